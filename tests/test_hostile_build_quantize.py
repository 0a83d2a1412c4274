"""`build`, `quantize` and `validate --atol` under hostile input (issue 23): every refusal exits 2 with the flag,
file or field named, before any work, and nothing outside the command's own output changes. Cheap on purpose:
dry runs, refusals before work, monkeypatched disk-full writes; one real (TensorRT-RTX) build, for the race."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from PIL import Image

from .conftest import changed_entries, run_main, tree_state


@pytest.fixture
def art(export_demo, tmp_path) -> Path:
    """A private copy of the shared demo export: a command that failed to refuse could otherwise damage it."""
    return Path(shutil.copytree(export_demo("trt-10.3"), tmp_path / "art"))


def _refused(result, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# --- item 1: the dry run makes every check the build makes, and prints the targets ---------------------------


def test_dry_run_refuses_what_the_build_refuses(art, tmp_path):
    (tmp_path / "taken").mkdir()
    before = tree_state(tmp_path)
    cases = [
        (["--out", str(art / "eng")], ["--out", "is an artifact folder"]),
        (["--out", str(tmp_path / "taken")], ["--out", "already exists"]),
        (["--compute-capability", "SM90"], ["--compute-capability SM90", "tensorrt-rtx offers SM75"]),
        (["--trt", "tensorrt", "--compute-capability", "SM86"], ["--compute-capability SM86", "tensorrt offers none"]),
        (["--trt", "tensorrt-rtx", "--timing-cache", str(tmp_path / "t.cache")], ["--timing-cache", "tensorrt-rtx"]),
        (["--device-memory", "0.5"], ["--device-memory", "even the shortest context does not fit"]),
        (["--max-batch", "5000"], ["--max-batch 5000: must be in 1..1024"]),
    ]
    for flags, words in cases:
        _refused(run_main("build", str(art), "--dry-run", *flags), *words)
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_dry_run_command_lines_carry_the_targets(art, tmp_path):
    before = tree_state(tmp_path)
    result = run_main("build", str(art), "--dry-run", "--compute-capability", "sm86,SM120", "--max-context", "1024")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  tensorrt_rtx ")]
    assert len(lines) == 1 and all(line.endswith(" --computeCapabilities=86,120") for line in lines)
    assert "# decoder: decoder_prefill.onnx + decoder_step.onnx merged in memory" in result.stdout
    assert "trtexec" not in result.stdout  # enterprise TensorRT takes no targets: its lines would build something else
    result = run_main("build", str(art), "--dry-run", "--trt", "tensorrt", "--timing-cache", str(tmp_path / "t.cache"))
    assert result.returncode == 0, result.stderr  # no TensorRT needed: the flavour's flags come from a static table
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in result.stdout and "tensorrt_rtx " not in result.stdout
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_dry_run_table_is_what_tensorrt_rtx_reports():
    from engines.tensorrt.flavours import Trt, TrtFlavour, load_trt
    from engines.tensorrt.plan import COMPUTE_CAPABILITIES, HAS_TIMING_CACHE

    rtx = load_trt("tensorrt-rtx")
    assert list(COMPUTE_CAPABILITIES["tensorrt-rtx"]) == rtx.compute_capabilities()
    assert HAS_TIMING_CACHE["tensorrt-rtx"] is rtx.has_timing_cache is False
    assert set(COMPUTE_CAPABILITIES) == set(HAS_TIMING_CACHE) == {f.value for f in TrtFlavour}
    enterprise = Trt(TrtFlavour.tensorrt, module=type("NoComputeCapability", (), {}))  # no ComputeCapability enum
    assert list(COMPUTE_CAPABILITIES["tensorrt"]) == enterprise.compute_capabilities() == []
    assert HAS_TIMING_CACHE["tensorrt"] is enterprise.has_timing_cache is True


# --- item 2: validate --atol ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-0.5", "1e400"])
def test_validate_refuses_a_meaningless_atol(art, tmp_path, value):
    before = tree_state(tmp_path)
    result = run_main("validate", str(art), "--model", str(tmp_path / "no-model"), "--atol", value)
    _refused(result, "--atol")
    assert changed_entries(before, tree_state(tmp_path)) == []


# --- item 3: quantize --exclude / --float-inputs ---------------------------------------------------------------


def test_quantize_refuses_patterns_that_match_nothing(art, tmp_path):
    before = tree_state(tmp_path)
    out = tmp_path / "q"
    result = run_main("quantize", str(art), "--out", str(out), "--weight-only", "--exclude", "lm_head")
    _refused(result, "--exclude 'lm_head': matches none of the", "model.lm_head.weight.T")
    result = run_main("quantize", str(art), "--out", str(out), "--float-inputs", "*down-proj*")
    _refused(result, "--float-inputs '*down-proj*': matches none", "down_proj.weight.T")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_exclude_adds_to_the_lm_head_default():
    from engines.quantization.qdq import DEFAULT_EXCLUDE
    from fusion_export_cli.commands.quantize import patterns

    assert patterns(None, DEFAULT_EXCLUDE) == ("*lm_head*",)
    assert patterns(["model.layers.0.*"], DEFAULT_EXCLUDE) == ("*lm_head*", "model.layers.0.*")
    assert patterns(["none"], DEFAULT_EXCLUDE) == ()
    assert patterns(["none", "model.layers.0.*", "model.layers.0.*"], DEFAULT_EXCLUDE) == ("model.layers.0.*",)


def _fake_quantize(seen: dict):
    """quantize_artifact stood in for: records its options, reports what a real run would print, writes nothing."""
    from engines.quantization.quantize import QuantizeResult

    class Report:
        def table(self) -> str:
            return "TensorRT compatibility: (not run)"

    def fake(artifact, out_dir, options, verbose=True):
        seen["options"] = options
        return QuantizeResult(Path(out_dir), {"decoder_step": ["a"]}, ["model.lm_head.weight.T"], None, Report())

    return fake


def test_quantize_says_what_it_keeps_in_float(art, tmp_path, monkeypatch):
    import engines.quantization.quantize as quantize

    seen: dict = {}
    monkeypatch.setattr(quantize, "quantize_artifact", _fake_quantize(seen))
    result = run_main("quantize", str(art), "--out", str(tmp_path / "q"), "--weight-only", "--exclude",
                      "model.layers.0.*")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert seen["options"].exclude == ("*lm_head*", "model.layers.0.*")  # the LM head stays float
    assert "kept in float (--exclude *lm_head* (default), model.layers.0.*)" in result.stdout
    result = run_main("quantize", str(art), "--out", str(tmp_path / "q"), "--weight-only", "--exclude", "none")
    assert result.returncode == 0 and seen["options"].exclude == ()


# --- quantize: flags that would do nothing, numeric ranges (items 7 and 8) ----------------------------------


def test_quantize_refuses_idle_flags_and_out_of_range_numbers(art, tmp_path):
    before = tree_state(tmp_path)
    out = str(tmp_path / "q")
    cases = [
        (["--weight-only", "--num-samples", "3"], ["--num-samples: --weight-only runs no calibration"]),
        (["--weight-only", "--calib", str(tmp_path)], ["--calib: --weight-only runs no calibration"]),
        (["--weight-only", "--float-inputs", "*q_proj*"], ["--float-inputs: with --weight-only"]),
        (["--method", "max", "--percentile", "99"], ["--percentile is for --method percentile"]),
        (["--kv-cache", "int8", "--linear", "float", "--exclude", "*q_proj*"], ["--exclude applies to the linear"]),
        (["--percentile", "nan"], ["--percentile nan"]),
        (["--decode-steps", "100000"], ["--decode-steps 100000: must be in 1..256"]),
        (["--threads", "100000"], ["--threads", "at most 1,024"]),
        (["--num-samples", "0"], ["--num-samples"]),
        (["--max-image-pixels", "-5"], ["--max-image-pixels"]),
    ]
    for flags, words in cases:
        _refused(run_main("quantize", str(art), "--out", out, *flags), *words)
    assert changed_entries(before, tree_state(tmp_path)) == []


# --- item 6: quantize --max-image-pixels ----------------------------------------------------------------------


def test_quantize_max_image_pixels_reaches_the_calibration(art, tmp_path, monkeypatch):
    import engines.quantization.quantize as quantize
    from reference_model.errors import FusionError

    calib = tmp_path / "calib"
    calib.mkdir()
    Image.new("RGB", (64, 48), "gray").save(calib / "a.png")
    before = tree_state(tmp_path)
    result = run_main("quantize", str(art), "--out", str(tmp_path / "q"), "--calib", str(calib), "--num-samples", "1",
                      "--max-image-pixels", "1000")  # fmt: skip
    _refused(result, str(calib / "a.png"), "64x48", "--max-image-pixels")  # up front, not mid-calibration
    assert changed_entries(before, tree_state(tmp_path)) == []

    seen = {}

    def fake_calibrate(*args, **kwargs):
        seen.update(kwargs)
        raise FusionError("calibration stops here")  # the staging folder must go too

    monkeypatch.setattr(quantize, "calibrate", fake_calibrate)
    result = run_main("quantize", str(art), "--out", str(tmp_path / "q"), "--calib", str(calib), "--num-samples", "1",
                      "--max-image-pixels", "3072", "--quiet")  # fmt: skip
    _refused(result, "calibration stops here")  # the 64x48 image passed the up-front check at 3072 pixels
    assert seen["max_image_pixels"] == 3072
    assert changed_entries(before, tree_state(tmp_path)) == []


# --- item 4: two commands racing on one --out -----------------------------------------------------------------


def test_staging_folder_never_replaces_what_another_process_created(tmp_path):
    from reference_model.errors import FusionError
    from reference_model.staging import OutputExistsError, staging_folder

    for theirs in ("empty", "full"):
        out = tmp_path / theirs
        with pytest.raises(OutputExistsError, match="another process created it while this command ran") as error:
            with staging_folder(out) as tmp:
                (tmp / "ours").write_text("ours")
                out.mkdir()  # the other process wins the race
                if theirs == "full":
                    (out / "theirs").write_text("theirs")
        assert isinstance(error.value, FusionError) and "result was discarded" in str(error.value)
        assert sorted(p.name for p in out.iterdir()) == ([] if theirs == "empty" else ["theirs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no staging folder left
    with pytest.raises(OutputExistsError, match="already exists; nothing was written"):
        with staging_folder(tmp_path / "full"):
            pass


def test_build_racing_another_build_on_one_out(art, tmp_path, monkeypatch):
    """The one real build here: another process creates --out while this one builds; the result is discarded
    with a message that says so, and the other's folder is left as it was."""
    import engines.tensorrt.build as build

    out = tmp_path / "eng"
    real_save = build.save_manifest

    def save_then_lose_the_race(folder, manifest, name):
        real_save(folder, manifest, name)
        out.mkdir()
        (out / "engines.json").write_text("{}")  # the other build's folder

    monkeypatch.setattr(build, "save_manifest", save_then_lose_the_race)
    before = tree_state(tmp_path)
    result = run_main("build", str(art), "--out", str(out), "--max-context", "1024", "--quiet")
    _refused(result, f"{out}: another process created it while this command ran", "result was discarded")
    assert "Directory not empty" not in result.stderr
    assert changed_entries(before, tree_state(tmp_path), allowed=("eng",)) == []
    assert [p.name for p in out.iterdir()] == ["engines.json"]


