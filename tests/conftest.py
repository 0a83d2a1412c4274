"""Shared fixtures: the vendored upstream oracle (tests/data/oracle/fusion-phi-tiny) and tiny random checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
DEMO_IMAGE = ROOT / "fusion_export" / "assets" / "demo_image.png"
VENDORED_ORACLE_DIR = ROOT / "tests" / "data" / "oracle" / "fusion-phi-tiny"
ORACLE_DIR = Path(os.environ.get("FUSION_ORACLE_DIR", VENDORED_ORACLE_DIR))

# Thread count fixed so float reductions are repeatable on shared 2-core CI machines.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    if not (ORACLE_DIR / "model.safetensors").exists():
        pytest.fail(f"upstream oracle not found at {ORACLE_DIR} (set FUSION_ORACLE_DIR to its folder)")
    return ORACLE_DIR


@pytest.fixture(scope="session")
def oracle_inputs(oracle_dir):
    return load_file(oracle_dir / "inputs.safetensors")


@pytest.fixture(scope="session")
def oracle_outputs(oracle_dir):
    return load_file(oracle_dir / "outputs.safetensors")


@pytest.fixture(scope="session")
def oracle_intermediates(oracle_dir):
    return load_file(oracle_dir / "intermediates.safetensors")


@pytest.fixture(scope="session")
def oracle_model(oracle_dir):
    from reference_model import load_model

    return load_model(oracle_dir)


@pytest.fixture(scope="session")
def oracle_request(oracle_inputs):
    from reference_model import Request

    return Request(
        input_ids=oracle_inputs["input_ids"][0].tolist(),
        instructs=oracle_inputs["instructs"][0].tolist(),
        pixel_values=oracle_inputs["images"][0],
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint with the oracle's shapes (seed 1), written once per test session."""
    from reference_model.synthetic import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from reference_model import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from reference_model.prompt import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def export_oracle(oracle_dir, tmp_path_factory):
    """Export the oracle checkpoint once per (query_len, target, dtype) per test session."""
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.precision import Precision
    from fusion_export.trt_targets import TrtTarget

    cache: dict[tuple, Path] = {}

    def get(query_len: int, target: str = "trt-10.3", dtype: str = "fp32") -> Path:
        key = (query_len, target, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"oracle-q{query_len}-{target}-{dtype}"
            options = ExportOptions(query_len=query_len, precision=Precision(dtype), trt_target=TrtTarget(target))
            cache[key] = export_artifact(oracle_dir, out, options, verbose=False).folder
        return cache[key]

    return get


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str) -> CliResult:
    """The CLI's `main` in this process (no interpreter start-up): for the many bad-input cases. Subprocess
    runs (`test_cli_golden.run_cli`) cover what needs a real process (signals, exit codes from the shell)."""
    from fusion_export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
