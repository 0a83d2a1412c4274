"""A careless or hostile user's inputs: each gets one clear message naming the file, tensor or flag, exit 2,
before any compute; no input is ever overwritten; nothing silently wrong comes out.

The cases follow the hardening issue's list; `run_main` runs the real CLI entry point in this process.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from reference_model import load_model
from reference_model.checkpoint import SINGLE_FILE

from .conftest import DEMO_IMAGE, run_main, sha256


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny random checkpoint."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weight(folder, key, change):
    tensors = load_file(folder / SINGLE_FILE)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})


def golden(model, inputs, out, *extra):
    return run_main("golden", "--model", str(model), "--inputs", str(inputs), "--out", str(out), *extra)


def generate(model, *extra, image=DEMO_IMAGE, question="What is this?"):
    args = ["--image", str(image), "--question", question, "--max-new-tokens", "2", "--quiet"]
    return run_main("generate", "--model", str(model), *args, *extra)


# ---------------------------------------------------------------------------------------------- data loss


def test_golden_out_equal_to_inputs_is_refused(oracle_dir, tmp_path):
    inputs = shutil.copy(oracle_dir / "inputs.safetensors", tmp_path / "inputs.safetensors")
    before = sha256(inputs)
    result = golden(oracle_dir, inputs, inputs)
    assert result.returncode == 2
    assert "--out" in result.stderr and "is one of this command's inputs" in result.stderr
    assert sha256(inputs) == before
    link = tmp_path / "link.safetensors"
    link.symlink_to(inputs)  # the same file by another name
    assert golden(oracle_dir, inputs, link).returncode == 2 and sha256(inputs) == before


def test_golden_out_into_checkpoint_is_refused(ckpt, oracle_dir):
    before = sha256(ckpt / SINGLE_FILE)
    for model in (ckpt, oracle_dir):  # its own checkpoint, or any other
        result = golden(model, oracle_dir / "inputs.safetensors", ckpt / SINGLE_FILE)
        assert result.returncode == 2 and f"{ckpt} is a checkpoint folder" in result.stderr
    result = golden(oracle_dir, oracle_dir / "inputs.safetensors", ckpt / "sub" / "new-golden.safetensors")
    assert result.returncode == 2 and "outputs never go into one" in result.stderr
    assert sha256(ckpt / SINGLE_FILE) == before and not (ckpt / "new-golden.safetensors").exists()
    load_model(ckpt)  # still loads


def test_existing_file_replaced_only_when_of_the_kind(oracle_dir, tmp_path):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    result = golden(oracle_dir, oracle_dir / "inputs.safetensors", notes, "--max-new-tokens", "1")
    assert result.returncode == 2 and "exists and is not a golden outputs file" in result.stderr
    assert notes.read_text() == "my notes"

    out = tmp_path / "golden.safetensors"
    old = os.umask(0o027)
    try:
        for _ in range(2):  # the second run replaces the first run's file: same kind
            result = golden(oracle_dir, oracle_dir / "inputs.safetensors", out, "--max-new-tokens", "1")
            assert result.returncode == 0, result.stderr
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640  # the user's umask, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden.safetensors", "notes.safetensors"]


@pytest.mark.parametrize("where", ["folder", "unwritable", "under a file", "device"])
def test_bad_output_paths_refused_before_any_work(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = {
        "folder": tmp_path,
        "unwritable": "/sys/golden.safetensors",  # even root cannot create files there
        "under a file": tmp_path / "afile" / "golden.safetensors",
        "device": "/dev/null",
    }[where]
    expected = {
        "folder": "is a folder; give a file path",
        "unwritable": "cannot create files in this folder (Permission denied)",
        "under a file": "afile is a file, not a folder",
        "device": "exists and is not a regular file",
    }[where]
    # the checkpoint does not even exist: the output check comes first, before anything is read or run
    result = golden(tmp_path / "no-such-checkpoint", tmp_path / "no-inputs.safetensors", out)
    assert result.returncode == 2 and "--out" in result.stderr and expected in result.stderr, result.stderr


def test_missing_parent_folders_are_created_at_write_time(oracle_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "golden.safetensors"
    result = golden(oracle_dir, oracle_dir / "inputs.safetensors", out, "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr and out.exists()


def test_export_into_checkpoint_refused(ckpt):
    result = run_main("export", "--model", str(ckpt), "--out", str(ckpt / "onnx"))
    assert result.returncode == 2 and "is a checkpoint folder" in result.stderr
    assert not (ckpt / "onnx").exists()


# ------------------------------------------------------------------------------------------ silently wrong


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_refused_at_load(ckpt, oracle_dir, value, tmp_path):
    key = "model.layers.2.mlp.down_proj.weight"

    def poison(t):
        t[3, 5] = value
        return t

    edit_weight(ckpt, key, poison)
    result = golden(ckpt, oracle_dir / "inputs.safetensors", tmp_path / "g.safetensors")
    assert result.returncode == 2 and f"tensor {key} holds 1 NaN/Inf value(s)" in result.stderr
    assert not (tmp_path / "g.safetensors").exists()
    result = generate(ckpt)
    assert result.returncode == 2 and f"tensor {key} holds 1 NaN/Inf value(s)" in result.stderr
    assert SINGLE_FILE in result.stderr


def test_nan_images_refused_naming_the_tensor(oracle_dir, oracle_inputs, tmp_path):
    inputs = dict(oracle_inputs)
    inputs["images"] = inputs["images"].clone()
    inputs["images"][0, 2, 1, 10, 10] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(inputs, path)
    result = golden(oracle_dir, path, tmp_path / "g.safetensors")
    assert result.returncode == 2 and f"{path}: images: holds NaN or Inf values" in result.stderr
    assert not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize(
    "key,stage",
    [
        ("model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight", "vision encoder"),
        ("lm_head.weight", "decoder prefill"),
    ],
)
def test_overflowing_activations_refused_at_the_first_stage(ckpt, key, stage):
    """Finite weights (so they load) large enough that float32 activations overflow: the stage that first
    produces Inf/NaN is named, instead of decoding token 0 from NaN logits."""
    edit_weight(ckpt, key, lambda t: t / t.abs().max() * 3e38)  # every weight finite
    result = generate(ckpt)
    assert result.returncode == 2 and f"{stage} produced" in result.stderr and "non-finite" in result.stderr


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from reference_model.image_preprocessing import static_hd_crops

    grey16 = np.full((40, 60), 32896, dtype=np.uint16)  # 32896 / 257 = 128 exactly
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    Image.fromarray(np.full((40, 60), 128, dtype=np.uint8)).save(tmp_path / "grey8.png")
    crops16, crops8 = static_hd_crops(tmp_path / "grey16.png"), static_hd_crops(tmp_path / "grey8.png")
    assert torch.equal(crops16, crops8)
    assert abs(float(crops16.mean()) - (128 / 255 - 0.5) / 0.5) < 1e-6  # mid grey, not clipped to white (1.0)


def test_wide_images_without_a_display_range_are_refused(tmp_path):
    from reference_model.image_preprocessing import ImageError, open_image

    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "i32.tiff")
    with pytest.raises(ImageError, match="32-bit integer pixels .* no defined display range"):
        open_image(tmp_path / "i32.tiff")
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(tmp_path / "f32.tiff")
    with pytest.raises(ImageError, match="floating-point pixels"):
        open_image(tmp_path / "f32.tiff")
    small = np.arange(64, dtype=np.int32).reshape(8, 8)  # 8-bit data stored wide: accepted as is
    assert np.array_equal(np.asarray(open_image(Image.fromarray(small)))[..., 0], small.astype(np.uint8))


def test_check_trt_on_an_empty_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.touch()
    result = run_main("check-trt", str(empty))
    assert result.returncode == 2 and f"{empty}: not an ONNX model (0 bytes" in result.stderr
    assert "OK" not in result.stdout


# ---------------------------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_hidden_layers": "six"}, "num_hidden_layers must be an integer >= 1, got 'six'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
        ({"hidden_size": 127.5}, "hidden_size must be an integer >= 1, got 127.5"),
        ({"hidden_size": 130}, "hidden_size 130 is not divisible by num_attention_heads 4"),
        ({"num_attention_heads": 128}, "head size hidden_size / num_attention_heads = 128 / 128 = 1 is odd"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a finite number > 0, got 'tiny'"),
        ({"rope_scaling": "longrope"}, "rope_scaling must be an object"),
        ({"vocab_size": True}, "vocab_size must be an integer >= 1, got True"),
        ({"window_size": 0}, "window_size must be an integer >= 1, got 0"),
        ({"query_len": "0,16"}, "query_len '0,16' must list positive integers"),
        ({"eos_token_id": "end"}, "eos_token_id must be an integer >= 0, got 'end'"),
    ],
)
def test_bad_config_values(ckpt, changes, message):
    edit_config(ckpt, **changes)
    result = generate(ckpt)
    assert result.returncode == 2 and "config.json" in result.stderr and message in result.stderr, result.stderr


def test_bad_vision_config_value(ckpt):
    path = ckpt / "vision_config.json"
    vision = json.loads(path.read_text())
    vision["num_attention_heads"] = -4
    path.write_text(json.dumps(vision))
    result = generate(ckpt)
    assert result.returncode == 2 and "num_attention_heads must be an integer >= 1, got -4" in result.stderr


def test_huge_image_refused_before_decoding(tiny_checkpoint, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (15000, 15000)).save(huge)  # 225 M pixels, a few hundred kB compressed
    result = generate(tiny_checkpoint, image=huge)
    assert result.returncode == 2
    assert "15000x15000 = 225,000,000 pixels, over the limit of 64,000,000" in result.stderr
    assert "--max-image-pixels" in result.stderr
    result = generate(tiny_checkpoint, "--max-image-pixels", "1000")  # the flag moves the limit both ways
    assert result.returncode == 2 and "over the limit of 1,000" in result.stderr


@pytest.mark.parametrize(
    "image,message",
    [("missing.png", "image file not found"), ("notes.png", "not a readable image"), (".", "is a folder")],
)
def test_unreadable_images(tiny_checkpoint, tmp_path, image, message):
    (tmp_path / "notes.png").write_text("not a png")
    result = generate(tiny_checkpoint, image=tmp_path / image)
    assert result.returncode == 2 and message in result.stderr


def test_long_question_refused_before_any_work(tiny_checkpoint):
    result = generate(tiny_checkpoint, question="x" * 100_000)
    assert result.returncode == 2
    assert "the question is 100001 tokens; this model reads questions of at most 4096 tokens" in result.stderr


@pytest.mark.parametrize(
    "question,message",
    [
        ("", "the question is empty"),
        ("   \n\t", "the question is empty"),
        ("what is <image> here?", "contains '<image>', a marker the prompt template reserves"),
        ("<latent_image>", "contains '<latent_image>'"),
        ("bad \udcff byte", "not valid text (undecodable character at position 4)"),
    ],
)
def test_bad_questions(tiny_checkpoint, question, message):
    result = generate(tiny_checkpoint, question=question)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", "nan", "expected a finite number >= 0, got 'nan'"),
        ("--temperature", "inf", "expected a finite number >= 0"),
        ("--temperature", "-1", "expected a finite number >= 0"),
        ("--top-p", "nan", "expected a number in (0, 1]"),
        ("--top-p", "1.5", "expected a number in (0, 1]"),
        ("--seed", "-1", "expected an integer in 0..2^63-1"),
        ("--seed", str(2**64), "expected an integer in 0..2^63-1"),
        ("--max-new-tokens", "0", "expected a positive integer"),
        ("--query-len", "abc", "expected a positive integer"),
    ],
)
def test_bad_sampling_flags(tiny_checkpoint, flag, value, message):
    result = generate(tiny_checkpoint, flag, value)
    assert result.returncode == 2 and f"argument {flag}: {message}" in result.stderr


def test_too_many_new_tokens(tiny_checkpoint):
    result = generate(tiny_checkpoint, "--max-new-tokens", "1000000")
    assert result.returncode == 2 and "exceeds the model's 131072 positions" in result.stderr


def test_generate_without_a_model_names_both_flags():
    result = run_main("generate", "--image", str(DEMO_IMAGE), "--question", "q")
    assert result.returncode == 2 and "--model DIR" in result.stderr and "--artifacts ART" in result.stderr


def test_golden_inputs_of_the_wrong_shape_or_vocabulary(oracle_dir, oracle_inputs, tmp_path):
    out = tmp_path / "g.safetensors"
    small = dict(oracle_inputs, images=torch.zeros(1, 5, 3, 224, 224))
    save_file(small, tmp_path / "small.safetensors")
    result = golden(oracle_dir, tmp_path / "small.safetensors", out)
    assert result.returncode == 2 and "small.safetensors: images: torch.float32 [5, 3, 224, 224]" in result.stderr
    assert "the model reads float crops of shape [5, 3, 384, 384]" in result.stderr

    ids = oracle_inputs["input_ids"].clone()
    ids[0, 3] = 5000
    save_file(dict(oracle_inputs, input_ids=ids), tmp_path / "oov.safetensors")
    result = golden(oracle_dir, tmp_path / "oov.safetensors", out)
    assert result.returncode == 2 and "input_ids: id 5000 is outside the model's vocabulary 0..265" in result.stderr

    instructs = oracle_inputs["instructs"].clone()
    instructs[0, 0] = -7
    save_file(dict(oracle_inputs, instructs=instructs), tmp_path / "neg.safetensors")
    result = golden(oracle_dir, tmp_path / "neg.safetensors", out)
    assert result.returncode == 2 and "instructs: id -7 is outside 1..265" in result.stderr
    assert not out.exists()


def test_check_trt_distinguishes_unreadable_from_rejected(tmp_path, oracle_dir):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(4096))
    result = run_main("check-trt", str(corrupt))
    assert result.returncode == 2 and f"{corrupt}: not" in result.stderr
    result = run_main("check-trt", str(tmp_path / "nothing.onnx"))
    assert result.returncode == 2 and "neither an artifact folder nor an existing .onnx file" in result.stderr


def test_check_trt_json_is_refused_over_an_input(tmp_path):
    from onnx import helper

    from .test_trt_compat import save, vi

    graph = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], name="relu")
    before = sha256(graph)
    result = run_main("check-trt", str(graph), "--json", str(graph))
    assert result.returncode == 2 and "is one of this command's inputs" in result.stderr
    assert sha256(graph) == before
    result = run_main("check-trt", str(graph), "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0 and json.loads((tmp_path / "report.json").read_text())["ok"]


# ---------------------------------------------------------------------------------------------- the family


@pytest.fixture(scope="module")
def llama_ckpt_source(tmp_path_factory):
    """The demo's toy LLaMA + SigLIP2 checkpoint (fusion_llama), written once."""
    from fusion_export_cli.commands.demo import DEMO_SEED, demo_config
    from reference_model.synthetic import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", demo_config("x-llama"), seed=DEMO_SEED)


