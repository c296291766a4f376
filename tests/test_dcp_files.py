"""Sharded (DCP) checkpoints, as two ranks write them, read by every reader without running code from the files.

A crafted ``.metadata`` (a pickle whose loading would run code, alone or hidden in the genuine metadata) or a crafted
value inside a shard, both sealed by a matching manifest, is refused as a ``CheckpointError`` by the checkpoint
reader, ``from_pretrained``, ``convert``, and ``--resume`` in one process and over two ranks; the payload never runs.
A genuine one loads whole in one process: ``from_pretrained(run folder)`` and ``switchformer convert --to hf``.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from switchformer import from_pretrained
from switchformer.cli.main import main
from switchformer.dcp_files import METADATA_FILE, SafeFileSystemReader
from switchformer.errors import CheckpointError
from switchformer.interop.files import read_weights
from switchformer.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.parallel import runs
from tests.parallel.launcher import run_ranks
from tests.parallel.train_workers import cli_exit_code
from tests.reliability.test_untrusted_checkpoints import MARKER, _Exploit, _reseal

LAYOUT = ["--expert-parallel", "2"]
ARGS = runs.train_args(*LAYOUT, steps=2)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose checkpoints two expert-parallel ranks wrote."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    runs.train_on_ranks(2, ARGS, run)
    return run


def _metadata(path: Path):
    return SafeFileSystemReader(path).read_metadata()


def _crafted_metadata(path: Path, how: str) -> None:
    if how == "whole":
        payload = pickle.dumps(_Exploit())
    else:  # the genuine metadata with one object swapped for the exploit
        metadata = _metadata(path)
        metadata.state_dict_metadata["model.shared.weight"] = _Exploit()
        payload = pickle.dumps(metadata)
    (path / METADATA_FILE).write_bytes(payload)


def _crafted_value(path: Path) -> None:
    """A non-tensor value (the learning rate of the optimizer state) replaced by a pickle that would run code: the
    payload is appended to the shard that holds the value and the metadata points there."""
    metadata = _metadata(path)
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    where = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save({"lr": _Exploit()}, buffer)
    shard = path / where.relative_path
    offset = shard.stat().st_size
    with shard.open("ab") as handle:
        handle.write(buffer.getvalue())
    metadata.storage_data[index] = dataclasses.replace(where, offset=offset, length=len(buffer.getvalue()))
    metadata.storage_meta = None
    (path / METADATA_FILE).write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("craft", ["whole-metadata", "hidden-in-metadata", "value-in-a-shard"])
def test_a_crafted_checkpoint_with_a_matching_manifest_is_refused_without_running_code(
    sharded_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], craft: str
) -> None:
    monkeypatch.chdir(tmp_path)
    run = Path(shutil.copytree(sharded_run, tmp_path / "run"))  # crafted in a copy of the genuine run
    path = latest_checkpoint(run / "checkpoints")
    if craft == "value-in-a-shard":
        _crafted_value(path)
    else:
        _crafted_metadata(path, craft.split("-")[0])
    _reseal(path)
    expected = (
        r"optimizer\.param_groups\.0\.lr is not plain data \(WeightsUnpickler error: Unsupported global: GLOBAL exec"
        if craft == "value-in-a-shard"
        else "is not a checkpoint's metadata"
    )
    with pytest.raises(CheckpointError, match=rf"could not read the sharded checkpoint .*{expected}"):
        load_checkpoint(path)
    if craft != "value-in-a-shard":  # the weights readers only read the model part, and its metadata
        with pytest.raises(CheckpointError, match="is not a checkpoint's metadata"):
            read_weights(path)
        with pytest.raises(CheckpointError):
            from_pretrained(run)
        assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert main(["train", "--resume", "--output", str(run), "--steps", "3", "--no-progress"]) == 2
    assert "could not read the sharded checkpoint" in capsys.readouterr().err
    resume = ["train", "--resume", "--output", str(run), "--steps", "3", *LAYOUT, "--no-progress"]
    results = run_ranks(cli_exit_code, 2, timeout_s=runs.LAUNCH_TIMEOUT_S, args=resume)
    assert [r.value for r in results] == [2, 2], [r.error for r in results]
    assert not (tmp_path / MARKER).exists(), "the payload ran"


def test_from_pretrained_and_convert_read_a_sharded_checkpoint(sharded_run: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(latest_checkpoint(sharded_run / "checkpoints"))
    model = from_pretrained(sharded_run)
    state = model.state_dict()
    assert state.keys() == checkpoint.model_state.keys()
    assert all(torch.equal(value, checkpoint.model_state[name]) for name, value in state.items())
    assert model.config.moe.num_experts == 8 and model.config.vocab_size == checkpoint.config["model"]["vocab_size"]

    hf = tmp_path / "hf"
    assert main(["convert", str(sharded_run), str(hf), "--to", "hf"]) == 0
    back = from_pretrained(hf).state_dict()  # the Hugging Face files hold the same weights
    assert back.keys() == state.keys()
    assert all(torch.equal(value, state[name]) for name, value in back.items())
