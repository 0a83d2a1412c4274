"""Opt-in (`pytest -m slow -s`): the full-size fusion-phi3.5-3b preset, random weights, exported in fp16 on a
24 GB / 2-core CPU machine, then loaded by ONNX Runtime for one prefill and one step.

Needs ~21 GB of free disk (checkpoint + artifact) under FUSION_SLOW_TMP (default: pytest's tmp dir); both are
removed afterwards unless FUSION_SLOW_KEEP=1. Measured here (`FUSION_SLOW_TMP=... pytest -m slow -s
tests/test_fullsize_export.py`, 5 min 37 s in all): checkpoint 64 s; export 2.8 min, peak RSS 10.3 GiB;
artifact 10.19 GB (decoder.onnx.data 9.14 GB stored once for prefill and step, vision 0.85 GB, embeddings
0.20 GB); ONNX Runtime load + prefill + step 107 s, peak RSS 22.8 GiB (9.1 GiB of it the memory-mapped decoder
weights), prefill of 853 positions 71 s, one step 18 s (fp16 weights cast per call on CPU), finite logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reference_model import FusionModel, preset_config

from .conftest import ROOT

pytestmark = pytest.mark.slow

CHECK_SCRIPT = """
import sys, time, torch
from fusion_export.manifest import open_artifact
from fusion_export.ort_runtime import OrtModel
from fusion_export.commands.demo import DEMO_IMAGE
from reference_model import make_request, prepare_batch
from reference_model.prompt import load_tokenizer
artifact = open_artifact(sys.argv[1])
runtime = OrtModel(artifact)
request = make_request(DEMO_IMAGE, "What is this?", load_tokenizer(artifact.model_dir), runtime.config)
batch = prepare_batch([request], runtime.config, artifact.query_len)
session = runtime.session(batch, 2)
t = time.time(); logits = session.prefill(); prefill_s = time.time() - t
t = time.time(); step = session.step(logits.argmax(-1)); step_s = time.time() - t
finite = all(bool(torch.isfinite(x.float()).all()) for x in (logits, step, *vars(session.vision).values()))
print(f"RESULT positions={batch.layout.seq_len} prefill_s={prefill_s:.1f} step_s={step_s:.1f} finite={finite}")
"""


def run_measured(args: list[str], log: Path) -> tuple[int, str, float, float]:
    """Run a command; return its exit code, output, seconds and peak RSS in GiB (file-backed weight pages a
    process maps count in its RSS)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, log.read_text(), time.perf_counter() - start, usage.ru_maxrss / 2**20


def test_full_size_fp16_export(tmp_path):
    work = Path(os.environ.get("FUSION_SLOW_TMP", tmp_path))
    ckpt, art = work / "fusion-phi3.5-3b-random", work / "fusion-phi3.5-3b-fp16"
    write = (
        "import torch; from reference_model.synthetic import write_random_checkpoint; "
        f"write_random_checkpoint({str(ckpt)!r}, 'fusion-phi3.5-3b', dtype=torch.float16, shard_bytes=2_000_000_000)"
    )
    try:
        measure(ckpt, art, write, work)
    finally:
        if not os.environ.get("FUSION_SLOW_KEEP"):
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(art, ignore_errors=True)


def measure(ckpt: Path, art: Path, write: str, work: Path) -> None:
    code, out, t_ckpt, _ = run_measured([sys.executable, "-c", write], work / "checkpoint.log")
    assert code == 0, out

    cli = [sys.executable, "-m", "fusion_export.cli"]
    export = [*cli, "export", "--model", str(ckpt), "--out", str(art), "--dtype", "fp16"]
    code, out, t_export, peak_export = run_measured(export, work / "export.log")
    assert code == 0, out
    manifest = json.loads((art / "manifest.json").read_text())
    sizes = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    with torch.device("meta"):  # decoder (embeddings live apart) + interaction parameters, from the preset
        model = FusionModel(preset_config("fusion-phi3.5-3b"))
    decoder_params = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("layers.", "norm.", "lm_head.", "interaction."))
    )
    assert sizes["decoder.onnx.data"] == pytest.approx(2 * decoder_params, rel=0.001)  # once, not twice

    code, out, t_ort, peak_ort = run_measured([sys.executable, "-c", CHECK_SCRIPT, str(art)], work / "ort.log")
    assert code == 0, out
    result = out.strip().splitlines()[-1]
    assert "finite=True" in result, result
    big = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items() if v > 1e8)
    print(
        f"\ncheckpoint {t_ckpt:.0f} s; export {t_export / 60:.1f} min, peak RSS {peak_export:.1f} GiB; "
        f"artifact {sum(sizes.values()) / 1e9:.2f} GB ({big}); "
        f"ONNX Runtime load + prefill + step {t_ort:.0f} s, peak RSS {peak_ort:.1f} GiB; {result}"
    )
