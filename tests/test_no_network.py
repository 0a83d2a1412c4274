"""Nothing the toolkit runs opens a network socket: no download, no telemetry (ONNX Runtime's is switched off
with its API; this watches the system calls of real commands to prove the rest)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from .conftest import DEMO_IMAGE, ROOT

pytestmark = [
    pytest.mark.xdist_group("oracle-exports"),
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch system calls"),
]


def network_calls(tmp_path, *args: str) -> list[str]:
    """Connections or datagrams to an internet address, and name lookups (reading resolv.conf or hosts).
    Creating a socket is not enough: an IPv6 capability probe (bind to ::1, at import of an HTTP library)
    sends nothing."""
    trace = tmp_path / "strace.txt"
    cmd = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,openat", "-o", str(trace)]
    proc = subprocess.run([*cmd, sys.executable, "-m", "fusion_export_cli.cli", *args], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    sending = re.compile(r"\b(connect|sendto|sendmsg)\(.*AF_INET6?")
    lookup = re.compile(r"openat\(.*\"/etc/(resolv\.conf|hosts|gai\.conf)\"")
    return [line for line in trace.read_text().splitlines() if sending.search(line) or lookup.search(line)]


def test_commands_open_no_network_socket(export_oracle, oracle_dir, tmp_path):
    common = ["--image", str(DEMO_IMAGE), "--question", "What is this?", "--max-new-tokens", "2", "--quiet"]
    assert network_calls(tmp_path, "generate", "--artifacts", str(export_oracle(16)), *common) == []
    assert network_calls(tmp_path, "generate", "--model", str(oracle_dir), "--query-len", "16", *common) == []
