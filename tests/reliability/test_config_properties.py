"""Config validation under random input: every config either builds or raises a ``ValueError`` that names the
field, never another exception type, through each way a config is made: Python keyword arguments, a JSON file
(``from_dict``, what ``--resume`` and ``from_pretrained`` read) and command-line overrides (``--set``,
``--train-set``, ``--data-set``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchformer import ModelConfig, MoEConfig
from switchformer.config import Config, ConfigError
from switchformer.data import DataConfig
from switchformer.training.config import TrainConfig

CONFIGS: list[type[Config]] = [ModelConfig, MoEConfig, TrainConfig, DataConfig]


def _fields(cls: type[Config]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


# -- typed values --------------------------------------------------------------------------------------------
INTS = st.one_of(st.integers(-3, 70), st.integers(-(2**31), 5000), st.sampled_from([0, 1, 2, 4, 64, 4096, 10**6]))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 2.0),
    st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 1.25, 3.0, math.inf, -math.inf, math.nan]),
)


def typed_value(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the field's declared type (and None where it is optional): what Python callers pass."""
    inner, optional = _optional(tp)
    if inner is bool:
        base: st.SearchStrategy[Any] = st.booleans()
    elif inner is int:
        base = INTS
    elif inner is float:
        base = FLOATS
    elif inner is str:
        base = st.one_of(st.text(max_size=12), st.sampled_from(["", "auto", "cpu", "cuda", "cuda:1", "mps", "gpu"]))
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        base = st.one_of(st.sampled_from([m.value for m in inner]), st.text(max_size=8))
    elif isinstance(inner, type) and issubclass(inner, Config):
        base = st.one_of(st.builds(inner), typed_kwargs(inner))  # nested configs also arrive as dicts
    elif typing.get_origin(inner) is tuple:
        base = st.lists(FLOATS, max_size=3).map(tuple)
    else:  # pragma: no cover - a new field type: teach this strategy about it
        raise NotImplementedError(f"no strategy for {tp}")
    return st.one_of(st.none(), base) if optional else base


@st.composite
def typed_kwargs(draw: st.DrawFn, cls: type[Config]) -> dict[str, Any]:
    hints = _fields(cls)
    names = draw(st.lists(st.sampled_from(sorted(hints)), unique=True, max_size=3))  # few: most builds succeed
    return {name: draw(typed_value(hints[name])) for name in names}


# -- arbitrary JSON ------------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def json_dicts(draw: st.DrawFn, cls: type[Config]) -> dict[str, Any]:
    """A config file's contents: known fields with typed or arbitrary JSON values, sometimes an unknown key."""
    hints = _fields(cls)
    names = draw(st.lists(st.sampled_from(sorted(hints)), unique=True, max_size=5))
    data = {name: draw(st.one_of(JSON_VALUES, typed_value(hints[name]).map(_plain))) for name in names}
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


# -- command-line overrides ----------------------------------------------------------------------------------
def _paths(cls: type[Config], prefix: str = "") -> list[str]:
    out = []
    for name, tp in _fields(cls).items():
        inner, _ = _optional(tp)
        out.append(prefix + name)
        if isinstance(inner, type) and issubclass(inner, Config):
            out += _paths(inner, f"{prefix}{name}.")
    return out


TYPED_TEXT = ["0", "-1", "1e400", "nan", "inf", "null", "true", "[0.9,", "[0.9, 0.99]", "[[1], 2]", '{"x": 1}',
              '{"top_k": "x"}', "1.5", "2", "cosine", "adafactor", "cuda:0"]  # fmt: skip
OVERRIDE_TEXT = st.one_of(st.text(max_size=10), st.sampled_from(TYPED_TEXT))


@st.composite
def overrides(draw: st.DrawFn, cls: type[Config]) -> list[str]:
    paths = st.one_of(st.sampled_from(_paths(cls)), st.text(min_size=1, max_size=6))
    items = st.tuples(paths, OVERRIDE_TEXT).map(lambda pair: f"{pair[0]}={pair[1]}")
    return draw(st.lists(items, min_size=1, max_size=3))


# -- the property --------------------------------------------------------------------------------------------
def _names_a_field(message: str) -> bool:
    """The message names a real field (``Owner.field=...``, ``override path=...``) or the unknown one."""
    for owner, field in re.findall(r"\b(\w+Config)\.(\w+)\b", message):
        cls = {c.__name__: c for c in CONFIGS}.get(owner)
        if cls is not None and field in _fields(cls):
            return True
    return bool(re.search(r"override [\w.]+=|has no field", message))


