"""``switchformer convert SOURCE DESTINATION --to hf|switchformer``: rewrite a checkpoint in the other format."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from switchformer.interop import CheckpointFormat, copy_tokenizer_files, from_pretrained, save_pretrained
from switchformer.interop.checkpoint_io import resolve_checkpoint_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert a Hugging Face Switch checkpoint to switchformer's, or back")
    parser.add_argument("source", help="checkpoint folder (either format) or a Hub id such as google/switch-base-8")
    parser.add_argument("destination", help="folder to write (created if needed)")
    parser.add_argument("--to", choices=[f.value for f in CheckpointFormat], default="switchformer")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="precision of the written weights")
    parser.add_argument("--max-shard-mb", type=int, default=None, help="split weights into shards of this size")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = from_pretrained(args.source, dtype=DTYPES[args.dtype])
    shard = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    folder = save_pretrained(model, args.destination, format=args.to, max_shard_bytes=shard)
    copied = copy_tokenizer_files(resolve_checkpoint_folder(args.source), Path(folder))
    print(f"wrote a {args.to} checkpoint to {folder}" + (f" (with {', '.join(copied)})" if copied else ""))
    return 0
