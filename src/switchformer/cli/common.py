"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from switchformer.config import ConfigError
from switchformer.models.config import ModelConfig
from switchformer.parallel.mesh import ParallelDims
from switchformer.presets import get_preset, preset_names
from switchformer.training.strategy import DistributedStrategy


def add_model_arguments(parser: argparse.ArgumentParser, *, default_preset: str | None = None) -> None:
    parser.add_argument(
        "--preset",
        default=default_preset,
        help=f"named model config ({', '.join(preset_names())})",
    )
    add_override_argument(
        parser,
        "--set",
        "overrides",
        "override any model config field, e.g. --set moe.capacity_factor=1.0 --set d_model=512 (repeatable); "
        "moe.priority=confidence is not causal in decoders with a capacity, and capacity makes cached decoding "
        "differ from a full forward when tokens are dropped (docs/routing-caveats.md)",
    )


def add_override_argument(group: argparse._ActionsContainer, flag: str, dest: str, help_text: str) -> None:
    """A repeatable ``FLAG FIELD=VALUE`` option, collected as a list of strings in ``dest`` (``Config.with_overrides``
    parses them)."""
    group.add_argument(flag, dest=dest, action="append", default=[], metavar="FIELD=VALUE", help=help_text)


def given_fields(args: argparse.Namespace, fields: Iterable[str]) -> dict[str, Any]:
    """The values of the options named like config ``fields`` that the command line set (those not None)."""
    return {name: getattr(args, name) for name in fields if getattr(args, name) is not None}


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


# TrainConfig fields that train and finetune set from the option of the same name (--warmup-steps: warmup_steps)
TRAIN_FIELDS = ("steps", "lr", "optimizer", "schedule", "warmup_steps", "micro_batches", "precision", "device")
INTERVAL_FIELDS = ("eval_every", "log_every", "checkpoint_every")
STEP_FIELDS = ("activation_checkpointing", "compile")  # set by add_step_arguments' options


def add_step_arguments(group: argparse._ActionsContainer) -> None:
    """How each training step runs, without changing what it computes: memory and compilation."""
    group.add_argument(
        "--activation-checkpointing",
        type=int,
        metavar="N",
        help="recompute every N-th block's activations in the backward pass (1 = every block): less memory, "
        "about one more forward pass of compute",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        type=compile_backend,
        help="torch.compile each transformer block for training (default backend: inductor; on CPU it needs a C++ "
        "compiler); evaluation and decoding stay eager",
    )


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


def add_parallel_arguments(group: argparse._ActionsContainer) -> None:
    """``--dp-shard``, ``--dp-replicate``, ``--expert-parallel``: the layout of a torchrun launch."""
    group.add_argument(
        "--dp-shard",
        type=int,
        metavar="N",
        help="FSDP2 shard degree: each expert slice is sharded over N ranks and dense weights over N x "
        "expert-parallel ranks (default: whatever the world size leaves; -1 says so explicitly)",
    )
    group.add_argument(
        "--dp-replicate", type=int, default=1, metavar="N", help="replicas of the sharded model (HSDP, e.g. nodes)"
    )
    group.add_argument(
        "--expert-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each Switch layer's experts over N ranks (-1: whatever the world size leaves); "
        "world size = dp-replicate x dp-shard x expert-parallel; launch with torchrun",
    )


def parallel_dims(args: argparse.Namespace) -> ParallelDims:
    """The layout the flags ask for; ``--dp-shard`` fills the world unless another degree is -1."""
    shard = args.dp_shard
    if shard is None:
        shard = 1 if -1 in (args.dp_replicate, args.expert_parallel) else -1
    return ParallelDims(dp_replicate=args.dp_replicate, dp_shard=shard, expert_parallel=args.expert_parallel)


def require_output_under_torchrun(output: object) -> None:
    """Every rank must write into the same folder, so a torchrun launch cannot use a timestamped default."""
    if output is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a torchrun launch needs --output RUN_DIR, the same folder on every rank")


@contextmanager
def torchrun_job(command: str, dims: ParallelDims | None = None) -> Iterator[DistributedStrategy | None]:
    """Join the torchrun job this process was launched in (``None`` when it runs alone) and leave it at the end.

    A layout that does not fit the world size is refused before any work, and one that needs several processes
    outside torchrun is an error that says how to launch. Only rank 0 logs below warnings: one rank speaks.
    """
    dims = dims or ParallelDims()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        dims.resolve(world)
    except ConfigError as error:
        if world > 1:
            raise
        ranks = max(dims.dp_replicate, 1) * max(dims.dp_shard, 1) * max(dims.expert_parallel, 1)
        raise ValueError(
            f"{error}. This layout needs several processes: launch with `torchrun --nproc-per-node {ranks} "
            f"-m switchformer {command} ...`"
        ) from None
    if world == 1:
        yield None
        return
    from switchformer.parallel import close_parallel, init_parallel
    from switchformer.parallel.collectives import job_collectives

    layout = init_parallel(dims, command=command)
    if layout.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        with job_collectives(f"the {command} job"):
            yield DistributedStrategy(layout)
    finally:
        close_parallel()
