"""Shared fixtures: the vendored upstream oracle (tests/data/oracle/fusion-phi-tiny) and tiny random checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# The plugin kernels run in Triton's interpreter on CPU tensors. Set before any test module imports triton, which
# reads it at import: a module that imported triton first would leave the others with compiled kernels only.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
DEMO_IMAGE = ROOT / "fusion_export" / "assets" / "demo_image.png"
VENDORED_ORACLE_DIR = ROOT / "tests" / "data" / "oracle" / "fusion-phi-tiny"
LLAMA_ORACLE_DIR = ROOT / "tests" / "data" / "oracle" / "fusion-x-llama-tiny"
VENDORED_ORACLES = {"fusion-phi-tiny": VENDORED_ORACLE_DIR, "fusion-x-llama-tiny": LLAMA_ORACLE_DIR}
# upstream's outputs on the two other family members, made after the reference was written (tests/data/upstream)
UNSEEN_DIR = ROOT / "tests" / "data" / "upstream"
UNSEEN_ORACLES = {name: UNSEEN_DIR / name for name in ("fusion-x-phi-tiny", "fusion-llama-so400m-tiny")}
ORACLE_DIR = Path(os.environ.get("FUSION_ORACLE_DIR", VENDORED_ORACLE_DIR))

# `make test` runs two pytest-xdist workers. Tests that share a session's exports must run in the same worker,
# or each worker would export the same graphs again: these nodeid prefixes name the groups (checked in order).
EXPORT_GROUPS = [
    ("tests/test_trt_build.py::test_oracle_checkpoint_builds", "oracle-exports"),
    ("tests/test_properties.py::test_reference_and_onnxruntime_agree", "oracle-exports"),
    ("tests/test_onnx_parity.py::test_fp16_export_within_fp16_tolerances", "demo-exports"),
    ("tests/test_artifact.py", "oracle-exports"),
    ("tests/test_no_network.py", "oracle-exports"),
    ("tests/test_onnx_parity.py", "oracle-exports"),
    ("tests/test_trt_compat.py", "oracle-exports"),
    ("tests/test_trt_build.py::test_small_shape_builds", "small-build"),  # independent: balances the workers
    ("tests/test_trt_build.py", "demo-exports"),
    ("tests/test_hostile_build_quantize.py", "demo-exports"),
    ("tests/test_bench.py", "demo-exports"),
    ("tests/test_decoder_merge.py", "demo-exports"),
    ("tests/test_containment.py", "demo-exports"),  # copies of the demo export, planted
    ("tests/test_kv_int8.py", "demo-exports"),  # quantizes the demo exports above, its plugin form included
    ("tests/test_plugin_kernels.py::test_export_with_plugins_matches_reference_and_builds", "demo-exports"),
    ("tests/test_quantize.py", "quantize"),  # its own demo exports: balances the workers
    ("tests/test_int4.py", "demo-exports"),  # quantizes the demo exports above
    ("tests/test_memory_plan.py", "demo-exports"),
    ("tests/test_ort_matmul_nbits.py", "demo-exports"),
    ("tests/test_ort_attention.py", "ort-attention"),  # module-scoped GQA exports shared by its tests
    ("tests/test_llama_family.py::test_oracle", "llama-oracle"),  # the LLaMA oracle's export, shared
]

if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config, log):
        """Whole export groups per worker, every other test on its own (xdist's loadgroup ignores module marks
        under pytest 9, so the grouping is by nodeid here)."""
        from xdist.scheduler import LoadScopeScheduling

        class ExportGroups(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return next((group for prefix, group in EXPORT_GROUPS if nodeid.startswith(prefix)), nodeid)

        return ExportGroups(config, log)


# Thread count fixed so float reductions are repeatable on shared 2-core CI machines: 2 threads in a serial run,
# 1 per worker when `make test` runs two pytest-xdist workers (the oracle gates hold at both, measured).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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
    """A random checkpoint with the oracle's decoder and a 4-layer tower (seed 1), written once per test session:
    what its tests exercise is the decoder, the loop and the files; the tower's depth (27 in the oracle) only made
    every prefill 5x slower. The oracle's own depth is tested on the oracles (tests/data)."""
    import dataclasses

    from reference_model import preset_config
    from reference_model.synthetic import write_random_checkpoint

    config = preset_config("tiny")
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_layers=4))
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config, seed=1)


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
    from fusion_export.trt_rules.targets import TrtTarget

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


def build_plugin_model(model, path: Path, profile: dict[str, tuple], min_layers: int, min_plan_bytes: int) -> None:
    """A plugin's one-node ONNX model (fusion_export/plugin_ops/onnx_forms.py) saved to `path`: with no plugin
    registered, TensorRT-RTX's parser inlines the local function (more than `min_layers` layers) and the builder
    builds it under `profile` ({input: (min, opt, max)}); the static check reads the node through its function for every
    target."""
    import onnx

    from engines.tensorrt.flavours import load_trt
    from fusion_export.trt_rules.operator_check import check_graphs
    from fusion_export.trt_rules.targets import TrtTarget

    onnx.save(model, path)
    builder, network, errors = load_trt("tensorrt-rtx").parse(path)
    assert errors == [] and network.num_layers > min_layers
    for target in TrtTarget:
        report = check_graphs({path.stem: path}, target)
        assert report.ok and any("local-function decomposition" in f.message for f in report.findings)
    plan = build_plan(builder, network, profile)
    assert plan is not None and plan.nbytes > min_plan_bytes


