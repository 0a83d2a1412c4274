"""Plugin kernels against their reference ops, in Triton's interpreter on the CPU (the same kernels run on
NVIDIA GPUs): odd head sizes, GQA, batches whose rows have different padding and lengths, several new tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engines.plugins.decode_attention import decode_attention  # noqa: E402
from fusion_export.plugin_ops.reference import decode_attention_reference  # noqa: E402
from reference_model.errors import FusionError  # noqa: E402

# fp32: both sides accumulate in float32; only the order of the softmax sums differs (online vs. one pass).
# fp16: inputs are the same fp16 values on both sides and the math is float32, so the bound is the fp16 rounding
# of the output itself (half an ulp at |out| < 4 is <= 2e-3) plus the fp32 order effects.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}


def _case(B, H, KVH, T, C, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, KVH, C, D, generator=g).to(dtype)
    v = torch.randn(B, KVH, C, D, generator=g).to(dtype)
    end = torch.randint(T + 1, C + 1, (B,), generator=g)
    start = torch.stack([torch.randint(0, int(e) - T + 1, (1,), generator=g)[0] for e in end])
    return q, k, v, start.int(), end.int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,H,KVH,T,C,D",
    [(1, 4, 4, 1, 37, 32), (3, 8, 2, 1, 70, 40), (2, 6, 3, 3, 45, 24), (3, 4, 1, 4, 100, 96), (1, 2, 2, 2, 5, 8)],
)
def test_decode_attention_matches_reference(B, H, KVH, T, C, D, dtype):
    q, k, v, start, end = _case(B, H, KVH, T, C, D, dtype, seed=B * 100 + C)
    out = decode_attention(q, k, v, start, end)
    ref = decode_attention_reference(q, k, v, start, end)
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KVH,T,C,D", [(3, 8, 2, 1, 70, 40), (2, 6, 3, 3, 45, 24)])
def test_decode_attention_int8_cache_matches_reference(B, H, KVH, T, C, D, dtype):
    """An INT8 KV cache (per-tensor scales): the kernel dequantizes on load; int8 * scale is exact in float32, so
    the float tolerances hold. The scales matter: a kernel that ignored one would be off by far more."""
    q, k, v, start, end = _case(B, H, KVH, T, C, D, dtype, seed=C)
    k_scale, v_scale = float(k.float().abs().max()) / 127, float(v.float().abs().max()) / 127
    k8 = (k.float() / k_scale).round().clamp(-127, 127).to(torch.int8)
    v8 = (v.float() / v_scale).round().clamp(-127, 127).to(torch.int8)
    out = decode_attention(q, k8, v8, start, end, k_scale, v_scale)
    ref = decode_attention_reference(q, k8, v8, start, end, k_scale, v_scale)
    assert out.dtype == dtype
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]
    unscaled = decode_attention_reference(q, k8, v8, start, end, k_scale, 2 * v_scale)
    assert (unscaled.float() - ref.float()).abs().max().item() > 100 * TOLERANCE[dtype]
    # quantization error against the float cache: what INT8 KV costs on these random values
    assert (out.float() - decode_attention_reference(q, k, v, start, end).float()).abs().max().item() < 0.05


def test_decode_attention_reads_only_valid_columns():
    """Poisoning every column outside [start, end) changes nothing: the kernel never reads them."""
    q, k, v, start, end = _case(2, 4, 2, 2, 64, 32, torch.float32, seed=7)
    expected = decode_attention(q, k, v, start, end)
    for b in range(2):
        outside = torch.ones(64, dtype=torch.bool)
        outside[int(start[b]) : int(end[b])] = False
        k[b, :, outside] = float("nan")
        v[b, :, outside] = float("inf")
    assert torch.equal(decode_attention(q, k, v, start, end), expected)
    reference = decode_attention_reference(q, k, v, start, end)
    assert torch.isnan(reference).any()  # the reference multiplies a zero weight by inf: the kernel must not read


def test_decode_attention_refuses_bad_inputs():
    q, k, v, start, end = _case(2, 4, 2, 1, 16, 8, torch.float32, seed=1)
    with pytest.raises(FusionError, match="end <= 16"):
        decode_attention(q, k, v, start, end + 16)
    with pytest.raises(FusionError, match="heads % kv_heads"):
        decode_attention(q[:, :3], k, v, start, end)
    with pytest.raises(FusionError, match="dtypes"):
        decode_attention(q.double(), k, v, start, end)
    with pytest.raises(FusionError, match="dtypes"):  # one int8 buffer and one float
        decode_attention(q, k.to(torch.int8), v, start, end)
    with pytest.raises(FusionError, match="apply to an int8 cache only"):
        decode_attention(q, k, v, start, end, k_scale=0.5)
    with pytest.raises(FusionError, match="must be positive"):
        decode_attention(q, k.to(torch.int8), v.to(torch.int8), start, end, k_scale=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KVH,C,D,chunk", [(3, 8, 2, 70, 40, 16), (2, 6, 3, 45, 24, 256), (1, 4, 1, 100, 96, 32)])
def test_split_decode_attention_matches_reference(B, H, KVH, C, D, chunk, dtype, monkeypatch):
    """The split (flash-decoding) form of the op for one new token: chunks of the capacity merged by their softmax
    statistics, some of them empty (past a row's end or before its start), against the same reference."""
    from engines.plugins import split_decode_attention as split

    monkeypatch.setattr(split, "CHUNK", chunk)  # several chunks at these small capacities
    q, k, v, start, end = _case(B, H, KVH, 1, C, D, dtype, seed=B * 10 + C)
    op = split.SplitDecodeAttention(B, H, D, C, "cpu")
    assert op.splits == -(-C // chunk)
    ref = decode_attention_reference(q, k, v, start, end)
    assert (op(q, k, v, start, end).float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]
    k_scale, v_scale = float(k.float().abs().max()) / 127, float(v.float().abs().max()) / 127
    k8 = (k.float() / k_scale).round().clamp(-127, 127).to(torch.int8)
    v8 = (v.float() / v_scale).round().clamp(-127, 127).to(torch.int8)
    ref = decode_attention_reference(q, k8, v8, start, end, k_scale, v_scale)
    assert (op(q, k8, v8, start, end, k_scale, v_scale).float() - ref.float()).abs().max() <= TOLERANCE[dtype]
    outside = torch.arange(C)[None, :].expand(B, C)
    outside = (outside < start[:, None]) | (outside >= end[:, None])  # poisoned: never read
    k[outside[:, None].expand(B, KVH, C)] = float("nan")
    assert torch.equal(op(q, k, v, start, end), op(q, k.nan_to_num(0.0), v, start, end))
    with pytest.raises(FusionError, match="one new token"):
        op(torch.cat((q, q), dim=2), k, v, start, end)


ONNX_TYPES = {torch.float32: 1, torch.float16: 10}  # TensorProto.FLOAT, FLOAT16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_onnx_form_runs_on_onnxruntime(dtype):
    """The plugin node with its local-function decomposition, on ONNX Runtime, equals the reference op."""
    import onnx
    import onnxruntime as ort

    from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, DOMAIN, decode_attention_model

    model = decode_attention_model(ONNX_TYPES[dtype], heads=8, kv_heads=2, head_dim=40)
    onnx.checker.check_model(model, full_check=True)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, DECODE_ATTENTION)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for T, C in ((1, 50), (3, 77)):
        q, k, v, start, end = _case(3, 8, 2, T, C, 40, dtype, seed=T * C)
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "start": start.numpy(), "end": end.numpy()}
        out = torch.from_numpy(session.run(None, feeds)[0])
        assert out.dtype == dtype
        assert (out.float() - decode_attention_reference(q, k, v, start, end).float()).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_onnx_form_reads_an_int8_cache(dtype):
    """An int8 cache with per-tensor scales (node attributes k_scale, v_scale, which the local function reads by
    reference): ONNX Runtime equals the reference op's dequantized attention; a node without the attributes
    takes the defaults (1.0)."""
    import onnx
    import onnxruntime as ort

    from fusion_export.plugin_ops.onnx_forms import decode_attention_model

    k_scale, v_scale = 0.0123, 0.0457
    model = decode_attention_model(ONNX_TYPES[dtype], heads=8, kv_heads=2, head_dim=40, kv_dtype=3,
                                   k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, k, v, start, end = _case(3, 8, 2, 2, 61, 40, dtype, seed=7)
    k8, v8 = (x.float().mul(40).round().clamp(-127, 127).to(torch.int8) for x in (k, v))
    feeds = {"q": q.numpy(), "k": k8.numpy(), "v": v8.numpy(), "start": start.numpy(), "end": end.numpy()}
    out = torch.from_numpy(session.run(None, feeds)[0])
    expected = decode_attention_reference(q, k8, v8, start, end, k_scale, v_scale)
    assert out.dtype == dtype and (out.float() - expected.float()).abs().max() <= TOLERANCE[dtype]
    unscaled = decode_attention_reference(q, k8, v8, start, end)  # the scales are not a no-op here
    assert (unscaled.float() - expected.float()).abs().max() > 100 * TOLERANCE[dtype]
    plain = decode_attention_model(ONNX_TYPES[dtype], heads=8, kv_heads=2, head_dim=40)
    del plain.graph.node[0].attribute[:]
    session = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds |= {"k": k.numpy(), "v": v.numpy()}
    out = torch.from_numpy(session.run(None, feeds)[0])
    assert (out.float() - decode_attention_reference(q, k, v, start, end).float()).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [(torch.float32, None), (torch.float16, None), (torch.float16, 3)],
    ids=["fp32", "fp16", "q8"],
)
def test_decode_attention_onnx_form_builds_with_tensorrt_rtx(dtype, kv_dtype, tmp_path):
    """Without the plugin registered, TensorRT-RTX's parser inlines the local function and the builder builds it
    (an int8 cache too: the scales reach the function body by attribute reference); the static check reads the
    node as the parser does: through its function."""
    from fusion_export.plugin_ops.onnx_forms import decode_attention_model

    from .conftest import build_plugin_model

    q, kv = ((1, 8, 1, 40), (4, 8, 4, 40)), ((1, 2, 8, 40), (4, 2, 1024, 40))
    profile = {"q": (*q, q[1]), "k": (*kv, kv[1]), "v": (*kv, kv[1]), "start": ((1,), (4,), (4,)),
               "end": ((1,), (4,), (4,))}  # fmt: skip
    model = decode_attention_model(ONNX_TYPES[dtype], heads=8, kv_heads=2, head_dim=40, kv_dtype=kv_dtype,
                                   k_scale=0.02, v_scale=0.03)  # fmt: skip
    build_plugin_model(model, tmp_path / "decode_attention.onnx", profile, min_layers=10, min_plan_bytes=100_000)


