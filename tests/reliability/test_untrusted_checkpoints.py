"""Damaged, crafted and mismatched checkpoints: detected by the manifest's checksums or refused by the readers,
always as a ``CheckpointError`` naming the problem, with nothing applied to the model, optimizer or data stream.

Extends ``tests/training/test_checkpoint.py`` (one bit flip and one truncation per file, a raw pickle payload in
``optimizer.pt``, a missing manifest, a shape mismatch) with random damage of every file, payloads hidden in
every pickled file and format, hostile safetensors headers, hostile manifests, and the trainer's resume path.
"""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from switchformer import build_model
from switchformer.data import Batcher, BatchStream, Objective
from switchformer.errors import CheckpointError
from switchformer.interop.files import read_weights
from switchformer.training import checkpoint as ckpt
from switchformer.training.checkpoint import latest_checkpoint, load_checkpoint, load_model_state
from switchformer.training.trainer import CyclingBatches, Trainer
from tests.training.conftest import synthetic_batches, tiny_model, tiny_train_config

FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.json", "manifest.json")
MARKER = "PWNED"  # what a payload would write if it ever ran


def _trainer(
    run_dir: Path,
    *,
    resume: bool = False,
    model: torch.nn.Module | None = None,
    train_batches: Any = None,
    **changes: Any,
) -> Trainer:
    """The tiny decoder-only Switch model of tests/training on its toy data, checkpointing every 2 steps."""
    data = synthetic_batches("decoder-only", count=3)
    return Trainer(
        tiny_model("decoder-only"),
        tiny_train_config(**{"steps": 2, "checkpoint_every": 2, **changes}),
        train_batches=train_batches or CyclingBatches(data[:-1]),
        validation=data[-1:],
        run_dir=run_dir,
        resume=resume,
        model=model,
        tensorboard=False,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding one real checkpoint (model, AdamW state, trainer state), made by the trainer."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    _trainer(run).train()
    return run


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def _checkpoint(run: Path) -> Path:
    found = latest_checkpoint(run / "checkpoints")
    assert found is not None
    return found


def _reseal(path: Path) -> None:
    """Recompute the manifest, as an attacker who crafts a whole checkpoint folder would."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": ckpt.sha256_of(p)}
        for p in sorted(path.iterdir())
        if p.name != "manifest.json"
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert not changed, f"a failed load changed {changed[:3]}"


# -- random damage -------------------------------------------------------------------------------------------
Damage = tuple[str, str, int, int]  # file, kind, position (per mille of the size), byte


@st.composite
def damages(draw: st.DrawFn) -> list[Damage]:
    kinds = st.sampled_from(["flip", "truncate", "append", "zero-fill", "delete", "empty", "swap"])
    item = st.tuples(st.sampled_from(FILES), kinds, st.integers(0, 999), st.integers(1, 255))
    return draw(st.lists(item, min_size=1, max_size=3))


def _same_json(file: Path, original: bytes) -> bool:
    """Whether a damaged file still parses to the original's JSON value (only its whitespace changed)."""
    try:
        return file.exists() and json.loads(file.read_bytes()) == json.loads(original)
    except ValueError:
        return False


def _damage(path: Path, damage: Damage) -> None:
    name, kind, where, byte = damage
    file = path / name
    if not file.exists():
        return
    data = bytearray(file.read_bytes())
    at = len(data) * where // 1000
    if kind == "flip" and data:
        data[at] ^= byte
    elif kind == "truncate":
        del data[at:]
    elif kind == "append":
        data += bytes([byte]) * (1 + where)
    elif kind == "zero-fill":
        data[at : at + 64] = bytes(len(data[at : at + 64]))
    elif kind == "empty":
        data = bytearray()
    elif kind == "swap":  # another file's contents under this name
        other = path / FILES[(FILES.index(name) + 1) % len(FILES)]
        data = bytearray(other.read_bytes()) if other.exists() else bytearray()
    if kind == "delete":
        file.unlink()
    else:
        file.write_bytes(bytes(data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damages())
@example(damage=[("manifest.json", "flip", 99, 45)])  # found by Hypothesis: a space turns into a carriage return
def test_any_damage_is_detected_and_loads_nothing(pristine: Path, tmp_path_factory: pytest.TempPathFactory,
                                                  damage: list[Damage]) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("damaged") / "step"
    shutil.copytree(_checkpoint(pristine), path)
    originals = {name: (path / name).read_bytes() for name in FILES}
    for item in damage:
        _damage(path, item)
    changed = sorted(n for n in FILES if not (path / n).exists() or (path / n).read_bytes() != originals[n])
    if "manifest.json" in changed and _same_json(path / "manifest.json", originals["manifest.json"]):
        changed.remove("manifest.json")  # e.g. an indenting space flipped to a carriage return: the same manifest
    net = build_model(tiny_model("decoder-only"))
    before = _weights(net)
    if not changed:  # e.g. a flip by the byte already there: nothing to detect
        load_model_state(net, load_checkpoint(path).model_state, source=path)
        return
    with pytest.raises(CheckpointError) as error:
        checkpoint = load_checkpoint(path)
        load_model_state(net, checkpoint.model_state, source=path)
    # A damaged manifest shows up as a mismatch of whichever file its damaged entry describes.
    named = FILES if "manifest.json" in changed else changed
    assert any(name in str(error.value) for name in named), str(error.value)
    _assert_unchanged(net, before)


@pytest.mark.parametrize(
    "damage",
    [("model.safetensors", "flip", 500, 1), ("optimizer.pt", "truncate", 300, 0), ("trainer_state.pt", "empty", 0, 0),
     ("manifest.json", "delete", 0, 0), ("config.json", "append", 10, 32)],
    ids=lambda d: f"{d[0]}-{d[1]}",
)  # fmt: skip
def test_resume_from_a_damaged_checkpoint_is_refused_and_names_the_older_one(run: Path, damage: Damage) -> None:
    first = _checkpoint(run)
    newer = _trainer(run, resume=True, steps=4)  # a second checkpoint at step 4, then damage that one
    newer.train()
    latest = _checkpoint(run)
    assert latest != first
    _damage(latest, damage)
    model = build_model(tiny_model("decoder-only"))
    before = _weights(model)
    stream = CyclingBatches(synthetic_batches("decoder-only", count=3)[:-1])
    if damage[0] == "manifest.json":  # no manifest: the folder is not a complete checkpoint, the older one is used
        resumed = _trainer(run, resume=True, model=model, steps=4, train_batches=stream)
        assert resumed.step == 2
        return
    with pytest.raises(CheckpointError, match=rf"{damage[0]}.*{first.name}"):
        _trainer(run, resume=True, model=model, steps=4, train_batches=stream)
    _assert_unchanged(model, before)
    assert stream.state_dict() == {"position": 0}


# -- code in pickles -----------------------------------------------------------------------------------------
class _Exploit:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"import pathlib; pathlib.Path({MARKER!r}).write_text('ran')",))


