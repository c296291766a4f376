"""The run folder's layout and atomic writes, and folders written by earlier versions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from switchformer.errors import CheckpointError
from switchformer.run_folder import (
    atomic_directory,
    atomic_write,
    atomic_write_json,
    finished_steps,
    latest_run_checkpoint,
    list_checkpoints,
    read_run_config,
    remove_leftovers,
    resolve_checkpoint,
    step_dir_name,
)

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})

    def fail(tmp: Path) -> None:
        tmp.write_text("half of a ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left behind


def test_atomic_directory_replaces_a_folder_in_one_rename_and_keeps_it_on_failure(tmp_path):
    final = tmp_path / "best"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("killed mid-write")
    assert (final / "x").read_text() == "1"
    with atomic_directory(final) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"]  # the old folder went, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_leftovers_of_killed_writes_are_cleared_and_never_listed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in (step_dir_name(2), step_dir_name(4), f".{step_dir_name(6)}.tmp-{os.getpid()}"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "manifest.json").write_text("{}")
    (checkpoints / step_dir_name(8)).mkdir()  # a step folder without its manifest is not complete
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002", "step-00000004"]
    assert latest_run_checkpoint(tmp_path).name == "step-00000004"
    assert resolve_checkpoint(tmp_path) == checkpoints / "step-00000004"
    remove_leftovers(checkpoints, "step-*")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004", "step-00000008"]


def test_a_folder_without_checkpoints_is_named_in_the_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"neither a checkpoint nor a run folder .*checkpoints/step-\*"):
        resolve_checkpoint(tmp_path)


def test_finished_steps_reads_the_summary_and_tolerates_a_damaged_one(tmp_path):
    assert finished_steps(tmp_path) == 0
    (tmp_path / "summary.json").write_text('{"steps": 7')
    assert finished_steps(tmp_path) == 0
    (tmp_path / "summary.json").write_text('{"steps": 7}')
    assert finished_steps(tmp_path) == 7


def test_a_run_folder_written_by_an_earlier_version_still_reads(tmp_path):
    run = shutil.copytree(LEGACY / "train-run", tmp_path / "train-run")
    assert finished_steps(run) == 4
    assert latest_run_checkpoint(run).name == "step-00000004"
    saved = read_run_config(run)
    assert saved["model"]["d_model"] == 16 and saved["train"]["steps"] == 4 and saved["data"]["source"] == "corpus"
