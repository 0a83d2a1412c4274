"""One decoder graph for prefill and decode (fusion_export/decoder_merge.py), on the demo model's artifacts:
ONNX Runtime runs it equal to the prefill and step graphs (a decode step binds no latents), and TensorRT-RTX's real
builder builds it under one profile spanning both phases into an engine that holds the decoder's weights once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import load_external_data_for_model

from fusion_export.decoder_merge import MergeError, merge_decoder
from fusion_export.onnx_export import SCOPE_KEY

onnxruntime = pytest.importorskip("onnxruntime")

# (TensorRT target, precision, max_context): the two KV-write forms (ScatterElements; TensorScatter -> TensorRT's
# KV-cache update, which needs its cache to be a network input) in both precisions
MERGED_FLAVOURS = [("trt-10.3", "fp32", None), ("trt-10.15", "fp16", 1024)]
CAPACITY = 96  # KV columns of the ONNX Runtime runs (dynamic-capacity graphs)


def _graphs(folder):
    load = lambda name: onnx.load(folder / f"{name}.onnx", load_external_data=False)  # noqa: E731
    return load("decoder_prefill"), load("decoder_step")


def _with_weights(model: onnx.ModelProto, folder) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    load_external_data_for_model(model, str(folder))
    return model


def _session(model: onnx.ModelProto, folder):
    model = _with_weights(model, folder)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _request(prefill: onnx.ModelProto, capacity: int, seed: int = 0):
    """Prefill feeds for two rows (the second left-padded by 5) and the step feeds that follow them."""
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in prefill.graph.input}
    dtype = np.float16 if prefill.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(seed)
    B, T = 2, 40
    D, hd = shapes["inputs_embeds"][2], shapes["rope_cos"][2]
    Q, ctx = shapes["vision_pos"][1], shapes["global_ctx"][1]
    mask = np.ones((B, T), np.int64)
    mask[1, :5] = 0
    past = {i.name: np.zeros((B, shapes[i.name][1], capacity, shapes[i.name][3]), dtype)
            for i in prefill.graph.input if i.name.startswith("past_key_values.")}  # fmt: skip
    prefill_feeds = {
        "inputs_embeds": rng.standard_normal((B, T, D)).astype(dtype),
        "attention_mask": mask,
        "rope_cos": rng.standard_normal((B, T, hd)).astype(np.float32),
        "rope_sin": rng.standard_normal((B, T, hd)).astype(np.float32),
        "vision_pos": np.tile(np.arange(8, 8 + Q), (B, 1)),
        "instruct_pos": np.full((B, 1), T - 1),
        "global_ctx": rng.standard_normal((B, ctx, D)).astype(dtype),
        **past,
    }
    columns = np.zeros((B, capacity), np.int64)
    columns[:, :T] = mask
    columns[:, T] = 1
    step_feeds = {
        "inputs_embeds": rng.standard_normal((B, 1, D)).astype(dtype),
        "attention_mask": columns,
        "rope_cos": rng.standard_normal((B, 1, hd)).astype(np.float32),
        "rope_sin": rng.standard_normal((B, 1, hd)).astype(np.float32),
        "write_indices": np.full(B, T, np.int64),
    }
    no_latents = {"vision_pos": np.zeros((B, 0), np.int64), "instruct_pos": np.zeros((B, 1), np.int64),
                  "global_ctx": np.zeros((B, 0, D), dtype)}  # fmt: skip
    return prefill_feeds, step_feeds, no_latents


@pytest.mark.parametrize("target,precision,max_context", MERGED_FLAVOURS)
def test_merged_decoder_runs_as_both_graphs_on_onnxruntime(export_demo, target, precision, max_context):
    folder = export_demo(target, precision, max_context)
    prefill, step = _graphs(folder)
    merged = merge_decoder(prefill, step)
    onnx.checker.check_model(_with_weights(merged, folder), full_check=True)
    capacity = max_context or CAPACITY
    prefill_feeds, step_feeds, no_latents = _request(prefill, capacity)
    T = prefill_feeds["attention_mask"].shape[1]

    want = _session(prefill, folder).run(None, prefill_feeds)
    as_step = {
        **prefill_feeds,
        "attention_mask": step_feeds["attention_mask"].copy(),
        "write_indices": np.zeros(2, np.int64),
    }
    as_step["attention_mask"][:, T] = 0
    merged_session = _session(merged, folder)
    got = merged_session.run(None, as_step)
    # the merged prefill is the step graph's masked attention over the whole buffer, the prefill graph's over its
    # own tokens: the same products, summed in other blocks (masked columns add exact zeros); measured 5e-6 (fp32)
    # on logits of magnitude ~2, so 1e-4 is 20x that and far below any wrong computation (a dropped interaction
    # layer moves them by > 0.1)
    atol = 1e-4 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=atol)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g[:, :, :T].astype(np.float32), w[:, :, :T].astype(np.float32), rtol=0, atol=atol)

    # a decode step from that cache: no latents bound, the interaction layers compute nothing
    cache = dict(zip([k for k in prefill_feeds if k.startswith("past_key_values.")], want[1:]))
    step_want = _session(step, folder).run(None, {**step_feeds, **cache})
    step_got = merged_session.run(None, {**step_feeds, **no_latents, **cache})
    # the same decoder nodes on the same cache: fp32 exact; fp16 within rounding (ONNX Runtime fuses the two graphs'
    # nodes differently: 5.4e-3 of logits of magnitude ~4 measured on the small preset)
    atol = 0 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(step_got[0], step_want[0], rtol=0, atol=atol)
    assert np.abs(step_got[0] - want[0]).max() > 0.1  # the step's logits are a new token's, not the prefill's


def _profiles(artifact_folder, merged: onnx.ModelProto) -> dict[str, dict[str, tuple]]:
    """The build plan's prefill and step profiles, and one for the merged graph spanning both phases: their ranges
    joined, latents and context 0..all."""
    from engines.tensorrt.plan import BuildLimits, plan_build
    from fusion_export.manifest import open_artifact

    artifact = open_artifact(artifact_folder)
    plan = plan_build(artifact, BuildLimits())
    ranges = {g.name: {k: (v["min"], v["opt"], v["max"]) for k, v in g.profile.items()} for g in plan.graphs}
    prefill, step = ranges["decoder_prefill"], ranges["decoder_step"]
    both = {}
    for value in merged.graph.input:
        name = value.name
        if name in ("vision_pos", "global_ctx"):  # none at a decode step
            full = prefill[name][2]
            both[name] = ([full[0], 0, *full[2:]], full, full)
        elif name in prefill and name in step and name != "attention_mask":
            low = [min(a, b) for a, b in zip(prefill[name][0], step[name][0])]
            high = [max(a, b) for a, b in zip(prefill[name][2], step[name][2])]
            both[name] = (low, prefill[name][1], high)
        else:
            both[name] = step.get(name) or prefill[name]
    return {"prefill": prefill, "step": step, "merged": both}


def _plan_bytes(trt, model: onnx.ModelProto, folder, profile) -> int:
    from tests.conftest import build_plan

    module = trt.module
    builder = module.Builder(trt.logger())
    network = builder.create_network(trt.network_flags())
    parser = module.OnnxParser(network, trt.logger())
    assert parser.parse(model.SerializeToString(), str(folder / "decoder_step.onnx")), parser.get_error(0).desc()
    for layer in trt.attention_layers(network):
        layer.decomposable = True  # as engines/tensorrt/build.py does
    plan = build_plan(builder, network, profile)
    assert plan is not None, trt.logger().errors()[-3:]
    return plan.nbytes


@pytest.mark.parametrize("target,precision,max_context", MERGED_FLAVOURS)
def test_merged_decoder_builds_holding_the_weights_once(export_demo, target, precision, max_context):
    from engines.tensorrt.flavours import load_trt

    trt = load_trt("tensorrt-rtx")
    folder = export_demo(target, precision, max_context)
    prefill, step = _graphs(folder)
    merged = merge_decoder(prefill, step)
    profiles = _profiles(folder, merged)
    merged_bytes = _plan_bytes(trt, merged, folder, profiles["merged"])
    prefill_bytes = _plan_bytes(trt, prefill, folder, profiles["prefill"])
    step_bytes = _plan_bytes(trt, step, folder, profiles["step"])
    # one engine for both phases holds what the prefill engine holds (the decoder and the interaction layers) and
    # the kernels of more shapes; two engines would hold the decoder twice (merged >= prefill + most of step).
    # Measured: 10.2 MB against 9.4 + 5.2 (demo, fp16), 110 MB against 110 + 90 (small preset)
    assert merged_bytes < prefill_bytes + 0.3 * step_bytes, (merged_bytes, prefill_bytes, step_bytes)
    assert merged_bytes > 0.9 * prefill_bytes


def test_merge_refuses_graphs_without_layer_scopes(export_demo):
    prefill, step = _graphs(export_demo("trt-10.3"))
    for node in prefill.graph.node:
        kept = [m for m in node.metadata_props if m.key != SCOPE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    with pytest.raises(MergeError, match="no interaction-layer scopes"):
        merge_decoder(prefill, step)


def test_merge_refuses_an_interaction_layer_reading_the_decoder(export_demo):
    """A graph whose interaction layer reads a decoder value besides its hidden state does not separate: refused
    with the layer named, not merged into a graph that would compute something else."""
    prefill, step = _graphs(export_demo("trt-10.3"))
    producer = {out: n for n in prefill.graph.node for out in n.output}
    scope = lambda n: next((m.value for m in n.metadata_props if m.key == SCOPE_KEY), "")  # noqa: E731
    decoder_value = next(out for n in prefill.graph.node if scope(n) == "model.layers.0" and n.op_type == "Add"
                         for out in n.output)  # fmt: skip
    add = next(n for n in prefill.graph.node if scope(n) == "model.interaction.0" and n.op_type == "Add")
    other = next(i for i, name in enumerate(add.input) if name in producer and scope(producer[name]) != "")
    add.input[other] = decoder_value
    with pytest.raises(MergeError, match="interaction layer 0"):
        merge_decoder(prefill, step)
