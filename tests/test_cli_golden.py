"""`fusion-export golden` run as a subprocess reproduces the oracle's numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .conftest import ROOT
from .test_oracle_parity import LOGITS_TOL, STATES_TOL


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusion_export_cli.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_golden_matches_oracle(oracle_dir, oracle_outputs, tmp_path):
    out = tmp_path / "golden.safetensors"
    proc = run_cli(
        "golden", "--model", str(oracle_dir), "--inputs", str(oracle_dir / "inputs.safetensors"),
        "--out", str(out), "--query-len", "16", "--max-new-tokens", "5", "--hidden-states",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    golden = load_file(out)
    assert golden["generated_ids"].tolist() == oracle_outputs["generated_ids"].tolist()
    for name in ["logits", "generate_step_logits"] + [f"hidden_states_{k}" for k in range(7)]:
        assert golden[name].dtype == torch.float32
        tol = STATES_TOL if name.startswith("hidden") else LOGITS_TOL  # the gates of test_oracle_parity.py
        assert (golden[name] - oracle_outputs[name]).abs().max().item() <= tol, name
    with safe_open(out, "pt") as f:
        assert f.metadata()["query_len"] == "16" and f.metadata()["format"] == "fusion-export-golden"
    assert not list(tmp_path.glob(".*partial")), "temp file left behind"


@pytest.mark.parametrize("query_len", [4, 36, 64, 144])
def test_golden_other_query_lengths(oracle_dir, oracle_outputs, tmp_path, query_len):
    out = tmp_path / "golden.safetensors"
    proc = run_cli(
        "golden", "--model", str(oracle_dir), "--inputs", str(oracle_dir / "inputs.safetensors"),
        "--out", str(out), "--query-len", str(query_len), "--max-new-tokens", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    diff = load_file(out)["logits"] - oracle_outputs[f"logits_query_len_{query_len}"]
    assert diff.abs().max().item() <= LOGITS_TOL


def test_golden_defaults_to_checkpoint_query_len(oracle_dir, oracle_outputs, tmp_path):
    # the oracle's config.json says query_len "16" and does not list 64, so 16 is the default
    out = tmp_path / "golden.safetensors"
    proc = run_cli(
        "golden", "--model", str(oracle_dir), "--inputs", str(oracle_dir / "inputs.safetensors"),
        "--out", str(out), "--max-new-tokens", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (load_file(out)["logits"] - oracle_outputs["logits"]).abs().max().item() <= LOGITS_TOL


def test_golden_bad_inputs_are_named(oracle_dir, oracle_inputs, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": oracle_inputs["input_ids"], "images": oracle_inputs["images"]}, bad)
    out = tmp_path / "golden.safetensors"
    proc = run_cli("golden", "--model", str(oracle_dir), "--inputs", str(bad), "--out", str(out))
    assert proc.returncode == 2
    assert "missing tensor 'instructs'" in proc.stderr and str(bad) in proc.stderr
    assert not out.exists()


def test_golden_rejects_non_square_query_len(oracle_dir, tmp_path):
    proc = run_cli(
        "golden", "--model", str(oracle_dir), "--inputs", str(oracle_dir / "inputs.safetensors"),
        "--out", str(tmp_path / "g.safetensors"), "--query-len", "10",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--query-len" in proc.stderr and "not a perfect square" in proc.stderr
