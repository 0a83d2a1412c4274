"""ONNX Runtime's fused attention (engines/onnxruntime/attention.py, and the vision encoder's,
ort_vision_attention.py): the rewritten graphs compute what the shipped ones do, for every export form, with
grouped KV heads, left-padded batches and multi-token steps.

Tolerances: fused and exported attention differ only in reduction order (GroupQueryAttention's own GEMMs against
MatMul + Softmax), ~1e-6 on these logits; 2e-5 leaves room for other CPUs. Against the reference, the fp32 gate
of the parity tests (1e-4).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest

from engines.onnxruntime.attention import PREFILL_BLOCKS, FusedStepFeeds, fuse_attention
from engines.onnxruntime.session import OrtModel
from fusion_export.manifest import open_artifact
from fusion_export.onnx_export import REGION_KEY
from reference_model import GenerationConfig, ReferenceSession, generate, make_request, prepare_batch
from reference_model.prompt import load_tokenizer

from .conftest import DEMO_IMAGE

FUSED_VS_GRAPH = 2e-5
VS_REFERENCE = 1e-4
FORMS = [("trt-10.3", False, None), ("trt-10.15", False, 1024), ("trt-10.3", True, None)]


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """The demo model with grouped KV heads (4 query heads over 2 KV heads)."""
    from fusion_export_cli.commands.demo import demo_config
    from reference_model.synthetic import write_random_checkpoint

    config = demo_config()
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, num_kv_heads=2))
    return write_random_checkpoint(tmp_path_factory.mktemp("gqa") / "gqa", config, seed=3)


@pytest.fixture(scope="module")
def gqa_export(gqa_checkpoint, tmp_path_factory):
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.trt_rules.targets import TrtTarget

    cache = {}

    def get(target: str, plugins: bool, max_context: int | None):
        key = (target, plugins, max_context)
        if key not in cache:
            out = tmp_path_factory.mktemp("gqa-art") / f"{target}-{plugins}"
            options = ExportOptions(
                query_len=16, trt_target=TrtTarget(target), max_context=max_context, plugins=plugins
            )
            cache[key] = export_artifact(gqa_checkpoint, out, options, verbose=False).folder
        return cache[key]

    return get


def _batch(model_dir, config):
    tokenizer = load_tokenizer(model_dir)
    questions = ["What is in front of the house?", "Count the boxes, then name every one of their colours."]
    return prepare_batch([make_request(DEMO_IMAGE, q, tokenizer, config) for q in questions], config, 16)


@pytest.mark.parametrize("target,plugins,max_context", FORMS)
def test_fused_attention_matches_the_exported_graphs(gqa_checkpoint, gqa_export, target, plugins, max_context):
    from reference_model import load_model

    artifact = open_artifact(gqa_export(target, plugins, max_context))
    fused, exported = OrtModel(artifact).load(), OrtModel(artifact, attention="graph").load()
    layers = artifact.config.decoder.num_layers
    prefill_form, _, step_form = fused.attention_form.partition("; decoder_step: ")
    assert f"{layers} layers as GroupQueryAttention" in step_form, fused.attention_form
    assert f"{layers} layers' attention in {PREFILL_BLOCKS} causal query blocks" in prefill_form, prefill_form
    # every norm but the first reads a residual sum: each layer's two, the final norm's
    assert f"{2 * layers} residual norms as SkipSimplifiedLayerNormalization" in step_form, step_form
    # each session prepacks its own weights here: the gate_up splits become sliced weights (ort_split_projections)
    assert fused.packed and f"{layers} split projections as sliced weights" in step_form, step_form
    assert f"{layers} split projections as sliced weights" in prefill_form, prefill_form
    assert "GroupQueryAttention" not in exported.attention_form
    # the vision encoder: every eager attention of the tower as MultiHeadAttention (ort_vision_attention.py)
    tower = onnx.load(artifact.graph_path("vision_encoder"), load_external_data=False).graph.node
    attentions = sum(node.op_type == "Softmax" for node in tower)
    assert f"vision_encoder: {attentions} attentions as MultiHeadAttention" in fused.attention_form
    assert "vision_encoder: as exported" in exported.attention_form
    assert fused.attends_to_valid_columns and not exported.attends_to_valid_columns  # the bench's roofline

    batch = _batch(artifact.model_dir, artifact.config)  # rows of different lengths: the shorter is left-padded
    assert (batch.layout.attention_mask == 0).any()
    config = GenerationConfig(max_new_tokens=9)
    runs = {}
    for name, model in (("fused", fused), ("graph", exported)):
        session = model.session(batch, 9)
        runs[name] = generate(session, config, keep_logits=True), session.cache_arrays()
    reference = generate(ReferenceSession(load_model(gqa_checkpoint), batch, 9), config, keep_logits=True)

    (ours, our_cache), (graph, graph_cache) = runs["fused"], runs["graph"]
    assert ours.token_ids == graph.token_ids == reference.token_ids
    assert (ours.step_logits - graph.step_logits).abs().max().item() <= FUSED_VS_GRAPH
    assert (ours.step_logits - reference.step_logits).abs().max().item() <= VS_REFERENCE
    written = batch.layout.attention_mask.shape[1] + 8  # the prompt's columns and the 8 steps' (the last is unread)
    for a, b in zip(our_cache, graph_cache):
        assert np.abs(a[:, :, :written] - b[:, :, :written]).max() <= FUSED_VS_GRAPH


@pytest.mark.parametrize("target,plugins,max_context", FORMS[:2])
def test_blocked_prefill(gqa_export, target, plugins, max_context):
    """The prefill's attention as causal query blocks: no GroupQueryAttention, each layer's output the concatenation
    of its blocks, the graph's own KV writes kept; rows of one length (no padding) match the exported graph."""
    artifact = open_artifact(gqa_export(target, plugins, max_context))
    d = artifact.config.decoder
    model, form = fuse_attention(
        artifact.graph_path("decoder_prefill"), d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim
    )
    graph = onnx.load_from_string(model).graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node), form
    producer = {out: n.op_type for n in graph.node for out in n.output}
    blocked = [  # each layer's output: its blocks' probs @ v, concatenated
        n
        for n in graph.node
        if n.op_type == "Concat" and [producer.get(i) for i in n.input] == ["MatMul"] * PREFILL_BLOCKS
    ]
    assert len(blocked) == d.num_layers, form
    writes = [n for n in graph.node if any(i.startswith("past_key_values.") for i in n.input)]
    assert len(writes) == 2 * d.num_layers  # the graph's scatter stores the keys and values

    fused, exported = OrtModel(artifact).load(), OrtModel(artifact, attention="graph").load()
    tokenizer = load_tokenizer(artifact.model_dir)
    questions = ["Count the boxes.", "Name the boxes.", "Where is the door?", "What colour is it?", "Is it red?"]
    for pair in itertools.combinations(questions, 2):  # two different rows of one length: no padding
        requests = [make_request(DEMO_IMAGE, q, tokenizer, artifact.config) for q in pair]
        batch = prepare_batch(requests, artifact.config, 16)
        if bool(batch.layout.attention_mask.all()):
            break
    else:
        pytest.fail("no two of the questions tokenize to one length")
    config = GenerationConfig(max_new_tokens=5)
    ours = generate(fused.session(batch, 5), config, keep_logits=True)
    graph_run = generate(exported.session(batch, 5), config, keep_logits=True)
    assert ours.token_ids == graph_run.token_ids
    assert (ours.step_logits - graph_run.step_logits).abs().max().item() <= FUSED_VS_GRAPH


