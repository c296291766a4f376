"""Fine-tuning end to end on a synthetic task: exact match improves, the best model is kept, early stopping
stops, a resumed run matches an uninterrupted one, and the paper's dropout reaches the modules."""

from __future__ import annotations

import json

import pytest
import torch

from switchformer import from_pretrained
from switchformer.data.tokenizer import SwitchTokenizer
from switchformer.finetune import BestTracker, FinetuneConfig, Metric, exact_match, finetune, load_for_finetuning
from switchformer.finetune.batches import encode_pairs
from switchformer.finetune.rows import read_pairs
from switchformer.moe.experts import GroupedExperts
from tests.finetune.helpers import (
    one_thread,  # noqa: F401 (a fixture)
    task_config,
    tiny_config,
    train_config,
    word_tokenizer,
    write_checkpoint,
    write_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_finetuning_improves_exact_match_and_keeps_the_best_model(tmp_path, task, architecture):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config(architecture))
    result = finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / "run", config=task_config(),
                      train_config=train_config(), tensorboard=False)  # fmt: skip
    assert result.before is not None and result.best is not None and result.last is not None
    assert result.before["exact_match"] == 0.0  # a random model outputs no correct uppercase string
    assert result.best["exact_match"] >= 0.25  # measured: 0.41 (encoder-decoder), 0.69 (decoder-only)
    assert result.best["val_loss"] < result.before["val_loss"] - 3
    steps = [json.loads(line)["step"] for line in (result.run_dir / "eval.jsonl").read_text().splitlines()]
    assert steps == [0, 50, 100, 150]

    # The best model is a standalone checkpoint that reproduces its recorded exact match.
    info = json.loads((result.best_dir / "best.json").read_text())
    assert info["step"] == result.best["step"] and info["exact_match"] == result.best["exact_match"]
    best = from_pretrained(result.best_dir)
    tokenizer = SwitchTokenizer.load(result.best_dir / "tokenizer.json", num_sentinels=0)
    examples = encode_pairs(read_pairs(task[1]).pairs, tokenizer, task_config())
    again = exact_match(best, examples, tokenizer, max_new_tokens=6)
    assert again.exact_match == result.best["exact_match"]
    assert best.config.dropout == 0.1 and best.config.moe.expert_dropout == 0.4


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, task):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    # A learning rate this small cannot lower the loss by min_delta: only the first evaluation is a best.
    config = task_config(metric=Metric.VAL_LOSS, patience=2, min_delta=0.01, baseline_eval=False)
    result = finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / "run", config=config,
                      train_config=train_config(steps=50, lr=1e-9, eval_every=2), tensorboard=False)  # fmt: skip
    assert result.stopped_early and result.summary["steps"] == 6
    assert result.best["step"] == 2 and json.loads((result.best_dir / "best.json").read_text())["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000006").is_dir()  # the stopping step is saved


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path, task):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    config = task_config(dropout=0.1, expert_dropout=0.4)

    def run(folder, steps, resume=False):
        return finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / folder, config=config,
                        train_config=train_config(steps=steps, eval_every=2, checkpoint_every=3), resume=resume,
                        tensorboard=False)  # fmt: skip

    whole = run("whole", 6)
    run("split", 3)
    resumed = run("split", 6, resume=True)
    assert resumed.summary["final_loss"] == whole.summary["final_loss"]
    assert resumed.last == whole.last and resumed.best == whole.best
    split_log = (tmp_path / "split" / "eval.jsonl").read_text().splitlines()
    # the same evaluations, plus the one the trainer always runs at the last step of the first part
    assert [line for line in split_log if '"step": 3,' not in line] == (tmp_path / "whole" / "eval.jsonl").read_text(
    ).splitlines()  # fmt: skip
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run("split", 6)


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_the_papers_expert_dropout_reaches_the_modules(tmp_path, architecture):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config(architecture, num_layers=3))
    for dropout, expert in ((0.1, 0.4), (0.2, 0.0)):
        model = load_for_finetuning(checkpoint, dropout=dropout, expert_dropout=expert)
        assert model.training and model.config.dropout == dropout and model.config.moe.expert_dropout == expert
        inside = {id(m.dropout) for m in model.modules() if isinstance(m, GroupedExperts)}
        rates = {(id(m) in inside, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == {(True, expert), (False, dropout)}
        assert len(inside) == 1 + (architecture == "encoder-decoder")  # one Switch layer per stack (layer 1)
    reloaded = from_pretrained(checkpoint)
    for name, tensor in load_for_finetuning(checkpoint).state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name  # same weights, new dropout


def test_overrides_and_tokenizer_mismatches_are_clear_errors(tmp_path, task):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    model = load_for_finetuning(checkpoint, overrides=["moe.capacity_factor=1.0"])
    assert model.config.moe.capacity_factor == 1.0
    with pytest.raises(ValueError, match="change the weights' names or shapes"):
        load_for_finetuning(checkpoint, overrides=["d_ff=128"])
    bigger = word_tokenizer()
    bigger.add_tokens([f"w{i}" for i in range(30)])
    bigger.save(str(tmp_path / "big.json"))
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"holds no tokenizer\.json or SentencePiece \.model; pass --tokenizer"):
        finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / "run", tensorboard=False)
    with pytest.raises(ValueError, match="the tokenizer has 49 ids but the model's vocabulary only 19"):
        finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / "run",
                 tokenizer=tmp_path / "big.json", config=FinetuneConfig(), tensorboard=False)  # fmt: skip


def test_best_tracker_breaks_exact_match_ties_by_validation_loss():
    tracker = BestTracker(Metric.EXACT_MATCH, min_delta=0.05)
    figures = [(0.0, 3.0), (0.0, 2.0), (0.0, 2.5), (0.04, 2.6), (0.1, 2.9), (0.1, 2.9)]
    improved = [
        tracker.update({"step": i, "exact_match": em, "val_loss": loss}) for i, (em, loss) in enumerate(figures)
    ]
    assert improved == [True, True, False, False, True, False]
    assert (tracker.best, tracker.best_step, tracker.since_best) == (0.1, 4, 1)
    by_loss = BestTracker(Metric.VAL_LOSS, min_delta=0.1)
    assert [by_loss.update({"step": i, "exact_match": 0.0, "val_loss": v}) for i, v in enumerate([2.0, 1.95, 1.8])] == [
        True, False, True]  # fmt: skip


def test_bf16_finetuning_trains_bf16_weights_with_float32_routers(tmp_path, task):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    result = finetune(checkpoint, train=task[0], validation=task[1], run_dir=tmp_path / "run",
                      config=task_config(dtype="bf16"), train_config=train_config(steps=50, eval_every=25),
                      tensorboard=False)  # fmt: skip
    assert result.best["val_loss"] < result.before["val_loss"] - 1
    best = from_pretrained(result.best_dir, dtype=None)  # as saved
    dtypes = {name: p.dtype for name, p in best.named_parameters()}
    routers = {name for name in dtypes if ".router." in name}
    assert routers and all(dtypes[name] == torch.float32 for name in routers)
    assert {dtypes[name] for name in dtypes.keys() - routers} == {torch.bfloat16}
