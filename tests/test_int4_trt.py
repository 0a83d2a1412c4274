"""INT4 weights as TensorRT's parsers read them (issue 25): the static check's INT4 rules for each target, held
against TensorRT-RTX 1.7.1's real parser and builder (no GPU needed) on one-layer graphs of the form the quantizer
writes (INT4 [K, N] -> DequantizeLinear(axis 0, block_size B, scale [K/B, N]) -> MatMul), and check_int4, the
refusal the quantizer asks for before any work. Where the static check and TensorRT-RTX disagree, the test says so
and why (the static check follows each target's importer source; RTX 1.7.1 has a newer parser than trt-10.3's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.tensorrt.flavours import TrtFlavour, installed_flavours, load_trt
from fusion_export.trt_rules.operator_check import GraphReadError, check_graph, check_model
from fusion_export.trt_rules.targets import TrtTarget, check_int4
from reference_model.errors import FusionError

from .conftest import build_plan, run_main

needs_rtx = pytest.mark.skipif(
    TrtFlavour.tensorrt_rtx not in installed_flavours(),
    reason="needs TensorRT-RTX (pip install tensorrt-rtx-cu12, in the test extras on x86-64 Linux)",
)
OPSET21_TARGETS = (TrtTarget.trt_10_15, TrtTarget.trt_11)
WEIGHTS, SCALE, ZERO_POINT, DEQUANTIZE = "p.weight.T.int4", "p.weight.T.scale", "p.weight.T.zp", "p.weight.T/dequantize"
NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def int4_linear(
    k: int = 1024,
    n: int = 512,
    block: int = 64,
    act: int = TensorProto.FLOAT,
    opset: int = 21,
    scale_shape: tuple[int, ...] | None = None,
    scale_dtype: int | None = None,
    zero_point: np.ndarray | None = None,
    attributes: dict | None = None,
    op: str = "DequantizeLinear",
    domain: str = "",
) -> onnx.ModelProto:
    """One linear layer in the quantizer's INT4 form (k, n, block, act); the other arguments bend or break it."""
    rng = np.random.default_rng(0)
    weights = rng.integers(-7, 8, size=(k, n)).astype(np.int8)
    scale = (rng.random(scale_shape or (-(-k // block), n)) * 0.01 + 0.001).astype(NUMPY[scale_dtype or act])
    initializers = [
        helper.make_tensor(WEIGHTS, TensorProto.INT4, [k, n], weights.flatten().tolist()),
        numpy_helper.from_array(scale, SCALE),
    ]
    if zero_point is not None:
        zero = helper.make_tensor(ZERO_POINT, TensorProto.INT4, list(zero_point.shape), zero_point.flatten().tolist())
        initializers.append(zero)
    inputs = [WEIGHTS, SCALE] + ([ZERO_POINT] if zero_point is not None else [])
    attrs = {"axis": 0, "block_size": block} if attributes is None else attributes
    nodes = [
        helper.make_node(op, inputs, ["p.weight.T.dq"], name=DEQUANTIZE, domain=domain, **attrs),
        helper.make_node("MatMul", ["x", "p.weight.T.dq"], ["y"], name="p/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "int4_linear",
        [helper.make_tensor_value_info("x", act, ["batch", k])],
        [helper.make_tensor_value_info("y", act, ["batch", n])],
        initializers,
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def findings(model: onnx.ModelProto, target: TrtTarget) -> list[tuple[str, str]]:
    return [(f.severity, f.message) for f in check_model(model, target, "int4_linear")[0]]


def errors(model: onnx.ModelProto, target: TrtTarget) -> list[str]:
    return [message for severity, message in findings(model, target) if severity == "error"]


def rtx_parse_and_build(model: onnx.ModelProto, path: Path) -> tuple[list[str], object, object]:
    """TensorRT-RTX's verdict on `model`: (parser errors, network, serialized plan or None)."""
    onnx.save(model, path)
    builder, network, parse_errors = load_trt(TrtFlavour.tensorrt_rtx).parse(path)
    if parse_errors:
        return parse_errors, network, None
    k = network.get_input(0).shape[1]
    return [], network, build_plan(builder, network, {"x": ((1, k), (4, k), (16, k))})


@needs_rtx
@pytest.mark.parametrize("act", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_the_quantizers_form_passes_and_builds(tmp_path, act, block):
    k, n = 1024, 512
    model = int4_linear(k, n, block, act)
    path = tmp_path / "int4_linear.onnx"
    for target in OPSET21_TARGETS:
        found = findings(model, target)
        if block in (64, 128):
            assert found == []
        else:  # not among the INT4 block sizes TensorRT documents: a warning, not an error
            documented = f"INT4 blocks of {block}: TensorRT documents blocks of [64, 128]"
            assert len(found) == 1 and found[0][0] == "warning" and found[0][1].startswith(documented)
    assert errors(model, TrtTarget.trt_10_3) == ["ai.onnx opset 21 outside trt-10.3's 9..20"]

    parse_errors, network, plan = rtx_parse_and_build(model, path)
    assert parse_errors == [] and plan is not None
    assert not [f for f in check_graph(path, TrtTarget.trt_10_15)[0] if f.severity == "error"]  # via ONNX checker
    trt = load_trt(TrtFlavour.tensorrt_rtx).module
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dequantize = next(layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE)
    assert dequantize.get_input(0).dtype == trt.DataType.INT4 and tuple(dequantize.get_input(0).shape) == (k, n)
    assert tuple(dequantize.get_input(1).shape) == (k // block, n)
    assert dequantize.get_output(0).dtype == (trt.DataType.FLOAT if act == TensorProto.FLOAT else trt.DataType.HALF)
    # the plan keeps the weights packed: their k*n/2 bytes plus the scales, under the k*n bytes even INT8 would take
    scale_bytes = (k // block) * n * np.dtype(NUMPY[act]).itemsize
    assert k * n // 2 + scale_bytes < plan.nbytes < k * n


# (case, the graph, what the static check says (with the tensor it names), TensorRT-RTX's own words or None when
# RTX accepts the graph, and then why the two disagree)
BROKEN = [
    (
        "nonzero zero point",
        dict(zero_point=np.ones((16, 512), np.int8)),
        f"input 2 (x_zero_point) must be a zero initializer ('{ZERO_POINT}' is not)",
        "Non-zero zero point is not supported",
    ),
    (
        "scale of rank 3",
        dict(scale_shape=(1, 16, 512)),
        f"the scale '{SCALE}' of INT4 weights '{WEIGHTS}' has rank 3",
        "Invalid rank for the scale tensor. Rank = 3",
    ),
    (
        "scale blocked on two axes",
        dict(scale_shape=(16, 256)),
        f"the scale '{SCALE}' [16, 256] of INT4 weights '{WEIGHTS}' [1024, 512]: exactly one axis may be blocked",
        "only the quantization axis may be blocked",
    ),
    (
        "blocks of one",
        dict(k=4, n=6, block=1),
        f"the scale '{SCALE}' [4, 6] of INT4 weights '{WEIGHTS}' [4, 6]: exactly one axis may be blocked",
        "Only a single blocking dimension is allowed",
    ),
    (
        "fp32 scale, fp16 activations",
        dict(act=TensorProto.FLOAT16, scale_dtype=TensorProto.FLOAT),
        f"the scale '{SCALE}' is FLOAT and the activations 'x' into MatMul 'p/MatMul' are FLOAT16",
        "IMatrixMultiplyLayer must have same input types",
    ),
    # RTX reads per-channel INT4 (a 1-D scale), a TensorRT form but not the blockwise one this project writes for
    # both runtimes
    (
        "per-channel scale",
        dict(scale_shape=(512,), attributes={"axis": 1}),
        f"the scale '{SCALE}' of INT4 weights '{WEIGHTS}' has rank 1",
        None,
    ),
    # RTX never reads block_size: it takes blocks of K / scale rows = 48 where ONNX Runtime reads 64 and a last
    # block of 32, so one file would hold two different weights
    (
        "block not dividing K",
        dict(k=96, block=64),
        f"INT4 weights '{WEIGHTS}': block_size 64 over dimension 0 (96) with 2 scale rows",
        None,
    ),
    # RTX reads blocks of 1024 / 8 = 128 from the scale's shape, where block_size says 32
    (
        "block_size disagreeing with the scale",
        dict(block=32, scale_shape=(8, 512)),
        f"INT4 weights '{WEIGHTS}': block_size 32 over dimension 0 (1024) with 8 scale rows",
        None,
    ),
    # RTX infers the block; without block_size, ONNX's DequantizeLinear is not blockwise at all
    (
        "no block_size",
        dict(attributes={"axis": 0}),
        f"INT4 weights '{WEIGHTS}' have a scale of their rank but no block_size",
        None,
    ),
]


@needs_rtx
@pytest.mark.parametrize("case,kwargs,static,rtx", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_forms_against_the_real_parser(tmp_path, case, kwargs, static, rtx):
    model = int4_linear(**kwargs)
    for target in OPSET21_TARGETS:
        messages = errors(model, target)
        assert len(messages) == 1 and messages[0].startswith(static), (target, messages)
    parse_errors, _, plan = rtx_parse_and_build(model, tmp_path / "broken.onnx")
    if rtx is None:  # a recorded disagreement: RTX parses and builds what the static check refuses
        assert parse_errors == [] and plan is not None
    else:  # both refuse, for the same reason
        assert len(parse_errors) == 1 and rtx in parse_errors[0]


@needs_rtx
def test_block_size_needs_opset_21(tmp_path):
    """block_size at opset 20: the ONNX checker stops the file (so check-trt names the node), the static check of
    the graph in memory names the attribute and the opset, check_int4 refuses the opset before any work; RTX, which
    ignores block_size, parses and builds it (a recorded disagreement: the file is not valid ONNX)."""
    model = int4_linear(opset=20)
    path = tmp_path / "opset20.onnx"
    onnx.save(model, path)
    with pytest.raises(GraphReadError, match=f"Unrecognized attribute: block_size .* at node '{DEQUANTIZE}'"):
        check_graph(path, TrtTarget.trt_10_15)
    for target in TrtTarget:
        assert errors(model, target) == [
            f"INT4 weights '{WEIGHTS}': block_size is a DequantizeLinear attribute from opset 21; the graph is 20"
        ]
    with pytest.raises(FusionError, match=r"graphs are opset 20: export it again for trt-10\.15 with --opset 21\.\.24"):
        check_int4(TrtTarget.trt_10_15, 20)
    parse_errors, _, plan = rtx_parse_and_build(model, path)
    assert parse_errors == [] and plan is not None


@needs_rtx
def test_odd_last_dimension(tmp_path):
    """10.1's importer refuses an odd last INT4 dimension; 10.6+ importers (and RTX 1.7.1) need only an even element
    count. trt-10.15/trt-11: a warning, and RTX builds it. trt-10.3 (its custom op, below): an error; RTX builds that
    too (a recorded disagreement: RTX's parser is newer than JetPack 6's)."""
    model = int4_linear(n=127)
    for target in OPSET21_TARGETS:
        assert errors(model, target) == []
        assert any(s == "warning" and "odd last dimension (127)" in m for s, m in findings(model, target))
    assert rtx_parse_and_build(model, tmp_path / "odd.onnx")[0] == []
    custom = int4_linear(n=127, opset=20, attributes={"axis": 0}, op="TRT_INT4DequantizeLinear", domain="trt")
    assert errors(custom, TrtTarget.trt_10_3) == [
        f"INT4 weights '{WEIGHTS}' have an odd last dimension (127): trt-10.3's parser packs two values a byte along it"
    ]
    parse_errors, _, plan = rtx_parse_and_build(custom, tmp_path / "odd_custom.onnx")
    assert parse_errors == [] and plan is not None


@needs_rtx
def test_trt_int4_dequantize_linear_custom_op(tmp_path):
    """The one INT4 form an opset-20 graph can carry for trt-10.3 (JetPack 6): the parser's built-in
    TRT_INT4DequantizeLinear, read on op_type alone (domain 'trt' satisfies ONNX's checker), block inferred from
    the scale's shape, axis given. It passes every target's check and RTX parses and builds it; ONNX Runtime cannot
    run it, so the exporter does not write it (docs/tensorrt.md)."""
    model = int4_linear(block=64, opset=20, attributes={"axis": 0}, op="TRT_INT4DequantizeLinear", domain="trt")
    path = tmp_path / "custom.onnx"
    parse_errors, network, plan = rtx_parse_and_build(model, path)
    assert parse_errors == [] and plan is not None
    for target in TrtTarget:
        assert check_graph(path, target)[0] == []
    default_domain = int4_linear(block=64, opset=20, attributes={"axis": 0}, op="TRT_INT4DequantizeLinear")
    not_in_table = "TRT_INT4DequantizeLinear is not supported by trt-10.3: not in the parser's operator table"
    assert errors(default_domain, TrtTarget.trt_10_3) == [not_in_table]


def test_check_int4_names_the_target():
    jetpack6 = r"trt-10\.3's parser reads opsets up to 20: quantize an artifact exported for trt-10\.15 or trt-11"
    for opset in (18, 20):
        with pytest.raises(FusionError, match=jetpack6):
            check_int4(TrtTarget.trt_10_3, opset)
    with pytest.raises(FusionError, match=r"are opset 18: export it again for trt-11 with --opset 21\.\.24 \(without"):
        check_int4(TrtTarget.trt_11, 18)
    for target in OPSET21_TARGETS:
        for opset in (21, 24):
            assert check_int4(target, opset) is None


@needs_rtx
def test_check_trt_cli_parses_an_int4_graph(tmp_path):
    path = tmp_path / "int4_linear.onnx"
    onnx.save(int4_linear(act=TensorProto.FLOAT16, block=128), path)
    result = run_main("check-trt", str(path), "--trt-target", "trt-11", "--parser")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TensorRT compatibility (trt-11): OK" in result.stdout and "int4_linear: parses" in result.stdout
    assert "DISAGREES" not in result.stdout
