"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from switchformer.models.config import ModelConfig
from switchformer.presets import get_preset, preset_names
from switchformer.training.strategy import DistributedStrategy


def add_model_arguments(parser: argparse.ArgumentParser, *, default_preset: str | None = None) -> None:
    parser.add_argument(
        "--preset",
        default=default_preset,
        help=f"named model config ({', '.join(preset_names())})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any model config field, e.g. --set moe.capacity_factor=1.0 --set d_model=512 (repeatable); "
        "moe.priority=confidence is not causal in decoders with a capacity, and capacity makes cached decoding "
        "differ from a full forward when tokens are dropped (docs/routing-caveats.md)",
    )


def model_config_from_args(preset: str, overrides: list[str]) -> ModelConfig:
    return get_preset(preset).with_overrides(overrides)


def switch_layer_rows(config: ModelConfig) -> list[tuple[str, str]]:
    """One ``(label, "k of n: indices")`` row per stack: where the Switch layers are."""
    rows = []
    for stack in config.stacks:
        layers = config.switch_layers(stack)
        where = ", ".join(map(str, layers)) if layers else "none (dense)"
        rows.append((f"Switch layers ({stack.value})", f"{len(layers)} of {config.stack_layers(stack)}: {where}"))
    return rows


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """Two-column table on the terminal (the CLI owns printing; the library only logs)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def add_step_arguments(group: argparse._ActionsContainer) -> None:
    """How each training step runs, without changing what it computes: memory and compilation."""
    group.add_argument("--activation-checkpointing", type=int, metavar="N",
                       help="recompute every N-th block's activations in the backward pass (1 = every block): "
                       "less memory, about one more forward pass of compute")  # fmt: skip
    group.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", type=compile_backend,
                       help="torch.compile each transformer block for training (default backend: inductor; on CPU "
                       "it needs a C++ compiler); evaluation and decoding stay eager")  # fmt: skip


def compile_backend(name: str) -> str:
    """``--compile``'s value, checked while parsing: its value is optional, so it takes a positional argument
    written right after it (``finetune --compile runs/x``), and the error should say so, not "missing checkpoint"."""
    import torch._dynamo

    available = sorted(torch._dynamo.list_backends(exclude_tags=()))
    if name not in available:
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {name!r} (choose one of {', '.join(available)}); --compile takes an "
            "optional backend, so write positional arguments before it or give the backend as --compile=BACKEND"
        )
    return name


def add_expert_parallel_argument(group: argparse._ActionsContainer) -> None:
    group.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                       help="shard each Switch layer's experts over N ranks; launch with torchrun "
                       "(the other world_size/N factor is data parallelism)")  # fmt: skip


def require_output_under_torchrun(output: object) -> None:
    """Every rank must write into the same folder, so a torchrun launch cannot use a timestamped default."""
    if output is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a torchrun launch needs --output RUN_DIR, the same folder on every rank")


@contextmanager
def torchrun_job(command: str, expert_parallel: int = 1) -> Iterator[DistributedStrategy | None]:
    """Join the torchrun job this process was launched in (``None`` when it runs alone) and leave it at the end.

    Expert parallelism needs several processes, so asking for it outside torchrun is an error that says how to
    launch. Only rank 0 logs below warnings: one rank speaks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and expert_parallel == 1:
        yield None
        return
    if "RANK" not in os.environ:
        raise ValueError(
            f"--expert-parallel {expert_parallel} needs several processes: launch with `torchrun --nproc-per-node "
            f"{expert_parallel} -m switchformer {command} --expert-parallel {expert_parallel} ...`"
        )
    from switchformer.parallel import close_parallel, init_parallel

    layout = init_parallel(expert_parallel, command=command)
    if layout.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield DistributedStrategy(layout)
    finally:
        close_parallel()
