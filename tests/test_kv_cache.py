"""KV-cache decoding equals recomputing the whole sequence at every step (tiny random model, 16 steps)."""

from __future__ import annotations

import torch

from reference_model import GenerationConfig, ReferenceSession, generate, make_request, prepare_batch
from reference_model.decoder import attention_mask
from reference_model.rope import rope_cos_sin
from reference_model.sequence import assemble_embeddings

from .conftest import DEMO_IMAGE


def recompute_logits(model, batch, vision, generated: list[int]) -> torch.Tensor:
    """Logits of the last position after prefilling prompt + generated tokens without any cache (the vision
    outputs do not depend on the generated tokens, so they are computed once by the caller)."""
    layout = batch.layout
    with torch.inference_mode():
        embeds = assemble_embeddings(layout, model.embed_tokens(layout.text_ids), vision)
        extra = torch.tensor([generated], dtype=torch.int64)
        embeds = torch.cat((embeds, model.embed_tokens(extra)), dim=1)
        positions = torch.arange(embeds.shape[1])[None]
        cos, sin = rope_cos_sin(positions, model.config.decoder.rope)
        mask = attention_mask(torch.ones(1, embeds.shape[1], dtype=torch.bool), torch.arange(embeds.shape[1]))
        interaction = model.interaction_inputs(vision.global_ctx, layout.vision_pos, layout.instruct_pos)
        return model.logits(model.decode(embeds, cos, sin, mask, None, interaction))[:, -1]


def test_cached_decoding_equals_recomputation(demo_checkpoint):
    from reference_model import load_model
    from reference_model.prompt import load_tokenizer

    tiny_model, tiny_tokenizer = load_model(demo_checkpoint), load_tokenizer(demo_checkpoint)  # a non-degenerate draw
    request = make_request(DEMO_IMAGE, "Describe the picture.", tiny_tokenizer, tiny_model.config)
    batch = prepare_batch([request], tiny_model.config, 16)
    # the prefill's token, then 16 cached decode steps
    out = generate(ReferenceSession(tiny_model, batch, 17), GenerationConfig(max_new_tokens=17), keep_logits=True)
    ids = out.token_ids[0]
    assert len(ids) == 17
    assert len(set(ids)) > 1, "degenerate model: every step produced the same token"
    with torch.inference_mode():
        vision = tiny_model.encode_images(batch.pixel_values, batch.instructs, batch.query_len)
    for step in range(17):
        logits = recompute_logits(tiny_model, batch, vision, ids[:step])
        assert int(logits.argmax()) == ids[step], step
        assert (logits - out.step_logits[:, step]).abs().max().item() <= 1e-4, step