def test_export_with_plugins_matches_reference_and_builds(export_demo, demo_checkpoint, tmp_path):
    """`export --plugins on`: the step graph's attention becomes DecodeAttention nodes, the prefill's interaction
    attention InteractionAttention nodes (no window gather left) and the vision encoder's pooling WindowMaxPool
    nodes (+ local functions); ONNX Runtime runs the files within the fp32 gates with identical greedy ids, and
    TensorRT-RTX builds them with every plugin node as an IPluginV3 layer."""
    import json

    import onnx

    from engines.plugins.rtx_plugins import IMPLEMENTATION
    from engines.tensorrt.build import BuildOptions, build_engines
    from engines.tensorrt.flavours import load_trt
    from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, DOMAIN, INTERACTION_ATTENTION, WINDOW_MAX_POOL

    from .conftest import run_main

    art = export_demo("trt-10.3", plugins=True)  # `export --plugins on`, shared with tests/test_kv_int8.py
    step = onnx.load(art / "decoder_step.onnx", load_external_data=False)
    plugin_nodes = [n for n in step.graph.node if (n.domain, n.op_type) == (DOMAIN, DECODE_ATTENTION)]
    layers = json.loads((demo_checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert len(plugin_nodes) == layers and [f.name for f in step.functions] == [DECODE_ATTENTION]
    assert len({tuple(n.input[3:5]) for n in plugin_nodes}) == 1  # each row's valid range: read once per forward
    vision = onnx.load(art / "vision_encoder.onnx", load_external_data=False)
    pools = [n for n in vision.graph.node if (n.domain, n.op_type) == (DOMAIN, WINDOW_MAX_POOL)]
    assert len(pools) == 2 and [f.name for f in vision.functions] == [WINDOW_MAX_POOL]  # init latents, context
    assert not any(n.op_type == "ReduceMax" for n in vision.graph.node)
    from reference_model.config import load_config

    prefill = onnx.load(art / "decoder_prefill.onnx", load_external_data=False)
    windows = [n for n in prefill.graph.node if (n.domain, n.op_type) == (DOMAIN, INTERACTION_ATTENTION)]
    assert len(windows) == load_config(demo_checkpoint).interaction.num_layers
    assert [f.name for f in prefill.functions] == [INTERACTION_ATTENTION]
    assert not any(n.op_type == "Transpose" and len(n.attribute[0].ints) == 6 for n in prefill.graph.node)  # gather
    plugins = sorted([DECODE_ATTENTION, INTERACTION_ATTENTION, WINDOW_MAX_POOL])
    assert json.loads((art / "manifest.json").read_text())["export"]["plugins"] == plugins
    report = tmp_path / "report.json"
    result = run_main("validate", str(art), "--model", str(demo_checkpoint), "--max-new-tokens", "12",
                      "--json", str(report))  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert json.loads(report.read_text())["first_divergence"] == [None]
    built = build_engines(art, tmp_path / "eng", BuildOptions(), verbose=False)
    engines = json.loads((built.folder / "engines.json").read_text())
    assert engines["plugins"] == plugins and list(engines["plugin_implementation"]) == plugins
    # the InteractionAttention plugin takes a fixed number of latent rows: a prefill and a step engine
    assert sorted(engines["engines"]) == ["decoder_prefill", "decoder_step", "vision_encoder"]
    assert engines["plan"]["decoder_engines"] == 2
    assert set(engines["plugin_implementation"].values()) == {IMPLEMENTATION}
    trt = load_trt("tensorrt-rtx")  # the engines hold plugin layers, not the local functions' decompositions
    for graph, count in (("vision_encoder", len(pools)), ("decoder_step", layers), ("decoder_prefill", len(windows))):
        _, network, errors = trt.parse(art / f"{graph}.onnx", plugins=True)
        kinds = [network.get_layer(i).type for i in range(network.num_layers)]
        assert errors == [] and kinds.count(trt.module.LayerType.PLUGIN_V3) == count, graph
    # what each engine was built with, counted after parsing and recorded; the backend reads it: a step engine
    # running DecodeAttention reads only the written KV columns (the bench's roofline counts those)
    assert {name: e["plugin_layers"] for name, e in engines["engines"].items()} == {
        "vision_encoder": {WINDOW_MAX_POOL: len(pools)}, "decoder_step": {DECODE_ATTENTION: layers},
        "decoder_prefill": {INTERACTION_ATTENTION: len(windows)}}  # fmt: skip
    from engines.tensorrt.engine_manifest import open_engines
    from engines.tensorrt.runtime import TrtModel

    assert TrtModel(open_engines(built.folder)).attends_to_valid_columns


def _meta_inputs(op):
    """A plugin's inputs and output buffer as meta tensors (shapes and dtypes, no values: reading one raises)."""
    from fusion_export.plugin_ops.onnx_forms import DECODE_ATTENTION, INTERACTION_ATTENTION

    meta = {"device": "meta"}
    if op == DECODE_ATTENTION:  # GQA, an int8 cache (with its scales), two new tokens
        q = torch.empty(2, 8, 2, 32, dtype=torch.float16, **meta)
        kv = [torch.empty(2, 2, 64, 32, dtype=torch.int8, **meta) for _ in range(2)]
        lengths = [torch.empty(2, dtype=torch.int32, **meta) for _ in range(2)]
        return [q, *kv, *lengths], torch.empty_like(q), {"k_scale": 0.02, "v_scale": 0.03}
    if op == INTERACTION_ATTENTION:
        q = torch.empty(1, 4, 4, 2, 16, dtype=torch.float16, **meta)
        kv = [torch.empty(1, 12, 12, 2, 16, dtype=torch.float16, **meta) for _ in range(2)]
        return [q, *kv], torch.empty_like(q), {}
    grid = torch.empty(1, 27, 27, 64, dtype=torch.float16, **meta)
    return [grid, torch.empty(9, 3, dtype=torch.int64, **meta)], torch.empty(1, 81, 64, dtype=grid.dtype, **meta), {}


@pytest.mark.parametrize("op", ["DecodeAttention", "InteractionAttention", "WindowMaxPool"])
def test_plugin_enqueue_reads_no_device_value(op, monkeypatch):
    """Every plugin's enqueue (tensorrt.plugin's impl, TensorRT-RTX's IPluginV3.enqueue) goes through run_kernel,
    possibly while TensorRT's stream is captured into a CUDA graph, where a device read (`.any()`, `.item()`) is a
    host sync that ends the capture. On meta tensors any such read raises, so reaching the launch proves there is
    none; the direct call's range check does read, and is shown to raise on the same tensors."""
    from engines.plugins import decode_attention as module
    from engines.plugins import interaction_attention, window_max_pool
    from engines.plugins.kernel_table import run_kernel

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: launched.append((grid, args, constexprs))

    for kernels in (module, interaction_attention, window_max_pool):
        monkeypatch.setattr(kernels, "triton_kernel", lambda compiled=False: Recorder())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # meta tensors are not CUDA ones: let the device check pass
    inputs, out, attributes = _meta_inputs(op)
    run_kernel(op, inputs, out, attributes)
    assert len(launched) == 1 and launched[0][1][-1] is out  # the kernel launched once, into the plugin's buffer
    if op == "DecodeAttention":
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            module.decode_attention(*inputs, **attributes, out=out)  # check_values=True reads start and end
