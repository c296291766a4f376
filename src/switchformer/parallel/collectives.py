"""The collectives expert parallelism uses, with gradients where needed and errors that say what happened.

Shape legend: N rows sent, M rows received, D d_model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, or did not reach the collective within the process-group timeout."""


@contextlib.contextmanager
def collective(what: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Re-raise a backend failure inside the block as a :class:`CollectiveError` naming the operation and rank."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # gloo and NCCL failures (DistBackendError is a RuntimeError)
        rank = dist.get_rank() if dist.is_initialized() else -1
        size = dist.get_world_size(group) if dist.is_initialized() else -1
        raise CollectiveError(
            f"{what} failed on rank {rank} (group of {size} ranks): a peer process died or did not reach this "
            "collective within the process-group timeout (init_parallel(timeout=...)). Check the other ranks' "
            f"logs for the first failure. Backend error: {error}"
        ) from error


def is_backend_failure(error: BaseException) -> bool:
    """Whether ``error`` is a communication backend's report of a failed collective (gloo or NCCL), as raised by
    the collectives FSDP2 and DCP issue themselves."""
    text = str(error)
    return isinstance(error, dist.DistBackendError) or "gloo" in text or "NCCL" in text or "Connection reset" in text


@contextlib.contextmanager
def job_collectives(what: str) -> Iterator[None]:
    """Around a whole distributed job: a backend failure anywhere in it (FSDP2's all-gathers and reduce-scatters,
    DCP's exchanges) becomes a :class:`CollectiveError` that says a peer died; other errors pass unchanged."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, CollectiveError) or not is_backend_failure(error):
            raise
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise CollectiveError(
            f"a collective of {what} failed on rank {rank}: a peer process died or did not reach it within the "
            f"process-group timeout. Check the other ranks' logs for the first failure. Backend error: {error}"
        ) from error


def all_to_all_rows(
    x_ND: torch.Tensor, *, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send ``send_splits[j]`` consecutive rows of ``x_ND`` to rank ``j`` of ``group``; returns the received rows
    (``recv_splits[j]`` from rank ``j``, in rank order). Differentiable: the backward is the reverse all-to-all.

    Every rank of ``group`` must call it, also with zero rows to send or receive.
    """
    return _AllToAll.apply(x_ND, send_splits, recv_splits, group)


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Equal-split all-to-all of a 1-D tensor: chunk ``j`` goes to rank ``j``, chunk ``j`` of the result came from
    rank ``j``. Used to tell each rank how many rows it will receive before the rows travel."""
    received = torch.empty_like(counts)
    with collective("expert-parallel all-to-all (token counts)", group):
        dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


def _all_to_all(
    x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    with collective("expert-parallel all-to-all (token rows)", group):
        dist.all_to_all_single(
            out_MD, x_ND.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
        )
    return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group  # type: ignore[attr-defined]
        return _all_to_all(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_MD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Gradients of the received rows go back to the ranks that sent them: the same exchange, reversed.
        grad_ND = _all_to_all(grad_MD, ctx.recv_splits, ctx.send_splits, ctx.group)  # type: ignore[attr-defined]
        return grad_ND, None, None, None