def _step_feeds(session, new: int, rng) -> dict[str, np.ndarray]:
    """A step of `new` tokens at columns 20.. of the buffer (40 columns, or the graph's fixed capacity); row 1
    left-padded by 6 columns."""
    feeds, capacity = {}, 40
    for i in session.get_inputs():
        if i.name.startswith("past_") and isinstance(i.shape[2], int):
            capacity = i.shape[2]
        shape = [{"batch": 2, "capacity": 40, "new_tokens": new}.get(d, d) for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    half = feeds["rope_cos"].shape[-1] // 2  # RoPE tables repeat their frequencies (rotate-half form)
    angles = np.concatenate([feeds["rope_cos"][..., :half]] * 2, axis=-1) * 3
    feeds["rope_cos"], feeds["rope_sin"] = np.cos(angles), np.sin(angles)
    mask = np.zeros((2, capacity), np.int64)
    mask[:, : 20 + new] = 1
    mask[1, :6] = 0
    feeds["attention_mask"], feeds["write_indices"] = mask, np.array([20, 20], np.int64)
    return feeds


def _run(session, feeds):
    import onnxruntime as ort

    values = {name: ort.OrtValue.ortvalue_from_numpy(array.copy()) for name, array in feeds.items()}
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():  # the cache aliased as the runtimes bind it
        if out.name.startswith("present."):
            binding.bind_ortvalue_output(out.name, values[out.name.replace("present.", "past_key_values.")])
        else:
            binding.bind_output(out.name, "cpu")
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), [v.numpy().copy() for n, v in values.items() if n.startswith("past_")]