# --- item 5: a disk that fills up -----------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail with `code` once `room` bytes are written (a short write first)."""

    def __init__(self, path, mode, code=errno.ENOSPC, room=4096):
        self.file, self.code, self.room = open(path, mode), code, room  # noqa: SIM115 (closed by __exit__)

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(self.code, "No space left on device" if self.code == errno.ENOSPC else "Disk quota exceeded")
        n = self.file.write(bytes(data)[: self.room])
        self.room -= n
        return n

    def flush(self) -> None:
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _SwallowingBuilder:
    """Streams a plan the way TensorRT-RTX 1.7.1 does: an exception raised in the writer is caught and logged, a
    short write ignored, and the build still returns True (measured with the real builder)."""

    def build_serialized_network_to_stream(self, network, config, writer) -> bool:
        for _ in range(4):
            try:
                writer.write(b"\0" * 8192)
            except Exception:  # noqa: S110 (what the bindings do)
                pass
        return True


def test_write_plan_raises_a_full_disk(tmp_path, monkeypatch):
    import engines.tensorrt.flavours as trt_api

    monkeypatch.setattr(trt_api, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as error:
        trt_api.load_trt("tensorrt-rtx").write_plan(_SwallowingBuilder(), None, None, tmp_path / "x.engine")
    assert error.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_build_on_a_full_disk_names_the_engine_folder(art, tmp_path, monkeypatch, code):
    import engines.tensorrt.build as build
    import engines.tensorrt.flavours as trt_api

    def build_graph(trt, onnx_path, graph, options, progress, timing_cache, engine_path, *args):
        trt.write_plan(_SwallowingBuilder(), None, None, engine_path)  # where the engine's bytes are written
        raise AssertionError("a full disk went unnoticed")

    monkeypatch.setattr(trt_api, "open", lambda path, mode: _FullDisk(path, mode, code), raising=False)
    monkeypatch.setattr(build, "build_graph", build_graph)
    out = tmp_path / "eng"
    before = tree_state(tmp_path)
    result = run_main("build", str(art), "--out", str(out), "--max-context", "1024", "--quiet")
    reason = "the disk is full" if code == errno.ENOSPC else "the disk quota is exceeded"
    _refused(result, f"{out}: {reason}", "free there now", "0.0 MB written")
    assert ".partial" not in result.stderr and "truncated" not in result.stderr
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_staging_and_atomic_writes_name_the_final_path_on_a_full_disk(tmp_path):
    from fusion_export.output_files import write_atomically
    from reference_model.staging import DiskFullError, staging_folder

    def fill(path: Path) -> None:
        path.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(DiskFullError, match=r"report\.json: the disk is full .* free there now") as error:
        write_atomically(tmp_path / "report.json", fill)
    assert ".partial" not in str(error.value)

    def wrapped(path: Path) -> None:  # a library that wraps the OSError in its own error
        try:
            fill(path)
        except OSError as e:
            raise RuntimeError("could not save") from e

    with pytest.raises(DiskFullError, match="golden.safetensors: the disk is full"):
        write_atomically(tmp_path / "golden.safetensors", wrapped)
    with pytest.raises(DiskFullError, match=r"folder: the disk is full .*\(0\.0 MB written\)") as error:
        with staging_folder(tmp_path / "folder") as tmp:
            fill(tmp / "weights.bin")
    assert ".partial" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # temp file and staging folder removed


# --- item 7: flags the chosen TensorRT would ignore, the timing-cache location ---------------------------------


def test_build_refuses_flags_the_flavour_ignores_before_any_work(tmp_path):
    before = tree_state(tmp_path)
    missing = str(tmp_path / "no-artifact")  # refused on the flag, before the artifact is even read
    result = run_main("build", missing, "--out", str(tmp_path / "eng"), "--timing-cache", str(tmp_path / "t.cache"))
    _refused(result, "--timing-cache", "tensorrt-rtx 1.", "keeps no timing cache")
    result = run_main("build", missing, "--out", str(tmp_path / "eng"), "--compute-capability", "SM90")
    _refused(result, "--compute-capability SM90: tensorrt-rtx 1.")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_timing_cache_location_is_checked_up_front(art, tmp_path, monkeypatch):
    import fusion_export.output_files as output_files

    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_mkstemp = output_files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # a read-only mount, whoever runs the test (root writes anywhere)
        if Path(dir) == readonly:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(output_files.tempfile, "mkstemp", mkstemp)
    before = tree_state(tmp_path)
    cases = [
        (tmp_path / "file" / "t.cache", "is a file, not a folder"),
        (tmp_path / "folder", "not a regular file"),
        (readonly / "t.cache", f"{readonly}: cannot create files in this folder (Read-only file system)"),
        (art / "manifest.json", "is an artifact folder"),
        (tmp_path / "eng" / "t.cache", "inside --out"),
    ]
    for cache, message in cases:
        result = run_main("build", str(art), "--dry-run", "--trt", "tensorrt", "--out", str(tmp_path / "eng"),
                          "--timing-cache", str(cache))  # fmt: skip
        _refused(result, "--timing-cache", message)
    assert changed_entries(before, tree_state(tmp_path)) == []


# --- item 8: build's numbers ----------------------------------------------------------------------------------


def test_build_range_checks_every_number(art, tmp_path):
    before = tree_state(tmp_path)
    cases = [
        (["--max-batch", "0"], "--max-batch"),
        (["--max-batch", "99999"], "--max-batch 99999"),
        (["--opt-batch", "2"], "--opt-batch 2"),
        (["--max-prompt", "-3"], "--max-prompt"),
        (["--max-prompt", "10"], "--max-prompt 10"),
        (["--max-question-tokens", "100000"], "--max-question-tokens 100000"),
        (["--max-step-tokens", "300"], "--max-step-tokens 300"),
        (["--max-context", "99999999"], "--max-context 99999999"),
        (["--opt-level", "9"], "--opt-level"),
        (["--device-memory", "nan"], "--device-memory 'nan'"),
        (["--device-memory", "-8"], "--device-memory '-8'"),
        (["--device-memory", "inf"], "--device-memory 'inf'"),
        (["--compute-capability", "SM86,,SM89"], "--compute-capability"),
        (["--compute-capability", "SM86,sm86"], "SM86 given more than once"),
    ]
    for flags, message in cases:
        for mode in (["--dry-run"], ["--out", str(tmp_path / "eng")]):
            _refused(run_main("build", str(art), *mode, *flags), message)
    assert changed_entries(before, tree_state(tmp_path)) == []
