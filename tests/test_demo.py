"""`fusion-export demo` runs the whole pipeline on CPU (about 30 s here, most of it the ONNX export; the
timeouts only guard against hangs)."""

from __future__ import annotations

import re

from .test_cli_golden import run_cli


def test_demo(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "wrote a random FUSION checkpoint" in out
    assert "-> 838 positions" in out  # 95 prompt ids + 729 image tokens + 16 latents - 2 placeholders
    assert "TensorRT check (trt-10.3): OK" in out
    assert "top-1 agreement 100.0%; PASSED" in out
    assert "ONNX Runtime tokens identical to the reference's" in out
    assert "== 7. build TensorRT engines" in out and re.search(r"decoder: \d+ layers", out)  # TensorRT-RTX
    assert (tmp_path / "demo" / "engines" / "engines.json").exists()
    assert (tmp_path / "demo" / "onnx-fp32" / "manifest.json").exists()
    again = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", timeout=300)
    assert again.returncode == 0 and again.stdout.count("reusing") == 3
