"""The plugins as TensorRT-RTX IPluginV3 classes (engines/plugins/rtx_plugins.py), on the real TensorRT-RTX.

What runs here for real: TensorRT-RTX's parser importing each plugin node as one IPluginV3 layer (not its local
function) and its builder building the engine without a GPU; the shape, type and format callbacks run inside
that build. `enqueue` needs a GPU for TensorRT to call it; here it is called directly on host buffers with the
kernels in Triton's interpreter, which checks everything but the CUDA stream: buffer views, op dispatch, output.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
trt_rtx = pytest.importorskip("tensorrt_rtx")

from engines.plugins import rtx_plugins  # noqa: E402
from engines.plugins.kernel_table import ATTRIBUTES, LOCAL_FUNCTION  # noqa: E402
from engines.plugins.tensorrt_plugins import register_plugins  # noqa: E402
from engines.tensorrt.flavours import load_trt  # noqa: E402
from fusion_export.plugin_ops.onnx_forms import (  # noqa: E402
    DECODE_ATTENTION,
    INTERACTION_ATTENTION,
    WINDOW_MAX_POOL,
    decode_attention_model,
    interaction_attention_model,
    window_max_pool_model,
)
from fusion_export.plugin_ops.reference import (  # noqa: E402
    decode_attention_reference,
    interaction_attention_reference,
    window_max_pool_reference,
)

OPS = [DECODE_ATTENTION, INTERACTION_ATTENTION, WINDOW_MAX_POOL]
ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.int8: 3}  # TensorProto.FLOAT, FLOAT16, INT8


@pytest.fixture(scope="module")
def trt():
    api = load_trt("tensorrt-rtx")
    assert register_plugins(api, OPS) == dict.fromkeys(OPS, rtx_plugins.IMPLEMENTATION)
    return api


def test_parser_library_link(tmp_path, monkeypatch):
    """The parser opens libtensorrt_rtx.so from its own folder; the wheel ships libtensorrt_rtx.so.1: linked once,
    atomically; a folder without the library, or one where the link cannot be made, is a reason with the fix."""
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    assert rtx_plugins.parser_can_import_plugins(tmp_path) == ""
    link = tmp_path / "libtensorrt_rtx.so"
    assert link.is_symlink() and link.readlink() == Path("libtensorrt_rtx.so.1")
    assert rtx_plugins.parser_can_import_plugins(tmp_path) == "" and sorted(p.name for p in tmp_path.iterdir()) == [
        "libtensorrt_rtx.so", "libtensorrt_rtx.so.1"]  # fmt: skip
    assert "exists" in rtx_plugins.parser_can_import_plugins(tmp_path / "elsewhere")

    def refuse(self, target):
        raise PermissionError(13, "Permission denied", str(self))

    fresh = tmp_path / "read-only"
    fresh.mkdir()
    (fresh / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    monkeypatch.setattr(Path, "symlink_to", refuse)
    why = rtx_plugins.parser_can_import_plugins(fresh)
    assert f"ln -s libtensorrt_rtx.so.1 {fresh / 'libtensorrt_rtx.so'}" in why and "Permission denied" in why
    assert sorted(p.name for p in fresh.iterdir()) == ["libtensorrt_rtx.so.1"]  # nothing half-made left
    # where the link cannot be made, engines inline the local functions and say why
    monkeypatch.setattr(rtx_plugins, "parser_can_import_plugins", lambda: "linking it failed (no)")
    monkeypatch.setattr(rtx_plugins, "register", lambda *a: pytest.fail("registered without the link"))
    how = register_plugins(load_trt("tensorrt-rtx"), [WINDOW_MAX_POOL])
    assert how[WINDOW_MAX_POOL].startswith(f"{LOCAL_FUNCTION}: tensorrt_rtx.plugin does not import")
    assert how[WINDOW_MAX_POOL].endswith("IPluginV3: linking it failed (no)")


def test_type_combinations(trt):
    t = trt.module
    assert rtx_plugins.allowed_types(t, DECODE_ATTENTION) == [
        (t.float32, t.float32, t.float32, t.int32, t.int32, t.float32),
        (t.float16, t.float16, t.float16, t.int32, t.int32, t.float16),
        (t.float32, t.int8, t.int8, t.int32, t.int32, t.float32),  # an int8 cache
        (t.float16, t.int8, t.int8, t.int32, t.int32, t.float16),
    ]
    assert rtx_plugins.allowed_types(t, INTERACTION_ATTENTION) == [(t.float32,) * 4, (t.float16,) * 4]
    assert rtx_plugins.allowed_types(t, WINDOW_MAX_POOL) == [
        (t.float32, t.int64, t.float32), (t.float16, t.int64, t.float16), (t.int8, t.int64, t.int8)]  # fmt: skip


SCALES = {"k_scale": 0.0123, "v_scale": 0.0457}  # an int8 cache's


def _cases(dtype: torch.dtype, int8_cache: bool) -> dict[str, tuple]:
    """Per op: a one-node model, its optimization profile (dynamic batch), the output's network shape."""
    d = ONNX_TYPES[dtype]
    cache = {"kv_dtype": ONNX_TYPES[torch.int8], **SCALES} if int8_cache else {}
    q, kv = ((1, 8, 1, 40), (4, 8, 4, 40)), ((1, 2, 8, 40), (4, 2, 1024, 40))
    lengths = ((1,), (4,), (4,))
    grids = {name: tuple((b, side, side, 16, 32) for b in (1, 2, 4)) for name, side in (("q", 8), ("k", 24), ("v", 24))}
    return {
        DECODE_ATTENTION: (decode_attention_model(d, heads=8, kv_heads=2, head_dim=40, **cache),
                           {"q": (*q, q[1]), "k": (*kv, kv[1]), "v": (*kv, kv[1]), "start": lengths, "end": lengths},
                           (-1, 8, -1, 40)),
        INTERACTION_ATTENTION: (interaction_attention_model(d, side=8, window=3, heads=16, head_dim=32), grids,
                                (-1, 8, 8, 16, 32)),
        WINDOW_MAX_POOL: (window_max_pool_model(d, side=54, out_size=8, channels=64, opset=17),
                          {"grid": ((1, 54, 54, 64), (2, 54, 54, 64), (4, 54, 54, 64))}, (-1, 64, 64)),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("op", "dtype", "int8_cache"),
    [(op, dtype, False) for op in OPS for dtype in (torch.float32, torch.float16)]
    + [(WINDOW_MAX_POOL, torch.int8, False), (DECODE_ATTENTION, torch.float16, True)],
)
def test_plugin_node_becomes_one_plugin_layer_and_builds(trt, op, dtype, int8_cache, tmp_path):
    """With the plugins registered and ENABLE_PLUGIN_OVERRIDE, TensorRT-RTX's parser makes the node one IPluginV3
    layer (not the local function's dozens) whose output shape and type come from the plugin's callbacks, and the
    builder builds it with no GPU: fp32 and fp16, int8 WindowMaxPool, and DecodeAttention over an int8 cache,
    whose scales (node attributes -> plugin fields) are serialized into the engine."""
    import onnx

    from .conftest import build_plan

    model, profile, shape = _cases(dtype, int8_cache)[op]
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, path)
    builder, network, errors = trt.parse(path, plugins=True)
    assert errors == []
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    kinds = [layer.type for layer in layers if layer.type != trt.module.LayerType.CONSTANT]  # WindowMaxPool's table
    assert kinds == [trt.module.LayerType.PLUGIN_V3]
    out = network.get_output(0)
    assert tuple(out.shape) == shape and out.dtype == network.get_input(0).dtype
    plan = build_plan(builder, network, profile)
    assert plan is not None and op.encode() in bytes(plan)  # the plugin is serialized into the engine by name
    for name, value in SCALES.items():
        assert (np.float32(value).tobytes() in bytes(plan)) == int8_cache, name  # 1.0 otherwise


