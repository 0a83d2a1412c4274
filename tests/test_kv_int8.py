"""An INT8 KV cache (`quantize --kv-cache int8`): the reference's quantized cache (reference_model/kv_cache.py),
the decoder graphs rewritten to store INT8 (engines/quantization/kv_cache.py) in every export form, ONNX
Runtime's tokens and logits against the reference quantizing with the same scales, a perturbed scale caught by
`validate`, the graphs built by TensorRT-RTX with INT8 cache I/O, and the static check agreeing with RTX's parser
about which writes take an INT8 cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.onnxruntime.session import OrtModel
from engines.tensorrt.build import BuildOptions, build_engines
from engines.tensorrt.flavours import TrtFlavour, installed_flavours, load_trt
from fusion_export.bundled import DEMO_IMAGE, DEMO_QUESTION
from fusion_export.manifest import ArtifactError, file_entries, open_artifact, save_manifest
from fusion_export.trt_rules.operator_check import check_graphs
from fusion_export.trt_rules.targets import TrtTarget
from reference_model import load_model, make_request, prepare_batch
from reference_model.generation import GenerationConfig, ReferenceSession, generate
from reference_model.kv_cache import KVCache, quantize_int8
from reference_model.prompt import load_tokenizer

from .conftest import run_main

# The demo model's forms: default graphs, trt-10.15 (TensorScatter writes, a fixed capacity), plugin nodes.
FORMS = {
    "trt-10.3": ("trt-10.3", None, False),
    "trt-10.15": ("trt-10.15", 1024, False),
    "plugins": ("trt-10.3", None, True),
}
NEW_TOKENS = 8
# The ONNX graphs and the reference store the same integers except where float32 noise straddles a rounding
# boundary (one step apart; 30 of 1.3M values on the demo model): logits then move by up to ~1.5e-4.
STEP_LOGITS = 1e-3
PREFILL_LOGITS = 1e-4  # the prefill attends to its own keys unquantized: fp32 parity
rtx = pytest.mark.skipif(TrtFlavour.tensorrt_rtx not in installed_flavours(), reason="TensorRT-RTX not installed")


def test_reference_int8_cache_semantics():
    """Stored: QuantizeLinear's integers (round half to even, saturated); read: q * scale. The prefill attends to
    its keys as computed, a later forward to the stored columns, its own included."""
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 400.0, -400.0, 0.1])
    assert quantize_int8(x, 0.5).tolist() == [0, 2, 0, 2, 127, -128, 0]
    cache = KVCache(1, 1, 1, 4, 2, torch.float32, int8_scales=[(0.5, 0.25)])
    k, v = torch.tensor([[[[0.3, -0.8], [1.1, 2.0]]]]), torch.tensor([[[[0.3, -0.8], [1.1, 2.0]]]])
    keys, values = cache.layer(0).update(k, v)
    assert keys is k and values is v  # the prefill
    assert cache.keys[0].dtype == torch.int8 and cache.keys[0][0, 0, :2].tolist() == [[1, -2], [2, 4]]
    cache.advance(2)
    keys, values = cache.layer(0).update(k[:, :, :1] * 0 + 0.6, v[:, :, :1] * 0 - 0.6)
    assert keys[0, 0].tolist() == [[0.5, -1.0], [1.0, 2.0], [0.5, 0.5]]
    assert values[0, 0].tolist() == [[0.25, -0.75], [1.0, 2.0], [-0.5, -0.5]]
    with pytest.raises(ValueError, match="1 positive"):
        KVCache(1, 1, 1, 4, 2, torch.float32, int8_scales=[(0.5, 0.0)])


@pytest.fixture(scope="module")
def kv_int8(export_demo, tmp_path_factory):
    """form -> an INT8-KV artifact of the demo model (linear layers float), made once from the shared exports."""
    made = {}

    def get(form: str):
        if form not in made:
            target, max_context, plugins = FORMS[form]
            out = tmp_path_factory.mktemp("kv") / form
            result = run_main("quantize", str(export_demo(target, "fp32", max_context, plugins)), "--out", str(out),
                              "--kv-cache", "int8", "--linear", "float", "--num-samples", "2", "--decode-steps", "4",
                              "--quiet")  # fmt: skip
            assert result.returncode == 0, result.stderr
            made[form] = out
        return made[form]

    return get


@pytest.mark.parametrize("form", list(FORMS))
def test_int8_cache_matches_the_reference_quantizing_alike(kv_int8, demo_checkpoint, form):
    artifact = open_artifact(kv_int8(form))
    d = artifact.config.decoder
    scales = artifact.kv_int8_scales
    assert artifact.quantization is None and len(scales) == d.num_layers  # only the cache is quantized
    record = artifact.manifest["kv_cache"]
    assert record["dtype"] == "int8" and record["calibration"]["samples"] == 2
    for name in ("decoder_prefill", "decoder_step"):
        graph = onnx.load(artifact.graph_path(name), load_external_data=False).graph
        caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key", "present"))]
        assert {v.type.tensor_type.elem_type for v in caches} == {TensorProto.INT8}
        assert not any(n.op_type == "TensorScatter" for n in graph.node)  # TensorRT's KV update takes no INT8
        plugin_nodes = [n for n in graph.node if n.op_type == "DecodeAttention"]
        if form == "plugins" and name == "decoder_step":  # the plugin reads INT8 itself, scales as attributes
            assert len(plugin_nodes) == d.num_layers and not any(n.op_type == "DequantizeLinear" for n in graph.node)
            first = {a.name: a.f for a in plugin_nodes[0].attribute}
            assert first == pytest.approx({"k_scale": scales[0][0], "v_scale": scales[0][1]})

    model = load_model(demo_checkpoint)
    tokenizer = load_tokenizer(artifact.model_dir)
    questions = [DEMO_QUESTION, "Count the windows."]  # two lengths: a left-padded row
    batch = prepare_batch([make_request(DEMO_IMAGE, q, tokenizer, artifact.config) for q in questions],
                          artifact.config, artifact.query_len)  # fmt: skip
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    runtime = OrtModel(artifact).load()
    # ONNX Runtime's CPU GroupQueryAttention stores and reads the INT8 cache itself (per-tensor k/v scales)
    assert f"decoder_step: {d.num_layers} layers as GroupQueryAttention" in runtime.attention_form
    session = runtime.session(batch, NEW_TOKENS)
    ours = generate(session, config, keep_logits=True)
    reference = ReferenceSession(model, batch, NEW_TOKENS, scales)
    theirs = generate(reference, config, keep_logits=True)
    assert ours.token_ids == theirs.token_ids
    gap = (ours.step_logits - theirs.step_logits).abs()  # token 0 is drawn from the prefill's logits
    assert gap[:, 0].max().item() <= PREFILL_LOGITS and gap[:, 1:].max().item() <= STEP_LOGITS
    if form == "trt-10.3":  # the cache really is INT8: ours is near its own reference only
        float_run = generate(ReferenceSession(model, batch, NEW_TOKENS), config, keep_logits=True)
        float_gap = (ours.step_logits - float_run.step_logits)[:, 1:].abs().max().item()
        assert float_gap > 10 * gap[:, 1:].max().item()

    written = reference.cache.length
    flipped = total = 0
    for i, (a, b) in enumerate(zip(session.cache_arrays(), reference.cache.dequantized())):
        gap = np.abs(a[:, :, :written] - b[:, :, :written].numpy())
        step = scales[i // 2][i % 2]
        assert gap.max() <= step * 1.001, f"cache {i}: more than one rounding step from the reference"
        flipped, total = flipped + int((gap > step / 2).sum()), total + gap.size
    assert flipped <= 1e-3 * total


def _scale_one_layer(folder, factor: float) -> None:
    """Layer 0's key scale multiplied by `factor` in both decoder graphs, every hash and the digest resealed."""
    name = "past_key_values.0.key.kv_scale"
    for graph in ("decoder_prefill", "decoder_step"):
        path = folder / f"{graph}.onnx"
        model = onnx.load(path, load_external_data=False)
        tensor = next(t for t in model.graph.initializer if t.name == name)
        assert not tensor.external_data  # a scalar: inline
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), name))
        onnx.save(model, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder)
    save_manifest(folder, manifest)


