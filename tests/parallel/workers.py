"""What each rank runs in the expert-parallel tests.

Every rank builds the same full model from one seed and computes the single-process result on the whole global
batch itself (the models are tiny), then runs the expert-parallel copy on its slice and asserts that outputs,
losses and synchronised gradients match the single-process ones. A failing assertion comes back to pytest with
the rank's traceback.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import time
from typing import Any

import torch

from switchformer import ModelConfig, MoEConfig, SwitchFFN, build_model
from switchformer.models.stack import set_activation_checkpointing
from switchformer.parallel import (
    CollectiveError,
    apply_expert_parallel,
    clip_grad_norm_,
    gather_full_optimizer_state,
    gather_full_state_dict,
    init_parallel,
    load_full_optimizer_state,
    load_full_state_dict,
    mean_over_ranks,
    slice_global_batch,
    sync_gradients,
)
from switchformer.parallel.adafactor import sharded_adafactor
from switchformer.parallel.expert_parallel import expert_shards
from switchformer.parallel.mesh import ParallelLayout
from switchformer.training.strategy import DistributedStrategy
from tests.parallel.tolerances import adafactor_drift_bound, adamw_drift_bound

ATOL = 1e-5
LR = 1e-2  # the optimizers' learning rate in check_model_training
D_MODEL, D_FF, NUM_EXPERTS = 16, 32, 8

# Switch-layer cases whose routing groups never straddle a rank's slice, so routing matches one process.
FFN_CASES: dict[str, dict[str, Any]] = {
    "capacity-drops": {"capacity_factor": 1.0, "min_capacity": 1, "grouping": "tokens", "group_size": 4},
    "top2": {"top_k": 2, "capacity_factor": 1.0, "min_capacity": 1, "grouping": "sequence"},
    "next-best": {"overflow": "next-best", "capacity_factor": 0.5, "min_capacity": 1, "grouping": "sequence"},
    "dropless-grouped-mm": {"dropless": True, "kernel": "grouped-mm", "grouping": "sequence"},
    "confidence-priority": {
        "priority": "confidence",
        "capacity_factor": 1.0,
        "min_capacity": 1,
        "grouping": "sequence",
    },
}


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.detach().float() - expected.detach().float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"


def _check_grads(model_ep: torch.nn.Module, model_ref: torch.nn.Module, layout: ParallelLayout, what: str) -> None:
    shards = expert_shards(model_ep)
    ref = dict(model_ref.named_parameters())
    for name, param in model_ep.named_parameters():
        expected = ref[name].grad
        if name in shards:
            expected = expected[shards[name].start : shards[name].stop]
        assert (param.grad is None) == (expected is None), f"{what}: gradient presence differs for {name}"
        if expected is not None:
            _close(f"{what}: grad of {name}", param.grad, expected)


def _switch_ffn(seed: int, **moe: Any) -> SwitchFFN:
    torch.manual_seed(seed)
    return SwitchFFN(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, router_jitter=0.0, **moe)


def _ffn_loss(out, probe: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return (out.hidden_states * probe).sum() / num_tokens + 0.01 * out.load_balancing_loss + 0.001 * out.z_loss


def check_switch_ffn(ep: int, cases: list[str], batch: int = 8, seq: int = 4) -> dict[str, Any]:
    """One Switch layer: outputs, router losses, input and parameter gradients against one process."""
    layout = init_parallel(ep)
    generator = torch.Generator().manual_seed(1)
    for case in cases:
        moe = FFN_CASES[case]
        layer = _switch_ffn(0, **moe)
        x = torch.randn(batch, seq, D_MODEL, generator=generator)
        probe = torch.randn(batch, seq, D_MODEL, generator=generator)
        layer_ep = apply_expert_parallel(copy.deepcopy(layer), layout)

        x_ref = x.clone().requires_grad_(True)
        out = layer(x_ref)
        _ffn_loss(out, probe, x.shape[0] * seq).backward()

        local = slice_global_batch({"x": x, "probe": probe}, layout)
        x_ep = local["x"].clone().requires_grad_(True)
        out_ep = layer_ep(x_ep)
        _ffn_loss(out_ep, local["probe"], x_ep.shape[0] * seq).backward()
        sync_gradients(layer_ep, layout)

        mine = slice_global_batch({"y": out.hidden_states, "gx": x_ref.grad}, layout)
        _close(f"{case}: output", out_ep.hidden_states, mine["y"])
        lb_ep = mean_over_ranks(out_ep.load_balancing_loss, layout)
        _close(f"{case}: load balancing loss", lb_ep, out.load_balancing_loss)
        _close(f"{case}: z-loss", mean_over_ranks(out_ep.z_loss, layout), out.z_loss)
        # Rank r's input only reaches L_r, and L is the mean of the W ranks' losses.
        _close(f"{case}: input grad", x_ep.grad / layout.world_size, mine["gx"])
        _check_grads(layer_ep, layer, layout, case)

        layer_ep.eval()
        with torch.no_grad():
            _close(
                f"{case}: eval output",
                layer_ep(local["x"]).hidden_states,
                slice_global_batch({"y": layer.eval()(x).hidden_states}, layout)["y"],
            )
    return {"cases": cases}


def check_degenerate_routing(ep: int) -> dict[str, Any]:
    """Every token routed to expert 0; rank 1's tokens are all padding, so it sends and receives nothing."""
    layout = init_parallel(ep)
    layer = _switch_ffn(0, dropless=True, grouping="sequence")
    with torch.no_grad():
        layer.router.weight.copy_(torch.full_like(layer.router.weight, -1.0))
        layer.router.weight[0] = 1.0
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2 * layout.world_size, 3, D_MODEL, generator=generator) + 0.1  # positive: expert 0 wins
    probe = torch.randn(x.shape, generator=generator)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    rows = x.shape[0] // layout.world_size
    mask[rows : 2 * rows] = False  # rank 1's slice
    layer_ep = apply_expert_parallel(copy.deepcopy(layer), layout)

    out = layer(x, token_mask=mask)
    assert int(out.tokens_per_expert[0]) == int(mask.sum()), "the router should send every real token to expert 0"
    (out.hidden_states * probe).sum().div(x.shape[0] * x.shape[1]).backward()

    local = slice_global_batch({"x": x, "probe": probe, "mask": mask}, layout)
    out_ep = layer_ep(local["x"], token_mask=local["mask"])
    (out_ep.hidden_states * local["probe"]).sum().div(local["x"].shape[0] * x.shape[1]).backward()
    sync_gradients(layer_ep, layout)
    _close("degenerate: output", out_ep.hidden_states, slice_global_batch({"y": out.hidden_states}, layout)["y"])
    _check_grads(layer_ep, layer, layout, "degenerate")
    with torch.no_grad():  # inference takes part in the same collectives
        layer_ep.eval()(local["x"], token_mask=local["mask"])
    return {"ok": True}


