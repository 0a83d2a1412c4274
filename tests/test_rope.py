"""LongRoPE and llama3: tables (and LongRoPE's short/long switch) agree with transformers' own Phi-3 and Llama
implementations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, Phi3Config, Phi3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from reference_model import preset_config
from reference_model.checkpoint import to_checkpoint_key
from reference_model.decoder import attention_mask
from reference_model.kv_cache import KVCache
from reference_model.rope import decode_cos_sin, inverse_frequencies, rope_cos_sin, uses_long_factors


def hf_config(config) -> Phi3Config:
    return Phi3Config(**{k: v for k, v in config.raw.items() if k != "model_type"}, attn_implementation="eager")


@pytest.mark.parametrize("preset", ["tiny", "fusion-phi3.5-3b"])
@pytest.mark.parametrize("first,last", [(0, 900), (3990, 4096), (3990, 4097), (0, 5000), (131000, 131072)])
def test_tables_match_transformers(preset, first, last):
    config = preset_config(preset)
    positions = torch.arange(first, last)[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # transformers' float32 cos is not repeatable multi-threaded (docs/semantics.md section 7)
    try:
        cos_hf, sin_hf = Phi3RotaryEmbedding(hf_config(config))(torch.zeros(1), positions)
    finally:
        torch.set_num_threads(threads)
    cos, sin = rope_cos_sin(positions, config.decoder.rope)
    assert (cos - cos_hf).abs().max() <= 2.5e-7 and (sin - sin_hf).abs().max() <= 2.5e-7


@pytest.mark.parametrize("preset", ["tiny-x-llama", "fusion-llama3.1-8b"])
def test_llama3_tables_match_transformers(preset):
    """All three llama3 bands (kept, interpolated, divided) hold at both head sizes (20: pairs 0-4 kept, 5
    interpolated, 6-9 divided; 128); no switch at any position and no scaling of cos and sin."""
    config = preset_config(preset)
    rope = config.decoder.rope
    hf = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in config.raw.items() if k != "model_type"}))
    short, long = inverse_frequencies(rope)
    assert torch.equal(short, hf.inv_freq) and torch.equal(long, short)  # bit for bit
    assert hf.attention_scaling == rope.attention_scaling == 1.0 and rope.switch_position is None
    positions = torch.cat([torch.arange(0, 900), torch.arange(8000, 8400), torch.arange(131000, 131072)])[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cos_hf, sin_hf = hf(torch.zeros(1), positions)
    finally:
        torch.set_num_threads(threads)
    cos, sin = rope_cos_sin(positions, rope)
    assert (cos - cos_hf).abs().max() <= 2.5e-7 and (sin - sin_hf).abs().max() <= 2.5e-7
    steps = decode_cos_sin(positions, rope)
    assert torch.equal(steps[0], cos) and torch.equal(steps[1], sin)
    assert not uses_long_factors(positions, rope).any()


def test_switch_is_per_forward_and_per_row():
    rope = preset_config("fusion-phi3.5-3b").decoder.rope
    assert not uses_long_factors(torch.tensor([[4095]]), rope)  # 4096 positions: still short
    assert uses_long_factors(torch.tensor([[4096]]), rope)  # the 4097th position switches
    assert uses_long_factors(torch.tensor([[4095], [4096]]), rope).tolist() == [False, True]
    short = rope_cos_sin(torch.tensor([[100]]), rope)[0]
    long = rope_cos_sin(torch.tensor([[100, 4096]]), rope)[0][:, :1]
    assert (short - long).abs().max() > 1e-2, "same position, other factors: tables must differ"


def test_decoding_across_4096_matches_transformers(tiny_model):
    """Prefill 4090 tokens, then decode one token at a time across position 4096: the cached keys keep
    their short-factor rotation while new tokens use the long one, exactly as transformers 4.48 does."""
    cfg = tiny_model.config
    hf = Phi3ForCausalLM(hf_config(cfg)).eval()
    ours = {to_checkpoint_key(n): t for n, t in tiny_model.state_dict().items()}
    missing, _ = hf.load_state_dict({k: v for k, v in ours.items() if k in hf.state_dict()}, strict=False)
    assert not missing

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.decoder.vocab_size, (1, 4090), generator=generator)
    steps = torch.randint(3, cfg.decoder.vocab_size, (1, 10), generator=generator)
    rope = cfg.decoder.rope
    with torch.inference_mode():
        cache_hf = DynamicCache()
        hf_logits = [hf(prompt, past_key_values=cache_hf, use_cache=True).logits[:, -1]]
        for i in range(steps.shape[1]):
            hf_logits.append(hf(steps[:, i : i + 1], past_key_values=cache_hf, use_cache=True).logits[:, -1])

        cache = KVCache(cfg.decoder.num_layers, 1, cfg.decoder.num_kv_heads, 4100, cfg.decoder.head_dim, torch.float32)
        n = prompt.shape[1]
        positions = torch.arange(n)[None]
        cos, sin = rope_cos_sin(positions, rope)
        mask = attention_mask(torch.ones(1, n, dtype=torch.bool), torch.arange(n))
        h = tiny_model.decode(tiny_model.embed_tokens(prompt), cos, sin, mask, cache)
        cache.advance(n)
        our_logits = [tiny_model.logits(h)[:, -1]]
        for i in range(steps.shape[1]):
            cos, sin = rope_cos_sin(torch.tensor([[n + i]]), rope)
            mask = attention_mask(torch.ones(1, n + i + 1, dtype=torch.bool), torch.tensor([n + i]))
            h = tiny_model.decode(tiny_model.embed_tokens(steps[:, i : i + 1]), cos, sin, mask, cache)
            cache.advance(1)
            our_logits.append(tiny_model.logits(h)[:, -1])
    crossed = [n + i for i in range(steps.shape[1]) if n + i >= rope.original_max_position_embeddings]
    assert crossed, "the test must cross the switch"
    for i, (a, b) in enumerate(zip(our_logits, hf_logits)):
        assert (a - b).abs().max().item() <= 1e-4, i