def build_plan(builder, network, profile: dict[str, tuple]):
    """The serialized engine of a parsed network under one optimization profile ({input: (min, opt, max)}), or
    None when the builder refuses it."""
    config = builder.create_builder_config()
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization_profile)
    return builder.build_serialized_network(network, config)


def run_main(*args: str) -> CliResult:
    """The CLI's `main` in this process (no interpreter start-up): for the many bad-input cases. Subprocess
    runs (`test_cli_golden.run_cli`) cover what needs a real process (signals, exit codes from the shell)."""
    from fusion_export_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The demo's model: the oracle's decoder shape with a 4-layer tower (quick to export and build)."""
    from fusion_export_cli.commands.demo import DEMO_SEED, demo_config
    from reference_model.synthetic import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("demo") / "tiny-demo", demo_config(), seed=DEMO_SEED)


# Every export flavour and precision that exists, as (TensorRT target, precision, max_context).
FLAVOURS = [("trt-10.3", "fp32", None), ("trt-10.3", "fp16", None), ("trt-10.15", "fp32", 1024),
            ("trt-10.15", "fp16", 1024)]  # fmt: skip


@pytest.fixture(scope="session")
def export_demo(demo_checkpoint, tmp_path_factory):
    """Export the demo model once per (target, precision, max_context, plugins) per test session; the plugin form
    through the CLI, so that `--plugins on` is what its tests read."""
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.precision import Precision
    from fusion_export.trt_rules.targets import TrtTarget

    cache: dict[tuple, Path] = {}

    def get(target: str, precision: str = "fp32", max_context: int | None = None, plugins: bool = False) -> Path:
        key = (target, precision, max_context, plugins)
        if key not in cache and plugins:
            out = tmp_path_factory.mktemp("demo-artifacts") / f"demo-{target}-{precision}-{max_context}-plugins"
            capacity = ["--max-context", str(max_context)] if max_context else []
            result = run_main("export", "--model", str(demo_checkpoint), "--out", str(out), "--query-len", "16",
                              "--trt-target", target, "--dtype", precision, *capacity, "--plugins", "on",
                              "--quiet")  # fmt: skip
            assert result.returncode == 0, result.stderr
            cache[key] = out
        if key not in cache:
            out = tmp_path_factory.mktemp("demo-artifacts") / f"demo-{target}-{precision}-{max_context}"
            options = ExportOptions(
                query_len=16, precision=Precision(precision), trt_target=TrtTarget(target), max_context=max_context
            )
            cache[key] = export_artifact(demo_checkpoint, out, options, verbose=False).folder
        return cache[key]

    return get


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under `root` as rel path -> sha256 of its bytes (files), 'link -> target' (symlinks, never
    followed) or 'dir'/'other': compared before and after a hostile command, it shows anything it wrote or
    changed outside its own output."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[rel] = "dir"
            elif path.is_file():
                state[rel] = sha256(path)
            else:
                state[rel] = "other"
    return state


def changed_entries(before: dict[str, str], after: dict[str, str], allowed: tuple[str, ...] = ()) -> list[str]:
    """Entries added, removed or changed between two `tree_state`s, except those under an `allowed` prefix (the
    command's own output)."""

    def outside(rel: str) -> bool:
        return not any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allowed)

    return sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel) and outside(rel))


def scale_initializer(folder: Path, name: str, factor: float) -> None:
    """A real fault planted in an artifact: one float initializer of the decoder graphs multiplied by `factor`
    where it is stored (inline in both graphs, or once in the shared data file), then every file hash and the
    manifest digest resealed, so only the numbers are wrong."""
    import json

    import numpy as np
    import onnx

    from fusion_export.manifest import file_entries, save_manifest

    step = onnx.load(folder / "decoder_step.onnx", load_external_data=False)
    target = next(t for t in step.graph.initializer if t.name == name)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(target.data_type)
    info = {e.key: e.value for e in target.external_data}
    if info:
        data = folder / info["location"]
        raw = bytearray(data.read_bytes())
        offset, length = int(info.get("offset", 0)), int(info["length"])
        raw[offset : offset + length] = (
            (np.frombuffer(raw[offset : offset + length], dtype) * factor).astype(dtype).tobytes()
        )
        data.write_bytes(bytes(raw))
    else:
        for graph in ("decoder_prefill", "decoder_step"):
            model = onnx.load(folder / f"{graph}.onnx", load_external_data=False)
            t = next(t for t in model.graph.initializer if t.name == name)
            t.raw_data = (np.frombuffer(t.raw_data, dtype) * factor).astype(dtype).tobytes()
            onnx.save(model, folder / f"{graph}.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder)
    save_manifest(folder, manifest)
