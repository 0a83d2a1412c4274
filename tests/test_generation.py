"""Sampling, stop tokens and streaming in the shared generation loop."""

from __future__ import annotations

import pytest
import torch

from reference_model import GenerationConfig, ReferenceSession, Request, generate, make_request, prepare_batch
from reference_model.generation import GenerationError, TokenSampler, greedy_tokens
from reference_model.prompt import stop_token_ids
from reference_model.sequence import RequestError

from .conftest import DEMO_IMAGE


@pytest.fixture(scope="module")
def batch(tiny_model, tiny_tokenizer):
    request = make_request(DEMO_IMAGE, "What colour is the sky?", tiny_tokenizer, tiny_model.config)
    return prepare_batch([request], tiny_model.config, 16)


def run(model, batch, **kwargs):
    config = GenerationConfig(**kwargs)
    return generate(ReferenceSession(model, batch, config.max_new_tokens), config, keep_logits=True)


def test_sampling_is_seeded(tiny_model, batch):
    a = run(tiny_model, batch, max_new_tokens=8, temperature=1.5, seed=7)
    b = run(tiny_model, batch, max_new_tokens=8, temperature=1.5, seed=7)
    c = run(tiny_model, batch, max_new_tokens=8, temperature=1.5, seed=8)
    greedy = run(tiny_model, batch, max_new_tokens=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # other seed, other draw (deterministic: seeds are fixed)
    assert a.token_ids != greedy.token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = TokenSampler(GenerationConfig(temperature=1.0, top_p=0.75, seed=0))
    drawn = {int(sampler(logits)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 covers 0.75; tokens 2 and 3 are cut
    tiny_p = TokenSampler(GenerationConfig(temperature=1.0, top_p=0.01, seed=0))
    assert {int(tiny_p(logits)) for _ in range(50)} == {0}  # the most likely token always survives


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_tokens_are_torch_argmax(dtype):
    """The numpy argmax the greedy sampler uses on CPU picks what torch's does, the first of equal maxima included."""
    logits = torch.randn(3, 32064, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, [7, 9000]] = 50.0  # a tie: the first index wins in both
    ids = greedy_tokens(logits)
    assert ids.dtype == torch.int64 and ids.tolist() == logits.argmax(dim=-1).tolist() and ids[1] == 7
    assert TokenSampler(GenerationConfig(temperature=0))(logits).tolist() == ids.tolist()


def test_stops_at_stop_token(tiny_model, batch, tiny_tokenizer):
    free = run(tiny_model, batch, max_new_tokens=6)
    stop_at = free.token_ids[0][2]
    stopped = run(tiny_model, batch, max_new_tokens=6, stop_token_ids=(stop_at,))
    first = free.token_ids[0].index(stop_at)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1]
    assert stopped.finish_reasons == ["stop"] and free.finish_reasons == ["length"]
    assert stop_token_ids(tiny_tokenizer, 259) == (262, 259)  # <|end|>, then the model's EOS


def test_streaming_callback_sees_every_token(tiny_model, batch):
    seen = []
    config = GenerationConfig(max_new_tokens=5)
    out = generate(ReferenceSession(tiny_model, batch, 5), config, on_token=lambda row, t: seen.append((row, t)))
    assert seen == [(0, t) for t in out.token_ids[0]]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        GenerationConfig(**kwargs)


def test_bad_requests(tiny_model, batch):
    good = Request(input_ids=[1, -300, 5, -200, 7], instructs=[1, 9], pixel_values=batch.pixel_values[0])
    prepare_batch([good], tiny_model.config, 4)
    no_latent = Request(input_ids=[1, 5, -200, 7], instructs=[1, 9], pixel_values=batch.pixel_values[0])
    with pytest.raises(RequestError, match="exactly one -300"):
        prepare_batch([no_latent], tiny_model.config, 4)
    empty = Request(input_ids=[1, -300, 5, -200, 7], instructs=[], pixel_values=batch.pixel_values[0])
    with pytest.raises(RequestError, match="non-empty instruction"):
        prepare_batch([empty], tiny_model.config, 4)
    with pytest.raises(GenerationError, match="exceeds the model's 131072 positions"):
        ReferenceSession(tiny_model, prepare_batch([good], tiny_model.config, 4), max_new_tokens=200_000)
