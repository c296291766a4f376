"""Checkpoints: atomic writes, a failed save keeps the previous one, corruption and crafted files are refused."""

from __future__ import annotations

import errno
import json
import pickle

import pytest
import torch

from switchformer.training import checkpoint as ckpt
from switchformer.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)


def _save(directory, step, value=1.0, **kwargs):
    return save_checkpoint(
        directory,
        step,
        model_state={"w": torch.full((3, 2), value), "b": torch.arange(4.0)},
        optimizer_state={"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        trainer_state={"step": step, "torch_rng": torch.get_rng_state(), "data_state": "{}"},
        config={"format": "switchformer", "model": {}},
        **kwargs,
    )


def test_round_trip(tmp_path):
    path = _save(tmp_path, 7)
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and torch.equal(loaded.model_state["w"], torch.ones(3, 2))
    assert loaded.optimizer_state["param_groups"][0]["lr"] == 0.1
    assert torch.equal(loaded.trainer_state["torch_rng"], torch.get_rng_state())
    assert json.loads((path / "manifest.json").read_text())["files"].keys() >= {"model.safetensors", "config.json"}


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_torch_save", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-00000001 is intact"):
        _save(tmp_path, 2, value=2.0)
    assert latest_checkpoint(tmp_path) == first
    assert not list(tmp_path.glob(".step-*"))  # the partial folder was removed
    assert torch.equal(load_checkpoint(first).model_state["w"], torch.ones(3, 2))


def test_a_write_killed_midway_is_never_the_latest(tmp_path):
    first = _save(tmp_path, 1)
    partial = tmp_path / ".step-00000002.tmp-999"  # what kill -9 during a save leaves behind
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) == first
    _save(tmp_path, 3, keep=2)
    assert not partial.exists()  # cleaned up by the next save


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "trainer_state.pt", "config.json"])
def test_corrupted_or_truncated_files_are_detected(tmp_path, victim):
    path = _save(tmp_path, 1)
    data = bytearray((path / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim} is corrupted or truncated"):
        load_checkpoint(path)
    (path / victim).write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_pickle_payload_is_refused_even_with_a_matching_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path, 1)
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Exploit()}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {
        "bytes": (path / "optimizer.pt").stat().st_size,
        "sha256": ckpt.sha256_of(path / "optimizer.pt"),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_checkpoint_of_another_config_is_rejected_before_anything_is_loaded():
    model = torch.nn.Linear(2, 3, bias=False)
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"another model config.*shape mismatch: weight \(4, 2\)"):
        load_model_state(model, {"weight": torch.zeros(4, 2)}, source="ckpt")
    with pytest.raises(CheckpointError, match="unexpected 1"):
        load_model_state(model, {"weight": torch.zeros(3, 2), "extra": torch.zeros(1)}, source="ckpt")
    assert torch.equal(model.weight, before)


def test_missing_manifest_means_incomplete(tmp_path):
    path = _save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
