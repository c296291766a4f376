"""A published checkpoint's shape, switchformer against transformers: decoding, forward and a fine-tuning step.

    python bench/bench_generation.py                   # the whole table (about 20 minutes on 2 idle cores)
    python bench/bench_generation.py --quick           # greedy at batch 4 and the 4 x 64 forward only
    python bench/bench_generation.py --bf16 --profile  # also our bf16 weights, and where our decoding time goes

The model has google/switch-base-8's shape (d_model 768, d_ff 3072, 12 + 12 layers, 12 heads, 8 experts in every
other layer, ``expert_capacity`` 64 per sequence, vocabulary 32128, tied embeddings) with random weights built
locally, saved by ``transformers`` and loaded by both sides from that folder (ours with
``switchformer.from_pretrained``), so both compute with identical weights and the published routing semantics.
Decoding never stops at eos: both generate exactly ``--new-tokens`` tokens. The check column compares tokens
(generation), logits (forward) or the loss (fine-tuning step). The fine-tuning step is forward and backward of one
batch in training mode with dropout and router jitter off (``switchformer finetune``'s step without the
optimizer), under glibc settings that keep freed memory (``harness.KEEP_FREED_MEMORY``).

Each group of cases (decoding, forwards, the fine-tuning step) runs in a fresh process. Each case runs for both
libraries in the same rounds (``harness.interleaved_medians``), after waiting for the 1-minute load average to
fall below ``--quiet-load``. A decoding step's time is (generate ``N`` tokens - generate 1) / (N - 1). Its floor
is the bytes of weights the step must read over the memory bandwidth of a 1 GiB tensor copy (bytes read plus
bytes written): the decoder's weights without the cross-attention keys and values (computed once), of each Switch
layer only the experts that got a token (counted in our run), and the output layer. The read floor is the same
bytes over the rate of a sum over that tensor (reading alone, as a step reads its weights). The matmul floor is the same
bytes over the rate at which the matmul itself streams weights for as many rows as the step has: ``torch.mm`` on
the stored weights, or the product with packed copies for the columns that decode with them (``switchformer``, the
default; ``switchformer stored`` decodes with ``prepack_weights=False``). The decoding group also prints the first
call's time, which includes packing. ``--compiled`` adds a column that decodes with ``generate(compile=True)`` (its
first call, which compiles, printed apart). ``--compiled-floor`` adds the rate at which ``torch.compile`` with frozen
weights streams them (inductor's CPU GEMM template), a floor for a decoding step compiled whole.

The forward and fine-tuning cases also print their arithmetic: the matrix-product and attention FLOPs each side
does (``FlopCounterMode``) and each side's floor, its FLOPs over the best rate of ``torch.mm`` at the model's shapes
for the case's encoder rows (``floors``).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import floors
import harness
from harness import Column, markdown_table, ms, ratio
from switchformer import SwitchFFN, from_pretrained
from switchformer.layers.prepacked import prepack_applies
from switchformer.models.generation import GenerationConfig, generate

SHAPE = {
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_decoder_layers": 12,
    "num_heads": 12,
    "num_experts": 8,
    "num_sparse_encoder_layers": 6,
    "num_sparse_decoder_layers": 6,
    "expert_capacity": 64,
    "vocab_size": 32128,
    "dropout_rate": 0.0,
    "router_jitter_noise": 0.0,
    "decoder_start_token_id": 0,
}
TRANSFORMERS, OURS, OURS_BF16 = "transformers", "switchformer", "switchformer bf16"
OURS_STORED = "switchformer stored"  # decoding with the stored weights (prepack_weights=False), same model
OURS_COMPILED = "switchformer compiled"  # decoding with a compiled step (compile=True), same model
GROUPS = ("decoding", "forward", "finetune")


def parse_args(argv: list[str]):
    p = harness.argument_parser(__doc__, repeats=3)
    p.add_argument("--quick", action="store_true", help="greedy at batch 4 and the 4 x 64 forward only")
    p.add_argument(
        "--decoding",
        nargs="*",
        default=["greedy-1", "greedy-4", "beam-1", "beam-4"],
        help="STRATEGY-BATCH decoding cases (beam search keeps 4 beams)",
    )
    p.add_argument("--weights", type=Path, help="folder to keep the random checkpoint in (built if missing)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--forward", nargs="*", default=["4x64", "8x512", "2x2048"], help="BATCHxLENGTH encoder inputs")
    p.add_argument("--bf16", action="store_true", help="also decode with our bf16 weights (routers float32)")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also decode with generate(compile=True) (compiles once per case's shapes, about a minute each)",
    )
    p.add_argument("--quiet-load", type=float, default=0.5, help="wait for the 1-minute load to fall below this")
    p.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for quiet before measuring anyway")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning step")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--profile", action="store_true", help="print an op-level profile of our greedy decoding")
    p.add_argument(
        "--compiled-floor",
        action="store_true",
        help="also measure the rate of inductor's frozen-weight CPU GEMM (compiles for tens of seconds)",
    )
    p.add_argument("--group", choices=GROUPS, help="measure one group of cases in this process (see main)")
    args = p.parse_args(argv)
    if args.quick:
        args.decoding, args.forward, args.no_finetune = ["greedy-4"], ["4x64"], True
    return args


@dataclasses.dataclass
class Case:
    name: str
    tokens: int  # tokens the case processes: generated, or encoder plus decoder inputs
    runs: dict[str, Callable[[], object]]  # by library: TRANSFORMERS, OURS (and OURS_BF16)
    check: Callable[[], str]
    params: list[torch.Tensor] = dataclasses.field(default_factory=list)  # whose gradients a run produces
    decoding: str | None = None  # the case that generates one token with the same inputs (a decoding case)
    rows: int = 0  # a decoding case's rows per step: batch x beams
    encoder_tokens: int = 0  # a forward or fine-tuning case's encoder rows: the M of its largest products


def build_weights(folder: Path) -> Path:
    """A random checkpoint with the published shape, written by transformers (kept if already there)."""
    import transformers

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(**SHAPE))
        model.save_pretrained(folder)
    return folder


def inputs(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, SHAPE["vocab_size"], (batch, length), generator=g)
    return ids, torch.ones_like(ids)


def generation_cases(hf, ours: dict[str, torch.nn.Module], batch: int, beams: int, args) -> list[Case]:
    """``generate`` with ``--new-tokens`` tokens, and with one (the encoder and the first step)."""
    ids, mask = inputs(batch, args.prompt_len)
    strategy = "beam" if beams > 1 else "greedy"
    name = f"{strategy}{f' {beams} beams' if beams > 1 else ''}, batch {batch}"

    def runs(new: int) -> dict[str, Callable[[], torch.Tensor]]:
        config = GenerationConfig(strategy=strategy, num_beams=beams, max_new_tokens=new, eos_token_id=-1)

        def run_hf() -> torch.Tensor:
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_beams=beams, do_sample=False)

        def run_ours(label: str, model: torch.nn.Module) -> Callable[[], torch.Tensor]:
            chosen = config.replace(prepack_weights=label != OURS_STORED, compile=label == OURS_COMPILED)
            return lambda: generate(model, input_ids=ids, attention_mask=mask, config=chosen).sequences

        return {TRANSFORMERS: run_hf} | {label: run_ours(label, model) for label, model in ours.items()}

    full = runs(args.new_tokens)

    def check() -> str:
        expected = full[TRANSFORMERS]()
        differ = [label for label in ours if not torch.equal(full[label](), expected)]
        return f"tokens differ: {', '.join(differ)}" if differ else "same tokens"

    first = Case(f"{name}, first token", batch, runs(1), lambda: "-")
    return [Case(name, batch * args.new_tokens, full, check, decoding=first.name, rows=batch * beams), first]


def forward_case(hf, ours: torch.nn.Module, batch: int, length: int, decoder_len: int = 16) -> Case:
    ids, mask = inputs(batch, length)
    dec = inputs(batch, decoder_len, seed=1)[0]

    @torch.no_grad()
    def run_hf() -> torch.Tensor:
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits

    @torch.no_grad()
    def run_ours() -> torch.Tensor:
        return ours(ids, attention_mask=mask, decoder_input_ids=dec).logits

    def check() -> str:
        return f"logits {harness.largest_relative_difference([run_ours()], [run_hf()]):.1e}"

    name = f"forward {batch} x {length} (+{decoder_len})"
    runs = {TRANSFORMERS: run_hf, OURS: run_ours}
    return Case(name, batch * (length + decoder_len), runs, check, encoder_tokens=batch * length)


def finetune_case(hf, ours: torch.nn.Module, batch: int = 4, length: int = 256, target: int = 32) -> Case:
    """Forward and backward of one fine-tuning batch in training mode; the models return to eval mode after.

    Each side backpropagates its own loss (token cross-entropy plus its own auxiliary router losses, defined
    differently); the check compares the token cross-entropy of the two sides' logits."""
    ids, mask = inputs(batch, length)
    labels = inputs(batch, target, seed=2)[0]
    token_losses: dict[str, float] = {}

    def step(label: str, model: torch.nn.Module, forward: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            model.train()
            out = forward()
            out.loss.backward()
            logits = out.logits.detach().float()
            token_losses[label] = float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
            model.eval()

        return run

    runs = {
        TRANSFORMERS: step(TRANSFORMERS, hf, lambda: hf(input_ids=ids, attention_mask=mask, labels=labels)),
        OURS: step(OURS, ours, lambda: ours(ids, attention_mask=mask, labels=labels)),
    }

    params = [*hf.parameters(), *ours.parameters()]

    def check() -> str:
        for label in (TRANSFORMERS, OURS):
            runs[label]()
            drop_grads(params)  # one model's gradients at a time: each is as large as the model
        difference = abs(token_losses[OURS] - token_losses[TRANSFORMERS]) / token_losses[TRANSFORMERS]
        return f"token loss {difference:.1e}"

    name = f"fine-tuning step {batch} x {length} -> {target}"
    return Case(name, batch * (length + target), runs, check, params, encoder_tokens=batch * length)


def drop_grads(params: list[torch.Tensor]) -> None:
    """Set the gradients of ``params`` to ``None``, as ``zero_grad()`` does before a step."""
    for p in params:
        p.grad = None


def experts_hit(model: torch.nn.Module, run: Callable[[], object]) -> float:
    """Distinct experts that got a kept token per decoder Switch layer call, on average over ``run``."""
    counts: list[int] = []

    def record(module, args, out) -> None:
        counts.append(int(out.routing.expert_index[out.routing.keep].unique().numel()))

    layers = [m for n, m in model.named_modules() if isinstance(m, SwitchFFN) and n.startswith("decoder.")]
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return statistics.mean(counts)


def step_bytes(model: torch.nn.Module, hit_per_layer: float) -> float:
    """Weight bytes one decoding step reads: the decoder but its cross-attention keys and values, ``hit_per_layer``
    experts of each Switch layer, and the output layer (the tied embedding, or the head)."""
    total = per_expert = 0.0
    for name, param in model.decoder.named_parameters():
        if ".experts." in name:
            per_expert += param[0].numel() * param.element_size()
        elif ".cross_attn.k." not in name and ".cross_attn.v." not in name:
            total += param.numel() * param.element_size()
    head = model.lm_head.weight if model.lm_head is not None else model.shared.weight
    return total + head.numel() * head.element_size() + hit_per_layer * per_expert


def main(argv: list[str]) -> None:
    """Each group of cases (decoding, forwards, the fine-tuning step) runs in a fresh process, one after the other,
    from one weights folder: the groups' memory never adds up (a fine-tuning step holds a model's gradients, and
    glibc is told to keep freed memory, see ``harness.configure``)."""
    args = parse_args(argv)
    if args.group is None:
        asked = {"decoding": args.decoding, "forward": args.forward, "finetune": not args.no_finetune}
        with tempfile.TemporaryDirectory() as scratch:
            folder = build_weights(args.weights or Path(scratch))
            for group in (g for g in GROUPS if asked[g]):
                command = [sys.executable, sys.argv[0], *argv, "--weights", str(folder), "--group", group]
                subprocess.run(command, check=True)
        return
    harness.configure(threads=args.threads, huge_pages=True)
    import transformers

    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(args.weights).eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens tokens, as ours with eos_token_id=-1
    ours = {OURS: from_pretrained(args.weights)}
    if args.group == "decoding":
        ours[OURS_STORED] = ours[OURS]
        if args.compiled:
            ours[OURS_COMPILED] = ours[OURS]
        if args.bf16:
            ours[OURS_BF16] = from_pretrained(args.weights, dtype=torch.bfloat16)

    cases: list[Case] = []
    if args.group == "decoding":
        for spec in args.decoding:
            strategy, batch = spec.split("-")
            cases += generation_cases(hf, ours, int(batch), 4 if strategy == "beam" else 1, args)
    elif args.group == "forward":
        for spec in args.forward:
            batch, length = (int(v) for v in spec.split("x"))
            cases.append(forward_case(hf, ours[OURS], batch, length))
    else:
        cases.append(finetune_case(hf, ours[OURS]))

    if args.group == "decoding":  # the first call packs the decoder's weights: its cost, once
        first = cases[0].runs
        start = time.perf_counter()
        first[OURS]()
        packing = time.perf_counter() - start
        start = time.perf_counter()
        first[OURS]()
        second = time.perf_counter() - start
        print(f"{cases[0].name}, {OURS}: first call {packing * 1e3:.0f} ms (packing the decoder's weights), ", end="")
        print(f"second {second * 1e3:.0f} ms")
        if OURS_COMPILED in first:
            start = time.perf_counter()
            first[OURS_COMPILED]()
            compiling = time.perf_counter() - start
            print(f"{cases[0].name}, {OURS_COMPILED}: first call {compiling:.1f} s (compiling the step for its shapes)")
    checks = {case.name: case.check() for case in cases}
    flops = {}
    for case in cases:
        if case.encoder_tokens:
            for label, run in case.runs.items():
                flops[case.name, label] = floors.counted_flops(run)
                drop_grads(case.params)
    hits = {case.name: experts_hit(ours[OURS], case.runs[OURS]) for case in cases if case.decoding}
    memory = {}
    if not args.no_memory:
        for case in cases:
            for label, run in case.runs.items():
                memory[case.name, label] = harness.peak_activation_bytes(run, case.params)
    load = harness.wait_until_quiet(args.quiet_load, args.max_wait)
    bandwidth, read_bandwidth = floors.memory_bandwidth()
    print(harness.machine_summary())
    print(
        f"1-minute load when the timing started: {load:.2f}; copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"read bandwidth {read_bandwidth / 1e9:.1f} GB/s"
    )

    times: dict[tuple[str, str], float] = {}
    for case in cases:
        before_each = functools.partial(drop_grads, case.params)
        medians = harness.interleaved_medians(case.runs, repeats=args.repeats, before_each=before_each)
        drop_grads(case.params)
        times |= {(case.name, label): seconds for label, seconds in medians.items()}
    print_cases(args, cases, times, memory, checks, list(ours))
    if flops:
        gemm_rates = {c.name: floors.gemm_rate(model_gemm_shapes(c.encoder_tokens)) for c in cases if c.encoder_tokens}
        print_arithmetic(cases, times, flops, gemm_rates)
    if hits:
        kinds = {(next(model.decoder.parameters()).dtype, _packs(label, model)) for label, model in ours.items()}
        streams = {(c.rows, *kind): floors.matmul_bandwidth(c.rows, *kind) for c in cases if c.rows for kind in kinds}
        print_decoding_steps(args, cases, times, hits, ours, (bandwidth, read_bandwidth), streams)
        if args.compiled_floor:
            compiled = {c.rows: floors.compiled_matmul_bandwidth(c.rows) for c in cases if c.rows}
            print_compiled_floor(cases, times, hits, ours[OURS], args.new_tokens, compiled)
        if args.profile:
            profile_decoding(next(case for case in cases if case.decoding is not None))


def print_cases(args, cases: list[Case], times, memory, checks, ours: list[str]) -> None:
    labels = [TRANSFORMERS, *ours]
    columns = [Column("case"), *(Column(f"{label} ms", ms) for label in labels)]
    columns += [Column(f"speedup{label.removeprefix(OURS)}", ratio) for label in ours]
    columns += [Column(f"{label} tokens/s", lambda v: "-" if v is None else f"{v:.0f}") for label in labels]
    if memory:
        columns += [Column(f"{label} peak MiB", lambda v: "-" if v is None else f"{v / 2**20:.0f}") for label in labels]
    rows = []
    for case in cases:
        seconds = [times.get((case.name, label)) for label in labels]
        speedups = [None if s is None else seconds[0] / s for s in seconds[1:]]
        rates = [None if s is None else case.tokens / s for s in seconds]
        peaks = [memory.get((case.name, label)) for label in labels] if memory else []
        rows.append([case.name, *seconds, *speedups, *rates, *peaks, checks[case.name]])
    print(f"\nmedians of {args.repeats} rounds; speedup = transformers' time / ours")
    print(markdown_table([*columns, Column("check")], rows))


def _packs(label: str, model: torch.nn.Module) -> bool:
    """Whether that column decodes with packed weights (``generate``'s default where oneDNN takes them)."""
    return label != OURS_STORED and prepack_applies(next(model.decoder.parameters()))


def print_decoding_steps(args, cases: list[Case], times, hits, ours: dict[str, torch.nn.Module], bandwidths, streams):
    """A decoding step's time beside its floors: the weight bytes it reads over the copy bandwidth, over the read
    bandwidth, and over the bandwidth at which the matmul library streams weights for as many rows
    (``floors.matmul_bandwidth``)."""
    bandwidth, read_bandwidth = bandwidths
    labels = [TRANSFORMERS, *ours]
    columns = [Column("case"), Column("experts hit a layer", lambda v: f"{v:.2f}")]
    columns += [Column(f"{label} ms / step", ms) for label in labels]
    for label in ours:
        columns += [Column(f"{label} MB / step", lambda v: f"{v / 1e6:.0f}"), Column(f"{label} floor ms", ms)]
        columns += [Column(f"{label} / floor", ratio), Column(f"{label} / read floor", ratio)]
        columns += [Column(f"{label} / matmul floor", ratio)]
    rows = []
    for case in cases:
        if case.decoding is None:
            continue
        steps = [(times[case.name, lab] - times[case.decoding, lab]) / (args.new_tokens - 1) for lab in labels]
        row = [case.name, hits[case.name], *steps]
        for (label, model), step in zip(ours.items(), steps[1:], strict=True):
            nbytes = step_bytes(model, hits[case.name])
            stream = streams[case.rows, next(model.decoder.parameters()).dtype, _packs(label, model)]
            row += [nbytes, nbytes / bandwidth, step * bandwidth / nbytes, step * read_bandwidth / nbytes]
            row += [step * stream / nbytes]
        rows.append(row)
    rates = ", ".join(
        f"{n} rows {dtype}{' packed' if packed else ''}: {value / 1e9:.1f} GB/s"
        for (n, dtype, packed), value in streams.items()
    )
    print(
        f"\ndecoding step = (time of {args.new_tokens} tokens - time of 1) / {args.new_tokens - 1}; floor = weight "
        f"bytes a step reads / {bandwidth / 1e9:.1f} GB/s (copy); read floor = the same bytes / "
        f"{read_bandwidth / 1e9:.1f} GB/s (a sum's read rate); matmul floor = the same bytes / the rate at which "
        f"the matmul streams 768 x 3072 weights for the step's rows, stored or packed as that column decodes ({rates})"
    )
    print(markdown_table(columns, rows))


def model_gemm_shapes(rows: int) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` of the model's products for ``rows`` rows: attention projections and the two FFN matrices."""
    d_model, d_ff, inner = SHAPE["d_model"], SHAPE["d_ff"], SHAPE["num_heads"] * SHAPE["d_kv"]
    return [(rows, d_model, inner), (rows, d_model, d_ff), (rows, d_ff, d_model)]


def print_arithmetic(cases: list[Case], times, flops, gemm_rates: dict[str, float]) -> None:
    """Each side's counted floating-point operations and rate, beside its arithmetic floor: those operations over
    the best ``torch.mm`` rate measured at the case's own shapes (``gemm_rates``, from ``floors.gemm_rate``)."""
    labels = [TRANSFORMERS, OURS]
    columns = [Column("case"), *(Column(f"{label} GFLOP", lambda v: f"{v / 1e9:.1f}") for label in labels)]
    columns += [Column(f"{label} GFLOP/s", lambda v: f"{v / 1e9:.0f}") for label in labels]
    columns += [Column("mm GFLOP/s", lambda v: f"{v / 1e9:.0f}")]
    columns += [Column(f"{label} floor ms", ms) for label in labels]
    columns += [Column(f"{label} / its floor", ratio) for label in labels]
    rows = []
    for case in cases:
        if not case.encoder_tokens:
            continue
        counts = [flops[case.name, label] for label in labels]
        seconds = [times[case.name, label] for label in labels]
        rate = gemm_rates[case.name]
        floor = [count / rate for count in counts]
        rows.append(
            [case.name, *counts, *(c / t for c, t in zip(counts, seconds, strict=True)), rate, *floor]
            + [t / f for t, f in zip(seconds, floor, strict=True)]
        )
    print(
        "\narithmetic: matrix-product and attention FLOPs (FlopCounterMode); a side's floor = its FLOPs / the best "
        "torch.mm rate at the case's shapes (encoder rows x 768 x 768, x 768 x 3072, x 3072 x 768, float32)"
    )
    print(markdown_table(columns, rows))


def print_compiled_floor(cases: list[Case], times, hits, model: torch.nn.Module, new_tokens: int, compiled) -> None:
    """Our decoding step beside the time its weight bytes take at the rate of inductor's frozen-weight GEMM
    (``compiled``: bytes per second by rows, from ``floors.compiled_matmul_bandwidth``)."""
    columns = [Column("case"), Column(f"{OURS} ms / step", ms), Column("compiled GB/s", lambda v: f"{v / 1e9:.1f}")]
    columns += [Column("compiled matmul floor ms", ms), Column(f"{OURS} / compiled matmul floor", ratio)]
    rows = []
    for case in cases:
        if case.decoding is None:
            continue
        step = (times[case.name, OURS] - times[case.decoding, OURS]) / (new_tokens - 1)
        rate = compiled[case.rows]
        floor = step_bytes(model, hits[case.name]) / rate
        rows.append([case.name, step, rate, floor, step / floor])
    print(
        "\ncompiled matmul floor = the step's weight bytes / the rate at which torch.compile with frozen weights and "
        "inductor's CPU GEMM template streams 768 x 3072 float32 weights for the step's rows"
    )
    print(markdown_table(columns, rows))


def profile_decoding(case: Case) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        case.runs[OURS]()
    print(f"\nprofile of our {case.name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main(sys.argv[1:])
