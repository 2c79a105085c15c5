#!/usr/bin/env bash
# The GPU checks and figures in one go (about 7 minutes on one H200):
#   1. the throughput benchmark on torchvision resnet18 at 224 px, batch 64 (every method, the CW layer
#      against the reference layer, CW on resnet18 at 112 px), bf16 autocast + channels_last, CUDA events;
#   2. the same on resnet50 for the methods whose trunk is the backbone, and resnet18 at batch 256 (at batch 64
#      an H200 waits for the host: see benchmarks/gpu_profile.txt);
#   3. tests/test_gpu.py (bf16 + channels_last training against CPU fp32 logits, torch.compile);
#   4. every method again with torch.compile;
#   5. a profile of the CW and ProtoPNet steps (benchmarks/profile_step.py): the operators that cost the most.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (default benchmarks/gpu). Each step has its own time limit, so
# one that hangs leaves the others' results.
set -u
out=${1:-${OUT:-benchmarks/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
py=${PYTHON:-python}
bench=(benchmarks/throughput.py --device cuda --image-size 224 --batch-size 64 --inner 4)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', pl.__version__)"
} 2>&1 | tee "$out/machine.txt"

echo "== 1. resnet18, 224 px" | tee "$out/log.txt"
timeout "${T_R18:-210}" $py "${bench[@]}" --backbone resnet18 --out "$out/throughput_results_gpu_resnet18.md" 2>&1 | tee -a "$out/log.txt"
echo "== 2. resnet50, 224 px" | tee -a "$out/log.txt"
timeout "${T_R50:-120}" $py "${bench[@]}" --backbone resnet50 --sections methods --methods baseline protopnet cw icnn \
  --out "$out/throughput_results_gpu_resnet50.md" 2>&1 | tee -a "$out/log.txt"
timeout "${T_R18_256:-90}" $py "${bench[@]}" --batch-size 256 --backbone resnet18 --sections methods \
  --methods baseline protopnet cw icnn --out "$out/throughput_results_gpu_resnet18_b256.md" 2>&1 | tee -a "$out/log.txt"
echo "== 3. tests/test_gpu.py" | tee -a "$out/log.txt"
timeout "${T_TEST:-200}" $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$out/test_gpu.txt" | tail -25 | tee -a "$out/log.txt"
echo "== 4. resnet18, 224 px, torch.compile" | tee -a "$out/log.txt"
timeout "${T_COMPILE:-150}" $py "${bench[@]}" --backbone resnet18 --sections methods --compile \
  --out "$out/throughput_results_gpu_resnet18_compile.md" 2>&1 | tee -a "$out/log.txt"
echo "== 5. profiles" | tee -a "$out/log.txt"
for m in concept_whitening protopnet; do
  timeout "${T_PROFILE:-60}" $py benchmarks/profile_step.py --model $m --backbone resnet18 --image-size 224 --batch-size 64 \
    --device cuda 2>&1 | grep -v -i "tip\|USDT" >> "$out/profile.txt"
done
tail -4 "$out/profile.txt" | tee -a "$out/log.txt"
echo "== done" | tee -a "$out/log.txt"
