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
