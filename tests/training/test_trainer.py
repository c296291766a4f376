"""The training loop: learning, batch-split invariance, exact resume, non-finite guards, outputs."""

from __future__ import annotations

import json

import pytest
import torch

from switchformer.models.stack import TransformerStack
from switchformer.training.callbacks import Callback
from switchformer.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from switchformer.training.config import TrainConfig
from switchformer.training.metrics import read_metrics
from switchformer.training.strategy import SingleProcess
from switchformer.training.trainer import CyclingBatches, NonFiniteLossError, Trainer, split_batch


def _trainer(toy, tmp_path, arch="decoder-only", *, resume=False, train_changes=None, model_changes=None, count=4):
    tiny_model, batches, train_config = toy
    data = batches(arch, count=count)
    return Trainer(
        tiny_model(arch, **(model_changes or {})),
        train_config(**(train_changes or {})),
        train_batches=CyclingBatches(data[:-1]),
        validation=data[-1:],
        run_dir=tmp_path,
        resume=resume,
        tensorboard=False,
    )


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
def test_loss_falls_on_a_tiny_run(toy, tmp_path, arch):
    trainer = _trainer(toy, tmp_path, arch, train_changes={"steps": 40, "eval_every": 40, "checkpoint_every": 40})
    before = trainer.evaluate()["val_loss"]
    summary = trainer.train()
    records = read_metrics(tmp_path)
    assert summary["final_val_loss"] < before - 1.0, (before, summary)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
@pytest.mark.parametrize("micro_batches", [2, 4])
def test_loss_and_gradients_do_not_depend_on_how_the_batch_is_split(toy, tmp_path, arch, micro_batches):
    _, batches, _ = toy
    batch = batches(arch, count=1)[0]
    batch["labels"][0, 5:] = -100  # uneven label counts across micro-batches: the classic accumulation bug
    results = []
    for parts in (1, micro_batches):
        trainer = _trainer(
            toy,
            tmp_path / str(parts),
            arch,
            train_changes={"micro_batches": parts},
            model_changes={"z_loss_coef": 1e-3},
        )
        figures = trainer.accumulate_gradients(batch)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((figures, grads))
    (one, grads_one), (split, grads_split) = results
    for key in ("loss", "ce_loss", "aux_loss", "load_balancing_loss", "z_loss"):
        assert one[key] == pytest.approx(split[key], rel=1e-5, abs=1e-7), key
    assert grads_one.keys() == grads_split.keys()
    for name in grads_one:
        torch.testing.assert_close(grads_split[name], grads_one[name], atol=1e-6, rtol=1e-4, msg=name)


def test_indivisible_micro_batches_are_a_clear_error(toy):
    _, batches, _ = toy
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by micro_batches=3"):
        split_batch(batches(count=1)[0], 3)


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt  # Ctrl-C after the step, before its checkpoint


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(toy, tmp_path, arch):
    changes = {"steps": 12, "checkpoint_every": 4, "eval_every": 6, "keep_checkpoints": 5}
    jitter = {"router_jitter": 0.1}  # randomness in the forward pass: the RNG state must be restored too
    full = _trainer(toy, tmp_path / "full", arch, train_changes=changes, model_changes=jitter)
    full.train()
    interrupted = _trainer(toy, tmp_path / "resumed", arch, train_changes=changes, model_changes=jitter)
    interrupted.callbacks.insert(0, _CrashAt(7))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-00000004"
    resumed = _trainer(toy, tmp_path / "resumed", arch, resume=True, train_changes=changes, model_changes=jitter)
    assert resumed.step == 4
    resumed.train()
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"], x["step"]
        assert x.get("val_loss") == y.get("val_loss")
    final_a = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints")).model_state
    final_b = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints")).model_state
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_metrics_log_has_the_documented_fields(toy, tmp_path):
    trainer = _trainer(toy, tmp_path, train_changes={"steps": 10, "log_every": 5, "eval_every": 10})
    trainer.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10]
    for key in ("step", "loss", "lr", "tokens_per_second", "load_balancing_loss", "dropped_fraction", "routing"):
        assert key in records[0], key
    assert "val_loss" in records[-1] and "val_perplexity" in records[-1]
    layer = records[-1]["routing"]["decoder.1"]
    assert {"max_load_ratio", "idle_experts", "router_entropy", "dropped_fraction", "load"} <= set(layer)
    assert len(layer["load"]) == 4 and abs(sum(layer["load"]) - 1) < 1e-3
    assert layer["max_load_ratio"] >= 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["final_val_loss"] == records[-1]["val_loss"]


