"""A clean PyTorch FUSION-Phi3.5 that loads real checkpoints and reproduces the upstream numbers.

Data path: checkpoint folder -> `load_model` -> `prepare_batch` -> `ReferenceSession` -> `generate`.
"""

from .checkpoint import CheckpointError, load_model
from .config import ConfigError, FusionConfig, load_config, preset_config
from .generation import GenerationConfig, GenerationOutput, ReferenceSession, generate
from .model import FusionModel, VisionOutputs
from .sequence import PreparedBatch, Request, make_request, prepare_batch

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FusionConfig",
    "FusionModel",
    "GenerationConfig",
    "GenerationOutput",
    "PreparedBatch",
    "ReferenceSession",
    "Request",
    "VisionOutputs",
    "generate",
    "load_config",
    "load_model",
    "make_request",
    "prepare_batch",
    "preset_config",
]
