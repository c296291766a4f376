"""Peak memory of loading a large Hugging Face Switch checkpoint in bf16, against the size of its bf16 weights.

    python bench/bench_streaming_load.py [--preset switch-base-8] [--folder /tmp/sb8-hf] [--shard-mb 300]

Builds (once, if ``--folder`` holds none) a synthetic multi-shard Hugging Face checkpoint of the preset's shape
with random float32 weights, then, in a fresh process each, loads it with ``from_pretrained(dtype=torch.bfloat16)``
and reports the process's peak resident memory above what it held before the load (torch and switchformer
imported), against the bf16 weights' bytes. The default, switch-base-8 (619M parameters), writes 2.5 GB of float32
safetensors in 300 MB shards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LOAD = """
import json, sys, time, torch
import switchformer
def peak_rss():  # this process image's own peak (ru_maxrss would carry the parent's over fork and exec)
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
before = peak_rss()
started = time.perf_counter()
model = switchformer.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
seconds = time.perf_counter() - started
peak = peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights, "seconds": seconds}))
"""


def write_checkpoint(preset: str, folder: Path, shard_mb: int) -> None:
    import torch

    import switchformer

    config = switchformer.get_preset(preset).with_overrides(["moe.expert_capacity=64", "moe.grouping=sequence"])
    with torch.no_grad():
        model = switchformer.build_model(config, seed=0)
    switchformer.save_pretrained(model, folder, format="hf", max_shard_bytes=shard_mb * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="switch-base-8")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/switchformer-bench-hf"))
    parser.add_argument("--shard-mb", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (args.folder / "config.json").is_file():
        started = time.perf_counter()
        write_checkpoint(args.preset, args.folder, args.shard_mb)
        print(f"# wrote {args.folder} in {time.perf_counter() - started:.0f} s")
    files = sorted(args.folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"# {args.preset}: {len(files)} safetensors shards, {size / 2**30:.2f} GiB on disk (float32)")
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", LOAD, str(args.folder)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        load = r["peak"] - r["before"]
        print(
            f"bf16 weights {r['weights'] / 2**30:.2f} GiB; peak resident memory {r['peak'] / 2**30:.2f} GiB "
            f"({r['before'] / 2**30:.2f} GiB before the load): the load took {load / 2**30:.2f} GiB = "
            f"{load / r['weights']:.2f}x the bf16 weights, in {r['seconds']:.1f} s"
        )
    print(f"# this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak")


if __name__ == "__main__":
    main()
