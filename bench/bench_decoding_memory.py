"""Resident memory of decoding with packed weights, then with compiled steps, on a published checkpoint's shape.

    python bench/bench_decoding_memory.py [--weights /tmp/genbench/sb8]

Loads the checkpoint ``bench_generation.py`` builds (google/switch-base-8's shape, random weights; built if the
folder holds none) and prints the process's resident set (``VmRSS``) after each step: loading; an eager
``generate`` (which packs the decoder's weights); ``generate(compile=True)`` at batch 4, then at batches 1 and 2
(each new set of shapes compiles again); ``model.train()``. Greedy, 64 prompt tokens, 32 new ones, float32.
glibc keeps freed memory in the process (``switchformer.host_memory``), so the resident set shows what was held,
not what is still in use.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

import harness
from bench_generation import SHAPE, build_weights
from switchformer import from_pretrained, generate


def resident_mib() -> float:
    gc.collect()
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("/tmp/genbench/sb8"))
    args = parser.parse_args()
    harness.configure(threads=2, huge_pages=True)
    model = from_pretrained(build_weights(args.weights)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    decoder = sum(p.numel() * p.element_size() for p in model.decoder.parameters()) / 2**20
    print(f"weights {weights:.0f} MiB (decoder {decoder:.0f} MiB)")
    print("| after | resident MiB |\n|---|---:|")
    print(f"| loading | {resident_mib():.0f} |")
    ids = torch.randint(2, SHAPE["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(0))
    generate(model, input_ids=ids, max_new_tokens=32)
    print(f"| eager generate, batch 4 (packed copies) | {resident_mib():.0f} |")
    for batch in (4, 1, 2):
        generate(model, input_ids=ids[:batch], max_new_tokens=32, compile=True)
        print(f"| generate(compile=True), batch {batch} | {resident_mib():.0f} |")
    model.train()
    print(f"| model.train() | {resident_mib():.0f} |")


if __name__ == "__main__":
    main()
