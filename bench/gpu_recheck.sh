#!/usr/bin/env bash
# The short follow-up to gpu_session.sh: CUDA checks, a bf16 training run, and where the layer's GPU time goes.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1
timeout 90 python3 bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.log" | grep -E "^(ok|FAIL)|passed"
timeout 100 python3 -m switchformer train --device cuda --steps 300 --eval-every 100 --no-progress \
  --output /tmp/gpu-train > "$OUT/train.log" 2>&1
echo "train exit $?"; grep -E "failed|Error" "$OUT/train.log" | head -3
python3 bench/show_metrics.py /tmp/gpu-train
timeout 60 python3 bench/bench_switch_layer.py --device cuda --dtypes bfloat16 --experts 32 --tokens 65536 \
  --seq-len 1024 --d-model 768 --d-ff 3072 --modes cf1.0 --repeats 10 --threads 4 --compile off --no-hf \
  --no-memory --passes fwd+bwd --profile > "$OUT/profile.log" 2>&1
grep -A26 "profile of" "$OUT/profile.log" | cut -c1-60,100-200