def _desc(trt, tensor: torch.Tensor):
    types_ = {torch.float32: trt.float32, torch.float16: trt.float16, torch.int8: trt.int8, torch.int32: trt.int32,
              torch.int64: trt.int64}  # fmt: skip
    return types.SimpleNamespace(dims=tuple(tensor.shape), type=types_[tensor.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_enqueue_writes_the_kernel_result_into_the_output_buffer(trt, dtype):
    """enqueue reads TensorRT's buffers by pointer and description and writes the op's result into the output
    buffer: host buffers, kernels in Triton's interpreter, against each op's reference."""
    t = trt.module
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 3, 40), torch.randn(2, 2, 32, 40), torch.randn(2, 2, 32, 40)
    start, end = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([12, 30], dtype=torch.int32)
    lq, lk, lv = torch.randn(2, 3, 3, 4, 8), torch.randn(2, 6, 6, 4, 8), torch.randn(2, 6, 6, 4, 8)
    k8, v8 = torch.randint(-127, 128, k.shape, dtype=torch.int8), torch.randint(-127, 128, v.shape, dtype=torch.int8)
    grid = torch.randn(2, 13, 13, 24)
    index = torch.zeros(5, dtype=torch.int64)  # only its length (the output side) is read
    q16 = q.to(dtype)  # the reference op computes in float32 from the kernel's input type
    cases = [
        (DECODE_ATTENTION, [q, k, v, start, end], {}, decode_attention_reference(q, k, v, start, end)),
        (DECODE_ATTENTION, [q, k8, v8, start, end], SCALES, decode_attention_reference(q16, k8, v8, start, end,
                                                                                       **SCALES)),
        (INTERACTION_ATTENTION, [lq, lk, lv], {}, interaction_attention_reference(lq, lk, lv)),
        (WINDOW_MAX_POOL, [grid, index], {}, window_max_pool_reference(grid, 5)),
    ]  # fmt: skip
    tolerance = {torch.float32: 2e-5, torch.float16: 3e-3}[dtype]
    creator = rtx_plugins._classes(t).creator
    for op, inputs, attributes, expected in cases:
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        fields = t.PluginFieldCollection([rtx_plugins.plugin_field(t, n, v) for n, v in attributes.items()])
        plugin = creator(op).create_plugin(op, fields, t.TensorRTPhase.RUNTIME)
        assert plugin.attributes == {**ATTRIBUTES[op], **{n: float(np.float32(v)) for n, v in attributes.items()}}
        plugin.device = "cpu"
        runner = plugin.attach_to_context(None)  # what TensorRT runs: a clone
        out = torch.full(expected.shape, float("nan"), dtype=dtype)
        runner.enqueue([_desc(t, x) for x in inputs], [_desc(t, out)], [x.data_ptr() for x in inputs],
                       [out.data_ptr()], 0, 0)  # fmt: skip
        assert (out.float() - expected.float()).abs().max() <= tolerance, (op, attributes)