def _build_or_clear_error(make: Any) -> Config | None:
    try:
        return make()
    except ValueError as error:
        assert _names_a_field(str(error)), f"{type(error).__name__} does not name the field: {error}"
        return None


def _keyword_arguments(cls: type[Config], data: st.DataObject) -> None:
    kwargs = data.draw(typed_kwargs(cls))
    _build_or_clear_error(lambda: cls(**kwargs))


def _finite_numbers(cls: type[Config], data: st.DataObject) -> None:
    """``lr=inf`` or ``capacity_factor=inf`` must fail here, not as NaN losses or an OverflowError in forward."""
    kwargs = data.draw(typed_kwargs(cls))
    config = _build_or_clear_error(lambda: cls(**kwargs))
    if config is not None:
        bad = [(f"{type(c).__name__}.{f.name}", getattr(c, f.name)) for c in _configs_in(config)
               for f in dataclasses.fields(c) if isinstance(getattr(c, f.name), float)
               and not math.isfinite(getattr(c, f.name))]  # fmt: skip
        assert not bad, f"built with {bad}"


def _configs_in(config: Config) -> list[Config]:
    nested = [getattr(config, f.name) for f in dataclasses.fields(config)]
    return [config, *(c for n in nested if isinstance(n, Config) for c in _configs_in(n))]


def _config_file(cls: type[Config], data: st.DataObject) -> None:
    payload = json.loads(json.dumps(data.draw(json_dicts(cls))))  # exactly what reading the file gives back
    config = _build_or_clear_error(lambda: cls.from_dict(payload))
    if config is not None:  # and what builds survives its own round trip
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def _command_line(cls: type[Config], data: st.DataObject) -> None:
    items = data.draw(overrides(cls))
    _build_or_clear_error(lambda: cls().with_overrides(items))


def _property(check: Any, examples: int) -> Any:
    """A test running ``check`` on ``examples`` random inputs for each config class."""

    @pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
    @settings(max_examples=examples, deadline=None)
    @given(data=st.data())
    def test(cls: type[Config], data: st.DataObject) -> None:
        check(cls, data)

    test.__doc__ = check.__doc__
    return test


FAST, THOROUGH = 60, 2000  # examples per config class, default and slow runs
test_keyword_arguments_build_or_name_the_field = _property(_keyword_arguments, FAST)
test_a_config_that_builds_has_only_finite_numbers = _property(_finite_numbers, FAST)
test_a_config_file_builds_or_names_the_field = _property(_config_file, FAST)
test_command_line_overrides_build_or_name_the_field = _property(_command_line, FAST)
test_keyword_arguments_thoroughly = pytest.mark.slow(_property(_keyword_arguments, THOROUGH))
test_finite_numbers_thoroughly = pytest.mark.slow(_property(_finite_numbers, THOROUGH))
test_config_files_thoroughly = pytest.mark.slow(_property(_config_file, THOROUGH))
test_command_line_overrides_thoroughly = pytest.mark.slow(_property(_command_line, THOROUGH))


# Concrete inputs a person types or a hand-edited config file holds, each with the field the error must name.
BAD_INPUTS = [
    ("ModelConfig from a file", lambda: ModelConfig.from_dict({"d_model": "512"}), "ModelConfig.d_model"),
    ("ModelConfig moe not a table", lambda: ModelConfig(moe=5), "ModelConfig.moe"),
    ("TrainConfig betas=0.9", lambda: TrainConfig.from_dict({"betas": 0.9}), "TrainConfig.betas"),
    ("--train-set betas=[0.9,", lambda: TrainConfig().with_overrides(["betas=[0.9,"]), "betas"),
    ("--data-set sequence_length=", lambda: DataConfig().with_overrides(["sequence_length="]), "sequence_length"),
    ("--set moe.capacity_factor=inf", lambda: ModelConfig().with_overrides(["moe.capacity_factor=inf"]),
     "MoEConfig.capacity_factor"),
    ("--train-set lr=inf", lambda: TrainConfig().with_overrides(["lr=inf"]), "TrainConfig.lr"),
    ("--set d_model=null", lambda: ModelConfig().with_overrides(["d_model=null"]), "ModelConfig.d_model"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "field"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_typical_bad_inputs_are_refused_naming_the_field(make: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        make()
