"""``switchformer generate CHECKPOINT "text with <extra_id_0> spans"``: decode with greedy, beam or sampling."""

from __future__ import annotations

import argparse

import torch

from switchformer.interop import from_pretrained
from switchformer.interop.checkpoint_io import DTYPES, resolve_checkpoint_folder
from switchformer.models.generation import DecodingStrategy, GenerationConfig, generate


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="continue texts with a checkpoint (needs its tokenizer.json)")
    parser.add_argument("checkpoint", help="checkpoint folder (either format) or a Hub id")
    parser.add_argument("texts", nargs="+", help="inputs; T5 sentinels such as <extra_id_0> mark spans to fill")
    parser.add_argument("--strategy", choices=[s.value for s in DecodingStrategy], default="greedy")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights' precision (bf16: the routers stay float32)"
    )
    parser.add_argument(
        "--no-prepack",
        dest="prepack",
        action="store_false",
        help="decode with the stored weights (default on CPU: the decoder's weights packed for oneDNN first)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step with the weights frozen in (compiles first, then faster steps)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    folder = resolve_checkpoint_folder(args.checkpoint)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json to encode the texts with")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = from_pretrained(folder, dtype=DTYPES[args.dtype])
    config = GenerationConfig(
        strategy=args.strategy, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        length_penalty=args.length_penalty, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, prepack_weights=args.prepack, compile=args.compile,
    )  # fmt: skip
    pad = model.config.pad_token_id
    encoded = [tokenizer.encode(text).ids for text in args.texts]
    width = max(len(ids) for ids in encoded)
    left = not model.config.is_encoder_decoder  # decoder-only prompts are left-padded
    rows = [[pad] * (width - len(ids)) + ids if left else ids + [pad] * (width - len(ids)) for ids in encoded]
    masks = [[0] * (width - len(ids)) + [1] * len(ids) if left else [1] * len(ids) + [0] * (width - len(ids))
             for ids in encoded]  # fmt: skip
    out = generate(model, input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks), config=config)
    start = 1 if model.config.is_encoder_decoder else width
    for text, tokens, n in zip(args.texts, out.sequences.tolist(), out.num_generated.tolist(), strict=True):
        print(f"{text}\n  -> {tokenizer.decode(tokens[start : start + n], skip_special_tokens=False)}")
    return 0
