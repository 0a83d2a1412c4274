"""`fusion-export demo` runs end to end on CPU (about 6 s here; the 120 s timeout only guards against hangs)."""

from __future__ import annotations

from .test_cli_golden import run_cli


def test_demo(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote a random FUSION checkpoint" in proc.stdout
    assert "-> 838 positions" in proc.stdout  # 95 prompt ids + 729 image tokens + 16 latents - 2 placeholders
    assert (tmp_path / "demo" / "tiny-random-fusion" / "model.safetensors").exists()
    again = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", timeout=120)
    assert again.returncode == 0 and "reusing" in again.stdout