def test_validate_passes_and_a_perturbed_scale_fails(kv_int8, demo_checkpoint, tmp_path):
    """`validate` runs the reference with the manifest's scales: the artifact passes its gates; the same artifact
    with one layer's key scale 25% off in its graphs (consistently resealed) fails them."""
    good = kv_int8("trt-10.3")
    report = tmp_path / "good.json"
    result = run_main("validate", str(good), "--model", str(demo_checkpoint), "--max-new-tokens", "8",
                      "--json", str(report))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["kv_cache"] == "int8"
    one_step = max(max(pair) for pair in open_artifact(good).kv_int8_scales)
    assert data["tolerances"]["kv_atol"] == pytest.approx(one_step * 1.001)

    broken = shutil.copytree(good, tmp_path / "broken")
    _scale_one_layer(broken, 1.25)
    open_artifact(broken)  # consistent: only the numbers are wrong
    result = run_main("validate", str(broken), "--model", str(demo_checkpoint), "--max-new-tokens", "8",
                      "--json", str(tmp_path / "broken.json"))  # fmt: skip
    failed = {s["stage"] for s in json.loads((tmp_path / "broken.json").read_text())["stages"] if not s["passed"]}
    assert result.returncode == 1 and {"kv cache after prefill", "kv cache at the end"} <= failed


def test_manifest_and_graphs_must_agree_on_the_cache(kv_int8, tmp_path):
    folder = shutil.copytree(kv_int8("trt-10.3"), tmp_path / "art")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["kv_cache"]
    save_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="KV cache is INT8 but the manifest has no kv_cache record"):
        open_artifact(folder)
    manifest["kv_cache"] = {"dtype": "int8", "scales": [[0.1, -1.0]]}
    save_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="kv_cache must be"):
        open_artifact(folder)


