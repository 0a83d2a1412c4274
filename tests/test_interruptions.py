"""An export interrupted by Ctrl-C, SIGTERM or SIGHUP leaves nothing behind and says why it stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_interrupted_export_leaves_nothing(oracle_dir, tmp_path, signum, code):
    out = tmp_path / "art"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusion_export.cli", "export", "--model", str(oracle_dir), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.*.partial")):  # the staging folder: tracing is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert ("interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}") in err
    assert list(tmp_path.iterdir()) == [], "a partial artifact was left behind"


def test_signal_wrapped_by_a_library_still_reads_as_the_signal(monkeypatch, capsys):
    """onnxruntime's import turns whatever interrupts it into ImportError; the CLI still exits as terminated."""
    from fusion_export import cli

    def interrupted_import(args):
        try:
            raise cli.Terminated(signal.SIGTERM)
        except cli.Terminated as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(cli, "build_parser", _parser_running(interrupted_import))
    assert cli.main(["check-trt", "x.onnx"]) == 143
    assert "terminated by SIGTERM" in capsys.readouterr().err


def _parser_running(run):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("rest", nargs="*")
    parser.set_defaults(run=run)
    return lambda: parser
