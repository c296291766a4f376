"""``switchformer finetune`` and ``switchformer upcycle`` end to end: dense checkpoint -> upcycled Switch model ->
fine-tuned run with its best model; bad rows named by line; resume."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from switchformer import from_pretrained
from switchformer.cli import finetune as finetune_command
from switchformer.cli import main as cli_main
from switchformer.cli import upcycle as upcycle_command
from tests.finetune.helpers import (
    one_thread,  # noqa: F401 (a fixture)
    tiny_config,
    write_checkpoint,
    write_jsonl,
    write_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--steps", "6", "--eval-every", "3", "--batch-size", "8", "--lr", "5e-3", "--no-progress",
        "--finetune-set", "max_new_tokens=6"]  # fmt: skip


def cli(argv: list[str]) -> int:
    """Run a subcommand through a parser holding these two commands (``switchformer.cli.main`` once registered)."""
    parser = argparse.ArgumentParser(prog="switchformer")
    sub = parser.add_subparsers(dest="command", required=True)
    finetune_command.register(sub)
    upcycle_command.register(sub)
    args = parser.parse_args(argv)
    return args.run(args)


def _table_text(out: str) -> str:
    """The printed table's text with its borders and line wrapping removed."""
    return " ".join(re.sub("[│┃]", " ", out).split())


def _relative_gap(out: str) -> float:
    match = re.search(r"relative ([0-9.]+e[+-][0-9]+)", out)
    assert match, out
    return float(match.group(1))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), train=64, validation=16)


def test_upcycle_a_dense_checkpoint_then_finetune_it(tmp_path, task, capsys):
    dense = write_checkpoint(tmp_path / "dense", tiny_config(sparse=False, num_layers=3))
    # The default keeps the dense model's function: which gate and capacity, and the gap measured, are said.
    assert cli(["upcycle", str(dense), str(tmp_path / "default"), "--experts", "4"]) == 0
    out = _table_text(capsys.readouterr().out)
    assert "straight-through" in out and "dropless: no token dropped" in out and "0.0% of tokens dropped" in out
    assert _relative_gap(out) <= 1e-5
    default = from_pretrained(tmp_path / "default").config.moe
    assert default.gate.value == "straight-through" and default.dropless
    # The paper's gate on request, with its gap printed.
    assert cli(["upcycle", str(dense), str(tmp_path / "paper"), "--experts", "4", "--set", "moe.gate=probability"]) == 0
    out = _table_text(capsys.readouterr().out)
    assert "probability (the paper's)" in out and _relative_gap(out) > 1e-3

    assert cli(["upcycle", str(dense), str(tmp_path / "sparse"), "--experts", "4", "--sparse-every", "1",
                "--set", "moe.capacity_factor=1.5"]) == 0  # fmt: skip
    out = _table_text(capsys.readouterr().out)
    assert "Switch layers (encoder)" in out and "Switch layers (decoder)" in out and "tokenizer.json" in out
    assert out.count("3 of 3: 0, 1, 2") == 2 and "4 per Switch layer" in out
    assert "factor 1.5 in training, 2 in evaluation" in out  # a capacity asked for: not dropless
    sparse = from_pretrained(tmp_path / "sparse")
    assert sparse.config.moe.num_experts == 4 and sparse.config.moe.capacity_factor == 1.5
    assert not sparse.config.moe.dropless
    with pytest.raises(ValueError, match=r"moe.FIELD=VALUE only \(got d_model=8\)"):
        cli(["upcycle", str(dense), str(tmp_path / "x"), "--experts", "4", "--set", "d_model=8"])

    run = tmp_path / "run"
    argv = ["finetune", str(tmp_path / "sparse"), "--train", str(task[0]), "--validation", str(task[1]),
            "--output", str(run), "--activation-checkpointing", "2", "--compile", "aot_eager", *FAST]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "fine-tuning summary" in out and "best by exact_match" in out and "0.1 outside experts, 0.4 inside" in out
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 3, 6]
    best = from_pretrained(run / "best")
    assert best.config.moe.expert_dropout == 0.4 and (run / "best" / "tokenizer.json").is_file()

    # Resume the run to 9 steps with the saved settings.
    assert cli([*argv[: -len(FAST)], "--resume", "--steps", "9", "--no-progress"]) == 0
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 3, 6, 9]
    saved = json.loads((run / "checkpoints" / "step-00000009" / "config.json").read_text())
    assert saved["train"]["steps"] == 9 and saved["finetune"]["batch_size"] == 8
    assert saved["train"]["activation_checkpointing"] == 2 and saved["train"]["compile"] == "aot_eager"


def test_bad_rows_are_an_error_naming_lines_or_skipped_with_a_report(tmp_path, task, capsys):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    rows = [{"input": "a", "target": "A"}, {"input": "b"}, {"input": "c", "target": ""}, "{oops", {"input": "d",
            "target": "D"}]  # fmt: skip
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    argv = ["finetune", str(checkpoint), "--train", str(bad), "--validation", str(task[1]), *FAST]
    with pytest.raises(ValueError, match=r"3 bad rows: line 2: missing field 'target'; line 3: field 'target' is "
                                         r"empty; line 4: invalid JSON"):  # fmt: skip
        cli([*argv, "--output", str(tmp_path / "refused")])
    assert cli([*argv, "--output", str(tmp_path / "run"), "--skip-bad-rows", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped rows of bad.jsonl" in out and "line 2 (missing field 'target')" in out and "line 4 (invalid" in out


@pytest.mark.skipif(finetune_command not in cli_main.SUBCOMMANDS, reason="finetune is not registered in cli/main.py")
def test_main_prints_input_errors_without_a_traceback(tmp_path, task, capsys):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "target": "A"}, {"input": "b"}])
    argv = ["finetune", str(checkpoint), "--train", str(bad), "--validation", str(task[1]), *FAST]
    assert cli_main.main(argv) == 2
    assert "line 2: missing field 'target'" in capsys.readouterr().err


def test_a_positional_after_compile_is_named_as_the_mistake_it_is(capsys):
    """``--compile`` takes an optional backend, so a checkpoint written after it arrives as the backend."""
    with pytest.raises(SystemExit):
        cli_main.build_parser().parse_args(["finetune", "--compile", "runs/teacher", "--train", "t.jsonl"])
    err = capsys.readouterr().err
    assert "unknown torch.compile backend 'runs/teacher'" in err and "write positional arguments before it" in err
    rows = ["--train", "t.jsonl", "--validation", "v.jsonl"]
    args = cli_main.build_parser().parse_args(["finetune", "runs/teacher", "--compile", *rows])
    assert (args.checkpoint, args.compile) == ("runs/teacher", "inductor")
    args = cli_main.build_parser().parse_args(["finetune", "--compile=aot_eager", "runs/teacher", *rows])
    assert (args.checkpoint, args.compile) == ("runs/teacher", "aot_eager")