def test_quantize_refuses_bad_kv_flags(kv_int8, export_demo, tmp_path):
    source = str(export_demo("trt-10.3"))
    cases = [
        ((source, "--linear", "float"), "--linear float quantizes only the KV cache"),
        ((source, "--precision", "fp16", "--kv-cache", "int8"), "--kv-cache and --linear are for --precision int8"),
        ((str(kv_int8("trt-10.3")), "--weight-only"), "this one is an INT8 KV cache"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = run_main("quantize", *args, "--out", str(out), "--quiet")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert not out.exists()


@rtx
@pytest.mark.parametrize("form", list(FORMS))
def test_int8_cache_builds_with_tensorrt_rtx(kv_int8, tmp_path, form):
    """RTX's builder takes every form's INT8 writes and INT8 cache I/O; the plugin form's DecodeAttention becomes
    its IPluginV3 with INT8 K/V; the engine manifest carries the scales for the runtime."""
    folder = kv_int8(form)
    result = build_engines(folder, tmp_path / "eng", BuildOptions(), verbose=False)
    manifest = json.loads((result.folder / "engines.json").read_text())
    assert manifest["kv_int8_scales"] == [list(p) for p in open_artifact(folder).kv_int8_scales]
    # one decoder engine; the plugin form keeps a prefill and a step engine (its interaction plugin's fixed rows)
    names = ("decoder_prefill", "decoder_step") if form == "plugins" else ("decoder",)
    assert sorted(manifest["engines"]) == sorted(("vision_encoder", *names))
    for name in names:
        io = manifest["engines"][name]["io"]
        caches = [t for t in [*io["inputs"], *io["outputs"]] if t["name"].startswith(("past_key", "present"))]
        assert {t["dtype"] for t in caches} == {"INT8"}
    if form == "plugins":
        assert manifest["plugin_implementation"]["DecodeAttention"].startswith("IPluginV3")
    # INT8 writes are ScatterND in every form, never TensorRT's KV-cache update layer: two buffers take turns
    assert (manifest["plan"]["kv_in_place"], manifest["plan"]["kv_buffers"]) == (False, 2)
    assert all(e["kv_updated_in_place"] == [] for e in manifest["engines"].values())


def _one_write(op_type: str, opset: int) -> onnx.ModelProto:
    """An INT8 cache written by `op_type` from a quantized float update, read back through DequantizeLinear."""
    shape, update = [1, 2, 16, 8], [1, 2, 1, 8]
    inputs = [helper.make_tensor_value_info("past", TensorProto.INT8, shape),
              helper.make_tensor_value_info("update", TensorProto.FLOAT, update)]  # fmt: skip
    write = {
        "ScatterElements": (["past", "index", "q"], dict(axis=2), ("index", TensorProto.INT64, update)),
        "ScatterND": (["past", "index", "q"], {}, ("index", TensorProto.INT64, [1, 2, 1, 3])),
        "TensorScatter": (["past", "q", "columns"], dict(axis=-2), ("columns", TensorProto.INT64, [1])),
    }[op_type]
    inputs.append(helper.make_tensor_value_info(*write[2]))
    nodes = [
        helper.make_node("QuantizeLinear", ["update", "scale", "zero"], ["q"]),
        helper.make_node(op_type, write[0], ["present"], **write[1]),
        helper.make_node("DequantizeLinear", ["present", "scale", "zero"], ["read"]),
    ]
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                    numpy_helper.from_array(np.array(0, np.int8), "zero")]  # fmt: skip
    outputs = [helper.make_tensor_value_info("present", TensorProto.INT8, shape),
               helper.make_tensor_value_info("read", TensorProto.FLOAT, shape)]  # fmt: skip
    graph = helper.make_graph(nodes, op_type, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@rtx
@pytest.mark.parametrize(("op_type", "opset", "builds"), [("ScatterElements", 17, True), ("ScatterND", 17, True),
                                                          ("TensorScatter", 24, False)])  # fmt: skip
def test_static_check_agrees_with_rtx_on_int8_writes(op_type, opset, builds, tmp_path):
    """Which writes take an INT8 cache: RTX's parser and builder decide; the static check (the fallback for the
    TensorRT versions that cannot be installed here) warns where RTX builds and refuses where RTX refuses."""
    path = tmp_path / "write.onnx"
    onnx.save(_one_write(op_type, opset), path)
    trt = load_trt(TrtFlavour.tensorrt_rtx)
    builder, network, errors = trt.parse(path)
    if builds:
        assert not errors and trt.write_plan(builder, network, builder.create_builder_config(), tmp_path / "plan")
    else:
        assert errors and "cache has type Int8" in errors[0]
    target = TrtTarget.trt_10_15 if opset >= 24 else TrtTarget.trt_10_3
    report = check_graphs({"write": path}, target)
    assert report.ok == builds, report.table()
    if builds:
        assert any("INT8 data" in f.message for f in report.findings if f.severity == "warning")
