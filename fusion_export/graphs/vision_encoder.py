"""The vision encoder graph: five static_hd crops + the embedded question -> the decoder's visual inputs.

```text
pixel_values     [batch, 5, 3, image, image]   float32
instruct_embeds  [batch, instruct_len, hidden] model dtype   embed_tokens(question ids), from the runtime
instruct_mask    [batch, instruct_len]         int64         1 = token, 0 = padding
-> image_tokens  [batch, 729, hidden]          model dtype   for the first placeholder
-> init_latents  [batch, query_len, hidden]    model dtype   for the second placeholder
-> global_ctx    [batch, (s*w)^2, hidden]      model dtype   read by the interaction layers
```
The token-embedding table is not in this graph: the runtime gathers question embeddings from the artifact's
single copy of it, which the decoder inputs use too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reference_model import FusionModel

from ..graph_inputs import VISION_INPUTS, VISION_OUTPUTS
from .spec import GraphSpec
from .window_pool import WindowMaxPool


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: FusionModel, query_len: int):
        super().__init__()
        cfg = model.config
        side = math.isqrt(cfg.check_query_len(query_len))
        self.model, self.query_len = model, query_len
        # adaptive max pooling as index gathers + max, which TensorRT supports (see window_pool.py)
        sides = (side, side * cfg.interaction.window_size)
        self.pools = nn.ModuleDict({str(s): WindowMaxPool(cfg.global_grid_side, s) for s in sides})

    def forward(
        self, pixel_values: torch.Tensor, instruct_embeds: torch.Tensor, instruct_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model.encode_embedded(
            pixel_values, instruct_embeds, instruct_mask != 0, self.query_len, pool=lambda g, s: self.pools[str(s)](g)
        )
        return out.image_tokens, out.init_latents, out.global_ctx


def vision_encoder_spec(model: FusionModel, query_len: int) -> GraphSpec:
    cfg = model.config
    B, T = 2, 7  # example sizes distinct from every static dim, so none is specialised
    size = cfg.vision.image_size
    example = (
        torch.randn(B, 5, cfg.vision.num_channels, size, size),
        torch.randn(B, T, cfg.decoder.hidden_size, dtype=model.dtype),
        torch.ones(B, T, dtype=torch.int64),
    )
    batch, instruct_len = torch.export.Dim("batch", max=1024), torch.export.Dim("instruct_len", max=4096)
    return GraphSpec(
        name="vision_encoder",
        module=VisionEncoderGraph(model, query_len),
        example_inputs=example,
        input_names=list(VISION_INPUTS),
        output_names=list(VISION_OUTPUTS),
        dynamic_shapes={
            "pixel_values": {0: batch},
            "instruct_embeds": {0: batch, 1: instruct_len},
            "instruct_mask": {0: batch, 1: instruct_len},
        },
        weights_group="vision_encoder",
    )
