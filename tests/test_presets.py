"""Presets: the full-size model builds on the meta device with the spec's parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from reference_model import ConfigError, FusionModel, load_config, preset_config
from reference_model.config import PRESETS, config_from_dicts

from .conftest import VENDORED_ORACLES


def test_full_size_parameter_counts():
    config = preset_config("fusion-phi3.5-3b")
    with torch.device("meta"):
        model = FusionModel(config)
    total = sum(p.numel() for p in model.parameters())
    interaction = sum(p.numel() for p in model.interaction.parameters())
    decoder = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("embed_tokens", "layers", "norm", "lm_head"))
    )
    assert total == pytest.approx(5.09e9, rel=0.01)
    assert interaction == pytest.approx(0.85e9, rel=0.01)
    assert decoder == pytest.approx(3.82e9, rel=0.01)
    assert config.vision.num_layers == 26 and config.vision.num_patches == 729
    assert config.interaction.decoder_layers == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    assert config.decoder.head_dim == 96
    assert config.decoder.rope.attention_scaling == pytest.approx(1.1902, abs=1e-4)
    assert config.default_query_len == 64


@pytest.mark.parametrize(
    "preset,total,decoder,vision,patches,early",
    [("fusion-x-phi3.5-3b", 5.81e9, 3.82e9, 1.107e9, 576, 19),  # SigLIP2 giant-opt: 39 of 40 layers run
     ("fusion-llama3.1-8b", 9.98e9, 8.03e9, 0.398e9, 729, 13),
     ("fusion-x-llama3.1-8b", 10.69e9, 8.03e9, 1.107e9, 576, 19)],
)  # fmt: skip
def test_other_full_size_members(preset, total, decoder, vision, patches, early):
    """The other three trained shapes (upstream docs/model_zoo.md): tower, decoder and the 10 interaction layers
    each as large as their published sizes."""
    config = preset_config(preset)
    with torch.device("meta"):
        model = FusionModel(config)
    count = lambda prefixes: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))  # noqa: E731
    assert count(("",)) == pytest.approx(total, rel=0.01)
    assert count(("embed_tokens", "layers", "norm", "lm_head")) == pytest.approx(decoder, rel=0.01)
    assert count(("vision.",)) == pytest.approx(vision, rel=0.02)
    assert config.vision.num_patches == patches and config.vision.num_early_layers == early
    assert config.global_grid_side == 2 * math.isqrt(patches)
    assert config.interaction.decoder_layers == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    if "llama" in preset:
        d = config.decoder
        # Llama-3.1-8B's published 8,030,261,248 plus the two vision markers' rows in the embedding and the head
        assert count(("embed_tokens", "layers", "norm", "lm_head")) == 8_030_261_248 + 2 * 2 * 4096
        assert (d.num_heads, d.num_kv_heads, d.head_dim, d.vocab_size) == (32, 8, 128, 128258)
        assert d.rope.kind == "llama3" and d.rope.original_max_position_embeddings == 8192
        assert config.eos_token_ids == (128001, 128008, 128009)
        with torch.device("meta"):  # the KV cache holds the 8 KV heads only: a quarter of what 32 would take
            cache = model.new_cache(1, 16)
        assert cache.keys[0].shape == (1, 8, 16, 128) and len(cache.keys) == 32


def test_tower_shape_from_the_name():
    """Real checkpoints carry no vision config: the tower's shape comes from its name by upstream's rule ('siglip2'
    tested before 'siglip'), with the constants upstream hard-codes for each."""
    raw = dict(preset_config("fusion-phi3.5-3b").raw)
    shapes = {}
    for name in ("google/siglip-so400m-patch14-384", "google/siglip2-giant-opt-patch16-384", "my-SigLIP2-copy"):
        v = config_from_dicts(dict(raw, mm_vision_tower=name, mm_hidden_size=None), None).vision
        shapes[name] = (v.hidden_size, v.num_layers, v.patch_size, v.num_patches, v.num_early_layers)
    assert shapes == {"google/siglip-so400m-patch14-384": (1152, 26, 14, 729, 13),
                      "google/siglip2-giant-opt-patch16-384": (1536, 39, 16, 576, 19),
                      "my-SigLIP2-copy": (1536, 39, 16, 576, 19)}  # fmt: skip
    with pytest.raises(ConfigError, match="mm_vision_tower 'openai/clip-vit-large-patch14-336' names no tower"):
        raw = dict(preset_config("fusion-phi3.5-3b").raw, mm_vision_tower="openai/clip-vit-large-patch14-336")
        config_from_dicts(raw, None)


@pytest.mark.parametrize("preset,oracle", [("tiny", "fusion-phi-tiny"), ("tiny-x-llama", "fusion-x-llama-tiny")])
def test_tiny_presets_are_the_oracle_shapes(preset, oracle):
    assert preset_config(preset).digest_dict() == load_config(VENDORED_ORACLES[oracle]).digest_dict()


def test_config_files_round_trip():
    """A config written in the checkpoint format reads back as itself, in each decoder family's own fields."""
    for preset in PRESETS:
        config = preset_config(preset)
        config_json, vision_json = config.to_json_dicts()
        assert config_from_dicts(config_json, vision_json).digest_dict() == config.digest_dict(), preset
        if config.decoder.family == "llama":
            assert config_json["rope_scaling"]["rope_type"] == "llama3"
            assert "original_max_position_embeddings" not in config_json
        else:  # fields the reader does not use are written back as read
            assert config_json["sliding_window"] == config.raw["sliding_window"] == 262144


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")


@pytest.mark.parametrize("query_len", [4, 16, 36, 64, 144, 81])
def test_query_len_accepts_perfect_squares(query_len):
    assert preset_config("tiny").check_query_len(query_len) == query_len


@pytest.mark.parametrize("query_len", [0, 10, 15, -4, 400])
def test_query_len_rejects_others(query_len):
    with pytest.raises(ConfigError, match="query_len"):
        preset_config("tiny").check_query_len(query_len)
