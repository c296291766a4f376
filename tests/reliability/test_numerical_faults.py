"""Numerical faults: NaN/inf injected into a layer's output, a gradient or the loss is caught, the message names
where it came from, and the ``skip`` policy leaves weights and optimizer state exactly as before the bad step.
Router collapse (one expert taking a layer's tokens step after step) is reported with the layer and the expert.

``tests/training/test_trainer.py`` already covers inf in one expert's output under both policies, and the stop
after too many skips; this file runs the matrix of sites, values, policies and architectures around it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from switchformer.training.callbacks import Callback
from switchformer.training.trainer import CyclingBatches, NonFiniteLossError, Trainer
from tests.training.conftest import synthetic_batches, tiny_model, tiny_train_config

BAD_STEP = 3  # the injected fault fires in this step only (and in the diagnosis of it)

# (site, kind, what the message must name). "output": the module's output is poisoned in the forward pass;
# "gradient": the gradient flowing into the module's output is poisoned in the backward pass (forward finite);
# "parameter": one parameter's gradient only; "aux-loss": the model's auxiliary loss itself.
SITES: dict[str, list[tuple[str, str, str]]] = {
    "decoder-only": [
        ("shared", "output", "layer shared"),
        ("decoder.blocks.0.self_attn", "output", "layer decoder.blocks.0.self_attn"),
        ("decoder.blocks.1.ffn.router", "output", "layer decoder.blocks.1.ffn.router"),
        ("decoder.final_norm", "output", "layer decoder.final_norm"),
        ("decoder.blocks.1.ffn.experts", "gradient", "gradient reaching decoder.blocks.1.ffn.experts"),
        ("decoder.blocks.0.self_attn.q.weight", "parameter", "gradient reaching decoder.blocks.0.self_attn.q.weight"),
        ("", "aux-loss", "gradient reaching decoder.blocks.1.ffn.router"),
    ],
    "encoder-decoder": [
        ("encoder.blocks.1.ffn.experts", "output", "layer encoder.blocks.1.ffn.experts"),
        ("decoder.blocks.0.cross_attn", "output", "layer decoder.blocks.0.cross_attn"),
        ("encoder.blocks.0.self_attn", "gradient", "gradient reaching encoder.blocks.0.self_attn"),
        ("encoder.blocks.1.ffn.router.weight", "parameter", "gradient reaching encoder.blocks.1.ffn.router.weight"),
    ],
}
CASES = [(arch, *site) for arch, sites in SITES.items() for site in sites]
IDS = [f"{arch}:{kind}:{site or 'loss'}" for arch, site, kind, _ in CASES]
# The default run takes one case per kind of fault; the slow run takes every site.
FIRST_OF_KIND = {kind: index for index, (_, _, kind, _) in reversed(list(enumerate(CASES)))}
SOME = [
    case if index in FIRST_OF_KIND.values() else pytest.param(*case, marks=pytest.mark.slow)
    for index, case in enumerate(CASES)
]


def _trainer(arch: str, tmp_path: Any, **changes: Any) -> Trainer:
    data = synthetic_batches(arch, count=4)
    config = tiny_train_config(**{"steps": 5, "eval_every": 100, "checkpoint_every": 100, **changes})
    return Trainer(tiny_model(arch), config, train_batches=CyclingBatches(data[:-1]), validation=data[-1:],
                   run_dir=tmp_path, tensorboard=False)  # fmt: skip


def _inject(trainer: Trainer, site: str, kind: str, value: float) -> None:
    """Poison ``site`` during BAD_STEP (``trainer.step`` counts finished steps, so it reads BAD_STEP - 1)."""

    def now() -> bool:
        return trainer.step == BAD_STEP - 1

    def poison(grad: torch.Tensor) -> torch.Tensor:
        return grad * value if now() else grad

    if kind == "parameter":
        trainer.model.get_parameter(site).register_hook(poison)
        return
    module = trainer.model.get_submodule(site)

    def hook(_: torch.nn.Module, __: Any, output: Any) -> Any:
        if not now():
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # attention also returns its position bias
        if kind == "output":
            return (hidden * value, *output[1:]) if isinstance(output, tuple) else hidden * value
        if kind == "aux-loss":
            output.aux_loss = output.aux_loss * value
        elif hidden.requires_grad:  # "gradient"; the diagnostic forward runs without autograd
            hidden.register_hook(poison)
        return None

    module.register_forward_hook(hook)


class _Snapshots(Callback):
    """Weights and optimizer state after each step, to check that a skipped step changed nothing."""

    def __init__(self) -> None:
        self.after: dict[int, tuple[dict[str, torch.Tensor], list[torch.Tensor], int]] = {}

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        moments = [t.clone() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        self.after[trainer.step] = (weights, moments, trainer.scheduler.last_epoch)


@pytest.mark.parametrize(
    "value", [float("nan"), pytest.param(float("inf"), marks=pytest.mark.slow)], ids=["nan", "inf"]
)
@pytest.mark.parametrize(("arch", "site", "kind", "named"), CASES, ids=IDS)
def test_an_injected_fault_stops_the_run_naming_where_it_came_from(tmp_path, arch, site, kind, named, value) -> None:
    trainer = _trainer(arch, tmp_path)
    _inject(trainer, site, kind, value)
    with pytest.raises(NonFiniteLossError, match=rf"step {BAD_STEP}\b") as error:
        trainer.train()
    assert named in str(error.value), str(error.value)
    assert trainer.step == BAD_STEP - 1


@pytest.mark.parametrize(("arch", "site", "kind", "named"), SOME, ids=IDS)
def test_a_skipped_step_changes_nothing_and_training_goes_on(tmp_path, caplog, arch, site, kind, named) -> None:
    trainer = _trainer(arch, tmp_path, non_finite="skip")
    _inject(trainer, site, kind, float("nan"))
    snapshots = _Snapshots()
    trainer.callbacks.insert(0, snapshots)
    with caplog.at_level(logging.WARNING, logger="switchformer.training.trainer"):
        trainer.train()
    assert trainer.step == 5
    (before, moments_before, lr_step_before) = snapshots.after[BAD_STEP - 1]
    (after, moments_after, lr_step_after) = snapshots.after[BAD_STEP]
    assert all(torch.equal(before[n], after[n]) for n in before), "the skipped step changed weights"
    assert all(torch.equal(a, b) for a, b in zip(moments_before, moments_after, strict=True)), "optimizer state moved"
    assert lr_step_after == lr_step_before, "the schedule advanced on a skipped step"
    final = snapshots.after[5][0]
    assert all(torch.isfinite(w).all() for w in final.values())
    assert not torch.equal(final["shared.weight"], after["shared.weight"]), "training did not go on after the skip"
    skipped = [r.getMessage() for r in caplog.records if "skipping the update" in r.getMessage()]
    assert len(skipped) == 1 and named in skipped[0], skipped


def test_a_fault_in_the_second_micro_batch_is_traced_to_its_layer(tmp_path) -> None:
    """With gradient accumulation the bad token may sit in any micro-batch, not only the first one re-run."""
    trainer = _trainer("decoder-only", tmp_path, micro_batches=2)
    batch = trainer.train_batches.batches[0]
    only_second = sorted(
        set(batch["input_ids"][4:].flatten().tolist()) - set(batch["input_ids"][:4].flatten().tolist())
    )
    assert only_second, "the toy batch should hold a token seen only in its second half"
    with torch.no_grad():
        trainer.model.shared.weight[only_second[0]] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 1\b.*first non-finite output in layer shared"):
        trainer.train()


def test_the_gradient_diagnosis_does_not_blame_the_last_layer_when_clipping_is_off(tmp_path) -> None:
    trainer = _trainer("decoder-only", tmp_path, clip_grad_norm=None)
    _inject(trainer, "decoder.blocks.0.self_attn.k.weight", "parameter", float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"gradient reaching decoder\.blocks\.0\.self_attn\.k\.weight"):
        trainer.train()


# -- router collapse -----------------------------------------------------------------------------------------
def _collapse(trainer: Trainer, layer: str, expert: int, until: int | None = None) -> Callable[[], None]:
    """Force ``layer``'s router to send every token to ``expert`` (frozen bias), optionally releasing it after
    step ``until``; returns the release function."""
    router = trainer.model.get_submodule(layer).router

    def release() -> None:
        with torch.no_grad():
            router.bias.zero_()
        router.bias.requires_grad_(True)

    with torch.no_grad():
        router.bias.fill_(-30.0)
        router.bias[expert] = 30.0
    router.bias.requires_grad_(False)
    if until is not None:

        class Release(Callback):
            def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
                if trainer.step == until:
                    release()

        trainer.callbacks.insert(0, Release())
    return release


def _collapse_trainer(tmp_path: Any, **changes: Any) -> Trainer:
    data = synthetic_batches("encoder-decoder", count=4)
    config = tiny_train_config(**{"steps": 8, "log_every": 1, "eval_every": 100, "checkpoint_every": 100,
                                  "collapse_warning_share": 0.9, "collapse_warning_steps": 4, **changes})  # fmt: skip
    return Trainer(tiny_model("encoder-decoder", router_bias=True), config, train_batches=CyclingBatches(data[:-1]),
                   validation=data[-1:], run_dir=tmp_path, tensorboard=False)  # fmt: skip


def _collapse_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "collapse" in r.getMessage()]


@pytest.mark.parametrize(("layer", "name", "expert"), [("encoder.blocks.1.ffn", "encoder.1", 2),
                                                       ("decoder.blocks.1.ffn", "decoder.1", 0)])  # fmt: skip
def test_router_collapse_is_reported_once_with_the_layer_and_the_expert(tmp_path, caplog, layer, name, expert) -> None:
    trainer = _collapse_trainer(tmp_path)
    _collapse(trainer, layer, expert)
    with caplog.at_level(logging.WARNING, logger="switchformer.training.callbacks"):
        trainer.train()
    warnings = _collapse_warnings(caplog)
    assert len(warnings) == 1, warnings  # once, and only for the collapsed layer
    assert f"router collapse in {name}: expert {expert} has taken 100% of the tokens for 4 steps" in warnings[0]


def test_a_short_collapse_is_not_reported(tmp_path, caplog) -> None:
    trainer = _collapse_trainer(tmp_path)
    _collapse(trainer, "encoder.blocks.1.ffn", 1, until=3)  # 3 collapsed steps, fewer than the 4 that warn
    with caplog.at_level(logging.WARNING, logger="switchformer.training.callbacks"):
        trainer.train()
    assert _collapse_warnings(caplog) == []


def test_collapse_is_counted_in_steps_when_logging_is_sparse(tmp_path, caplog) -> None:
    """With log_every=2 each logged record stands for 2 steps: 4 collapsed steps are 2 records."""
    trainer = _collapse_trainer(tmp_path, log_every=2)
    _collapse(trainer, "encoder.blocks.1.ffn", 3)
    with caplog.at_level(logging.WARNING, logger="switchformer.training.callbacks"):
        trainer.train()
    warnings = _collapse_warnings(caplog)
    assert len(warnings) == 1 and "encoder.1: expert 3" in warnings[0] and "for 4 steps" in warnings[0], warnings