def test_keeps_only_the_last_k_checkpoints(toy, tmp_path):
    trainer = _trainer(toy, tmp_path, train_changes={"steps": 12, "checkpoint_every": 3, "keep_checkpoints": 2})
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000009", "step-00000012"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_is_caught_and_names_a_layer(toy, tmp_path, policy):
    trainer = _trainer(toy, tmp_path, train_changes={"steps": 6, "non_finite": policy, "max_skipped_steps": 3})
    target = trainer.model.decoder.blocks[1].ffn.experts.wo
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] in (3, 4):  # step 3's forward, and the diagnostic re-run of it
            return output * float("inf")
        return output

    trainer.model.decoder.blocks[1].ffn.experts.register_forward_hook(poison)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"step 3.*layer decoder\.blocks\.1\.ffn\.experts") as info:
            trainer.train()
        assert "learning rate" in str(info.value)
    else:
        before = target.detach().clone()
        trainer.train()  # step 3 is skipped, the rest apply
        assert trainer.step == 6
        assert torch.isfinite(target).all() and not torch.equal(before, target.detach())


def test_consecutive_skips_stop_the_run(toy, tmp_path):
    trainer = _trainer(toy, tmp_path, train_changes={"steps": 6, "non_finite": "skip", "max_skipped_steps": 2})
    with torch.no_grad():
        trainer.model.shared.weight[5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="2 steps in a row were skipped"):
        trainer.train()


def test_train_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig\.micro_batches=0 is invalid"):
        TrainConfig(micro_batches=0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match=r"activation_checkpointing.*0 = off"):
        TrainConfig(activation_checkpointing=-1)


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
@pytest.mark.parametrize(
    "option",
    [{"chunked_loss": True}, {"activation_checkpointing": 1}, {"compile": "aot_eager"}],
    ids=["chunked-loss", "activation-checkpointing", "compiled-blocks"],
)
def test_options_that_change_how_a_step_runs_train_like_the_default(toy, tmp_path, arch, option):
    """The chunked loss (no logits in memory), recomputed blocks and compiled blocks: the same losses, with jitter
    noise drawn (``aot_eager`` traces the same graphs as inductor without generating code)."""
    logs = []
    for name, changes in (("default", {}), ("option", option)):
        trainer = _trainer(
            toy, tmp_path / name, arch, train_changes={"steps": 5, **changes}, model_changes={"router_jitter": 0.05}
        )
        stacks = [m for m in trainer.model.modules() if isinstance(m, TransformerStack)]
        assert stacks and all(s.checkpoint_every == changes.get("activation_checkpointing", 0) for s in stacks)
        assert all((s.compiled_blocks is not None) == ("compile" in changes) for s in stacks)
        trainer.train()
        logs.append([(r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / name)])
    assert len(logs[0]) == len(logs[1]) >= 5
    for (loss, val), (option_loss, option_val) in zip(*logs, strict=True):
        assert option_loss == pytest.approx(loss, rel=1e-5)
        assert (val is None and option_val is None) or option_val == pytest.approx(val, rel=1e-5)


def test_an_unknown_compile_backend_is_a_clear_error(toy, tmp_path):
    with pytest.raises(ValueError, match=r"backend 'inductr' is unknown; choose one of .*'inductor'"):
        _trainer(toy, tmp_path, train_changes={"compile": "inductr"})


def test_cpu_training_keeps_freed_memory_in_the_process():
    from switchformer.host_memory import keep_freed_memory

    # glibc on Linux (this suite's platforms); a second call is the cached first answer.
    assert keep_freed_memory() is True and keep_freed_memory() is True


def test_cpu_training_flushes_denormals_while_it_runs_and_restores_the_mode(toy, tmp_path):
    from switchformer.training.denormals import denormals_are_flushed

    seen: list[bool] = []

    class Probe(Callback):
        def on_step_end(self, trainer, record):
            seen.append(denormals_are_flushed())

    trainer = _trainer(toy, tmp_path, train_changes={"steps": 3})
    trainer.callbacks.append(Probe())
    supported = torch.set_flush_denormal(False)
    trainer.train()
    assert seen == [supported] * 3, "flushed at every step where the CPU can"
    assert not denormals_are_flushed(), "the caller's mode is back: Python floats and Hypothesis obey it"


def test_a_rank_other_than_the_main_one_keeps_only_the_callbacks_that_run_on_every_rank(toy, tmp_path):
    class Printer(Callback):  # main rank only, the default
        pass

    class Decider(Callback):
        every_rank = True

    class OtherRank(SingleProcess):
        is_main = False

    tiny_model, batches, train_config = toy
    data = batches(count=2)
    printer, decider = Printer(), Decider()

    def trainer(strategy):
        return Trainer(
            tiny_model(),
            train_config(),
            train_batches=CyclingBatches(data[:1]),
            validation=data[1:],
            run_dir=tmp_path,
            callbacks=[printer, decider],
            tensorboard=False,
            strategy=strategy,
        )

    main_callbacks = trainer(SingleProcess()).callbacks
    assert main_callbacks[:2] == [printer, decider] and len(main_callbacks) == 3  # and the collapse warning
    assert trainer(OtherRank()).callbacks == [decider]
