"""The progress bar's figures: what a user watching a run sees."""

from __future__ import annotations

import pytest

from switchformer.training.callbacks import ProgressBar
from switchformer.training.metrics import read_metrics
from switchformer.training.trainer import CyclingBatches, Trainer


class RecordedBar:
    """Stands in for tqdm: the figures the bar was given."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.steps, self.postfixes, self.closed = kwargs, 0, [], False

    def set_postfix(self, postfix, refresh=True) -> None:
        self.postfixes.append(dict(postfix))

    def update(self, steps) -> None:
        self.steps += steps

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("sparse", [True, False])
def test_the_bar_shows_loss_speed_and_for_a_sparse_model_balance_expert_load_and_drops(
    toy, tmp_path, monkeypatch, sparse
):
    tiny_model, batches, train_config = toy
    made = []
    monkeypatch.setattr(ProgressBar, "make_bar", lambda **kwargs: made.append(RecordedBar(**kwargs)) or made[-1])
    model = tiny_model() if sparse else tiny_model().replace(moe=None)
    data = batches(count=4)
    trainer = Trainer(
        model,
        train_config(steps=10, log_every=5, eval_every=10),
        train_batches=CyclingBatches(data[:-1]),
        validation=data[-1:],
        run_dir=tmp_path,
        callbacks=[ProgressBar(desc="run")],
        tensorboard=False,
    )
    trainer.train()
    [bar] = made
    assert (bar.kwargs["desc"], bar.kwargs["total"], bar.steps, bar.closed) == ("run", 10, 10, True)
    last = bar.postfixes[-1]
    records = read_metrics(tmp_path)
    assert last["loss"] == f"{records[-1]['loss']:.3f}" and last["val"] == f"{records[-1]['val_loss']:.3f}"
    if not sparse:
        assert set(last) == {"loss", "tok/s", "lr", "val"}
        return
    assert list(last) == ["loss", "tok/s", "lr", "lb", "load", "drop", "val"]
    worst_layer = max(stats["max_load_ratio"] for stats in records[-1]["routing"].values())
    assert last["load"] == f"{worst_layer:.2f}x"  # the busiest expert over an even share, in the worst layer
    assert "load" not in bar.postfixes[0]  # nothing logged yet at step 1
