"""A left-padded batch gives every row the logits and tokens it gets alone (each row its own interaction)."""

from __future__ import annotations

from reference_model import GenerationConfig, ReferenceSession, generate, make_request, prepare_batch

from .conftest import DEMO_IMAGE


def test_batch_rows_equal_single_runs(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    image = DEMO_IMAGE
    long_q = make_request(image, "What is shown in this picture? Answer briefly.", tiny_tokenizer, cfg)
    short_q = make_request(image, "Colours?", tiny_tokenizer, cfg)
    short_q.pixel_values = short_q.pixel_values.flip(-1)  # a different image for the second row
    requests = [long_q, short_q]
    batch = prepare_batch(requests, cfg, 16)
    assert batch.layout.lengths[0] != batch.layout.lengths[1]
    assert not batch.layout.attention_mask[1, 0], "the shorter row must be left padded"
    assert (batch.instructs == 0).any(), "instructions must be padded too"

    config = GenerationConfig(max_new_tokens=6)
    together = generate(ReferenceSession(tiny_model, batch, 6), config, keep_logits=True)
    for row, request in enumerate(requests):
        alone = generate(ReferenceSession(tiny_model, prepare_batch([request], cfg, 16), 6), config, keep_logits=True)
        assert together.token_ids[row] == alone.token_ids[0]
        diff = (together.step_logits[row] - alone.step_logits[0]).abs().max().item()
        assert diff <= 1e-4, (row, diff)
    # the rows really differ, so equality above is not vacuous
    assert (together.step_logits[0, 0] - together.step_logits[1, 0]).abs().max() > 0.1
