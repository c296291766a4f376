"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from switchformer.models.config import ModelConfig
from switchformer.presets import get_preset, preset_names


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
        help="override any model config field, e.g. --set moe.capacity_factor=1.0 --set d_model=512 (repeatable)",
    )


def model_config_from_args(preset: str, overrides: list[str]) -> ModelConfig:
    return get_preset(preset).with_overrides(overrides)


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
