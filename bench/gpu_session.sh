#!/usr/bin/env bash
# One pass of every check that needs a CUDA GPU, sized for a ~9-minute lease on one GPU (CI has none).
# Writes logs to $OUT (default: ./gpu-out). Each part has its own time limit; one failing part stops no other.
#   1. bench/compare_sweep.py: ComparePlan variants at 3000 steps, 8 at once (float32, like the CPU runs)
#   2. bench/cuda_check.py: CUDA == CPU for the layer and models, bf16 autocast, transformers parity (alongside 1)
#   3. `switchformer train` on CUDA (bf16 autocast), 300 steps, once the GPU is free again
#   4. bench/bench_switch_layer.py on CUDA in bf16 against the dense FFN and the transformers layer
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

COMMON="--steps 3000 --seeds 0 --experts 8,32 --no-top2 --only dense-seed0,switch-8,switch-32 \
 --set device=cuda --set threads=1 --set checkpoint_every=1000"
timeout 330 python3 bench/compare_sweep.py --root /tmp/sweep --jobs 8 --common "$COMMON" \
  --variant "default:" \
  --variant "every-ffn:--set sparse_every=1" \
  --variant "lr1e-3:--set lr=1e-3" \
  --variant "every-ffn-lr1e-3:--set sparse_every=1 --set lr=1e-3" \
  --variant "cf2:--set capacity_factor=2.0" \
  --variant "bytes-seq256:--set vocab_size=512 --set sequence_length=256 --set batch_size=16" \
  --variant "dff1024:--set d_ff=1024" \
  --variant "warmup400:--set warmup_steps=400" \
  --at 500 1000 1500 2000 3000 > "$OUT/sweep.log" 2>&1 &
SWEEP=$!

timeout 150 python3 bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.log" | grep -E "^(ok|FAIL)|passed"

wait $SWEEP
echo "sweep exit $?"
python3 bench/compare_sweep.py --root /tmp/sweep --table-only --at 500 1000 1500 2000 3000 | tee "$OUT/sweep_table.md"
tar czf "$OUT/sweep.tgz" -C /tmp sweep --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  --exclude='data' 2>/dev/null

timeout 100 python3 -m switchformer train --device cuda --steps 300 --eval-every 100 --no-progress \
  --output /tmp/gpu-train > "$OUT/train.log" 2>&1
echo "train exit $?"
python3 bench/show_metrics.py /tmp/gpu-train

timeout 110 python3 bench/bench_switch_layer.py --device cuda --dtypes bfloat16 --experts 8 32 128 \
  --tokens 65536 --seq-len 1024 --d-model 768 --d-ff 3072 --modes cf1.0 dropless --repeats 20 --threads 4 \
  --compile off 2>&1 | tee "$OUT/bench_layer.log" | tail -14
