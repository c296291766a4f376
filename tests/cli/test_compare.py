"""``switchformer compare`` end to end on tiny settings: report, distillation row, rerun, re-plot and errors."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys

import pytest

from switchformer.cli import compare
from switchformer.cli.distill import parse_init
from switchformer.experiments.distillation import distill_best
from switchformer.experiments.history import HISTORY_FILE
from tests.experiments.conftest import write_corpus

# Short names of earlier versions and the sections' dotted paths, as a user may give either.
TINY_SETTINGS = [
    "d_model=32",
    "d_ff=64",
    "num_layers=2",
    "model.num_heads=2",
    "vocab_size=512",
    "data.sequence_length=32",
    "batch_size=4",
    "validation_batches=2",
    "train.eval_every=3",
    "warmup_steps=2",
    "threads=1",
]
TINY = [*(arg for setting in TINY_SETTINGS for arg in ("--set", setting)), "--no-progress"]


def run_cli(argv: list[str]) -> int:
    """The subcommand through its own parser (as ``switchformer compare`` runs it once registered in main)."""
    parser = argparse.ArgumentParser(prog="switchformer")
    compare.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *argv])
    return args.run(args)


@pytest.mark.slow
def test_compare_with_distillation_then_replot(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", modules=("json", "email"))
    out, docs = tmp_path / "cmp", tmp_path / "docs"
    argv = ["--data", str(corpus), "--output", str(out), "--report", str(docs), "--steps", "4", "--experts", "2,4"]
    argv += ["--capacity-factors", "2.0", "--set", "capacity_experts=2", "--no-top2", "--distill"]
    argv += ["--distill-set", "lr=0.0015", *TINY]
    monkeypatch.setattr(sys, "argv", ["switchformer", "compare", *argv])
    assert run_cli(argv) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["dense-seed0", "dense-seed1", "distill-" + _teacher(out), "switch-2", "switch-2-cf2", "switch-4"]
    text = (docs / "report.md").read_text()
    assert "## Distillation" in text and "Share of the teacher's gain kept" in text
    assert "init mean; lr=0.0015, threads=2)" in text  # the student's own settings, said in the report line
    student_config = next((out / "runs" / f"distill-{_teacher(out)}" / "checkpoints").glob("step-*/config.json"))
    student_train = json.loads(student_config.read_text())["train"]
    assert (student_train["lr"], student_train["threads"]) == (0.0015, 2)  # the threads of the 2 runs at a time
    # Distilling the folder again (e.g. a rerun with --set parallel_runs=1) keeps, and reports, the threads the
    # student began with.
    init = parse_init("mean", teacher_weight=0.25)
    again = distill_best(out, init, steps=4, train_overrides=["lr=0.0015"], threads=1)
    assert again.student_overrides == ["lr=0.0015", "threads=2"]
    assert "without the teacher (weight 0)" in text  # the control run of the distillation
    assert f"| distill-{_teacher(out)} |" in text
    assert "- Command: `switchformer" in text and "Load average" in text
    assert "float32, device cpu" in text  # the default precision, named in the settings
    assert len(list(docs.glob("*.png"))) == 6  # steps, time, speedup, experts, load, the student vs its control
    student = f"distill-{_teacher(out)}"
    assert f"![{student}]({student}.png)" in text and (docs / f"{student}.png").is_file()
    assert "comparison report" in capsys.readouterr().out
    assert "training sessions" not in text  # one command made it all

    # A comparison grown in stages names every session that trained it, in order, also when re-plotted.
    more = ["--output", str(out), "--report", str(docs), "--only", "switch-2", "--steps", "5", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["switchformer", "compare", *more])
    assert run_cli(more) == 0
    with pytest.raises(ValueError, match=r"other settings \(model\.d_model differ\)"):  # refused: not a session
        run_cli([*more, "--set", "d_model=48"])
    (docs / "report.md").unlink()
    with (out / HISTORY_FILE).open("a") as history:
        history.write('{"session": "1-abc", "comm\n')  # cut short by a crash: skipped, not fatal
    assert run_cli(["--output", str(out), "--report", str(docs), "--replot", "--no-progress"]) == 0
    text = (docs / "report.md").read_text()
    assert "re-plotted" in text and "- All 2 training sessions in this folder, oldest first" in text
    first, second = (line for line in text.splitlines() if line.startswith("  - "))
    assert "`switchformer compare --data" in first and "--distill" in first and "(finished " in first
    assert second.endswith("`switchformer compare " + shlex.join(more) + "`")


def _teacher(out) -> str:
    result = json.loads(next((out / "runs").glob("distill-*/distill.json")).read_text())
    return result["teacher"].split("/runs/")[1].split("/")[0]


@pytest.mark.parametrize(
    ("precision", "device", "native", "warned"),
    [
        ("bf16", "cpu", False, True),
        ("bf16", "cpu", True, False),
        ("fp32", "cpu", False, False),
        ("bf16", "cuda", False, False),
    ],
)
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned(monkeypatch, caplog, precision, device, native, warned):
    monkeypatch.setattr(compare, "cpu_has_native_bf16", lambda: native)
    plan = compare.ComparePlan().with_overrides([f"precision={precision}", f"device={device}"])
    compare.warn_if_bf16_is_emulated(plan)
    assert ("--set precision=fp32" in caplog.text) is warned


def test_compare_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a comparison folder"):
        run_cli(["--output", str(tmp_path / "none"), "--replot"])
    with pytest.raises(ValueError, match="unknown run"):
        run_cli(["--output", str(tmp_path / "x"), "--only", "switch-3", *TINY])
    assert not (tmp_path / "x").exists()  # refused before the tokenizer was trained or the session recorded


def test_each_run_bar_names_its_place_in_the_plan(tmp_path, monkeypatch):
    descriptions = []

    class RecordingBar(compare.ProgressBar):
        def __init__(self, **kwargs):
            descriptions.append(kwargs["desc"])
            super().__init__(**kwargs)

    monkeypatch.setattr(compare, "ProgressBar", RecordingBar)
    corpus = write_corpus(tmp_path / "corpus.txt", modules=("json", "email"))
    argv = ["--data", str(corpus), "--output", str(tmp_path / "cmp"), "--steps", "2", "--experts", "2"]
    argv += ["--only", "dense-seed0,switch-2", "--set", "parallel_runs=1"]  # bars made in this process
    argv += [a for a in TINY if a != "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["switchformer", "compare", *argv])
    assert run_cli(argv) == 0
    assert descriptions == ["dense-seed0 [1/2]", "switch-2 [2/2]"]


def test_side_by_side_runs_bars_and_log_lines_share_the_terminal_without_running_into_each_other(tmp_path):
    """The real command in its own process, its log handler on stderr as on a terminal: every log line starts on a
    line of its own (the bars are lifted first), and both runs' bars are drawn."""
    corpus = write_corpus(tmp_path / "corpus.txt", modules=("json", "email"))
    argv = ["compare", "--data", str(corpus), "--output", str(tmp_path / "cmp"), "--steps", "6", "--experts", "2"]
    argv += ["--only", "dense-seed0,switch-2", "--set", "parallel_runs=2", "--set", "checkpoint_every=3"]
    argv += [a for a in TINY if a != "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "switchformer", *argv], capture_output=True, timeout=600)
    stderr = done.stderr.decode()  # carriage returns kept: bars redraw their line after one
    assert done.returncode == 0, stderr
    assert "dense-seed0 [1/2]" in stderr and "switch-2 [2/2]" in stderr
    assert "switch-2: training at step 0 of 6" in stderr and "saved checkpoint" in stderr
    starts = [m.start() for m in re.finditer(r"(?:INFO|WARNING|ERROR) ", stderr)]
    # After a line end, or after a carriage return and the cursor moved up to the lifted bars' first line.
    assert starts and all(i == 0 or re.sub(r"(\x1b\[A)+$", "", stderr[:i]).endswith(("\n", "\r")) for i in starts)


@pytest.mark.parametrize(("parallel_runs", "cores", "expected"), [(2, 2, 2), (4, 2, 2), (1, 2, None)])
def test_the_distilled_student_gets_the_threads_the_runs_shared_up_to_the_cores(
    monkeypatch, parallel_runs, cores, expected
):
    monkeypatch.setattr(compare.os, "cpu_count", lambda: cores)
    assert compare.student_threads(compare.ComparePlan().replace(threads=1, parallel_runs=parallel_runs)) == expected
