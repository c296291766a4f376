"""``from_pretrained`` and ``save_pretrained``: Hugging Face Switch checkpoint folders and our own.

A folder holds ``config.json`` and the weights (``model.safetensors``, ``pytorch_model.bin``, or shards with an
``*.index.json``). The format is told by ``config.json``: ``{"format": "switchformer", "model": {...}}`` for ours
(our state-dict names, our full config), ``"model_type": "switch_transformers"`` for Hugging Face's.
"""

from __future__ import annotations

import enum
import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from switchformer.config import ConfigError
from switchformer.interop.files import read_json, read_weights, write_json, write_weights
from switchformer.interop.hf_config import MODEL_TYPE, config_from_hf, config_to_hf
from switchformer.interop.hf_keys import embeddings_differ, from_hf_state_dict, to_hf_state_dict
from switchformer.interop.key_map import CheckpointError, ParamMapping, expected_shapes, to_ours
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


def from_pretrained(path_or_name: str | Path, *, dtype: torch.dtype | None = torch.float32) -> SwitchModelBase:
    """Load a Hugging Face Switch Transformers checkpoint or a switchformer one, in eval mode.

    ``path_or_name`` is a folder, or (when no such path exists) a Hub repository id such as
    ``google/switch-base-8``. ``dtype`` is the weights' precision (``None`` keeps the stored one); with
    ``torch.bfloat16`` the routers stay float32 (``models.base.cast_weights``), the rest reads half the bytes.
    HF checkpoints load with HF's routing semantics (``grouping='sequence'`` and a fixed ``expert_capacity``), so
    logits match ``transformers``.
    """
    folder = resolve_checkpoint_folder(path_or_name)
    config, fmt = _read_config(folder)
    tensors = read_weights(folder)
    source = str(folder)
    if fmt is CheckpointFormat.HF:
        config = config_for_hf_weights(config, tensors)
        state = from_hf_state_dict(tensors, config, source=source)
    else:
        identity = [ParamMapping(key, (key,)) for key in expected_shapes(config)]
        state = to_ours(tensors, identity, config=config, source=source)
    logger.info("loading %s checkpoint %s", fmt.value, folder)
    return model_from_state_dict(config, state, dtype=dtype)


def config_for_hf_weights(config: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """``config`` with the input embeddings the weights have: transformers 5 gives an untied model's encoder and
    decoder tables of their own, so when they differ the model gets ``input_embeddings='per-stack'``."""
    if config.tie_word_embeddings or config.input_embeddings is InputEmbeddings.PER_STACK:
        return config
    if embeddings_differ(hf_state):
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