@pytest.mark.parametrize("target,plugins,max_context", FORMS[:2])
def test_multi_token_steps(gqa_export, target, plugins, max_context):
    """The step graphs take several new tokens (causal among themselves): fused and exported agree on them."""
    import onnxruntime as ort

    folder = gqa_export(target, plugins, max_context)
    d = open_artifact(folder).config.decoder
    path = folder / "decoder_step.onnx"
    model, form = fuse_attention(path, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim)
    assert model is not None, form
    rotary = [
        a.i for n in onnx.load_from_string(model).graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
        if a.name == "do_rotary"
    ]  # fmt: skip
    assert rotary == [1] * d.num_layers  # a step's whole attention module, RoPE included, is one kernel
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    fused = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    exported = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in fused.get_inputs()}
    assert {"attention_mask", "write_indices", "rope_cos", "rope_sin"}.isdisjoint(names)  # all fed from the host
    for new in (1, 3):
        feeds = _step_feeds(exported, new, np.random.default_rng(new))
        capacity = feeds["past_key_values.0.key"].shape[2]
        fed = FusedStepFeeds(names, 2, new, capacity, d.head_dim).update(feeds)
        ours = {name: array for name, array in {**feeds, **fed}.items() if name in names}
        (logits_f, cache_f), (logits_g, cache_g) = _run(fused, ours), _run(exported, feeds)
        assert np.abs(logits_f - logits_g).max() <= FUSED_VS_GRAPH
        for a, b in zip(cache_f, cache_g):
            assert np.abs(a[:, :, : 20 + new] - b[:, :, : 20 + new]).max() <= FUSED_VS_GRAPH
            assert np.abs(a[:, :, 20 : 20 + new]).max() > 0  # the new columns were written


def test_graphs_without_region_records_run_as_exported(gqa_export, tmp_path):
    folder = gqa_export(*FORMS[0])
    d = open_artifact(folder).config.decoder
    model = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    for node in model.graph.node:  # an older export: no region records
        kept = [p for p in node.metadata_props if p.key != REGION_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "decoder_step.onnx")
    fused, reason = fuse_attention(
        tmp_path / "decoder_step.onnx", d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim
    )
    assert fused is None and reason == f"0 of {d.num_layers} decoder layers carry region records"


