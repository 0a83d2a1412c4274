"""Presets: the full-size model builds on the meta device with the spec's parameter counts."""

from __future__ import annotations

import pytest
import torch

from reference_model import ConfigError, FusionModel, load_config, preset_config


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


def test_tiny_preset_is_the_oracle_shape(oracle_dir):
    assert preset_config("tiny").digest_dict() == load_config(oracle_dir).digest_dict()


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
