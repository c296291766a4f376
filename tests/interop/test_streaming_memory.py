"""A multi-shard Hugging Face checkpoint of more than 2 GB (switch-base-8's shape, float32) loads in bf16 in a
fresh process whose resident memory grows by at most 1.2x the bf16 weights (``bench/bench_streaming_load.py``
reports the same figure with its load time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import switchformer

pytestmark = pytest.mark.slow

LOAD = """
import json, sys, torch, switchformer
def peak_rss():  # this process image's own peak (ru_maxrss would carry the parent's over fork and exec)
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
before = peak_rss()
model = switchformer.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
peak = peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"grown": peak - before, "weights": weights, "dtypes": dtypes}))
"""


def test_a_2_gb_checkpoint_loads_in_bf16_within_1_2x_its_bf16_weights(tmp_path):
    config = switchformer.get_preset("switch-base-8").with_overrides(
        ["moe.expert_capacity=64", "moe.grouping=sequence"]
    )
    with torch.no_grad():
        model = switchformer.build_model(config, seed=0)
    folder = switchformer.save_pretrained(model, tmp_path / "hf", format="hf", max_shard_bytes=300 * 2**20)
    del model
    shards = list(folder.glob("*.safetensors"))
    assert len(shards) > 1 and sum(f.stat().st_size for f in shards) > 2 * 2**30
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtypes"] == ["torch.bfloat16", "torch.float32"]  # routers stay float32
    assert result["grown"] <= 1.2 * result["weights"], result
