"""Shared fixtures: the upstream oracle (../shared/oracle/fusion-phi-tiny) and tiny random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
DEMO_IMAGE = ROOT / "fusion_export" / "assets" / "demo_image.png"
ORACLE_DIR = Path(os.environ.get("FUSION_ORACLE_DIR", ROOT.parent / "shared" / "oracle" / "fusion-phi-tiny"))

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
    from fusion_export.trt_targets import TrtTarget

    cache: dict[tuple, Path] = {}

    def get(query_len: int, target: str = "trt-10.3", dtype: str = "fp32") -> Path:
        key = (query_len, target, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"oracle-q{query_len}-{target}-{dtype}"
            options = ExportOptions(query_len=query_len, dtype=dtype, trt_target=TrtTarget(target))
            cache[key] = export_artifact(oracle_dir, out, options, verbose=False)
        return cache[key]

    return get
