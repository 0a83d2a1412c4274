"""The static TensorRT check accepts the exported graphs for their target and rejects what the parser would."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.tensorrt.flavours import TrtFlavour, installed_flavours, load_trt
from fusion_export.trt_rules.operator_check import check_graph, check_graphs
from fusion_export.trt_rules.targets import TrtTarget

from .test_cli_golden import run_cli


def save(tmp_path, nodes, inputs, outputs, opset=20, initializers=(), name="g", domains=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=imports)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def vi(name, dtype=TensorProto.FLOAT, shape=("batch", 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def errors(path, target="trt-10.3"):
    findings, _ = check_graph(path, TrtTarget(target))
    return [f.message for f in findings if f.severity == "error"]


@pytest.mark.parametrize("query_len,target", [(16, "trt-10.3"), (64, "trt-10.15")])
def test_exported_graphs_pass_their_target(export_oracle, query_len, target):
    folder = export_oracle(query_len, target)
    paths = {name: folder / f"{name}.onnx" for name in ("vision_encoder", "decoder_prefill", "decoder_step")}
    report = check_graphs(paths, TrtTarget(target))
    assert report.ok, report.table()
    assert "If" not in {op for ops in report.ops.values() for op in ops}
    if TrtFlavour.tensorrt_rtx in installed_flavours():  # and the real parser agrees (tests/test_trt_build.py)
        trt = load_trt(TrtFlavour.tensorrt_rtx)
        assert {name: trt.parse(path)[2] for name, path in paths.items()} == dict.fromkeys(paths, [])


def test_opset24_graphs_fail_on_jetpack6(export_oracle):
    report = check_graphs({"decoder_step": export_oracle(64, "trt-10.15") / "decoder_step.onnx"}, TrtTarget.trt_10_3)
    messages = " | ".join(f.message for f in report.errors)
    assert "opset 24 outside trt-10.3's 9..20" in messages and "TensorScatter" in " ".join(
        f.where for f in report.errors
    )


def test_custom_domain_and_if_are_rejected(tmp_path):
    ms = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")
    path = save(tmp_path, [ms], [vi("x")], [vi("y")], domains=["com.microsoft"], name="ms")
    messages = errors(path)
    assert any("custom domain 'com.microsoft'" in m for m in messages)
    assert any("domain 'com.microsoft' is not a standard ONNX op" in m for m in messages)

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [vi("z")])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    path = save(tmp_path, [node], [cond, vi("x")], [vi("y")], name="if")
    assert any("`If` is not allowed" in m for m in errors(path))


def test_rules_from_the_operator_table(tmp_path):
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])  # computed, not a constant
    node = helper.make_node("ReduceMax", ["x", "axes"], ["y"])
    path = save(tmp_path, [node], [vi("x"), axes], [vi("y", shape=("batch", 1))], opset=18, name="reduce")
    assert any("input 1 (axes) must be a constant" in m for m in errors(path))

    const = helper.make_tensor("axes_c", TensorProto.INT64, [1], [1])
    path = save(tmp_path, [helper.make_node("ReduceMax", ["x", "axes_c"], ["y"])], [vi("x")],
                [vi("y", shape=("batch", 1))], opset=18, initializers=[const], name="reduce_ok")  # fmt: skip
    assert errors(path) == []

    scatter = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add")
    i = helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 1])
    path = save(tmp_path, [scatter], [vi("x"), i, vi("u", shape=("batch",))], [vi("y")], name="scatter")
    assert any("attribute reduction='add' not supported" in m for m in errors(path))

    ln = helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean"])
    s = helper.make_tensor("s", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    path = save(tmp_path, [ln], [vi("x")], [vi("y"), vi("mean")], initializers=[s], name="ln")
    assert any("output 1 (Mean) must be absent" in m for m in errors(path))

    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)
    path = save(tmp_path, [cast], [vi("x")], [vi("y", TensorProto.DOUBLE)], name="double")
    assert any("dtype DOUBLE is not a TensorRT I/O type" in m for m in errors(path))

    mm = helper.make_node("MatMul", ["a", "a"], ["y"])
    a = helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", "batch"])
    path = save(tmp_path, [mm], [a], [vi("y", TensorProto.INT64, ("batch", "batch"))], name="int_mm")
    assert any("input dtype INT64 not supported" in m for m in errors(path))

    anon = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [anon], [vi("y")], name="anon")
    assert any("dim 0 is dynamic without a name" in m for m in errors(path))

    dql = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    outs = [vi("q", TensorProto.UINT8), vi("s", shape=()), vi("z", TensorProto.UINT8, ())]
    path = save(tmp_path, [dql], [vi("x")], outs, name="dql")
    assert any("not supported by trt-10.3" in m for m in errors(path))


def test_check_trt_cli(export_oracle, tmp_path):
    folder = export_oracle(16)
    proc = run_cli("check-trt", str(folder), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TensorRT compatibility (trt-10.3): OK" in proc.stdout
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [vi("z")])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    bad = save(tmp_path, [node], [cond, vi("x")], [vi("y")], name="bad")
    proc = run_cli("check-trt", str(bad))
    assert proc.returncode == 1 and "FAILED" in proc.stdout  # a readable graph TensorRT would reject: 1
    broken = save(tmp_path, [helper.make_node("If", ["c"], ["y"])], [cond], [vi("y")], name="broken")
    proc = run_cli("check-trt", str(broken))
    assert proc.returncode == 2 and "not a valid ONNX model (Required attribute 'else_branch'" in proc.stderr


def test_more_rules_and_subgraphs(tmp_path):
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])  # computed K
    topk = helper.make_node("TopK", ["x", "k"], ["v", "i"])
    outs = [vi("v", shape=("batch", "k")), vi("i", TensorProto.INT64, ("batch", "k"))]
    path = save(tmp_path, [topk], [vi("x"), k], outs, name="topk")
    assert any("must be a constant below 3840" in m for m in errors(path))

    cast = helper.make_node("Cast", ["x"], ["u8"], to=TensorProto.UINT8)
    back = helper.make_node("Cast", ["u8"], ["y"], to=TensorProto.FLOAT)
    path = save(tmp_path, [cast, back], [vi("x")], [vi("y")], name="uint8")
    assert any("UINT8, which TensorRT allows only as network I/O" in m for m in errors(path))

    body = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Identity", ["acc"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            vi("acc"),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), vi("acc_out")],
    )
    n = helper.make_tensor("n", TensorProto.INT64, [], [2])
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)
    path = save(tmp_path, [loop], [vi("x")], [vi("y")], initializers=[n], name="loop")
    assert any("DynamicQuantizeLinear is not supported" in m for m in errors(path))
