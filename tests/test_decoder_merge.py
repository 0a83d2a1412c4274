"""One decoder graph for prefill and decode (fusion_export/decoder_merge.py): ONNX Runtime runs it equal to the
prefill and step graphs (a decode step binds no latents), and the feeds the TensorRT runtime gives its one decoder
engine generate what the two graphs generate. TensorRT-RTX's builds of it are tests/test_trt_build.py's (every
flavour; the `small` preset's engine holding the decoder's weights once)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import load_external_data_for_model

from fusion_export.decoder_merge import SCOPE_KEY, MergeError, merge_decoder

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


def _profiles(artifact_folder, prefill: onnx.ModelProto, step: onnx.ModelProto) -> dict[str, dict[str, tuple]]:
    """The build plan's profile for the decoder engine, and the same ranges for the prefill and step graphs alone:
    the prefill's tokens and mask over the plan's token range with all latents, the step's one token."""
    from engines.tensorrt.plan import DECODER, BuildLimits, plan_build
    from fusion_export.manifest import open_artifact

    plan = plan_build(open_artifact(artifact_folder), BuildLimits())
    merged = next({k: (v["min"], v["opt"], v["max"]) for k, v in g.profile.items()} for g in plan.graphs
                  if g.name == DECODER)  # fmt: skip
    low, _, high = merged["inputs_embeds"]
    one = {"prefill": {}, "step": {}}
    for phase, model in (("prefill", prefill), ("step", step)):
        for value in model.graph.input:
            name = value.name
            if name in ("vision_pos", "global_ctx"):
                full = merged[name][2]
                one[phase][name] = (full, full, full)
            elif phase == "prefill" and name == "attention_mask":
                one[phase][name] = ([low[0], low[1]], [low[0], 64], [high[0], high[1]])
            elif phase == "step" and name in ("inputs_embeds", "rope_cos", "rope_sin"):
                one[phase][name] = (merged[name][0], merged[name][0], merged[name][0])
            elif name in merged:
                one[phase][name] = merged[name]
    one["prefill"].update({k: (v[0], [v[1][0], 64, *v[1][2:]], v[2]) for k, v in merged.items()
                           if k in ("inputs_embeds", "rope_cos", "rope_sin")})  # fmt: skip
    return {"merged": merged, **one}


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


class MergedOnOrt:
    """The TensorRT runtime's feeding of the one decoder engine (engines/tensorrt/runtime.py TrtSession: a prefill
    through decoder_prefill_inputs, each step through decoder_step_inputs, one cache bound as past and present),
    run on ONNX Runtime over the merged graph: a DecoderSession whose numbers the GPU-free suite can check."""

    def __init__(self, model, merged: onnx.ModelProto, batch, max_new_tokens: int):
        from reference_model.generation import DecodeState

        d = model.config.decoder
        self.model, self.batch, self.batch_size = model, batch, batch.layout.batch_size
        self.session = _session(merged, model.artifact.folder)
        positions = d.rope.max_position_embeddings
        self.state = DecodeState(batch.layout, max_new_tokens, positions, model.max_context)
        shape = (self.batch_size, d.num_kv_heads, self.state.capacity, d.head_dim)
        self.cache = [np.zeros(shape, model.cache_dtype) for _ in range(2 * d.num_layers)]
        self.stage_seconds: dict[str, float] = {}

    def _run(self, arrays) -> np.ndarray:
        from fusion_export.graph_inputs import past_names

        names = past_names(self.model.config.decoder.num_layers)
        logits, *self.cache = self.session.run(None, {**arrays, **dict(zip(names, self.cache))})
        return logits

    def prefill(self):
        import torch

        from engines.feeds import decoder_prefill_inputs, prefill_inputs, vision_inputs

        m = self.model
        vision = m.vision.run(None, vision_inputs(self.batch, m.embed_table))
        arrays = prefill_inputs(self.batch, m.embed_table, *vision, m.config.decoder.rope)
        return torch.from_numpy(self._run(decoder_prefill_inputs(arrays, self.state.capacity)))

    def step(self, tokens):
        import torch

        from engines.feeds import decoder_step_inputs, step_inputs

        d = self.model.config.decoder
        arrays = step_inputs(tokens, self.state, self.model.embed_table, d.rope)
        return torch.from_numpy(self._run(decoder_step_inputs(arrays, d.hidden_size, self.model.embed_table.dtype)))

    def synchronize(self) -> None:
        pass


def test_runtime_feeds_generate_as_the_two_graphs(export_oracle, oracle_model):
    """Two left-padded requests, 12 tokens each, through the feeds the TensorRT runtime gives its one decoder
    engine: the same tokens as ONNX Runtime on the prefill and step graphs, logits within float32 rounding."""
    from engines.onnxruntime.session import OrtModel
    from fusion_export.manifest import open_artifact
    from reference_model import GenerationConfig, generate, make_request, prepare_batch
    from reference_model.prompt import load_tokenizer

    from .conftest import DEMO_IMAGE

    artifact = open_artifact(export_oracle(16))
    tokenizer = load_tokenizer(artifact.model_dir)
    questions = ["What is in front of the house?", "Count the boxes, then name their colours."]
    requests = [make_request(DEMO_IMAGE, q, tokenizer, oracle_model.config) for q in questions]
    batch = prepare_batch(requests, oracle_model.config, 16)
    config = GenerationConfig(max_new_tokens=12)
    model = OrtModel(artifact).load()
    two_graphs = generate(model.session(batch, 12), config, keep_logits=True)
    merged = merge_decoder(*_graphs(artifact.folder))
    one_graph = generate(MergedOnOrt(model, merged, batch, 12), config, keep_logits=True)
    assert one_graph.token_ids == two_graphs.token_ids
    # the prefill attends over the whole buffer under the mask (the prefill graph: over its own tokens), and ONNX
    # Runtime fuses the two graphs' attention differently: float32 sums in other orders (test above: 5e-6)
    assert (one_graph.step_logits - two_graphs.step_logits).abs().max().item() <= 1e-4


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
