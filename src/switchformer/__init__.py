"""switchformer: the Switch Transformer (Fedus, Zoph, Shazeer 2021) in PyTorch."""

from switchformer.config import Config, ConfigError
from switchformer.errors import CheckpointError
from switchformer.host_memory import keep_freed_memory
from switchformer.interop.checkpoint_io import CheckpointFormat, from_pretrained, save_pretrained
from switchformer.layers.activation import Activation
from switchformer.models.config import Architecture, ModelConfig
from switchformer.models.decoder_only import SwitchLM
from switchformer.models.encoder_decoder import SwitchTransformer
from switchformer.models.factory import build_model
from switchformer.models.flops import ModelSize, model_size
from switchformer.models.generation import DecodingStrategy, GenerationConfig, GenerationOutput, generate
from switchformer.models.outputs import LayerRouting, ModelOutput
from switchformer.moe.config import ExpertKernel, Grouping, MoEConfig, OverflowPolicy, RoutingPriority
from switchformer.moe.layer import MoEOutput, SwitchFFN, SwitchFFNConfig
from switchformer.presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Architecture",
    "CheckpointError",
    "CheckpointFormat",
    "Config",
    "ConfigError",
    "DecodingStrategy",
    "ExpertKernel",
    "GenerationConfig",
    "GenerationOutput",
    "Grouping",
    "LayerRouting",
    "MoEConfig",
    "MoEOutput",
    "ModelConfig",
    "ModelOutput",
    "ModelSize",
    "OverflowPolicy",
    "RoutingPriority",
    "SwitchFFN",
    "SwitchFFNConfig",
    "SwitchLM",
    "SwitchTransformer",
    "build_model",
    "from_pretrained",
    "generate",
    "get_preset",
    "keep_freed_memory",
    "model_size",
    "preset_names",
    "save_pretrained",
]
