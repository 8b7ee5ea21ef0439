#!/bin/bash
# The GPU check behind docs/results/gpu.md, on a machine with a CUDA GPU and PyTorch; packages it lacks are
# installed from wheels in .whl/ when that folder exists. Run from the repository root:
#   tools/gpu_check.sh DATA_DIR OUT_DIR
# 1. the shipped model on the GPU: same nuclei as on the CPU, time per tile next to HoVer-Net (benchmarks/gpu_check.py);
# 2. the default training configs, two short epochs of each stage on the GPU (the bundle's own `training` command);
# 3. the tests that run the pipeline and the bundle's commands (the configs pick cuda:0 when there is one).
set -uo pipefail
DATA=$(realpath "${1:?data folder with consep_train}"); OUT=$(realpath "${2:?output folder}")
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, segment_anything, numpy; print('torch', torch.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__)"
timeout 200 python3 benchmarks/gpu_check.py --data "$DATA" --output "$OUT/gpu.md" 2>&1 | grep -v -i warn
cd bundle
START=$(date +%s)
timeout 150 python3 -m monai.bundle run training \
  --config_file "['configs/train.json','configs/train_default.json','configs/train_default_s4.json','configs/train_default_prompter_r18.json']" \
  --dataset_dir "['$DATA/consep_train']" --output_dir /tmp/gpu_train --stage both --max_epochs 2 \
  --segmentor#hparams#max_epochs 2 --segmentor#hparams#init_checkpoint '$None' --epoch_length 25 --val_interval 1 > "$OUT/train.log" 2>&1
echo "training exit $? after $(( $(date +%s) - START )) s"
grep -E "Epoch\[[0-9]+\] Metrics|Iter: (1|25)/25|Error" "$OUT/train.log" | cut -c1-220 | tail -16
cd ..
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_pipeline.py tests/test_inference.py \
  tests/test_training_synthetic.py > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/pytest.log" | tail -8
