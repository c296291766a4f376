"""Routing groups spanning several processes' slices of a batch (moe/batch_slices.py): the slices, routed in
threads that exchange their counts as processes would, keep exactly the claims one process keeps on the whole
batch, and their auxiliary losses average to one process's."""

from __future__ import annotations

import threading

import pytest
import torch

from switchformer.moe.assignment import route
from switchformer.moe.batch_slices import BatchSlice, SpanningGroupsWarning, sliced_batch
from switchformer.moe.config import MoEConfig
from switchformer.moe.losses import load_balancing_loss, router_z_loss

E = 4


class ThreadGather:
    """``BatchSlice.gather`` for ``count`` threads: each group of ``span`` consecutive slices swaps tensors."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.barrier = threading.Barrier(count)
        self.posted: dict[int, torch.Tensor] = {}

    def for_slice(self, index: int):
        def gather(tensor: torch.Tensor, span: int) -> torch.Tensor:
            self.posted[index] = tensor.clone()
            self.barrier.wait()
            first = index // span * span
            out = torch.stack([self.posted[i] for i in range(first, first + span)])
            self.barrier.wait()  # nobody posts the next layer's tensor before all have read
            return out

        return gather


def route_in_slices(logits_TE, config, mask_T, count: int):
    """Route ``count`` equal slices of the batch, each in its own thread inside ``sliced_batch``."""
    gather = ThreadGather(count)
    size = logits_TE.shape[0] // count
    results: list = [None] * count
    errors: list = []

    def run(index: int) -> None:
        try:
            part = slice(index * size, (index + 1) * size)
            logits = logits_TE[part].detach().requires_grad_()
            with sliced_batch(BatchSlice(index, count, gather.for_slice(index))):
                routing = route(logits, config, training=True, token_mask_T=mask_T[part])
            loss = load_balancing_loss(routing) + router_z_loss(routing)
            loss.backward()
            results[index] = (routing, loss.detach(), logits.grad)
        except Exception as error:  # surfaced below, with the thread's traceback
            errors.append(error)
            gather.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(
    ("moe", "count"),
    [
        ({"group_size": 32}, 4),  # each group spans 2 of 4 slices of 16 tokens
        ({"group_size": 64}, 4),  # one group over all 4 slices
        ({"group_size": 64, "top_k": 2}, 4),  # second choices wait for every first choice of the group
        ({"grouping": "batch"}, 2),
        ({"group_size": 64, "dropless": True}, 4),  # nothing dropped; the losses still span the group
    ],
    ids=["span-2", "span-4", "top2", "batch", "dropless"],
)
def test_slices_keep_the_claims_one_process_keeps_and_share_its_losses(moe, count):
    config = MoEConfig(num_experts=E, capacity_factor=0.75, min_capacity=1, **moe)
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, E, generator=generator) * 2).requires_grad_()
    mask = torch.rand(64, generator=generator) > 0.2  # padding spread unevenly over the slices
    whole = route(logits, config, training=True, token_mask_T=mask)
    whole_loss = load_balancing_loss(whole) + router_z_loss(whole)
    whole_loss.backward()
    assert whole.capacity is None or not whole.keep[mask].all()  # the capacity binds somewhere

    parts = route_in_slices(logits, config, mask, count)
    keep = torch.cat([routing.keep for routing, _, _ in parts])
    assert torch.equal(keep, whole.keep)
    for routing, _, _ in parts:  # kept claims stay each expert's first local rows (what dispatch relies on)
        for expert in range(E):
            kept = routing.position[(routing.expert_index == expert) & routing.keep]
            assert torch.equal(kept.sort().values, torch.arange(kept.numel()))
    # Data parallelism averages the slices' losses and gradients: that average is one process's.
    mean_loss = torch.stack([loss for _, loss, _ in parts]).mean()
    torch.testing.assert_close(mean_loss, whole_loss.detach(), rtol=1e-6, atol=1e-6)
    gradient = torch.cat([grad for _, _, grad in parts]) / count
    torch.testing.assert_close(gradient, logits.grad, rtol=1e-5, atol=1e-7)


def test_groups_within_a_slice_exchange_nothing_and_unsupported_spans_route_locally_with_a_warning():
    config = MoEConfig(num_experts=E, capacity_factor=1.0, min_capacity=1, group_size=8)
    logits, mask = torch.randn(32, E), torch.ones(32, dtype=torch.bool)

    def refuse(tensor, span):
        raise AssertionError("no exchange expected")

    with sliced_batch(BatchSlice(0, 4, refuse)):
        local = route(logits[:8], config, training=True, token_mask_T=mask[:8])
    assert local.group_totals is None and torch.equal(local.keep, route(logits[:8], config, training=True).keep)

    confident = config.replace(group_size=32, priority="confidence")
    with pytest.warns(SpanningGroupsWarning, match="priority='confidence'"), sliced_batch(BatchSlice(1, 4, refuse)):
        alone = route(logits[8:16], confident, training=True, token_mask_T=mask[8:16])
    assert alone.group_totals is None and alone.capacity == 2  # its own 8 tokens' capacity
