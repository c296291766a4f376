"""Checkpoints of a run over several ranks: each rank writes only its shards (``torch.distributed.checkpoint``).

A step folder holds DCP's files (``.metadata`` and one ``__RANK_N.distcp`` per rank: ``{"model": ...,
"optimizer": ...}``), the trainer state, the configs and the tokenizer (main rank), and, written last, the manifest
with every file's size and SHA-256 (each rank hashes its own files). Everything goes into a hidden temporary folder
that the main rank renames into place once all of it is there, so a step becomes the latest only when complete:
``kill -9`` during a save, synchronous or asynchronous, leaves the previous checkpoint as the latest.

An asynchronous save (:class:`ShardedCheckpointer` with ``async_save``) copies the state to memory and writes it
in a background thread on its own gloo process group while training goes on; the step after all ranks finished
writing (an all-reduce of a flag while one is pending), the manifest is written and the folder renamed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from switchformer.errors import CheckpointError
from switchformer.run_folder import MANIFEST, atomic_write_json, fsync_directory, step_dir_name
from switchformer.training.checkpoint import save_failure, sha256_of

logger = logging.getLogger(__name__)


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def own_shard_files(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Size and checksum of the shard files ``rank`` wrote (DCP names them ``__RANK_N.distcp``)."""
    return {p.name: file_entry(p) for p in sorted(folder.glob(f"__{rank}_*.distcp"))}


class _Pending:
    """An asynchronous save in flight: the temporary folder, what the main rank writes beside the shards, and the
    future of this rank's writing (and hashing)."""

    def __init__(self, step: int, tmp: Path, final: Path, main_files: Any, future: concurrent.futures.Future) -> None:
        self.step, self.tmp, self.final, self.main_files, self.future = step, tmp, final, main_files, future


