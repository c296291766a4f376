"""Run a function on N local processes joined by a gloo process group, as torchrun would, and collect results.

Each rank gets torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
on a free port of 127.0.0.1) and one intra-op thread, so 4 ranks stay gentle on a 2-core machine. A rank's
return value, or its traceback, comes back through a file; a rank that exits without writing one (killed, or
still running at the deadline and then killed) has neither.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None when it had to be killed at the deadline
    reported: bool = False  # the rank wrote a result (it returned or raised)
    value: Any = None  # what the function returned
    error: str | None = None  # the traceback, when it raised


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *, timeout_s: float = 120.0, **kwargs: Any) -> list[RankResult]:
    """Start ``world_size`` spawned processes running ``fn(**kwargs)``; wait at most ``timeout_s`` for all."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="switchformer-ranks-") as tmp:
        processes = [
            context.Process(target=_entry, args=(rank, world_size, port, tmp, fn, kwargs), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
        results = []
        for rank, process in enumerate(processes):
            exitcode = process.exitcode
            if process.is_alive():
                process.kill()
                process.join()
                exitcode = None
            result = RankResult(rank, exitcode)
            path = Path(tmp) / f"rank{rank}.pkl"
            if path.exists():
                result.reported = True
                result.value, result.error = pickle.loads(path.read_bytes())
            results.append(result)
    return results


def run_and_check(fn: Callable[..., Any], world_size: int, *, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
    """:func:`run_ranks`, failing the test with every rank's traceback unless all ranks returned."""
    results = run_ranks(fn, world_size, timeout_s=timeout_s, **kwargs)
    problems = [
        f"rank {r.rank}: " + (r.error or f"no result (exit code {r.exitcode}; None = killed at the deadline)")
        for r in results
        if r.error is not None or not r.reported
    ]
    if problems:
        raise AssertionError("\n".join(problems))
    return [r.value for r in results]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    value, error = None, None
    try:
        value = fn(**kwargs)
    except BaseException:
        error = traceback.format_exc()
    path = Path(out_dir) / f"rank{rank}.pkl"
    path.with_suffix(".tmp").write_bytes(pickle.dumps((value, error)))
    path.with_suffix(".tmp").rename(path)
    if dist.is_initialized() and error is None:
        dist.destroy_process_group()
    # Skip interpreter teardown: a process group left broken by a failed peer can abort there.
    os._exit(0)
