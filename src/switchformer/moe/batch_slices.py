"""Routing groups that span several processes' slices of one batch.

Under data parallelism each process holds an equal, contiguous slice of the global batch (in process order), and
one process's routing groups are consecutive runs of ``group_size`` tokens of the flattened global batch. When a
group is longer than a slice (a decoder's few target tokens a sequence, or ``grouping='batch'``), it spans ``m``
consecutive slices; routing those slices separately would give each its own, smaller capacity and drop other
tokens. Inside :func:`sliced_batch`, :func:`~switchformer.moe.assignment.route` instead exchanges each slice's
per-expert claim counts with the other slices of its group (a few integers per layer), so every process keeps
exactly the claims one process keeps, and the auxiliary losses are normalised by the whole group's counts.

Supported where each group is made of whole slices (``group_size`` a multiple of the slice's tokens and the
slices a multiple of ``m``), with ``priority='position'`` and ``overflow='drop'``, or dropless with any policy;
other cases route each slice on its own and say so once (:class:`SpanningGroupsWarning`). One caveat: one process
averages the auxiliary losses over the groups that hold a real token; spanning groups are averaged over all of
them, which differs only when a whole group is padding.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from switchformer.moe.router import jitter_streams_for_recompute

# gather(tensor, span): ``tensor`` from each of the ``span`` consecutive slices of this slice's group, stacked in
# slice order (a collective: every process of the group calls it).
GatherFn = Callable[[torch.Tensor, int], torch.Tensor]


class SpanningGroupsWarning(UserWarning):
    """Routing groups span several processes' slices in a way the exchange does not support."""


@dataclasses.dataclass(frozen=True)
class BatchSlice:
    """This process holds slice ``index`` of ``count`` equal, consecutive slices of the batch being routed."""

    index: int
    count: int
    gather: GatherFn


@dataclasses.dataclass(frozen=True)
class GroupTotals:
    """A spanning group's figures summed over its slices, for the auxiliary losses."""

    span: int  # slices in the group (the loss of each slice is scaled by it, see losses.py)
    chosen: torch.Tensor  # [E] float32 router choices (all choice ranks) of the group's real tokens
    real_tokens: torch.Tensor  # [] float32 real (non-padding) tokens of the group


_SLICE: contextvars.ContextVar[BatchSlice | None] = contextvars.ContextVar("batch_slice", default=None)
_WARNED: set[str] = set()


# How many sliced_batch contexts are open in the process: a plain global that torch.compile traces (reading the
# context variable breaks its graph, which one process, never sliced, then does not pay for).
_open_slices = 0
_count_lock = threading.Lock()


@contextlib.contextmanager
def sliced_batch(batch_slice: BatchSlice | None) -> Iterator[None]:
    """Route the forwards run inside as slices of one batch (None: as whole batches, the default)."""
    global _open_slices
    token = _SLICE.set(batch_slice)
    with _count_lock:
        _open_slices += batch_slice is not None
    try:
        yield
    finally:
        with _count_lock:
            _open_slices -= batch_slice is not None
        _SLICE.reset(token)


def current_slice() -> BatchSlice | None:
    return _SLICE.get() if _open_slices else None


def contexts_for_recompute() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: a recomputed forward runs in the batch slice and draws from the
    jitter streams (:func:`~switchformer.moe.router.jitter_by_row`) its forward did."""
    forward, jitter_again = jitter_streams_for_recompute()
    return forward, _entered_together(jitter_again, sliced_batch(_SLICE.get()))


@contextlib.contextmanager
def _entered_together(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def group_span(local_tokens: int, group_size: int, batch_slice: BatchSlice, *, unsupported: str | None) -> int:
    """How many slices each routing group spans (1: groups lie within slices, nothing to exchange).
    ``unsupported`` names the routing option that cannot decide over slices, if one is set."""
    if batch_slice.count == 1:
        return 1
    total = local_tokens * batch_slice.count
    size = max(min(group_size, total), 1)
    if size <= local_tokens and local_tokens % size == 0:
        return 1
    span = size // local_tokens
    whole_slices = size % local_tokens == 0 and batch_slice.count % span == 0
    if whole_slices and unsupported is None:
        return span
    if not whole_slices:
        reason = f"routing groups of {size} tokens cut through slices of {local_tokens} tokens"
        fix = "choose a group_size that is a multiple of, or divides, each process's tokens, or grouping='sequence'"
    else:
        reason = f"routing groups of {size} tokens span {span} processes' slices, and {unsupported} decides over"
        reason += " a whole group at once"
        fix = "keep groups within a process's tokens (a smaller group_size, or grouping='sequence')"
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"{reason}: each process routes its slice as groups of its own, so capacity and drops differ from one "
            f"process's ({fix})",
            SpanningGroupsWarning,
            stacklevel=3,
        )
    return 1
