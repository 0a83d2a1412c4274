"""`fusion-export bench` runs (the demo model: the tiny preset's decoder with a 4-layer tower; 2 rounds, so the
figures mean nothing) and writes a valid report and plot; `bench compare` reads them back. Benchmarks are not
timed tests: nothing here asserts a speed."""

from __future__ import annotations

import json

from PIL import Image

from .conftest import run_main


def test_bench_writes_report_and_plot(demo_checkpoint, export_demo, tmp_path):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", str(demo_checkpoint), "--artifacts", str(export_demo("trt-10.3")),
            "--peers", "transformers", "--iters", "2", "--warmup", "0", "--new-tokens", "4", "--prompt-len", "860",
            "--query-len", "16", "--sweep", "840,900", "--out", str(report), "--plot", str(plot),
            "--quiet"]  # fmt: skip
    result = run_main(*args)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["format"] == "fusion-export-bench" and data["bandwidth_bytes_per_s"] > 1e8
    labels = [r["label"] for r in data["results"]]
    assert labels[0].startswith("reference") and labels[1].startswith("onnxruntime trt-10.3 fp32")
    assert labels[2] == "transformers Phi-3 sdpa fp32"
    for r in data["results"]:
        assert r["decode_step_s"]["n"] == 2 * 3  # 2 rounds x 3 steps after the prefill's token
        assert r["stages_s"]["ttft"]["median"] > 0 and 0 < r["roofline_fraction"]
    ours = data["results"][1]["stages_s"]
    assert ours["vision_encoder"]["median"] > 0 and ours["decoder_prefill"]["median"] > 0
    assert set(data["sweep"]) == set(labels) and set(data["sweep"][labels[0]]) == {"840", "900"}
    assert "tok/s" in result.stdout and "roofline:" in result.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.text.get("Software") == "fusion-export bench"

    result = run_main("bench", "compare", str(report), str(report))
    assert result.returncode == 0 and result.stdout.count("bench.json") == 6 and "1.00x" in result.stdout
    result = run_main("bench", "compare", str(plot))
    assert result.returncode == 2 and "not a readable benchmark report" in result.stderr
    result = run_main("bench", "--model", str(demo_checkpoint), "--out", str(demo_checkpoint / "x.json"))
    assert result.returncode == 2 and "is a checkpoint folder" in result.stderr


def test_bench_refuses_missing_optional_modules_before_work(demo_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in {"matplotlib",
                        "onnxruntime_genai"} else real(name, *a))  # fmt: skip
    result = run_main("bench", "--model", str(demo_checkpoint), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 2 and "--plot needs the Python module 'matplotlib'" in result.stderr
    result = run_main("bench", "--model", str(demo_checkpoint), "--peers", "genai-int4")
    assert result.returncode == 2 and "'onnxruntime_genai'" in result.stderr and "fusion-export[bench]" in result.stderr
    assert not (tmp_path / "b.png").exists()
