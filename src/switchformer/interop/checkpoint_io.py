"""``from_pretrained`` and ``save_pretrained``: Hugging Face Switch checkpoint folders and our own.

A folder holds ``config.json`` and the weights (``model.safetensors``, ``pytorch_model.bin``, or shards with an
``*.index.json``). The format is told by ``config.json``: ``{"format": "switchformer", "model": {...}}`` for ours
(our state-dict names, our full config), ``"model_type": "switch_transformers"`` for Hugging Face's.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from switchformer.config import ConfigError
from switchformer.dcp_files import is_dcp_folder
from switchformer.interop.files import read_json, read_weights, write_json, write_weights
from switchformer.interop.hf_config import MODEL_TYPE, config_from_hf, config_to_hf
from switchformer.interop.hf_keys import SameTensors, embeddings_differ, hf_sources, to_hf_state_dict
from switchformer.interop.key_map import CheckpointError, ParamMapping, expected_shapes, to_ours
from switchformer.interop.streaming import SafetensorsFiles, check_streamable, stream_into
from switchformer.local_blocks import local_block
from switchformer.models.base import SwitchModelBase, cast_weights
from switchformer.models.config import InputEmbeddings, ModelConfig
from switchformer.models.factory import build_model
from switchformer.run_folder import is_run_folder, resolve_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FORMAT_NAME = "switchformer"
FORMAT_VERSION = 1


class CheckpointFormat(enum.Enum):
    HF = "hf"  # loads with transformers' SwitchTransformersForConditionalGeneration.from_pretrained
    SWITCHFORMER = "switchformer"  # our names and full config (any architecture and routing option)


def _switchformer_version() -> str:
    try:
        return importlib.metadata.version("switchformer")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def resolve_checkpoint_folder(path_or_name: str | Path) -> Path:
    """A local folder (a training run folder means its latest checkpoint), or a Hub repository id downloaded with
    ``huggingface_hub`` when no such path exists."""
    path = Path(path_or_name).expanduser()
    if path.is_dir() and is_run_folder(path) and not (path / "model.safetensors").exists():
        return resolve_checkpoint(path)  # a training run folder: its latest checkpoint
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint folder holding {CONFIG_FILE} and weights")
    name = str(path_or_name)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    return _download(name)  # pragma: no cover - needs the network


def _download(repo_id: str) -> Path:  # pragma: no cover - needs the network
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such folder, and huggingface_hub is not installed to fetch it") from None
    patterns = [CONFIG_FILE, "*.safetensors", "*.safetensors.index.json"]
    try:
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_FILE, "*.bin", "*.bin.index.json"]))
    except Exception as error:  # network, authentication, unknown repository
        raise CheckpointError(f"{repo_id}: not a local folder, and the Hub download failed ({error})") from None
    return folder


def load_config(path_or_name: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint folder (either format), without reading weights.

    An untied Hugging Face checkpoint whose encoder and decoder tables differ loads with
    ``input_embeddings='per-stack'``, which only the weights tell (:func:`from_pretrained` reads them).
    """
    folder = resolve_checkpoint_folder(path_or_name)
    config, _ = _read_config(folder)
    return config


def _read_config(folder: Path) -> tuple[ModelConfig, CheckpointFormat]:
    path = folder / CONFIG_FILE
    data = read_json(path)
    try:
        if data.get("format") == FORMAT_NAME:
            version = data.get("format_version", FORMAT_VERSION)
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path}: format_version {version} is newer than this switchformer reads")
            if not isinstance(data.get("model"), dict):
                raise CheckpointError(f"{path}: a switchformer config needs a 'model' object (ModelConfig fields)")
            return ModelConfig.from_dict(data["model"]), CheckpointFormat.SWITCHFORMER
        if data.get("model_type") == MODEL_TYPE:
            return config_from_hf(data), CheckpointFormat.HF
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    raise CheckpointError(
        f'{path}: unknown checkpoint format: expected "format": "{FORMAT_NAME}" or '
        f'"model_type": "{MODEL_TYPE}", found model_type={data.get("model_type")!r}'
    )


DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}  # the precisions the command line offers


@dataclasses.dataclass
class OpenCheckpoint:
    """A checkpoint folder ready to fill a model: its config, and where each of our weights comes from.

    Safetensors weights (one file or an index of shards) are streamed (:mod:`switchformer.interop.streaming`): each
    parameter's local block (a rank's shard, or all of it) is read from the files when :meth:`fill` runs, so a
    model larger than memory in float32 loads in bf16, and each rank of a sharded model reads its share only.
    Other weights (``pytorch_model.bin``, training checkpoints in ``torch.distributed.checkpoint`` form) are read
    whole when the checkpoint is opened."""

    folder: Path
    config: ModelConfig
    format: CheckpointFormat
    mappings: list[ParamMapping]
    files: SafetensorsFiles | None  # streamed weights, or None with ``state`` holding them
    state: dict[str, torch.Tensor] | None = None

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """Each of our parameters' precision in the files."""
        if self.files is None:
            assert self.state is not None
            return {name: tensor.dtype for name, tensor in self.state.items()}
        return {m.ours: self.files.dtype(m.external[0]) for m in self.mappings}

    def cast(self, model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
        """Give the (meta-device) ``model`` its weights' precision: ``dtype`` with float32 routers
        (:func:`~switchformer.models.base.cast_weights`), or with None the stored precision of each."""
        if dtype is not None:
            return cast_weights(model, dtype)
        stored = self.stored_dtypes()
        for name, param in model.named_parameters():
            param.data = param.data.to(stored[name])
        return model

    def fill(self, model: torch.nn.Module) -> int:
        """Copy the checkpoint into ``model``'s allocated parameters (each process its local block, see
        :func:`~switchformer.local_blocks.local_block`); returns the bytes read from the files. Weights read whole
        are released as they are copied, so a checkpoint fills one model once."""
        source = str(self.folder)
        if self.files is not None:
            before = self.files.bytes_read
            stream_into(model, self.mappings, self.files, source=source)
            return self.files.bytes_read - before
        if self.state is None:
            raise RuntimeError(f"{source}: this opened checkpoint already filled a model; open it again")
        state, self.state = self.state, None
        read = sum(t.numel() * t.element_size() for t in state.values())
        with torch.no_grad():
            for name, param in model.named_parameters():
                local, offset = local_block(param)
                block = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
                local.copy_(state.pop(name)[block])
        return read


def open_checkpoint(path_or_name: str | Path) -> OpenCheckpoint:
    """Read a checkpoint's config and check its tensors' names and shapes against it. Safetensors weights are not
    read yet, but for the embedding tables it compares (tied copies must agree; untied ones decide
    ``input_embeddings``); other weights (``.bin``, sharded training checkpoints) are read whole now."""
    folder = resolve_checkpoint_folder(path_or_name)
    config, fmt = _read_config(folder)
    source = str(folder)
    files = None if is_dcp_folder(folder) else SafetensorsFiles.open(folder)
    tensors: dict[str, torch.Tensor] = {}
    if files is None:
        tensors = read_weights(folder)
    keys = files.keys() if files is not None else tensors.keys()
    same = files.same if files is not None else (lambda a, b: torch.equal(tensors[a], tensors[b]))
    ignorable = _nothing
    if fmt is CheckpointFormat.HF:
        config = _config_for_embeddings(config, keys, same)
        mappings, ignorable = hf_sources(keys, same, config, source=source)
    else:
        mappings = [ParamMapping(key, (key,)) for key in expected_shapes(config)]
    logger.info("loading %s checkpoint %s", fmt.value, folder)
    if files is None:
        state = to_ours(tensors, mappings, config=config, source=source, ignorable=ignorable)
        return OpenCheckpoint(folder, config, fmt, mappings, None, state)
    check_streamable(expected_shapes(config), mappings, files, source=source, ignorable=ignorable)
    return OpenCheckpoint(folder, config, fmt, mappings, files)


def _nothing(key: str) -> bool:
    return False


def from_pretrained(
    path_or_name: str | Path, *, dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
) -> SwitchModelBase:
    """Load a Hugging Face Switch Transformers checkpoint or a switchformer one, in eval mode.

    ``path_or_name`` is a folder, or (when no such path exists) a Hub repository id such as
    ``google/switch-base-8``. ``dtype`` is the weights' precision (``None`` keeps the stored one); with
    ``torch.bfloat16`` the routers stay float32 (``models.base.cast_weights``), the rest reads half the bytes.
    The model is built on the meta device, allocated in ``dtype`` on ``device`` and filled tensor by tensor from
    safetensors files, so loading takes little more memory than the weights in ``dtype``
    (``bench/bench_streaming_load.py``). HF checkpoints load with HF's routing semantics
    (``grouping='sequence'`` and a fixed ``expert_capacity``), so logits match ``transformers``.
    """
    checkpoint = open_checkpoint(path_or_name)
    if checkpoint.state is not None:  # read whole already: the model adopts those tensors (no second copy)
        return model_from_state_dict(checkpoint.config, checkpoint.state, dtype=dtype).to(device)
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    checkpoint.cast(model, dtype)
    model.to_empty(device=device)
    checkpoint.fill(model)
    return model.eval()


def config_for_hf_weights(config: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """``config`` with the input embeddings the weights have: transformers 5 gives an untied model's encoder and
    decoder tables of their own, so when they differ the model gets ``input_embeddings='per-stack'``."""
    return _config_for_embeddings(config, hf_state.keys(), lambda a, b: torch.equal(hf_state[a], hf_state[b]))


def _config_for_embeddings(config: ModelConfig, keys: Collection[str], same: SameTensors) -> ModelConfig:
    if config.tie_word_embeddings or config.input_embeddings is InputEmbeddings.PER_STACK:
        return config
    if embeddings_differ(keys, same):
        return config.replace(input_embeddings=InputEmbeddings.PER_STACK)
    return config


def model_from_state_dict(
    config: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32
) -> SwitchModelBase:
    """Build the model on the meta device (no memory, no random init) and adopt ``state``'s tensors; eval mode.

    ``dtype`` casts every weight but the routers' (see :func:`~switchformer.models.base.cast_weights`)."""
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        cast_weights(model, dtype)
    return model.eval()


def save_pretrained(
    model: SwitchModelBase,
    path: str | Path,
    *,
    format: CheckpointFormat | str = CheckpointFormat.SWITCHFORMER,
    max_shard_bytes: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` to the folder ``path`` (created if needed) and return it.

    ``format='hf'`` writes a folder ``transformers`` loads with
    ``SwitchTransformersForConditionalGeneration.from_pretrained`` (encoder-decoder, ReLU/GELU, top-1 only);
    ``format='switchformer'`` keeps our names and the full config. Weights larger than ``max_shard_bytes`` are
    sharded. ``config.json`` is written last, so a folder with a config has complete weights. ``state_dict``
    replaces the model's own weights, e.g. the full experts gathered from an expert-parallel model's shards.
    """
    fmt = CheckpointFormat(format)
    folder = Path(path)
    config: ModelConfig = model.config
    state = model.state_dict() if state_dict is None else state_dict
    data: dict[str, Any]
    if fmt is CheckpointFormat.HF:
        data = config_to_hf(config)  # raises for models transformers cannot run, before anything is written
        state = to_hf_state_dict(state, config)
    else:
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    data["switchformer_version"] = _switchformer_version()
    folder.mkdir(parents=True, exist_ok=True)
    written = write_weights(folder, state, max_shard_bytes=max_shard_bytes)
    write_json(folder / CONFIG_FILE, data)
    logger.info("saved %s checkpoint to %s (%s)", fmt.value, folder, ", ".join(written))
    return folder