def _payloads() -> dict[str, Callable[[Path], None]]:
    def raw(path: Path) -> None:
        path.write_bytes(pickle.dumps({"state": _Exploit()}))

    def torch_zip(path: Path) -> None:  # torch's own zip format, as torch.save writes it
        torch.save({"state": {}, "param_groups": [{"params": [0], "lr": _Exploit()}]}, path)

    def hidden_in_real_state(path: Path) -> None:  # a genuine file with one extra object deep inside
        state = torch.load(path, weights_only=True)
        state.setdefault("extra", []).append(_Exploit())
        torch.save(state, path)

    def legacy(path: Path) -> None:  # the pre-1.6 non-zip torch format
        torch.save({"state": _Exploit()}, path, _use_new_zipfile_serialization=False)

    return {"raw-pickle": raw, "torch-zip": torch_zip, "hidden": hidden_in_real_state, "legacy-format": legacy}


@pytest.mark.parametrize("victim", ["optimizer.pt", "trainer_state.pt"])
@pytest.mark.parametrize("payload", sorted(_payloads()))
def test_a_pickle_payload_never_runs_even_with_a_matching_manifest(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str, payload: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _checkpoint(run)
    _payloads()[payload](path / victim)
    _reseal(path)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(path)
    model = build_model(tiny_model("decoder-only"))
    before = _weights(model)
    with pytest.raises(CheckpointError):
        _trainer(run, resume=True, model=model)
    _assert_unchanged(model, before)
    assert not (tmp_path / MARKER).exists(), "the payload ran"


def test_a_pickled_hf_weight_file_cannot_run_code_either(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"shared.weight": _Exploit()}))
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_weights(tmp_path)
    assert not (tmp_path / MARKER).exists()


