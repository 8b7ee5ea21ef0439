#!/bin/bash
# The paper's recipe on a CUDA GPU, in under 10 minutes (issue 19, item 8). Run from the repository root:
#   tools/gpu_paper_check.sh OUT_DIR [DATA_DIR [WEIGHTS_DIR]]
# 1. the Kumar recipe (configs/train.json + configs/paper/kumar.json: ConvNeXt-S prompter with EMA, SAM ViT-B
#    segmentor, 20 focal + dice + IoU loss) trained by the bundle's own `training` command for STEPS iterations per
#    stage (default 200) on cuda:0, from the official weight files in WEIGHTS_DIR (sam_vit_b_01ec64.pth and timm's
#    convnext_small model.safetensors) or, without them, random weights in the same layouts
#    (scripts/stand_in_weights.py); DATA_DIR is a Kumar/MoNuSeg folder (<stem>.tif + <stem>.xml), default: 12
#    synthetic 512 px images in that layout. Records seconds per iteration and peak GPU memory per stage;
# 2. export and `evaluating` of the result on the held-out images with the paper's pipeline options;
# 3. the tests that train the paper configs, EMA, Tables 8/9 and the PanNuke folds (on CUDA where there is a GPU).
# Environment: STEPS (200), DEVICE (cuda:0; `cpu` to try the script itself on a CPU with STEPS=2).
set -uo pipefail
OUT=$(realpath -m "${1:?output folder}"); DATA=${2:-}; WEIGHTS=${3:-}
STEPS=${STEPS:-200}; DEVICE=${DEVICE:-cuda:0}; WORK=${WORK:-/tmp/gpu_paper}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, monai, segment_anything, timm; print('torch', torch.__version__, 'monai', monai.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
cd bundle

# the weights: the official files when given, else random ones in their layouts
if [ -n "$WEIGHTS" ] && [ -f "$WEIGHTS/sam_vit_b_01ec64.pth" ]; then
  SAM="$WEIGHTS/sam_vit_b_01ec64.pth"; BACKBONE=$(ls "$WEIGHTS"/model.safetensors "$WEIGHTS"/convnext_small*.pth 2>/dev/null | head -1)
  echo "weights: official files in $WEIGHTS"
else
  $PY -m scripts.stand_in_weights "$WORK/weights" > /dev/null || exit 1
  SAM="$WORK/weights/sam_vit_b.pth"; BACKBONE="$WORK/weights/model.safetensors"
  echo "weights: random, in the official layouts (no official files given)"
fi
if [ -z "$DATA" ]; then
  DATA="$WORK/kumar_synthetic"
  $PY -c "from scripts.data.synthetic import write_synthetic_dataset as w; w('$DATA', n_images=12, size=(512, 512), n_nuclei=(60, 90), num_classes=0, seed=0, dataset_format='monuseg')" || exit 1
  echo "data: 12 synthetic 512 px images in the MoNuSeg layout"
else
  DATA=$(realpath "$DATA"); echo "data: $DATA"
fi

# 1. training, with the GPU's memory sampled every 200 ms
MEM="$OUT/gpu_memory.csv"
(nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 > "$MEM" 2>/dev/null &
 echo $! > "$WORK/mem.pid")
START=$(date +%s)
timeout 200 $PY -m monai.bundle run training --config_file "['configs/train.json','configs/paper/kumar.json']" \
  --stage both --dataset_dir "$DATA" --output_dir "$WORK/run" --max_epochs 1 --epoch_length "$STEPS" \
  --val_interval 1 --num_workers 8 --device "$DEVICE" \
  --sam_checkpoint "$SAM" --backbone_weights "$BACKBONE" > "$OUT/train.log" 2>&1
echo "training exit $? after $(( $(date +%s) - START )) s ($STEPS iterations per stage)"
kill "$(cat "$WORK/mem.pid")" 2>/dev/null
$PY - "$OUT/train.log" "$MEM" <<'EOF'
"""Seconds per iteration of each stage (the ignite log's timestamps, read by the precision benchmark's parser) and
the peak GPU memory."""
import statistics, sys
sys.path.insert(0, "../benchmarks")
from bench_training_precision import iteration_seconds
log = open(sys.argv[1], errors="replace").read()
for stage in ("prompter", "segmentor"):
    seconds = iteration_seconds(log, stage, skip=5)
    if seconds:
        print(f"{stage}: {statistics.median(seconds):.3f} s per iteration (median of {len(seconds)}, the first 5 left out)")
try:
    used = [float(row.split(",")[1]) for row in open(sys.argv[2]) if row.count(",") == 1]
    print(f"peak GPU memory used: {max(used) / 1024:.1f} GiB" if used else "GPU memory: not sampled")
except (OSError, ValueError) as error:
    print("GPU memory: not sampled", error)
EOF
grep -E "Epoch\[[0-9]+\] Metrics|Error|error:" "$OUT/train.log" | cut -c1-220 | tail -8

# 2. export and held-out evaluation with the paper's pipeline options (Kumar: NMS 11 px, mask filter, no min area)
$PY -c "from scripts.pipeline.model_file import export_model as e; e('$WORK/run/prompter/best.pt', '$WORK/run/segmentor/best.pt', '$WORK/model.pt')" \
  && timeout 90 $PY -m monai.bundle run evaluating --config_file configs/evaluate.json --dataset_dir "$DATA" \
       --subset val --model_path "$WORK/model.pt" --output_dir "$WORK/eval" --device "$DEVICE" \
       --pipeline#nms_radius 11 --pipeline#mask_filter true --pipeline#min_area 0 > "$OUT/evaluate.log" 2>&1
echo "evaluating exit $?"; cp "$WORK/eval/metrics.json" "$OUT/" 2>/dev/null && $PY -c "import json, sys; m = json.load(open(sys.argv[1])); print({k: v for k, v in m.items() if not isinstance(v, (list, dict))})" "$OUT/metrics.json"
cd ..

# 3. the paper's tests (their trainings use cuda:0 where there is a GPU)
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_paper_configs.py tests/test_ema.py \
  tests/test_paper_tables.py tests/test_pannuke_folds.py > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/pytest.log" | tail -8
