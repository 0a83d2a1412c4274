"""A clean PyTorch FUSION (Phi-3.5 or Llama-3.1 decoders, SigLIP or SigLIP2 towers) that loads real checkpoints and
reproduces the upstream numbers.

Data path: checkpoint folder -> `load_model` -> `prepare_batch` -> `ReferenceSession` -> `generate`.
Names are imported on first use, so light modules (`errors`, `limits`) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "ConfigError": "config",
    "FusionConfig": "config",
    "load_config": "config",
    "preset_config": "config",
    "TurnState": "conversation",
    "follow_up_chunk": "conversation",
    "turn_state": "conversation",
    "whole_conversation": "conversation",
    "GenerationConfig": "generation",
    "GenerationOutput": "generation",
    "ReferenceSession": "generation",
    "generate": "generation",
    "FusionModel": "model",
    "VisionOutputs": "model",
    "PreparedBatch": "sequence",
    "Request": "sequence",
    "make_request": "sequence",
    "prepare_batch": "sequence",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
