"""A conversation's later turn on ONNX Runtime (session.py `OrtFollowUp`): the graph that prefills each chunk on top
of the kept KV columns.

Neither artifact graph does that: the prefill graph starts at column 0 and the step graph runs no interaction
layer. The one decoder graph TensorRT builds from the two (fusion_export/decoder_merge.py) does both: a chunk is a
step of its tokens written after the kept columns, with its block's latents and query given to the interaction
layers. It is merged in memory once (`OrtModel.follow_up_decoder`: on the first follow-up, or when `serve` starts) and
run as exported (the fused CPU attention and the MatMulNBits rewrite are the other sessions'); the turn's decode
steps are the step graph's, as for any request.
"""

from __future__ import annotations

from typing import Any

import onnx

from reference_model.errors import FusionError


def merged_decoder(artifact: Any) -> onnx.ModelProto:
    """The artifact's prefill and step graphs as the one decoder graph (its external weights stay in their file)."""
    from fusion_export.decoder_merge import merge_decoder

    prefill, step = (onnx.load(artifact.graph_path(name), load_external_data=False)
                     for name in ("decoder_prefill", "decoder_step"))  # fmt: skip
    try:
        return merge_decoder(prefill, step)
    except FusionError as e:
        raise FusionError(f"{artifact.folder}: a conversation's later turns need the one decoder graph: {e}") from None
