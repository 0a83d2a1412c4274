"""benchmarks/gpu_acceptance.py in its CPU mode (the tiny model with a 4-layer tower, Triton's interpreter) runs end
to end and passes, with the modules a GPU machine may lack (ONNX, ONNX Runtime, Pillow, TensorRT, matplotlib) made
unimportable: what the one-shot GPU run does, with nothing left to debug there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("triton")

BLOCKED = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "PIL", "tensorrt", "tensorrt_rtx", "onnxruntime_genai",
           "matplotlib")  # fmt: skip
RUNNER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
from benchmarks.gpu_acceptance import main
sys.exit(main(sys.argv[1:]))
"""


def test_cpu_mode_passes_without_onnx_or_pillow(tmp_path):
    out = tmp_path / "acceptance.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--device", "cpu", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("PASSED")
    report = json.loads(out.read_text())
    assert report["failures"] == []
    kernels = {(r["kernel"], r["dtype"]) for r in report["kernels"]}
    for kernel in ("decode_attention", "split_decode_attention"):
        assert {(kernel, dtype) for dtype in ("fp32", "fp16", "int8")} <= kernels
    assert {("interaction_attention", "fp16"), ("window_max_pool", "fp16")} <= kernels
    assert all(r["max_error"] <= r["error_bound"] for r in report["kernels"])
    precision = report["precision"]
    assert precision["top1_agreement"] == 1.0 and 0 < precision["relative_error"]["prefill_logits"] < 1e-2
    speed = {r["attention"]: r for r in report["speed"]}
    assert set(speed) == {"valid", "kernel"}  # without and with the kernels, prefill and step
    assert speed["kernel"]["tokens"] == speed["valid"]["tokens"] and len(speed["valid"]["tokens"]) == 3
