"""What each rank runs in the layout tests (launched by ``tests.parallel.launcher``).

Every rank builds the single-process model itself from the same seed and computes the single-process result on
the whole global batch (the models are tiny), then runs the parallel copy on its slice, built as the trainer builds
it (meta device, expert parallelism, FSDP2, materialised shards), and asserts that outputs, losses, gradients and
updates match. A failing assertion comes back to pytest with the rank's traceback.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from switchformer import ModelConfig, MoEConfig, SwitchFFN, build_model
from switchformer.errors import CheckpointError
from switchformer.local_blocks import local_block
from switchformer.models.stack import set_activation_checkpointing
from switchformer.parallel import (
    Backend,
    CollectiveError,
    ParallelDims,
    ParallelLayout,
    apply_expert_parallel,
    expert_shards,
    init_parallel,
    mean_over_ranks,
    slice_global_batch,
)
from switchformer.run_folder import step_dir_name
from switchformer.training.checkpoint import save_checkpoint
from switchformer.training.config import OptimizerKind, TrainConfig
from switchformer.training.optim import build_optimizer
from switchformer.training.sharded_checkpoint import load_into_sharded, optimizer_state_by_name
from switchformer.training.strategy import DistributedStrategy
from tests.parallel.tolerances import adafactor_drift_bound, adamw_drift_bound

ATOL = 1e-5
LR = 1e-2  # the optimizers' learning rate in check_model_training
SEED = 0  # the weights' seed, the same in every layout
D_MODEL, D_FF, NUM_EXPERTS = 16, 32, 8
FULL = StateDictOptions(full_state_dict=True)

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


def join(dims: dict[str, int], timeout: datetime.timedelta | None = None) -> ParallelLayout:
    """This rank's layout over gloo (CPU tensors); ``dims`` are :class:`ParallelDims` fields."""
    options = {} if timeout is None else {"timeout": timeout}
    return init_parallel(ParallelDims(**dims), backend=Backend.GLOO, **options)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.detach().float() - expected.detach().float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"


# -- one Switch layer ----------------------------------------------------------------------------------------
def _switch_ffn(seed: int, **moe: Any) -> SwitchFFN:
    torch.manual_seed(seed)
    return SwitchFFN(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, router_jitter=0.0, **moe)


