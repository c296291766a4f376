"""The router: a bias-free linear map from a token to one logit per expert, always in float32.

Jitter noise and the layout: by default a router draws its noise from torch's global generator, so a batch split
over ranks would draw other numbers than one process does. Inside :func:`jitter_by_row` each row (sequence) of
the batch draws from a stream of its own, named by a key (the trainer's seed and step), the row's index in the
*global* batch and the layer: the same noise for the same token whatever the layout, micro-batching or
recomputation.

Shape legend: T tokens (flattened batch), B rows, S positions, D d_model, E experts.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Turn autocast off for the router; some device types have no autocast to turn off."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # pragma: no cover - exotic device without autocast support
        return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class RowStreams:
    """Where jitter noise comes from inside :func:`jitter_by_row`."""

    key: int  # names this forward's noise, e.g. from the run's seed and the step
    first_row: int  # index, in the global batch, of the first row this process holds


_ROW_STREAMS: contextvars.ContextVar[RowStreams | None] = contextvars.ContextVar("row_streams", default=None)


@contextlib.contextmanager
def jitter_by_row(key: int, first_row: int) -> Iterator[None]:
    """Draw router jitter per global row (see the module docstring) for the forwards run inside."""
    token = _ROW_STREAMS.set(RowStreams(key, first_row))
    try:
        yield
    finally:
        _ROW_STREAMS.reset(token)


def jitter_streams_for_recompute() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: a recomputed forward draws from the streams its forward did."""
    streams = _ROW_STREAMS.get()
    again = contextlib.nullcontext() if streams is None else jitter_by_row(streams.key, streams.first_row)
    return contextlib.nullcontext(), again


def _row_seed(key: int, layer: int, row: int) -> int:
    digest = hashlib.blake2b(f"{key}/{layer}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class Router(nn.Module):
    """Computes router logits ``h(x) = W_r x`` for each token.

    Selective precision (paper, section 2.4): the router's input and matmul are cast to float32 and autocast is
    disabled around it, so a bf16 model still routes in float32; only the router's result is float32, the experts
    keep the model dtype. Jitter (multiplicative noise in ``[1 - eps, 1 + eps]``) is applied to the router's own
    float32 copy of the input in training, so the experts always see the clean input (unlike the HF port, which
    applies it in place).
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D], the layout of nn.Linear
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.jitter = jitter
        self.stream_id = 0  # which Switch layer this router is in its model (a stream of its own per layer)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor, *, rows: int = 1) -> torch.Tensor:
        """Return float32 logits ``[T, E]``; ``x_TD`` (``rows`` sequences, flattened) is never modified."""
        with _autocast_disabled(x_TD.device.type):
            x32_TD = x_TD.float()
            if self.training and self.jitter > 0:
                x32_TD = x32_TD * self._noise(x32_TD, rows)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x32_TD, self.weight.float(), bias)

    def _noise(self, x32_TD: torch.Tensor, rows: int) -> torch.Tensor:
        """Multiplicative noise in ``[1 - eps, 1 + eps]``: from the global generator, or one stream per row."""
        low, high = 1.0 - self.jitter, 1.0 + self.jitter
        streams = _ROW_STREAMS.get()
        if streams is None or rows < 1 or x32_TD.shape[0] % rows:
            return torch.empty_like(x32_TD).uniform_(low, high)
        noise_BSD = torch.empty(rows, x32_TD.shape[0] // rows, x32_TD.shape[1], device=x32_TD.device)
        for row in range(rows):
            seed = _row_seed(streams.key, self.stream_id, streams.first_row + row)
            generator = torch.Generator(x32_TD.device).manual_seed(seed)
            noise_BSD[row].uniform_(low, high, generator=generator)
        return noise_BSD.view_as(x32_TD)
