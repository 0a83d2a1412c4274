"""GraphSpec: everything the exporter needs to know about one graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class GraphSpec:
    name: str  # artifact name, e.g. "decoder_step"; the file is <name>.onnx
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, Any]  # torch.export dynamic shapes, keyed by forward argument name
    weights_group: str  # graphs in one group share one external data file
