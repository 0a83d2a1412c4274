"""GraphSpec: everything the exporter needs to know about one graph."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # input -> {axis: size}: dims traced dynamic (so no node holds them) and declared fixed in the graph's inputs
    declared_dims: dict[str, dict[int, int]] = field(default_factory=dict)