def _ffn_loss(out, probe: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return (out.hidden_states * probe).sum() / num_tokens + 0.01 * out.load_balancing_loss + 0.001 * out.z_loss


def _reduce_layer_gradients(layer: SwitchFFN, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """The gradient FSDP2 leaves for a layer it does not wrap here (``parallel/data_parallel.py``'s arithmetic):
    the router's is the mean over all ranks; an expert slice's local gradient already sums the tokens of its ``ep``
    group, so it is summed over the ranks holding the same slice and divided by the world size."""
    reduced = {}
    for name, param in layer.named_parameters():
        grad = param.grad.to_local().clone() if isinstance(param.grad, DTensor) else param.grad.clone()
        if name in expert_shards(layer):
            for dim in ("dp_replicate", "dp_shard"):
                if getattr(layout.dims, dim) > 1:
                    dist.all_reduce(grad, group=layout.mesh.get_group(dim))
        else:
            dist.all_reduce(grad)
        reduced[name] = grad / layout.world_size
    return reduced


def _check_layer_gradients(layer_ep: SwitchFFN, layer: SwitchFFN, layout: ParallelLayout, what: str) -> None:
    shards = expert_shards(layer_ep)
    reduced = _reduce_layer_gradients(layer_ep, layout)
    for name, param in layer.named_parameters():
        expected = param.grad
        if name in shards:
            expected = expected[shards[name].start : shards[name].stop]
        _close(f"{what}: grad of {name}", reduced[name], expected)


def check_switch_ffn(dims: dict[str, int], cases: list[str], batch: int = 8, seq: int = 4) -> dict[str, Any]:
    """One Switch layer: outputs, router losses, input and parameter gradients against one process."""
    layout = join(dims)
    generator = torch.Generator().manual_seed(1)
    for case in cases:
        moe = FFN_CASES[case]
        layer = _switch_ffn(0, **moe)
        x = torch.randn(batch, seq, D_MODEL, generator=generator)
        probe = torch.randn(batch, seq, D_MODEL, generator=generator)
        layer_ep = apply_expert_parallel(copy.deepcopy(layer), layout)
        assert len(expert_shards(layer_ep)) == 2 * (layout.ep_size > 1), "wi and wo are split over the ep ranks"

        x_ref = x.clone().requires_grad_(True)
        out = layer(x_ref)
        _ffn_loss(out, probe, x.shape[0] * seq).backward()

        local = slice_global_batch({"x": x, "probe": probe}, layout)
        x_ep = local["x"].clone().requires_grad_(True)
        out_ep = layer_ep(x_ep)
        _ffn_loss(out_ep, local["probe"], x_ep.shape[0] * seq).backward()

        mine = slice_global_batch({"y": out.hidden_states, "gx": x_ref.grad}, layout)
        _close(f"{case}: output", out_ep.hidden_states, mine["y"])
        lb_ep = mean_over_ranks(out_ep.load_balancing_loss, layout)
        _close(f"{case}: load balancing loss", lb_ep, out.load_balancing_loss)
        _close(f"{case}: z-loss", mean_over_ranks(out_ep.z_loss, layout), out.z_loss)
        # Rank r's input only reaches L_r, and L is the mean of the W ranks' losses.
        _close(f"{case}: input grad", x_ep.grad / layout.world_size, mine["gx"])
        _check_layer_gradients(layer_ep, layer, layout, case)

        layer_ep.eval()
        with torch.no_grad():
            _close(
                f"{case}: eval output",
                layer_ep(local["x"]).hidden_states,
                slice_global_batch({"y": layer.eval()(x).hidden_states}, layout)["y"],
            )
    return {"cases": cases}


def check_degenerate_routing(dims: dict[str, int]) -> dict[str, Any]:
    """Every token routed to expert 0; rank 1's tokens are all padding, so it sends and receives nothing."""
    layout = join(dims)
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
    sent = []
    dispatch = layer_ep.dispatcher.dispatch

    def recording(*args: Any, **kwargs: Any) -> Any:
        batch, state = dispatch(*args, **kwargs)
        sent.append((state.send_splits, state.recv_splits))
        return batch, state

    layer_ep.dispatcher.dispatch = recording
    out_ep = layer_ep(local["x"], token_mask=local["mask"])
    (out_ep.hidden_states * local["probe"]).sum().div(local["x"].shape[0] * x.shape[1]).backward()
    _close("degenerate: output", out_ep.hidden_states, slice_global_batch({"y": out.hidden_states}, layout)["y"])
    _check_layer_gradients(layer_ep, layer, layout, "degenerate")
    with torch.no_grad():  # inference takes part in the same collectives
        layer_ep.eval()(local["x"], token_mask=local["mask"])
    return {"rank": layout.rank, "ep_rank": layout.ep_rank, "splits": sent[0]}


# -- a whole model ---------------------------------------------------------------------------------------------
def tiny_model_config(num_experts: int = NUM_EXPERTS) -> ModelConfig:
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
    original = dist.all_to_all_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return original(*args, **kwargs)

    dist.all_to_all_single = counting
    calls: list[int] = []
    try:
        yield calls
    finally:
        dist.all_to_all_single = original
        calls.append(counted[0])


def sharded_model(layout: ParallelLayout, config: ModelConfig, *, seed: int = SEED, checkpoint_every: int = 0):
    """The model as the trainer builds it under ``layout``: on the meta device, then split, sharded, materialised."""
    model = build_model(config, device="meta")
    set_activation_checkpointing(model, checkpoint_every)
    return DistributedStrategy(layout).prepare_model(model, device=layout.device, seed=seed)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL)  # a collective: every rank gets the whole model


def check_model_training(
    dims: dict[str, int],
    checkpoint_dir: str,
    steps: int = 3,
    rows: int = 8,
    activation_checkpointing: int = 0,
    optimizer_kind: str = "adamw",
) -> dict[str, Any]:
    """A tiny encoder-decoder Switch Transformer built as the trainer builds it: the initial weights, logits, loss
    and gradients, a few steps with global-norm clipping, the model and optimizer states, and loading a
    single-process checkpoint into a fresh sharded model. With ``activation_checkpointing`` the sharded model
    recomputes its blocks (all-to-alls included) in backward."""
    layout = join(dims)
    strategy = DistributedStrategy(layout)
    config = tiny_model_config()
    reference = build_model(config, seed=SEED)
    model = sharded_model(layout, config, checkpoint_every=activation_checkpointing)
    held = held_bytes(model)
    train_config = TrainConfig(optimizer=OptimizerKind(optimizer_kind), lr=LR, weight_decay=0.1)
    optimizer = build_optimizer(reference, train_config)
    optimizer_p = build_optimizer(model, train_config, layout=layout)

    initial = _full_state(model)
    assert list(initial) == list(reference.state_dict()), "the sharded state must have the one-process keys, in order"
    for name, value in reference.state_dict().items():
        assert torch.equal(initial[name], value), f"initial {name} differs from build_model(config, seed={SEED})"

    generator = torch.Generator().manual_seed(3)
    layers = len(expert_shards(model)) // 2  # wi and wo per layer
    losses, losses_p = [], []
    for step in range(steps):
        batch = _global_batch(rows, generator)
        out = _forward(reference, batch)
        out.loss.backward()
        local = slice_global_batch(batch, layout)
        with _counting_all_to_alls() as forward_calls:
            out_p = _forward(model, local)
        with _counting_all_to_alls() as backward_calls:
            out_p.loss.backward()
        # A Switch layer's forward: counts, rows out, rows back; its backward: rows out and back. A recomputed
        # block runs its forward's three again in the backward pass.
        recomputed = 3 * layers if activation_checkpointing else 0
        calls = (forward_calls, backward_calls)
        assert calls == ([3 * layers], [2 * layers + recomputed]), calls
        if step == 0:
            _close("logits", out_p.logits, slice_global_batch({"logits": out.logits}, layout)["logits"])
            for name, param in model.named_parameters():  # the gradient FSDP2 reduced, against one process's
                _close(f"grad of {name}", param.grad.full_tensor(), dict(reference.named_parameters())[name].grad)
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        norm_p = strategy.clip_grad_norm(model, 0.5)
        assert abs(norm_p - float(norm)) <= ATOL * max(1.0, float(norm)), (step, norm_p, float(norm))
        optimizer.step()
        optimizer_p.step()
        optimizer.zero_grad()
        optimizer_p.zero_grad()
        losses.append(float(out.loss.detach()))
        losses_p.append(float(mean_over_ranks(out_p.loss, layout)))
    for step, (a, b) in enumerate(zip(losses_p, losses, strict=True)):
        assert abs(a - b) <= ATOL, f"step {step}: loss {a} in {layout.dims.describe()} vs {b} in one process"

    # The weights may differ by what the optimizer's arithmetic allows after these steps (tests/parallel/tolerances);
    # the gradients above and the optimizer state below are the tight checks.
    full = _full_state(model)
    expected = reference.state_dict()
    for name, value in expected.items():
        scale, lrs = value.abs().max().item(), [LR] * steps
        if optimizer_kind == "adamw":
            bound = adamw_drift_bound(lrs, train_config.betas, weight_scale=scale)
        else:
            bound = adafactor_drift_bound(lrs, numel=value.numel(), weight_scale=scale)
        _close(f"weights of {name}", full[name], value, atol=bound)
    full_optimizer = get_optimizer_state_dict(model, optimizer_p, options=FULL)
    expected_optimizer = optimizer_state_by_name(reference, optimizer, optimizer.state_dict())
    assert full_optimizer["state"].keys() == expected_optimizer["state"].keys()
    for name, entry in expected_optimizer["state"].items():
        assert full_optimizer["state"][name].keys() == entry.keys(), name
        for key, value in entry.items():
            _close(f"optimizer state {name}.{key}", torch.as_tensor(full_optimizer["state"][name][key]), value)

    # A one-process checkpoint loads into a fresh, differently initialised sharded model and optimizer.
    path = Path(checkpoint_dir) / step_dir_name(steps)
    if layout.rank == 0:
        state = {"step": steps}
        save_checkpoint(
            Path(checkpoint_dir),
            steps,
            model_state=expected,
            optimizer_state=optimizer.state_dict(),
            trainer_state=state,
            config={},
        )
    dist.barrier()
    resumed = sharded_model(layout, config, seed=123)
    resumed_optimizer = build_optimizer(resumed, train_config, layout=layout)
    load_into_sharded(path, resumed, resumed_optimizer)
    for name, value in _full_state(resumed).items():
        assert torch.equal(value, expected[name]), f"{name} was not loaded exactly"
    batch = _global_batch(rows, generator)
    for m, opt, data in (
        (reference, optimizer, batch),
        (resumed, resumed_optimizer, slice_global_batch(batch, layout)),
    ):
        _forward(m, data).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _forward(reference, batch).loss
    after_p = mean_over_ranks(_forward(resumed, slice_global_batch(batch, layout)).loss, layout)
    _close("loss after loading a single-process checkpoint", after_p, after)

    # A checkpoint of another expert count is refused, naming the mismatch, before anything is loaded.
    other = Path(checkpoint_dir) / "other"
    if layout.rank == 0:
        four = build_model(tiny_model_config(num_experts=4), seed=SEED).state_dict()
        save_checkpoint(other, 1, model_state=four, optimizer_state=None, trainer_state={}, config={})
    dist.barrier()
    before = _full_state(resumed)
    try:
        load_into_sharded(other / step_dir_name(1), resumed, None)
    except CheckpointError as error:
        assert "another model config" in str(error) and "experts.wi (4, 32, 32) vs model (8, 32, 32)" in str(error)
    else:
        raise AssertionError("a checkpoint with 4 experts loaded into a model with 8")
    assert all(torch.equal(v, before[n]) for n, v in _full_state(resumed).items()), "a refused load changed weights"
    return {"losses": losses_p, "reference_losses": losses, "held": held}


def check_initial_weights(dims: dict[str, int], seed: int) -> dict[str, Any]:
    """Every rank's block of every weight is exactly that block of ``build_model(config, seed=seed)``."""
    layout = join(dims)
    config = tiny_model_config()
    reference = dict(build_model(config, seed=seed).named_parameters())
    model = sharded_model(layout, config, seed=seed)
    held = {}
    for name, param in model.named_parameters():
        local, offset = local_block(param)
        block = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
        expected = reference[name].detach()[block]
        assert torch.equal(local, expected), f"rank {layout.rank}: the block at {offset} of {name} differs"
        held[name] = (offset[0] if offset else 0, local.shape[0] if local.dim() else 1)
    return {"rank": layout.rank, "held": held}


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """The bytes of parameter storage this process holds (padding included), expert weights and the rest."""
    held = {"expert": 0, "dense": 0}
    storages = set()
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param.data
        storage = local.untyped_storage()
        if storage.data_ptr() in storages:  # counted once however many views share it
            continue
        storages.add(storage.data_ptr())
        held["expert" if ".experts." in name else "dense"] += storage.nbytes()
    return held


# -- faults ----------------------------------------------------------------------------------------------------
def _join_with_short_timeout(dims: dict[str, int], seconds: float) -> ParallelLayout:
    """Join the world with a generous timeout (processes start at different speeds on a busy machine), then build
    the layout, whose process groups carry every collective under test, with ``seconds``."""
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    return join(dims, timeout=datetime.timedelta(seconds=seconds))


def check_dead_peer(dims: dict[str, int], timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 dies before the forward pass; the others must fail with a CollectiveError, not hang."""
    layout = _join_with_short_timeout(dims, timeout_s_pg)
    layer = apply_expert_parallel(_switch_ffn(0), layout)
    x = torch.randn(2, 4, D_MODEL)
    layer(x)  # one healthy step first
    if layout.rank == 1:
        os._exit(17)
    return _time_failure(lambda: layer(x).hidden_states.sum().backward())


def check_dead_peer_while_decoding(dims: dict[str, int], timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 dies between two decoding steps; the others must fail in the stop agreement, not hang in it."""
    layout = _join_with_short_timeout(dims, timeout_s_pg)
    strategy = DistributedStrategy(layout)
    assert strategy.agree_to_stop(layout.rank == 0) is False  # one healthy step first: rank 1 is not done
    if layout.rank == 1:
        os._exit(17)
    return _time_failure(lambda: strategy.agree_to_stop(True))


def check_hung_peer(dims: dict[str, int], timeout_s_pg: float) -> dict[str, Any]:
    """Rank 1 stays alive but stops taking part; the others must fail once the process-group timeout passes."""
    layout = _join_with_short_timeout(dims, timeout_s_pg)
    layer = apply_expert_parallel(_switch_ffn(0), layout)
    x = torch.randn(2, 4, D_MODEL)
    layer(x)
    if layout.rank == 1:
        time.sleep(timeout_s_pg + 5)  # well past the timeout: the survivor must not be waiting for its exit
        os._exit(0)
    return _time_failure(lambda: layer(x).hidden_states.sum().backward())


def _time_failure(step) -> dict[str, Any]:
    started = time.monotonic()
    try:
        step()
    except CollectiveError as error:
        return {"error": str(error), "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


# -- streamed checkpoint loads -------------------------------------------------------------------------------
def check_streamed_load(dims: dict[str, int], folder: str, bf16: bool) -> dict[str, Any]:
    """Fill this rank's shards from a safetensors checkpoint (as ``finetune`` does under torchrun) and return the
    bytes it read and the logits of a fixed batch (the same on every rank)."""
    from switchformer.interop.checkpoint_io import open_checkpoint

    layout = join(dims)
    checkpoint = open_checkpoint(folder)
    model = build_model(checkpoint.config, device="meta")
    checkpoint.cast(model, torch.bfloat16 if bf16 else torch.float32)
    model = DistributedStrategy(layout).prepare_model(model, device=layout.device, seed=1, fill=checkpoint.fill)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, 64, (4, 7), generator=generator)
    decoder_input_ids = torch.randint(2, 64, (4, 5), generator=generator)
    with torch.no_grad():
        logits = model.eval()(input_ids, decoder_input_ids=decoder_input_ids).logits
    return {"bytes_read": checkpoint.files.bytes_read, "logits": logits.float()}
