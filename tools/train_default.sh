#!/bin/bash
# Train the default CPU model (configs/train_default.json) in the background: the prompter and the segmentor side
# by side, one thread each (two processes use a 2-core machine better than one process with two threads).
# Re-running it resumes both stages from bundle/runs/default/<stage>/last.pt. Logs: bundle/runs/default/*.log;
# curves: MLflow store bundle/runs/default/mlflow.db.
# Segmentor stage 2: `tools/train_default.sh s8` fine-tunes the segmentor with 8 px tokens and a 128 px decoding
# window (configs/train_default_s8.json), starting from stage 1's best checkpoint (runs/default/segmentor/best.pt;
# the shipped model's stage 1 was stopped at epoch 66 of 100, its best was epoch 58). `tools/train_default.sh s4`:
# stage 3, 4 px tokens and a 96 px window (configs/train_default_s4.json), from stage 2's best (30 epochs; the
# shipped segmentor is its best, epoch 16). Then export (0.3.0, with the resnet_small prompter):
#   cd bundle && python -c "from scripts.pipeline.model_file import export_model; export_model('runs/default/prompter/best.pt',
#       'runs/default/segmentor_s4/best.pt', 'models/model.pt', storage='float16')"
# Prompter stage 2 (tried, not shipped: no better on the held-out images): `tools/train_default.sh prompter_ft`
# continues the prompter from its best epoch for 20 more epochs (configs/train_default_prompter_ft.json: lr 1e-4,
# decayed at epoch 14) into runs/default/prompter_ft. `tools/train_default.sh prompter_r18`: the prompter with a
# torchvision ResNet-18 backbone from scratch (configs/train_default_prompter_r18.json, 60 epochs) into
# runs/default/prompter_r18: the prompter of 0.4.0 (its epoch 52) and 0.4.1 (its best, epoch 56).
# `tools/train_default.sh prompter_r18_aug`: the same ResNet-18 prompter from scratch for 120 epochs (lr x0.1 at 96)
# with scale (RandZoomd 0.8-1.25) and H&E stain (scripts/data/stain.py) augmentation
# (configs/train_default_prompter_r18_aug.json) into runs/default/prompter_r18_aug: the shipped prompter since 0.5.0
# (its best, epoch 102), in int8 storage:
#   cd bundle && python -c "from scripts.pipeline.model_file import export_model; export_model(
#       'runs/default/prompter_r18_aug/best.pt', 'runs/default/segmentor_s4/best.pt', 'models/model.pt',
#       storage='int8')"
# `tools/train_default.sh prompter_all`: the 0.5.0 prompter (read from models/model.pt into
# runs/default/prompter_050.pt) fine-tuned on all of ../shared/data (CoNSeP, the 13 + 17 MoNuSeg training images;
# each folder split 80/20 on its own, seed 0, so 0.5.0's validation images stay held out) for 16 epochs (lr x0.1 at 12) with the
# rare "Other" class weighted 3 (configs/train_default_prompter_all.json on top of
# train_default_prompter_r18_aug.json) into runs/default/prompter_all.
# `tools/train_default.sh segmentor_all`: the 0.5.0 segmentor (read from models/model.pt into
# runs/default/segmentor_050.pt) fine-tuned on all of ../shared/data (the same per-folder 80/20 split) for 12 epochs
# (lr 1e-4, x0.1 at 9; configs/train_default_segmentor_all.json) into runs/default/segmentor_all.
# `tools/train_default.sh prompter_r18_all`: the 0.5.0 prompter's recipe (prompter_r18_aug: ResNet-18 from random
# weights, 120 epochs, scale and stain augmentation) on all of ../shared/data (the same per-folder split), "Other"
# weighted 3, the weights averaged (EMA 0.99) and the forward pass in bfloat16 (from epoch 15 of the run behind it;
# configs/train_default_prompter_r18_all.json on top of train_default_prompter_r18_aug.json) into
# runs/default/prompter_r18_all. Against the shipped model on every source's held-out images, with the shipped
# segmentor: .venv/bin/python benchmarks/compare_models.py --prompter bundle/runs/default/prompter_r18_all/best.pt
# THREADS=2 tools/train_default.sh STAGE: torch threads per process (default 1; 2 when one stage runs alone).
set -euo pipefail
cd "$(dirname "$0")/../bundle"
mkdir -p runs/default
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} MLFLOW_DISABLE_TELEMETRY=true
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647  # glibc: keep freed memory (25-45 % faster here)
PY=${PY:-../.venv/bin/python}
# launch STAGE NAME [CONFIG ...]: one training in the background, configs/train_default_CONFIG.json (each, in order)
# on top of the default configs; log runs/default/NAME.log, MLflow run default-NAME (underscores as dashes).
launch() {
  local configs="'configs/train.json','configs/train_default.json'" stage=$1 name=$2 config
  shift 2
  for config in "$@"; do configs="$configs,'configs/train_default_$config.json'"; done
  nohup setsid nice -n 5 "$PY" -m monai.bundle run training --config_file "[$configs]" --stage "$stage" \
    --tracking mlflow --run_name "default-${name//_/-}" >> "runs/default/$name.log" 2>&1 &
  echo "$stage training in the background; log in bundle/runs/default/$name.log"
}
# shipped_part PART: the shipped model's PART (prompter or segmentor) as a checkpoint to start from,
# runs/default/PART_050.pt (kept once written)
shipped_part() {
  [ -f "runs/default/$1_050.pt" ] || "$PY" -c "import torch; from scripts.pipeline.model_file import \
read_model_file, part_state_dict; m = read_model_file('models/model.pt'); torch.save({'network': \
part_state_dict(m, '$1')}, 'runs/default/$1_050.pt')"
}
case "${1:-}" in
  "")
    launch prompter prompter
    sleep 45  # let the first process create the MLflow store
    launch segmentor segmentor ;;
  s8 | s4) launch segmentor "segmentor_$1" "$1" ;;  # segmentor stage 2 (8 px tokens) or 3 (4 px tokens)
  prompter_ft | prompter_r18 | prompter_r18_aug) launch prompter "$1" "$1" ;;  # prompter variants (see above)
  prompter_all)
    shipped_part prompter
    launch prompter "$1" prompter_r18_aug "$1" ;;  # the r18_aug recipe, fine-tuned from 0.5.0
  segmentor_all)
    shipped_part segmentor
    launch segmentor "$1" "$1" ;;
  prompter_r18_all) launch prompter "$1" prompter_r18_aug "$1" ;;  # the r18_aug recipe from scratch on all data
  *) echo "train_default.sh: unknown stage '$1' (none, s8, s4, prompter_ft, prompter_r18, prompter_r18_aug," \
          "prompter_all, segmentor_all or prompter_r18_all)" >&2
     exit 2 ;;
esac