class ShardedCheckpointer:
    """Writes DCP step folders into ``directory`` from every rank of the default process group.

    ``write_main_files(tmp)`` is called on the main rank to add the trainer state, configs and tokenizer;
    ``prune(directory)`` removes old checkpoints after a step folder is in place.
    """

    def __init__(self, directory: Path, *, async_save: bool = False, timeout: Any = None) -> None:
        self.directory = Path(directory)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.async_save = async_save
        self.pending: _Pending | None = None
        # Background writes talk over a group of their own, so they never interleave with training's collectives.
        self.group = dist.new_group(backend="gloo", timeout=timeout) if async_save else None
        self.executor = concurrent.futures.ThreadPoolExecutor(1) if async_save else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, write_main_files: Any) -> Path | None:
        """Save (a collective: every rank calls it at the same step). Returns the step folder once it is in place
        (at once for a synchronous save; None while an asynchronous one is being written)."""
        self.wait()  # one save in flight at a time
        final = self.directory / step_dir_name(step)
        tmp = self._agreed_tmp(final)
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        writer = dcp.FileSystemWriter(tmp, thread_count=1)
        if not self.async_save:
            with self._failures_reported(tmp, final):
                dcp.save(state, storage_writer=writer)
                return self._finalize(step, tmp, final, write_main_files, own_shard_files(tmp, self.rank))
        with self._failures_reported(tmp, final):
            writing = dcp.async_save(state, storage_writer=writer, process_group=self.group)
        assert self.executor is not None
        future = self.executor.submit(lambda: (writing.result(), own_shard_files(tmp, self.rank))[1])
        self.pending = _Pending(step, tmp, final, write_main_files, future)
        return None

    def poll(self) -> Path | None:
        """If every rank finished writing the pending save, make it the latest (a collective while one is pending:
        every rank calls it after every step)."""
        if self.pending is None:
            return None
        done = torch.tensor([int(self.pending.future.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self._complete() if done.item() else None

    def wait(self) -> Path | None:
        """Finish the pending save, if any (a collective)."""
        if self.pending is None:
            return None
        self.pending.future.result()
        dist.barrier()
        return self._complete()

    def close(self) -> None:
        self.wait()
        if self.executor is not None:
            self.executor.shutdown()

    def _complete(self) -> Path | None:
        pending, self.pending = self.pending, None
        assert pending is not None
        with self._failures_reported(pending.tmp, pending.final):
            shards = pending.future.result()
            return self._finalize(pending.step, pending.tmp, pending.final, pending.main_files, shards)

    @contextlib.contextmanager
    def _failures_reported(self, tmp: Path, final: Path) -> Iterator[None]:
        """A failed write (a full disk, say; DCP reports any rank's failure on every rank, as a BaseException)
        removes the temporary folder and raises the :class:`CheckpointError` one process raises: what went wrong
        and that the previous checkpoint is intact."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:
            if isinstance(error, CheckpointError):
                raise
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(save_failure(final, _first_failure(error))) from error

    def _agreed_tmp(self, final: Path) -> Path:
        """The main rank's name for the temporary folder, the same on every rank (a fresh one each save)."""
        name = [f".{final.name}.tmp-{os.getpid()}"] if self.is_main else [None]
        dist.broadcast_object_list(name, src=0)
        tmp = final.parent / name[0]
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        return tmp

    def _finalize(self, step: int, tmp: Path, final: Path, write_main_files: Any, shards: dict) -> Path | None:
        """Gather every rank's checksums; the main rank adds its files, writes the manifest and renames."""
        tables: list[Any] = [None] * self.world_size
        dist.all_gather_object(tables, shards)
        if not self.is_main:
            return None
        write_main_files(tmp)
        files = {name: entry for table in tables for name, entry in table.items()}
        for path in sorted(tmp.iterdir()):
            if path.name not in files:
                files[path.name] = file_entry(path)
        atomic_write_json(tmp / MANIFEST, {"step": step, "format": "dcp", "files": files}, durable=True)
        fsync_directory(tmp)
        replaced = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():  # re-saving a step (after a resume): set the old one aside until the new one is in
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        try:
            fsync_directory(self.directory)
        except OSError as error:  # the checkpoint is complete once renamed; only power-loss durability suffers
            logger.warning("saved %s, but could not fsync %s (%s)", final, self.directory, error)
        logger.info("saved checkpoint %s (%d ranks' shards)", final, self.world_size)
        return final


def _first_failure(error: BaseException) -> BaseException:
    """The error behind a DCP ``CheckpointException`` (which carries every failed rank's error and traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank][0]
        return OSError(cause.errno, f"{cause.strerror} (rank {rank})") if isinstance(cause, OSError) else cause
    return error


def optimizer_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """torch's ``optimizer.state_dict()`` (parameters numbered in the optimizer's order) keyed by parameter names
    instead, the form ``set_optimizer_state_dict`` shards. ``optimizer`` must list the parameters in the order the
    saving optimizer did (``build_optimizer`` on the same model config does)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {names[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def load_into_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a checkpoint of any layout into this rank's shards (a collective). A sharded (DCP) checkpoint is read
    slice by slice, each rank only what it holds; a one-file checkpoint is read whole by every rank and sharded.
    Names and shapes are checked before anything is loaded."""
    from switchformer.dcp_files import is_dcp_folder, load_sharded, tensor_shapes
    from switchformer.training.checkpoint import check_model_state, load_checkpoint

    full = StateDictOptions(full_state_dict=True)
    if not is_dcp_folder(path):
        checkpoint = load_checkpoint(path, with_optimizer=optimizer is not None)
        check_model_state(model, checkpoint.model_state, source=path)
        set_model_state_dict(model, checkpoint.model_state, options=full)
        if optimizer is not None and checkpoint.optimizer_state is not None:
            by_name = optimizer_state_by_name(model, optimizer, checkpoint.optimizer_state)
            set_optimizer_state_dict(model, optimizer, by_name, options=full)
        return
    shapes = tensor_shapes(path, "model.")
    check_model_state(model, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}, source=path)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    load_sharded(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
