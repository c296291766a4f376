"""Shared benchmark plumbing: machine setup, interleaved timing with medians, peak activation memory, tables.

Every benchmark here compares candidates measured in the same process, round by round (each round runs every
candidate once, in a rotated order), so a noisy neighbour slows all of them alike; we report medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

# glibc returns every block over 32 MiB to the kernel on free and maps it anew on the next allocation, so each
# step's fresh gradients and activations are page-faulted again (in a VM, first touches can cost seconds per GiB).
# These keep freed memory in the process for reuse, as the caching allocators PyTorch's CPU guide recommends do.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def argument_parser(description: str | None, *, repeats: int) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as help, and the ``--repeats`` and ``--threads`` every script takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    return p


def configure(*, threads: int, huge_pages: bool, keep_freed_memory: bool = True) -> None:
    """Pin the intra-op thread count and make large CPU allocations cheap and repeatable.

    ``THP_MEM_ALLOC_ENABLE`` is PyTorch's own switch (c10's CPU allocator backs large tensors with transparent huge
    pages) and is read at the first large allocation, so call this first. ``keep_freed_memory`` re-executes the
    script once with glibc told to keep freed memory (malloc reads its settings at start-up). Without both, a
    backward that allocates the gradients of 128 experts (1 GiB) can spend longer faulting pages than computing,
    and by an amount that varies run to run.
    """
    if keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    if huge_pages:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    torch.set_num_threads(threads)


def wait_until_quiet(threshold: float, max_wait_s: float, *, poll_s: float = 15.0) -> float:
    """Wait until the 1-minute load average is below ``threshold`` (others share the cores), at most ``max_wait_s``
    seconds; returns the load when the wait ended, to report with the timings."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    if load >= threshold:
        print(f"waiting up to {max_wait_s:.0f} s for the load ({load:.2f}) to drop below {threshold}", flush=True)
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    return load


def machine_summary() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    keep = all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY.items())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"torch {torch.__version__}{gpu}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"THP_MEM_ALLOC_ENABLE={thp}, freed memory kept={keep}, load average {load}"
    )


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    before_each: Callable[[], None] | None = None,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median wall time in seconds of each case over ``repeats`` rounds; each round runs every case once.

    The start of each round rotates through the cases, so no case always runs right after the same neighbour.
    ``before_each`` (untimed) runs before every call, e.g. to drop gradients as ``zero_grad`` does. ``sync`` waits
    for queued device work (``torch.cuda.synchronize`` on a GPU) before the clock starts and before it stops.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            if before_each is not None:
                before_each()
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each()
            sync()
            start = time.perf_counter()
            cases[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_activation_bytes(step: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """Peak bytes held by the CPU allocator during ``step``, beyond what existed before, less weight gradients.

    Read from the profiler's allocation events (every allocation and free of the CPU allocator, in order). Inputs
    and weights exist before the step and do not count; the buffers that end the step as ``param.grad`` (freshly
    allocated, as after ``zero_grad(set_to_none=True)``) are left out; everything else counts: saved activations,
    temporaries, the output and the input's gradient.
    """
    params = list(params)
    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    events.sort()
    grad_ptrs = {p.grad.data_ptr() for p in params if p.grad is not None}
    last_alloc: dict[int, int] = {}
    freed: set[int] = set()
    for index, (_, ptr, size) in enumerate(events):
        if size > 0:
            last_alloc[ptr] = index
            freed.discard(ptr)
        else:
            freed.add(ptr)
    excluded = {last_alloc[ptr] for ptr in grad_ptrs if ptr in last_alloc and ptr not in freed}
    live = peak = 0
    for index, (_, _, size) in enumerate(events):
        if index not in excluded:
            live += size
            peak = max(peak, live)
    return peak


def peak_cuda_activation_bytes(step: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """The CUDA counterpart of :func:`peak_activation_bytes`, from the caching allocator's peak statistics."""
    params = list(params)
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return torch.cuda.max_memory_allocated() - before - grad_bytes


@dataclasses.dataclass
class Column:
    title: str
    fmt: Callable[[object], str] = str


def ms(seconds: object) -> str:
    if seconds is None:
        return "-"
    millis = float(seconds) * 1e3  # type: ignore[arg-type]
    return f"{millis:.0f}" if millis >= 10 else f"{millis:.3f}"


def ratio(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


def markdown_table(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (it reads fine in a terminal too)."""
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(c.fmt(v) for c, v in zip(columns, row, strict=True)) + " |")
    return "\n".join(lines)


def largest_relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The largest ``max|x - y| / max|y|`` over paired tensors (outputs and gradients of two candidates)."""
    return max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)) for x, y in zip(a, b, strict=True))


@dataclasses.dataclass
class Measured:
    """Median seconds, peak activation bytes and the check against the baseline, per candidate."""

    times: dict[str, float]
    memory: dict[str, int]
    checks: dict[str, float]


def measure_steps(
    cases: dict[str, Callable[[], Sequence[torch.Tensor]]], baseline: str, params: Sequence[torch.Tensor], repeats: int
) -> Measured:
    """Check every candidate's tensors against ``baseline``'s (before timing), then peak memory, then medians."""
    reference = cases[baseline]()
    checks = {name: largest_relative_difference(step(), reference) for name, step in cases.items()}
    memory = {name: peak_activation_bytes(step, params) for name, step in cases.items()}
    return Measured(interleaved_medians(cases, repeats=repeats, warmup=1), memory, checks)


def print_step_table(leading: Sequence[Column], baseline: str, rows: Iterable[Sequence[object]], repeats: int) -> None:
    """Print rows of ``(*leading values, seconds, speedup, MiB, check)`` under the shared fwd+bwd columns."""
    columns = [
        *leading,
        Column("fwd+bwd ms", ms),
        Column(f"speedup vs {baseline}", ratio),
        Column("peak memory MiB", lambda v: f"{v:.0f}"),
        Column("check", lambda v: f"{v:.1e}"),
    ]
    print(f"medians of {repeats} rounds")
    print(markdown_table(columns, rows))
