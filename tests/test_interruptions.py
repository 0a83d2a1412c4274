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
        [sys.executable, "-m", "fusion_export_cli.cli", "export", "--model", str(oracle_dir), "--out", str(out)],
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
    from fusion_export_cli import cli

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


def _swallow(signum: int) -> None:
    """What a library's `except ImportError` around an import that the signal interrupted does, in effect."""
    try:
        signal.raise_signal(signum)
    except BaseException:
        pass


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_a_library_swallows_still_stops_the_command(monkeypatch, capsys, tmp_path, signum, code):
    """The exception is gone but the signal was recorded: the next step does not start, the staged folder is not
    published, and the command exits as signalled (it exited 0 with its artifact written before)."""
    from fusion_export.progress import Progress
    from fusion_export_cli import cli
    from reference_model.staging import staging_folder

    out, ran = tmp_path / "art", []

    def export(args):
        progress = Progress(2, enabled=False)
        with staging_folder(out) as tmp:
            progress.step("trace")
            (tmp / "manifest.json").write_text("{}")
            _swallow(signum)
            ran.append("trace")
            progress.step("write")
            ran.append("write")
        return 0

    monkeypatch.setattr(cli, "build_parser", _parser_running(export))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert cli.main(["export"]) == code
    assert ran == ["trace"] and list(tmp_path.iterdir()) == []
    reason = "interrupted" if signum == signal.SIGINT else "terminated by SIGTERM"
    assert reason in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers main replaced are back
    from reference_model.interruption import raise_if_signalled

    raise_if_signalled()  # and forgotten: this process's later staging folders are not refused (they were)


def test_a_swallowed_signal_is_not_published_by_write_atomically(monkeypatch, tmp_path):
    from fusion_export.output_files import write_atomically
    from fusion_export_cli import cli

    report = tmp_path / "report.json"

    def write(tmp):
        tmp.write_text("{}")
        _swallow(signal.SIGINT)

    monkeypatch.setattr(cli, "build_parser", _parser_running(lambda args: write_atomically(report, write) and 0))
    assert cli.main(["bench"]) == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exit_with,code", [("exit_as_main", 130), ("sys-exit", -signal.SIGINT)])
def test_interrupted_module_run_exits_130(exit_with, code):
    """`python -m fusion_export_cli.cli` after a Ctrl-C that passed through exec'd code: CPython would exit by SIGINT
    (-2, the flaky failure of the export test above) whatever status `main` returned; `exit_as_main` keeps it."""
    args = [] if exit_with == "exit_as_main" else [exit_with]
    proc = subprocess.run([sys.executable, "-m", "tests.cli_interrupted_in_exec", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "interrupted" in proc.stderr
