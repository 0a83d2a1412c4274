"""A conversation's later turn on ONNX Runtime (session.py `OrtFollowUp`): each chunk prefilled on top of the kept
KV columns.

Neither artifact graph does that: the prefill graph starts at column 0 and the step graph runs no interaction
layer. The one decoder graph TensorRT builds from the two (fusion_export/decoder_merge.py) does both: a chunk is a
step of its tokens written after the kept columns, with its block's latents and query given to the interaction
layers. It is merged in memory on the first follow-up and run as exported (the fused CPU attention is the step
graph's, one token at a time); the turn's decode steps are the step graph's, as for any request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from reference_model.errors import FusionError

from ..feeds import follow_up_inputs


def follow_up_decoder(model: Any) -> Any:
    """The one decoder graph's session for an OrtModel (made once, on its first follow-up)."""
    if model.follow_up_decoder is None:
        from fusion_export.decoder_merge import merge_decoder

        prefill, step = (onnx.load(model.artifact.graph_path(name), load_external_data=False)
                         for name in ("decoder_prefill", "decoder_step"))  # fmt: skip
        try:
            merged = merge_decoder(prefill, step).SerializeToString()
        except FusionError as e:
            raise FusionError(f"{model.artifact.folder}: conversations need the one decoder graph: {e}") from None
        model.follow_up_decoder = model._session(model.artifact.graph_path("decoder_step"), model._options(), merged)
    return model.follow_up_decoder


def run_chunks(session: Any, run: Any) -> torch.Tensor:
    """Prefill `session.layouts` (a follow-up's chunks) one after the other through the one decoder graph, with
    `run(decoder, inputs)` binding the session's KV buffers; the last chunk's logits."""
    model = session.model
    decoder = follow_up_decoder(model)
    latents, context = (np.asarray(x) for x in (session.vision.init_latents, session.vision.global_ctx))
    for chunk in session.layouts:
        session.state.extend(chunk.text_ids.shape[1])
        rope = model.config.decoder.rope
        inputs = follow_up_inputs(chunk, model.embed_table, latents, context, rope, session.state.key_valid)
        logits = torch.from_numpy(run(decoder, inputs))
    return logits