def test_graphs_observing_attention_values_run_as_exported(gqa_export, tmp_path):
    """Calibration adds inner activations as graph outputs: the rewrite must leave such a graph alone."""
    folder = gqa_export(*FORMS[0])
    d = open_artifact(folder).config.decoder
    model = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    inner = next(
        node
        for node in model.graph.node
        if any(
            p.key == REGION_KEY and p.value.rsplit("/", 1)[-1] in ("decode_attention", "scaled_dot_product_attention")
            for p in node.metadata_props
        )
    )
    model.graph.output.append(onnx.helper.make_tensor_value_info(inner.output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "decoder_step.onnx")
    fused, reason = fuse_attention(
        tmp_path / "decoder_step.onnx", d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim
    )
    assert fused is None and f"{inner.output[0]} inside the attention is a graph output" in reason, reason


def test_shared_weights_are_not_split(gqa_export):
    """With one copy of the weights shared by the sessions, sliced weights would be private copies: not split."""
    shared = OrtModel(open_artifact(gqa_export(*FORMS[0])), weights="shared").load()
    assert "GroupQueryAttention" in shared.attention_form and "split projections" not in shared.attention_form


def test_attention_option_is_checked(gqa_export):
    from reference_model.errors import FusionError

    with pytest.raises(FusionError, match="--ort-attention 'flash': choose fused or graph"):
        OrtModel(open_artifact(gqa_export(*FORMS[0])), attention="flash")


def test_ort_attention_flag_applies_to_onnxruntime_only(gqa_checkpoint, gqa_export):
    from .conftest import run_main

    common = ["--image", str(DEMO_IMAGE), "--question", "What is this?", "--max-new-tokens", "2", "--quiet"]
    refused = run_main("generate", "--model", str(gqa_checkpoint), "--ort-attention", "graph", *common)
    assert refused.returncode == 2 and "--ort-attention does not apply to --backend reference" in refused.stderr
    answers = {
        form: run_main("generate", "--artifacts", str(gqa_export(*FORMS[0])), "--ort-attention", form, *common)
        for form in ("fused", "graph")
    }
    assert all(r.returncode == 0 for r in answers.values()), [r.stderr for r in answers.values()]
    assert answers["fused"].stdout == answers["graph"].stdout  # the same greedy answer


def _norm_graph(skip_shape: list[int], observe_sum: bool, decomposed: bool) -> onnx.ModelProto:
    """h = x + r; y = rms_norm(h) * g; out = h + y @ w: a residual norm whose sum is used again; the norm as
    opset 23's RMSNormalization or as the opset-17 exports write it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n = helper.make_node
    if decomposed:
        norm = [n("Pow", ["h", "two"], ["h2"]), n("ReduceMean", ["h2"], ["ms"], axes=[-1]),
                n("Add", ["ms", "eps"], ["ms_eps"]), n("Sqrt", ["ms_eps"], ["rms"]), n("Div", ["h", "rms"], ["hn"]),
                n("Mul", ["hn", "g"], ["y"])]  # fmt: skip
    else:
        norm = [n("RMSNormalization", ["h", "g"], ["y"], epsilon=1e-5)]
    nodes = [n("Add", ["x", "r"], ["h"]), *norm, n("MatMul", ["y", "w"], ["z"]), n("Add", ["h", "z"], ["out"])]
    io = helper.make_tensor_value_info
    outputs = [io("out", TensorProto.FLOAT, [2, 3, 8])] + ([io("h", TensorProto.FLOAT, [2, 3, 8])] * observe_sum)
    constants = {"g": rng.standard_normal(8), "w": rng.standard_normal((8, 8)), "two": np.array(2.0),
                 "eps": np.array(1e-5)}  # fmt: skip
    graph = helper.make_graph(
        nodes, "norm", [io("x", TensorProto.FLOAT, [2, 3, 8]), io("r", TensorProto.FLOAT, skip_shape)], outputs,
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()],
    )  # fmt: skip
    opset = 17 if decomposed else 23
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("decomposed", [False, True], ids=["RMSNormalization", "decomposed"])
@pytest.mark.parametrize(
    "skip_shape,observe_sum,fused", [([2, 3, 8], False, 1), ([8], False, 0), ([2, 3, 8], True, 0)],
    ids=["residual", "broadcast", "observed"],
)  # fmt: skip
def test_residual_norm_fusion(skip_shape, observe_sum, fused, decomposed):
    """Add + RMSNorm (either form) becomes one SkipSimplifiedLayerNormalization (its sum output feeds the later
    residual) and ONNX Runtime computes the same; a broadcasting Add or an observed sum stays as it is."""
    import onnx_ir as ir
    import onnxruntime as ort

    from engines.onnxruntime.norms import fuse_skip_norms

    model = _norm_graph(skip_shape, observe_sum, decomposed)
    rewritten = ir.serde.deserialize_model(model)
    assert fuse_skip_norms(rewritten) == fused
    ops = [node.op_type for node in rewritten.graph]
    assert ops.count("SkipSimplifiedLayerNormalization") == fused
    assert ops.count("Sqrt" if decomposed else "RMSNormalization") == 1 - fused
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32),
             "r": rng.standard_normal(skip_shape).astype(np.float32)}  # fmt: skip
    outs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for m in (model, ir.serde.serialize_model(rewritten))
    ]
    for a, b in zip(*outs):
        assert np.abs(a - b).max() <= 1e-5
