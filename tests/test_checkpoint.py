"""Checkpoint loading: sharded equals unsharded, and every kind of bad checkpoint gets one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference_model import CheckpointError, ConfigError, load_model
from reference_model.checkpoint import INDEX_FILE, SINGLE_FILE, save_checkpoint


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_equals_unsharded(tiny_model, tmp_path):
    sharded = save_checkpoint(tiny_model, tmp_path / "sharded", shard_bytes=1_000_000)
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (sharded / INDEX_FILE).exists() and not (sharded / SINGLE_FILE).exists()
    reloaded = load_model(sharded)
    original = tiny_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_dtype_choice(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_unexpected_and_misshaped_are_listed(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(ckpt / SINGLE_FILE)
    removed = [k for k in tensors if k.startswith("model.layers.")][:13]
    for key in removed:
        del tensors[key]
    tensors["model.extra.weight"] = torch.zeros(2)
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    save_file(tensors, ckpt / SINGLE_FILE)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "missing (13)" in msg and "... and 3 more" in msg and removed[0] in msg
    assert "unexpected (1)" in msg and "model.extra.weight" in msg
    assert "misshaped (1)" in msg and "lm_head.weight: checkpoint [3, 3], model [266, 128]" in msg


def test_post_layernorm_is_accepted_but_unused(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(ckpt / SINGLE_FILE)
    prefix = "model.vision_tower.vision_tower.vision_model.post_layernorm."
    tensors[prefix + "weight"], tensors[prefix + "bias"] = torch.ones(64), torch.zeros(64)
    save_file(tensors, ckpt / SINGLE_FILE)
    load_model(ckpt)


def test_corrupt_file(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    data = (ckpt / SINGLE_FILE).read_bytes()
    (ckpt / SINGLE_FILE).write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(ckpt)
    (ckpt / SINGLE_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(ckpt)


def test_missing_shard_and_weights(tiny_model, tmp_path):
    sharded = save_checkpoint(tiny_model, tmp_path / "sharded", shard_bytes=1_000_000)
    victim = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) not found: {victim.name}"):
        load_model(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("config.json", "vision_config.json"):
        shutil.copy(sharded / name, empty / name)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(empty)


def test_wrong_model_type(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llava_llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type is 'llava_llama', expected one of FUSION's 'fusion_phi'"):
        load_model(ckpt)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"config\.json: not found"):
        load_model(tmp_path)


def test_llama_checkpoint_round_trip(tmp_path):
    """A LLaMA checkpoint's separate projections are stacked into the fused modules on load (rows q, k, v; gate,
    up) and written back split, under upstream's own names: the saved folder holds the oracle's very tensors."""
    from .conftest import LLAMA_ORACLE_DIR

    model = load_model(LLAMA_ORACLE_DIR)
    layer = model.layers[0]
    source = load_file(LLAMA_ORACLE_DIR / SINGLE_FILE)
    q, k, v = (source[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q.shape == (160, 160) and k.shape == v.shape == (40, 160)  # 8 query heads over 2 KV heads of 20
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    gate, up = source["model.layers.0.mlp.gate_proj.weight"], source["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate, up]))
    saved = load_file(save_checkpoint(model, tmp_path / "saved", shard_bytes=None) / SINGLE_FILE)
    assert sorted(saved) == sorted(k for k in source if "post_layernorm" not in k)
    assert all(torch.equal(saved[key], source[key]) for key in saved)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "fusion_llama" and config["rope_scaling"]["rope_type"] == "llama3"
    assert load_model(tmp_path / "saved").config.digest_dict() == model.config.digest_dict()
