"""`quantize --precision int4`: INT4 blocks (round to nearest and AWQ) on the demo model's fp32 and fp16 exports:
the math of the blocks and AWQ's searches, the graphs' form and manifest, bad input refused before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engines.quantization.int4 import dequantize_blocks, quantize_blocks, search_clip, search_scales
from fusion_export.manifest import open_artifact

from .conftest import changed_entries, run_main, scale_initializer, tree_state

GRAPHS = ("vision_encoder", "decoder_prefill", "decoder_step")
TARGET = ("trt-10.15", "fp32", 1024)  # opset 24: DequantizeLinear's block_size (opset 21) is there


@pytest.fixture(scope="module")
def int4_artifact(export_demo, tmp_path_factory):
    """(precision, method, block) -> the demo export quantized to INT4, made once."""
    made = {}

    def get(precision: str = "fp32", method: str = "awq", block: int = 32):
        key = (precision, method, block)
        if key not in made:
            out = tmp_path_factory.mktemp("int4") / f"{precision}-{method}-{block}"
            calibration = ["--num-samples", "2", "--decode-steps", "4"] if method == "awq" else []
            result = run_main("quantize", str(export_demo(TARGET[0], precision, TARGET[2])), "--out", str(out),
                              "--precision", "int4", "--method", method, "--block-size", str(block), "--quiet",
                              *calibration)  # fmt: skip
            assert result.returncode == 0, result.stderr
            made[key] = out
        return made[key]

    return get


def test_blocks_hold_every_weight_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[32:64, 5] = 0.0  # an all-zero block still gets a positive scale
    for dtype in (np.float32, np.float16):
        q, scale = quantize_blocks(w, 32, scale_dtype=dtype)
        assert q.shape == w.shape and scale.shape == (8, 64) and scale.dtype == dtype
        assert np.abs(q).max() == 7 and (scale > 0).all()
        step = np.repeat(scale.astype(np.float32), 32, axis=0)
        # rounding to nearest with the stored scale: at most half a step, plus float32 rounding of w / scale
        assert (np.abs(dequantize_blocks(q, scale) - w) <= step * (0.5 + 1e-6)).all()
        assert (dequantize_blocks(q, scale)[32:64, 5] == 0).all()


def test_awq_beats_round_to_nearest_where_activations_have_outlier_channels():
    """The case AWQ exists for: a few input channels carry 30x larger activations; scaling their weight rows up
    before rounding keeps their products accurate. Measured: AWQ's output error is a fraction of RTN's."""
    rng = np.random.default_rng(1)
    k, n, block = 256, 128, 64
    x = rng.standard_normal((512, k)).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 30.0
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    reference = x @ w

    def error(q, scale, s=None):
        x_in = x if s is None else x / s
        return float(np.square(x_in @ dequantize_blocks(q, scale) - reference).mean())

    rtn = error(*quantize_blocks(w, block))
    s, alpha = search_scales(np.abs(x).mean(axis=0), x, [w], block)
    clip = search_clip(x / s, w * s[:, None], block)
    awq = error(*quantize_blocks(w * s[:, None], block, clip), s)
    assert alpha > 0 and awq < 0.5 * rtn, (alpha, awq, rtn)
    # alpha 0 (s = 1) is a candidate: where activations are plain, AWQ never does worse than RTN
    plain = rng.standard_normal((512, k)).astype(np.float32)
    s, _ = search_scales(np.abs(plain).mean(axis=0), plain, [w], block)
    exact = plain @ w
    scaled = np.square((plain / s) @ dequantize_blocks(*quantize_blocks(w * s[:, None], block)) - exact).mean()
    assert scaled <= np.square(plain @ dequantize_blocks(*quantize_blocks(w, block)) - exact).mean()


def _initializers(path):
    return {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_int4_graphs_form_and_manifest(int4_artifact, precision):
    folder = int4_artifact(precision)
    artifact = open_artifact(folder)
    record = artifact.manifest["quantization"]
    assert artifact.quantization == record["mode"] == "int4-weight-only"
    assert (record["method"], record["block_size"]) == ("awq", 32)
    assert record["layers"] == {"decoder": "int4", "lm_head": "int8", "vision": "int8"}
    assert record["awq"]["scaled_groups"] > 0 and "calibration" in record
    scale_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    step = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    inits = {t.name: t for t in step.graph.initializer}
    dqs = [n for n in step.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int4")]
    assert len(dqs) == record["quantized_layers"]["decoder_step"] - 1  # all but the LM head (INT8)
    for node in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        values, scale = inits[node.input[0]], inits[node.input[1]]
        assert attrs == {"axis": 0, "block_size": 32} and len(node.input) == 2  # no zero point
        assert values.data_type == onnx.TensorProto.INT4 and scale.data_type == scale_type
        assert list(scale.dims) == [values.dims[0] // 32, values.dims[1]]
    head = inits["model.lm_head.weight.T.int8"]
    assert head.data_type == onnx.TensorProto.INT8 and inits["model.lm_head.weight.T.scale"].data_type == scale_type
    assert not any(n.endswith(".weight.T") for n in inits)  # no float copy of a quantized weight is left
    # prefill and step share every INT4 weight: one copy of each in the decoder's data file
    prefill = _initializers(folder / "decoder_prefill.onnx")
    shared = [n for n in inits if n.endswith(".int4")]
    assert shared and all(prefill[n].external_data == inits[n].external_data for n in shared)


def test_int4_artifact_passes_its_gates_and_a_perturbed_one_fails(int4_artifact, demo_checkpoint, tmp_path):
    """validate's INT4 gates (benchmarks/validation.py) pass the AWQ artifact; one layer's INT4 scales off by 4x
    (every hash resealed: only the numbers are wrong) fails them."""
    import shutil

    good = int4_artifact("fp32")
    report = tmp_path / "good.json"
    result = run_main("validate", str(good), "--model", str(demo_checkpoint), "--max-new-tokens", "16", "--json",
                      str(report))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert "MatMulNBits accuracy level 1 (float32 compute)" in json.loads(report.read_text())["backend"]
    broken = shutil.copytree(good, tmp_path / "broken")
    scale_initializer(broken, "model.layers.0.mlp.down_proj.weight.T.scale", 4.0)
    open_artifact(broken)  # consistent
    result = run_main("validate", str(broken), "--model", str(demo_checkpoint), "--max-new-tokens", "16")
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_awq_scales_fold_into_the_norms_exactly(int4_artifact, export_demo):
    """Where a norm alone feeds a group (the attention's and the MLP's input norms), 1 / s went into its scale;
    the o_proj's and down_proj's inputs come from elsewhere, so a Mul by 1 / s stands before them."""
    folder = int4_artifact("fp32")
    source = _initializers(export_demo(*TARGET) / "decoder_step.onnx")
    step = onnx.load(folder / "decoder_step.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(folder)) for t in step.graph.initializer}
    norm = "model.layers.0.input_layernorm.weight"
    original = onnx.numpy_helper.to_array(source[norm], base_dir=str(export_demo(*TARGET)))
    assert not np.array_equal(inits[norm], original)  # folded
    muls = [n for n in step.graph.node if n.op_type == "Mul" and n.name.endswith("/awq_scale")]
    assert muls and all(n.input[1].endswith(".awq_inverse_scale") for n in muls)
    record = open_artifact(folder).manifest["quantization"]["awq"]
    assert 0 < record["folded"] < record["scaled_groups"]


def test_round_to_nearest_needs_no_calibration(int4_artifact):
    folder = int4_artifact("fp32", "rtn", 64)
    record = open_artifact(folder).manifest["quantization"]
    assert record["method"] == "rtn" and record["block_size"] == 64
    assert "calibration" not in record and "awq" not in record


def test_int4_refuses_bad_input_before_any_work(int4_artifact, export_demo, tmp_path):
    art = str(export_demo(*TARGET))
    before = tree_state(tmp_path)
    out = str(tmp_path / "q")
    cases = [
        (["--precision", "int3"], "invalid choice: 'int3'"),
        (["--precision", "int4", "--block-size", "48"], "--block-size: invalid choice: 48"),
        (["--precision", "int4", "--vision", "int4", "--block-size", "128", "--method", "rtn"],
         "--block-size 128: does not divide model.aux_projector.2.weight.T's input dimension 64"),
        (["--precision", "int4", "--method", "percentile"], "--method percentile is for --precision int8"),
        (["--precision", "int4", "--method", "rtn", "--num-samples", "2"], "--num-samples: --method rtn runs no"),
        (["--precision", "int4", "--weight-only"], "--weight-only: --precision int4 is weight-only already"),
        (["--precision", "int4", "--float-inputs", "*q*"], "--float-inputs: --precision int4"),
        (["--precision", "int4", "--linear", "float", "--kv-cache", "int8"], "--linear float keeps the linear"),
        (["--block-size", "32"], "--block-size is for --precision int4"),
        (["--lm-head", "int4"], "--lm-head is for --precision int4"),
        (["--method", "awq"], "--method awq is for --precision int4"),
        (["--precision", "int4", "--calib", str(tmp_path / "missing")], "missing"),
        (["--precision", "int4", "--exclude", "*nothing*"], "--exclude '*nothing*': matches none"),
    ]  # fmt: skip
    for flags, words in cases:
        result = run_main("quantize", art, "--out", out, *flags)
        assert result.returncode == 2 and words in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr
    result = run_main("quantize", str(int4_artifact("fp32", "rtn", 64)), "--out", out, "--precision", "int4")
    assert result.returncode == 2 and "(this one is int4-weight-only)" in result.stderr
    # JetPack 6's TensorRT 10.3 parses opset 20 at most: no DequantizeLinear block_size there
    result = run_main("quantize", str(export_demo("trt-10.3")), "--out", out, "--precision", "int4", "--method", "rtn")
    assert result.returncode == 2 and "trt-10.3's parser reads opsets up to 20" in result.stderr
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_engine_folder_records_int4(int4_artifact, tmp_path):
    """TensorRT-RTX parses and builds every INT4 graph; engines.json says what the weights are."""
    from engines.tensorrt.build import BuildOptions, build_engines

    result = build_engines(int4_artifact("fp16"), tmp_path / "eng", BuildOptions(), verbose=False)
    manifest = json.loads((result.folder / "engines.json").read_text())
    assert manifest["quantization"] == "int4-weight-only"
    assert all(e["layers"] > 100 for e in result.engines.values())
    assert manifest["engines"]["decoder"]["graphs"] == ["decoder_prefill", "decoder_step"]  # INT4 decoder held once