def _without_weights(folder):
    """The weights file cut to 10 bytes: a refusal that names a config field was made before any weight was read."""
    (folder / SINGLE_FILE).write_bytes((folder / SINGLE_FILE).read_bytes()[:10])


@pytest.mark.parametrize(
    "family,edit,message",
    [
        ("phi", {"model_type": "fusion_qwen"},
         ": model_type is 'fusion_qwen', expected one of FUSION's 'fusion_phi', 'fusion_llama'"),
        ("phi", {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "vision_config.json": None},
         ": mm_vision_tower 'openai/clip-vit-large-patch14-336' names no tower FUSION uses"),
        # the name gives SigLIP2's 1536-wide tower, mm_hidden_size says the weights are 64 wide
        ("phi", {"mm_vision_tower": "google/siglip2-giant-opt-patch16-384", "vision_config.json": None},
         ": mm_hidden_size 64 disagrees with the vision tower width 1536 (mm_vision_tower "
         "'google/siglip2-giant-opt-patch16-384': SigLIP2 giant-opt-patch16-384)"),
        ("llama", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
         ": rope_scaling type 'longrope' is not supported for model_type 'fusion_llama' (its checkpoints use "
         "'llama3')"),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 8192}},
         " rope_scaling: missing required field 'high_freq_factor'"),
        ("llama", {"head_dim": 32}, ": head_dim 32 differs from hidden_size / num_attention_heads = 16"),
        ("llama", {"tie_word_embeddings": True}, ": tie_word_embeddings True is not supported"),
        ("llama", {"eos_token_id": [259, "eot"]}, ": eos_token_id[1] must be an integer >= 0, got 'eot'"),
    ],
)  # fmt: skip
def test_family_config_refused_before_the_weights(ckpt, llama_ckpt_source, tmp_path, family, edit, message):
    folder = ckpt if family == "phi" else shutil.copytree(llama_ckpt_source, tmp_path / "llama")
    edit = dict(edit)
    if "vision_config.json" in edit:  # a real checkpoint's layout: the tower's shape from its name
        del edit["vision_config.json"]
        (folder / "vision_config.json").unlink()
    edit_config(folder, **edit)
    _without_weights(folder)
    result = generate(folder)
    assert result.returncode == 2 and f"{folder / 'config.json'}{message}" in result.stderr, result.stderr