def _tiny_model_config(num_experts: int = NUM_EXPERTS) -> ModelConfig:
    moe = MoEConfig(
        num_experts=num_experts,
        capacity_factor=1.0,
        min_capacity=1,
        grouping="sequence",
        router_jitter=0.0,
        z_loss_coef=1e-3,
    )
    return ModelConfig(
        vocab_size=64, d_model=32, d_ff=32, num_heads=4, num_layers=2, dropout=0.0, sparse_every=1, moe=moe
    )


def _global_batch(rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Padding in the same places of every rank's slice, so each slice holds the same number of label tokens."""
    input_ids = torch.randint(2, 64, (rows, 6), generator=generator)
    attention_mask = torch.ones(rows, 6, dtype=torch.long)
    attention_mask[1::2, -2:] = 0
    labels = torch.randint(2, 64, (rows, 5), generator=generator)
    labels[1::2, -1] = -100
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


@contextlib.contextmanager
def _counting_all_to_alls():
    """Count ``all_to_all_single`` calls in the block; yields a one-element list filled in on exit."""
    counted = [0]
    original = torch.distributed.all_to_all_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return original(*args, **kwargs)

    torch.distributed.all_to_all_single = counting
    calls: list[int] = []
    try:
        yield calls
    finally:
        torch.distributed.all_to_all_single = original
        calls.append(counted[0])


def _optimizer(kind: str, model: torch.nn.Module, layout: ParallelLayout | None) -> torch.optim.Optimizer:
    """AdamW, or Adafactor: torch's own for the single-process model, the sharded one for an expert-parallel one."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    if layout is None:
        return torch.optim.Adafactor(model.parameters(), lr=LR, weight_decay=0.1)
    return sharded_adafactor(model, layout, list(model.parameters()), lr=LR, weight_decay=0.1)


def check_model_training(
    ep: int, steps: int = 3, rows: int = 8, activation_checkpointing: int = 0, optimizer_kind: str = "adamw"
) -> dict[str, Any]:
    """A tiny encoder-decoder Switch Transformer: logits, loss and gradients, a few AdamW steps with global-norm
    clipping, gathered model and optimizer states, and loading a single-process state into the sharded model.
    With ``activation_checkpointing`` the sharded model recomputes its blocks (all-to-alls included) in backward."""
    layout = init_parallel(ep)
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = build_model(_tiny_model_config())
    model_ep = apply_expert_parallel(copy.deepcopy(model), layout)
    set_activation_checkpointing(model_ep, activation_checkpointing)
    optimizer = _optimizer(optimizer_kind, model, None)
    optimizer_ep = _optimizer(optimizer_kind, model_ep, layout)

    initial = gather_full_state_dict(model_ep, layout)
    assert list(initial) == list(model.state_dict()), "gathered state must have the single-process keys, in order"
    for name, value in model.state_dict().items():
        assert torch.equal(initial[name], value), f"gathered {name} differs from the single-process weights"

    losses, losses_ep = [], []
    for step in range(steps):
        batch = _global_batch(rows, generator)
        out = _forward(model, batch)
        out.loss.backward()
        local = slice_global_batch(batch, layout)
        with _counting_all_to_alls() as forward_calls:
            out_ep = _forward(model_ep, local)
        with _counting_all_to_alls() as backward_calls:
            out_ep.loss.backward()
        # A Switch layer's forward: counts, rows out, rows back; its backward: rows out and back. A recomputed
        # block runs its forward's three again in the backward pass.
        layers = len(expert_shards(model_ep)) // 2  # wi and wo per layer
        recomputed = 3 * layers if activation_checkpointing else 0
        calls = (forward_calls, backward_calls)
        assert calls == ([3 * layers], [2 * layers + recomputed]), calls
        sync_gradients(model_ep, layout)
        if step == 0:
            _close("logits", out_ep.logits, slice_global_batch({"logits": out.logits}, layout)["logits"])
            _check_grads(model_ep, model, layout, "model")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        norm_ep = clip_grad_norm_(model_ep, 0.5, layout)
        _close(f"step {step}: gradient norm", norm_ep, norm)
        optimizer.step()
        optimizer_ep.step()
        optimizer.zero_grad()
        optimizer_ep.zero_grad()
        losses.append(float(out.loss.detach()))
        losses_ep.append(float(mean_over_ranks(out_ep.loss, layout)))
    for step, (a, b) in enumerate(zip(losses_ep, losses, strict=True)):
        assert abs(a - b) <= ATOL, f"step {step}: loss {a} with expert parallelism vs {b} in one process"

    # The weights may differ by what the optimizer's arithmetic allows after these steps (tests/parallel/tolerances);
    # the gradients above and the optimizer state below are the tight checks.
    full = gather_full_state_dict(model_ep, layout)
    reference = model.state_dict()
    for name, value in reference.items():
        scale, lrs = value.abs().max().item(), [LR] * steps
        if optimizer_kind == "adamw":
            bound = adamw_drift_bound(lrs, optimizer.defaults["betas"], weight_scale=scale)
        else:
            bound = adafactor_drift_bound(lrs, numel=value.numel(), weight_scale=scale)
        _close(f"gathered {name}", full[name], value, atol=bound)
    full_optimizer = gather_full_optimizer_state(optimizer_ep, model_ep, layout)
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            _close(f"gathered optimizer state {index}.{key}", full_optimizer["state"][index][key], value)

    # Resume the single-process state at this world size: fresh (differently initialised) sharded model.
    torch.manual_seed(123)
    resumed = apply_expert_parallel(build_model(_tiny_model_config()), layout)
    resumed_optimizer = _optimizer(optimizer_kind, resumed, layout)
    load_full_state_dict(resumed, reference, layout)
    load_full_optimizer_state(resumed_optimizer, resumed, copy.deepcopy(optimizer.state_dict()), layout)
    batch = _global_batch(rows, generator)
    for m, opt, data in ((model, optimizer, batch), (resumed, resumed_optimizer, slice_global_batch(batch, layout))):
        _forward(m, data).loss.backward()
        if m is resumed:
            sync_gradients(resumed, layout)
        opt.step()
        opt.zero_grad()
    after = _forward(model, batch).loss
    after_ep = mean_over_ranks(_forward(resumed, slice_global_batch(batch, layout)).loss, layout)
    _close("loss after resuming from a single-process state", after_ep, after)
    return {"losses": losses_ep, "reference_losses": losses}


def _init_with_short_timeout(ep: int, seconds: float) -> ParallelLayout:
    """Join the world with a generous timeout (processes start at different speeds on a busy machine), then build
    the expert-parallel groups, which carry every collective under test, with the short one."""
    torch.distributed.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    return init_parallel(ep, timeout=datetime.timedelta(seconds=seconds))


def check_dead_peer(ep: int, timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 dies before the forward pass; the others must fail with a CollectiveError, not hang."""
    layout = _init_with_short_timeout(ep, timeout_s_pg)
    layer = apply_expert_parallel(_switch_ffn(0), layout)
    x = torch.randn(2, 4, D_MODEL)
    layer(x)  # one healthy step first
    if layout.rank == 1:
        os._exit(17)
    return _time_failure(lambda: layer(x).hidden_states.sum().backward())


def check_dead_peer_while_decoding(ep: int, timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 dies between two decoding steps; the others must fail in the stop agreement, not hang in it."""
    layout = _init_with_short_timeout(ep, timeout_s_pg)
    strategy = DistributedStrategy(layout)
    assert strategy.agree_to_stop(layout.rank == 0) is False  # one healthy step first: rank 1 is not done
    if layout.rank == 1:
        os._exit(17)
    return _time_failure(lambda: strategy.agree_to_stop(True))


def check_hung_peer(ep: int, timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 stays alive but stops taking part; the others must fail once the process-group timeout passes."""
    layout = _init_with_short_timeout(ep, timeout_s_pg)
    layer = apply_expert_parallel(_switch_ffn(0), layout)
    x = torch.randn(2, 4, D_MODEL)
    layer(x)
    if layout.rank == 1:
        time.sleep(timeout_s_pg + 2)
        os._exit(0)
    return _time_failure(lambda: layer(x).hidden_states.sum().backward())


def _time_failure(step) -> dict[str, Any]:
    started = time.monotonic()
    try:
        step()
    except CollectiveError as error:
        return {"error": str(error), "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}