# -- hostile safetensors headers -----------------------------------------------------------------------------
def _safetensors(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _header(**tensors: Any) -> bytes:
    return json.dumps(tensors).encode()


HOSTILE_HEADERS: dict[str, bytes] = {
    "length 2**64-1": _safetensors(b"{}", declared=2**64 - 1),
    "length past the end": _safetensors(b"{}", declared=10_000),
    "length 200 MB": _safetensors(b"{}", declared=200 * 2**20),
    "empty file": b"",
    "shorter than the length field": b"\x01\x02\x03",
    "not JSON": _safetensors(b"\x80\x81 not json at all"),
    "JSON list": _safetensors(b"[1, 2, 3]"),
    "nested 100k deep": _safetensors(b"[" * 100_000 + b"]" * 100_000),
    "offsets past the end": _safetensors(
        _header(w={"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}), bytes(16)
    ),
    "offsets reversed": _safetensors(_header(w={"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}), bytes(16)),
    "huge shape, tiny data": _safetensors(
        _header(w={"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 16]}), bytes(16)
    ),
    "shape overflowing 64 bits": _safetensors(
        _header(w={"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}), bytes(16)
    ),
    "negative shape": _safetensors(_header(w={"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}), bytes(16)),
    "unknown dtype": _safetensors(_header(w={"dtype": "OBJECT", "shape": [4], "data_offsets": [0, 16]}), bytes(16)),
    "overlapping tensors": _safetensors(
        _header(
            a={"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        ),
        bytes(24),
    ),
    "gap before the data": _safetensors(_header(w={"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}), bytes(16)),
    "metadata not strings": _safetensors(_header(__metadata__={"step": [1, 2]}), b""),
}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_a_hostile_safetensors_header_is_refused_cleanly(run: Path, name: str) -> None:
    path = _checkpoint(run)
    (path / "model.safetensors").write_bytes(HOSTILE_HEADERS[name])
    _reseal(path)
    model = build_model(tiny_model("decoder-only"))
    before, rss = _weights(model), _max_rss_mib()
    with pytest.raises(CheckpointError, match=r"could not read checkpoint|another model config"):
        checkpoint = load_checkpoint(path)
        load_model_state(model, checkpoint.model_state, source=path)
    with pytest.raises(CheckpointError):
        read_weights(path)  # the interop reader (from_pretrained, convert) sees the same file
    assert _max_rss_mib() - rss < 64, "a crafted header made the reader allocate memory"
    _assert_unchanged(model, before)


# -- hostile manifests ---------------------------------------------------------------------------------------
def _manifest_edits() -> dict[str, Callable[[dict[str, Any]], Any]]:
    def drop(name: str) -> Callable[[dict[str, Any]], Any]:
        return lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != name}}

    def add(name: str) -> Callable[[dict[str, Any]], Any]:
        return lambda m: {**m, "files": {**m["files"], name: {"bytes": 1, "sha256": "0" * 64}}}

    return {
        "step missing": lambda m: {"files": m["files"]},
        "step not a number": lambda m: {**m, "step": "2; rm -rf /"},
        "step negative": lambda m: {**m, "step": -1},
        "files a list": lambda m: {**m, "files": list(m["files"])},
        "entry without checksum": lambda m: {**m, "files": {k: {"bytes": v["bytes"]} for k, v in m["files"].items()}},
        "entry a string": lambda m: {**m, "files": {k: "ok" for k in m["files"]}},
        "model not covered": drop("model.safetensors"),
        "trainer state not covered": drop("trainer_state.pt"),
        "optimizer not covered": drop("optimizer.pt"),
        "path traversal": add("../../../../etc/passwd"),
        "absolute path": add("/etc/passwd"),
        "a JSON list": lambda m: [m],
        "not UTF-8": lambda m: b"\xff\xfe\x00garbage",
        "not JSON": lambda m: b"{'step': 2",
    }


@pytest.mark.parametrize("edit", sorted(_manifest_edits()))
def test_a_hostile_manifest_is_refused_with_a_clear_message(run: Path, edit: str) -> None:
    path = _checkpoint(run)
    manifest = _manifest_edits()[edit](json.loads((path / "manifest.json").read_text()))
    (path / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match=r"manifest\.json is (unreadable|malformed|incomplete)|is missing"):
        load_checkpoint(path)


# -- a checkpoint that does not fit the run ------------------------------------------------------------------
def _stream(seed: int) -> BatchStream:
    tokens = np.random.default_rng(seed).integers(4, 64, 4000).astype(np.uint16)
    batcher = Batcher(Objective.CAUSAL_LM, sequence_length=16, pad_id=0, eos_id=1, sentinel_ids=np.zeros(0, np.int64))
    return BatchStream(tokens, batcher=batcher, batch_size=8, seed=0)


def test_resume_with_other_data_changes_nothing(tmp_path: Path) -> None:
    """The data position is checked against the stream it was saved from: another corpus is refused, and the
    refusal comes before the weights are touched (the data check used to come last)."""
    _trainer(tmp_path, train_batches=_stream(0)).train()
    model = build_model(tiny_model("decoder-only"))
    before, other = _weights(model), _stream(1)
    with pytest.raises(ValueError, match="fingerprint"):
        _trainer(tmp_path, resume=True, model=model, train_batches=other)
    _assert_unchanged(model, before)
    assert other.state_dict()["batch"] == 0


def test_resume_with_another_optimizer_is_refused_before_loading(tmp_path: Path) -> None:
    """``--resume --optimizer adafactor`` on an AdamW run: AdamW's state must not be poured into Adafactor (which
    then fails with a KeyError at its first step)."""
    _trainer(tmp_path).train()
    model = build_model(tiny_model("decoder-only"))
    before = _weights(model)
    with pytest.raises(CheckpointError, match="optimizer"):
        _trainer(tmp_path, resume=True, model=model, optimizer="adafactor", steps=4)
    _assert_unchanged(model, before)


def test_resume_with_another_model_config_changes_nothing(tmp_path: Path) -> None:
    _trainer(tmp_path).train()
    bigger = tiny_model("decoder-only").replace(d_model=64)
    model = build_model(bigger)
    before = _weights(model)
    data = synthetic_batches("decoder-only", count=3)
    stream = CyclingBatches(data[:-1])
    with pytest.raises(CheckpointError, match="another model config"):
        Trainer(bigger, tiny_train_config(steps=2), train_batches=stream, validation=data[-1:], run_dir=tmp_path,
                resume=True, model=model, tensorboard=False)  # fmt: skip
    _assert_unchanged(model, before)
    assert stream.state_dict() == {"position": 0}


def test_a_trainer_state_missing_fields_is_a_clear_error(run: Path) -> None:
    """A trainer_state.pt from another version (fields renamed) must say so, not raise a bare KeyError."""
    path = _checkpoint(run)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, path / "trainer_state.pt")
    _reseal(path)
    model = build_model(tiny_model("decoder-only"))
    before = _weights(model)
    with pytest.raises(CheckpointError, match="scheduler"):
        _trainer(run, resume=True, model=model)
    _assert_unchanged(model, before)