def test_tower_name_disagreeing_with_the_weights(ckpt):
    """No vision config and no mm_hidden_size: the name's tower is compared with the weights' headers (shapes
    only), and the name is what the message blames."""
    (ckpt / "vision_config.json").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    del config["mm_hidden_size"]
    config["mm_vision_tower"] = "google/siglip2-giant-opt-patch16-384"
    (ckpt / "config.json").write_text(json.dumps(config))
    result = generate(ckpt)
    assert result.returncode == 2, result.stderr
    assert (f"{ckpt / 'config.json'}: mm_vision_tower 'google/siglip2-giant-opt-patch16-384' names a tower 1536 "
            "wide with 40 layers and 16 px patches (576 per crop), but the checkpoint's tower weights have other "
            "shapes") in result.stderr  # fmt: skip
    assert "misshaped" in result.stderr and "Traceback" not in result.stderr


def test_tokenizer_without_the_templates_tokens(llama_ckpt_source, tmp_path):
    """A LLaMA checkpoint carrying a Phi-3 tokenizer: no <|eot_id|> to end its turns, refused by name."""
    from reference_model.synthetic import build_byte_tokenizer

    folder = shutil.copytree(llama_ckpt_source, tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)  # transformers 5 writes no special_tokens_map.json
    build_byte_tokenizer("phi3").save_pretrained(str(folder))
    _without_weights(folder)
    result = generate(folder)
    assert result.returncode == 2, result.stderr
    assert ("tokenizer lacks the llama_3 template's special tokens <|start_header_id|>, <|end_header_id|>, "
            "<|eot_id|>, which config.json's model_type 'fusion_llama' prompts with") in result.stderr  # fmt: skip
