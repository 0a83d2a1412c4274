"""A hostile user's files and flags (issue 23): deeply nested JSON, FIFOs where files are expected, decompression
bombs, shard indexes that lie, configs of absurd sizes and out-of-range numbers. Each must end in one clear
message naming the file, tensor, field or flag, with exit status 2: never a traceback, a hang or a silently wrong
result, and nothing written outside the command's own output (checked with `tree_state`).

Commands run in this process (`run_main`); a test that plants a FIFO runs its command under `fifo_watchdog`, which
opens the FIFO's other end if the command is still blocked after a while, so a regression fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference_model.checkpoint import INDEX_FILE, SINGLE_FILE

from .conftest import DEMO_IMAGE, changed_entries, run_main, tree_state

DEEP = "[" * 100_000  # ends Python's JSON parser in a RecursionError unless the reader bounds the nesting
WATCHDOG_S = 60  # far longer than any of these commands takes to refuse a FIFO (about a second)


# The watchdog is another process: a reader blocked in safetensors' (Rust) `open` holds the GIL, so a thread of
# this process could never run to unblock it.
_WATCHDOG = """
import os, sys, time
time.sleep(float(sys.argv[2]))
while True:
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits
    except OSError:
        time.sleep(0.1)
        continue
    os.close(fd)  # the blocked reader sees an empty file
    print("unblocked", flush=True)
    time.sleep(0.1)
"""


@contextlib.contextmanager
def fifo_watchdog(fifo: Path, seconds: float = WATCHDOG_S):
    """Yields a list that gets an entry if the command was still blocked on `fifo` after `seconds`: the watchdog
    then opens and closes the FIFO's writing end (the blocked reader sees an empty file) so the test can fail."""
    unblocked: list[Path] = []
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(fifo), str(seconds)], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    try:
        yield unblocked
    finally:
        watchdog.kill()
        if "unblocked" in watchdog.communicate()[0]:
            unblocked.append(fifo)


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A writable copy of the tiny random checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def sharded(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint split into two shards with an index, as Hugging Face saves large models."""
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(SINGLE_FILE))
    tensors = load_file(tiny_checkpoint / SINGLE_FILE)
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: tensors[k] for k in names}, folder / name, metadata={"format": "pt"})
    weight_map = {key: name for name, names in halves.items() for key in names}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def torch_threads():
    """bench sets torch's thread count in this process: put it back for the tests after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def generate(model: Path, *extra: str, image: Path = DEMO_IMAGE):
    return run_main("generate", "--model", str(model), "--image", str(image), "--question", "What is this?",
                    "--max-new-tokens", "2", "--quiet", *extra)  # fmt: skip


def refused(result, *names: str) -> None:
    """Exit 2 with one message that names every one of `names`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb, 8-bit greyscale)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1))  # one row of the claimed many: the file stays ~100 bytes
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------- deep JSON


@pytest.mark.parametrize("name", ["config.json", "vision_config.json", INDEX_FILE])
def test_deeply_nested_checkpoint_json(ckpt, tmp_path, name):
    (ckpt / name).write_text(DEEP)
    before = tree_state(tmp_path)
    result = generate(ckpt)
    refused(result, str(ckpt / name), "nested deeper than 64 levels")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_deeply_nested_and_listed_bench_reports(tmp_path):
    (tmp_path / "deep.json").write_text(DEEP)
    (tmp_path / "list.json").write_text(json.dumps([{"format": "fusion-export-bench"}]))
    before = tree_state(tmp_path)
    deep = run_main("bench", "compare", str(tmp_path / "deep.json"), str(tmp_path / "deep.json"))
    refused(deep, f"{tmp_path / 'deep.json'}: not a readable benchmark report", "nested deeper")
    listed = run_main("bench", "compare", str(tmp_path / "list.json"), str(tmp_path / "list.json"))
    refused(listed, f"{tmp_path / 'list.json'}: not a fusion-export benchmark report (a JSON list")
    assert changed_entries(before, tree_state(tmp_path)) == []


def _report(**result_changes) -> dict:
    result = {"label": "reference", "stages_s": {"ttft": {"median": 0.5}}, "tokens_per_s": 10.0,
              "roofline_fraction": 0.5, **result_changes}  # fmt: skip
    return {"format": "fusion-export-bench", "machine": {"cpu": "x", "gpu": None}, "results": [result]}


@pytest.mark.parametrize(
    "report,message",
    [
        ({"format": "fusion-export-bench"}, "machine must be an object"),
        ({**_report(), "results": []}, "results must be a non-empty list"),
        ({**_report(), "results": [[1, 2]]}, "results[0] must be an object"),
        (_report(stages_s={"ttft": {"median": 0}}), "results[0].stages_s.ttft.median must be a finite number > 0"),
        (_report(stages_s=[]), "results[0].stages_s.ttft must be an object"),
        (_report(tokens_per_s="fast"), "results[0].tokens_per_s must be a finite number > 0, got 'fast'"),
        (_report(roofline_fraction=[1]), "results[0].roofline_fraction must be null or a finite number"),
        (_report(label=7), "results[0].label must be text"),
        ({**_report(), "machine": {"cpu": ["a"], "gpu": None}}, "machine.cpu must be text or null"),
    ],
)
def test_malformed_bench_report(tmp_path, report, message):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    before = tree_state(tmp_path)
    refused(run_main("bench", "compare", str(path), str(path)), f"{path}: not a valid benchmark report", message)
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_valid_bench_report_still_compares(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report()))
    result = run_main("bench", "compare", str(path), str(path))
    assert result.returncode == 0 and "1.00x" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "command,flag,kind",
    [
        (["check-trt", "missing.onnx"], "--json", "TensorRT check report"),
        (["bench", "--model", "missing"], "--out", "benchmark report"),
    ],
)
def test_existing_output_with_deep_json_is_probed_safely(tmp_path, command, flag, kind):
    existing = tmp_path / "existing.json"
    existing.write_text(DEEP)
    before = tree_state(tmp_path)
    result = run_main(*command, flag, str(existing))
    refused(result, f"{flag} {existing} exists and is not a {kind}")
    assert changed_entries(before, tree_state(tmp_path)) == []


# ---------------------------------------------------------------------------------------------- FIFOs


def test_fifo_image_is_refused_without_blocking(tiny_checkpoint, tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    before = tree_state(tmp_path)
    with fifo_watchdog(fifo) as unblocked:
        result = generate(tiny_checkpoint, image=fifo)
    assert not unblocked, "generate blocked on a FIFO given as --image"
    refused(result, f"{fifo}: not a regular file")
    assert changed_entries(before, tree_state(tmp_path)) == []


@pytest.mark.parametrize(
    "name", ["config.json", "vision_config.json", SINGLE_FILE, "tokenizer.json", "tokenizer_config.json"]
)
def test_fifo_in_checkpoint_is_refused_without_blocking(ckpt, tmp_path, name):
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    before = tree_state(tmp_path)
    with fifo_watchdog(ckpt / name) as unblocked:
        result = generate(ckpt)
    assert not unblocked, f"generate blocked on a FIFO as the checkpoint's {name}"
    refused(result, f"{ckpt / name}: not a regular file")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_fifo_shard_is_refused_without_blocking(sharded, tmp_path):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    before = tree_state(tmp_path)
    with fifo_watchdog(shard) as unblocked:
        result = generate(sharded)
    assert not unblocked, "generate blocked on a FIFO shard"
    refused(result, f"{shard}: not a regular file")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_fifo_golden_inputs_are_refused_without_blocking(oracle_dir, tmp_path):
    fifo, out = tmp_path / "inputs.safetensors", tmp_path / "golden.safetensors"
    os.mkfifo(fifo)
    before = tree_state(tmp_path)
    with fifo_watchdog(fifo) as unblocked:
        result = run_main("golden", "--model", str(oracle_dir), "--inputs", str(fifo), "--out", str(out))
    assert not unblocked, "golden blocked on a FIFO given as --inputs"
    refused(result, f"{fifo}: not a regular file")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_fifo_bench_report_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    with fifo_watchdog(fifo) as unblocked:
        result = run_main("bench", "compare", str(fifo), str(fifo))
    assert not unblocked, "bench compare blocked on a FIFO report"
    refused(result, f"{fifo}: not a readable benchmark report", "not a regular file")


def test_fifo_as_existing_output_is_refused_without_blocking(oracle_dir, tmp_path):
    fifo = tmp_path / "golden.safetensors"
    os.mkfifo(fifo)
    with fifo_watchdog(fifo) as unblocked:
        result = run_main("golden", "--model", str(oracle_dir), "--inputs", str(oracle_dir / "inputs.safetensors"),
                          "--out", str(fifo))  # fmt: skip
    assert not unblocked, "golden blocked probing a FIFO as its --out"
    refused(result, f"--out {fifo} exists and is not a regular file")


# ---------------------------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize(
    "content,message",
    [
        (struct.pack("<Q", 200 << 20) + b"{}", "header too large"),  # over safetensors' own 100 MB header bound
        (struct.pack("<Q", 4) + b"{{{{", "invalid JSON in header"),
        (b"\x01", "header too small"),
    ],
    ids=["oversized-header", "corrupt-header", "truncated"],
)
def test_corrupt_safetensors_headers_are_named(ckpt, oracle_dir, tmp_path, content, message):
    (ckpt / SINGLE_FILE).write_bytes(content)
    inputs = tmp_path / "inputs.safetensors"
    inputs.write_bytes(content)
    before = tree_state(tmp_path)
    refused(generate(ckpt), f"{ckpt / SINGLE_FILE}: not a readable safetensors file", message)
    result = run_main("golden", "--model", str(oracle_dir), "--inputs", str(inputs),
                      "--out", str(tmp_path / "golden.safetensors"))  # fmt: skip
    refused(result, f"{inputs}: not a readable safetensors file", message)
    assert changed_entries(before, tree_state(tmp_path)) == []


# ---------------------------------------------------------------------------------------------- shard indexes


def test_index_pointing_a_key_at_the_wrong_shard(sharded, tmp_path):
    index = json.loads((sharded / INDEX_FILE).read_text())
    key = next(k for k, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"  # a shard that does not hold it
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    before = tree_state(tmp_path)
    result = generate(sharded)
    refused(result, str(sharded / INDEX_FILE), "shards that do not hold these tensors", key)
    assert changed_entries(before, tree_state(tmp_path)) == []


@pytest.mark.parametrize(
    "shard,message",
    [
        ("/etc/passwd", "'/etc/passwd' leaves the folder"),
        ("../outside.safetensors", "'../outside.safetensors' leaves the folder"),
        ("sub/../../outside.safetensors", "'sub/../../outside.safetensors' leaves the folder"),
        (7, "7 is not a relative POSIX file name"),
        ("", "'' is not a relative POSIX file name"),
    ],
)
def test_index_naming_a_file_outside_the_checkpoint(sharded, tmp_path, shard, message):
    shutil.copy(sharded / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((sharded / INDEX_FILE).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    before = tree_state(tmp_path)
    refused(generate(sharded), str(sharded / INDEX_FILE), f"weight_map entry {key!r}", message)
    assert changed_entries(before, tree_state(tmp_path)) == []


@pytest.mark.parametrize("index,message", [([1, 2], "expected a JSON object"), ({"weight_map": []}, "'weight_map'")])
def test_index_of_the_wrong_shape(sharded, tmp_path, index, message):
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    before = tree_state(tmp_path)
    refused(generate(sharded), str(sharded / INDEX_FILE), message)
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_hugging_face_cache_layout_still_loads(sharded, tmp_path):
    """A cache snapshot's files are links into ../../blobs/: links leaving the folder are the user's own layout."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for entry in sharded.iterdir():
        shutil.move(entry, blobs / entry.name)
        (snapshot / entry.name).symlink_to(Path("../../blobs") / entry.name)
    result = generate(snapshot)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------- config sizes


LONG_FACTORS = {"type": "longrope", "short_factor": [1.0] * 10**6, "long_factor": []}


@pytest.mark.parametrize(
    "file,changes,message",
    [
        ("config.json", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, over the limit of 1024"),
        ("config.json", {"num_hidden_layers": 1e9}, "num_hidden_layers must be an integer >= 1, got 1000000000.0"),
        ("config.json", {"num_hidden_layers": -6}, "num_hidden_layers must be an integer >= 1, got -6"),
        ("config.json", {"num_hidden_layers": True}, "num_hidden_layers must be an integer >= 1, got True"),
        ("config.json", {"hidden_size": 2**20}, "hidden_size is 1048576, over the limit of 65536"),
        ("config.json", {"intermediate_size": 10**8}, "intermediate_size is 100000000, over the limit of 262144"),
        ("config.json", {"vocab_size": 10**9}, "vocab_size is 1000000000, over the limit of 4194304"),
        ("config.json", {"num_attention_heads": 4096}, "num_attention_heads is 4096, over the limit of 1024"),
        ("config.json", {"num_key_value_heads": 10**6}, "num_key_value_heads is 1000000, over the limit of 1024"),
        ("config.json", {"max_position_embeddings": 10**12}, "max_position_embeddings is 1000000000000, over"),
        ("config.json", {"num_of_vision_sampler_layers": 10**6}, "num_of_vision_sampler_layers is 1000000, over"),
        ("config.json", {"stride_of_vision_sampler_layers": 10**9}, "stride_of_vision_sampler_layers is 1000000000"),
        ("config.json", {"window_size": 10**6}, "window_size is 1000000, over the limit of 1024"),
        ("config.json", {"tokenizer_model_max_length": 10**30}, "tokenizer_model_max_length is 1" + "0" * 30),
        ("config.json", {"eos_token_id": 10**12}, "eos_token_id is 1000000000000, over the limit of 4194303"),
        ("config.json", {"query_len": "4," * 10_000}, "query_len lists more than 64 lengths"),
        ("config.json", {"query_len": str(10**9)}, "query_len 1000000000 is over the limit"),
        ("config.json", {"rope_scaling": LONG_FACTORS}, "short_factor has 1000000 entries, expected head_dim/2"),
        ("vision_config.json", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, over the limit"),
        ("vision_config.json", {"hidden_size": 10**7}, "hidden_size is 10000000, over the limit of 65536"),
        ("vision_config.json", {"image_size": 10**6}, "image_size is 1000000, over the limit of 2048"),
        ("vision_config.json", {"num_channels": 10**5}, "num_channels is 100000, over the limit of 64"),
        ("vision_config.json", {"intermediate_size": -1}, "intermediate_size must be an integer >= 1, got -1"),
    ],
)
def test_config_sizes_are_bounded(ckpt, tmp_path, file, changes, message):
    edit_json(ckpt / file, **changes)
    before = tree_state(tmp_path)
    # --query-len 5 (not a square) is refused right after the config is read: should the bound ever go, the test
    # fails on the message instead of building a billion layers
    result = generate(ckpt, "--query-len", "5")
    refused(result, str(ckpt / file), message)
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_largest_real_shapes_pass_the_bounds():
    """The bounds sit far above the largest real models: Llama-3.1-405B's decoder, Gemma 3's vocabulary, Llama 4
    Scout's context and a SigLIP2-giant-sized tower are all accepted."""
    from reference_model.config import config_from_dicts, preset_config

    config, vision = preset_config("fusion-phi3.5-3b").to_json_dicts()
    config.update(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=262144, max_position_embeddings=10_485_760,
                  rope_scaling={"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64},
                  mm_hidden_size=1536)  # fmt: skip
    vision.update(hidden_size=1536, intermediate_size=6144, num_hidden_layers=41, num_attention_heads=16,
                  image_size=512, patch_size=16)  # fmt: skip
    parsed = config_from_dicts(config, vision)
    assert parsed.decoder.num_layers == 126 and parsed.vision.num_layers == 40


# ---------------------------------------------------------------------------------------------- images


def test_decompression_bomb_image_is_refused_from_its_header(tiny_checkpoint, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    before = tree_state(tmp_path)
    result = generate(tiny_checkpoint, image=bomb)
    refused(result, f"{bomb}: 20000x20000 = 400,000,000 pixels, over the limit of 64,000,000", "--max-image-pixels")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_calibration_bomb_is_refused_from_its_header(tmp_path):
    from engines.quantization.calibration_set import CalibrationError, load_calibration_set

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(DEMO_IMAGE, calib / "a.png")
    bomb = bomb_png(calib / "b.png")
    before = tree_state(tmp_path)
    with pytest.raises(CalibrationError) as error:
        load_calibration_set(calib, 2)
    message = str(error.value)
    assert f"{bomb}: 20000x20000 = 400,000,000 pixels, over the limit of 64,000,000" in message
    assert "--max-image-pixels" in message
    with pytest.raises(CalibrationError, match="over the limit of 1,000"):  # the limit is the caller's
        load_calibration_set(calib, 1, max_pixels=1000)
    assert load_calibration_set(calib, 1).images == (calib / "a.png",)
    assert changed_entries(before, tree_state(tmp_path)) == []


@pytest.mark.parametrize("name", ["b.png", "questions.txt"])
def test_calibration_fifo_is_refused_without_blocking(tmp_path, name):
    from engines.quantization.calibration_set import load_calibration_set
    from reference_model.errors import FusionError

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(DEMO_IMAGE, calib / "a.png")
    fifo = calib / name
    os.mkfifo(fifo)
    with fifo_watchdog(fifo) as unblocked, pytest.raises(FusionError) as error:  # the CLI's exit-2 errors
        load_calibration_set(calib, 2 if name == "b.png" else 1)
    assert not unblocked, f"calibration blocked on a FIFO named {name}"
    assert f"{fifo}: not a regular file" in str(error.value)


# ---------------------------------------------------------------------------------------------- numeric flags

GENERATE = ["generate", "--model", "M", "--image", "I", "--question", "Q"]
GOLDEN = ["golden", "--model", "M", "--inputs", "I", "--out", "O"]
EXPORT = ["export", "--model", "M", "--out", "O"]
VALIDATE = ["validate", "A", "--model", "M"]
TOO_MANY = str(10**9)


FLAG_CASES = [
    (["bench"], "--batch", "0", "expected a positive integer"),
    (["bench"], "--batch", "100000", "expected a positive integer of at most 1,024"),
    (["bench"], "--prompt-len", "-1", "expected a positive integer"),
    (["bench"], "--prompt-len", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (["bench"], "--new-tokens", "0", "expected a positive integer"),
    (["bench"], "--new-tokens", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (["bench"], "--query-len", "-4", "expected a positive integer"),
    (["bench"], "--threads", "0", "expected a positive integer"),
    (["bench"], "--threads", "100000", "expected a positive integer of at most 1,024"),
    (["bench"], "--warmup", "-1", "expected an integer in 0..10,000, got -1"),
    (["bench"], "--warmup", "one", "expected an integer >= 0, got 'one'"),
    (["bench"], "--warmup", TOO_MANY, "expected an integer in 0..10,000"),
    (["bench"], "--iters", "0", "expected a positive integer"),
    (["bench"], "--iters", TOO_MANY, "expected a positive integer of at most 10,000"),
    (["bench"], "--sweep", "512,-1", "expected a positive integer, got -1"),
    (["bench"], "--sweep", "512,abc", "expected a positive integer, got 'abc'"),
    (["bench"], "--sweep", "512,,1024", "expected up to 64 comma-separated positive integers"),
    (["bench"], "--sweep", "1," * 100, "expected up to 64"),
    (["demo"], "--max-new-tokens", "0", "expected a positive integer"),
    (["demo"], "--max-new-tokens", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (EXPORT, "--opset", "-1", "expected a positive integer"),
    (EXPORT, "--max-context", "0", "expected a positive integer"),
    (EXPORT, "--query-len", "0", "expected a positive integer"),
    (GENERATE, "--max-new-tokens", "-1", "expected a positive integer"),
    (GENERATE, "--max-new-tokens", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (GENERATE, "--temperature", "nan", "expected a finite number >= 0"),
    (GENERATE, "--temperature", "-inf", "expected a finite number >= 0"),
    (GENERATE, "--top-p", "0", "expected a number in (0, 1]"),
    (GENERATE, "--top-p", "nan", "expected a number in (0, 1]"),
    (GENERATE, "--seed", "-1", "expected an integer in 0..2^63-1"),
    (GENERATE, "--query-len", "-16", "expected a positive integer"),
    (GENERATE, "--max-image-pixels", "0", "expected a positive integer"),
    (GOLDEN, "--max-new-tokens", "0", "expected a positive integer"),
    (GOLDEN, "--max-new-tokens", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (GOLDEN, "--query-len", "0", "expected a positive integer"),
    (VALIDATE, "--max-new-tokens", "0", "expected a positive integer"),
    (VALIDATE, "--max-new-tokens", TOO_MANY, "expected a positive integer of at most 16,777,216"),
    (VALIDATE, "--max-image-pixels", "-1", "expected a positive integer"),
]


@pytest.mark.parametrize(
    "command,flag,value,message", FLAG_CASES, ids=[f"{c[0]} {f}={v[:12]}" for c, f, v, _ in FLAG_CASES]
)
def test_numeric_flags_are_range_checked(tmp_path, command, flag, value, message):
    before = tree_state(tmp_path)
    result = run_main(*command, f"{flag}={value}")
    refused(result, f"argument {flag}: {message}")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_bench_warmup_minus_one_as_typed(tmp_path):
    """The sweep's case verbatim: `bench --warmup -1` (a separate negative number, not `--warmup=-1`)."""
    before = tree_state(tmp_path)
    refused(run_main("bench", "--warmup", "-1"), "argument --warmup: expected an integer in 0..10,000, got -1")
    assert changed_entries(before, tree_state(tmp_path)) == []


def test_bench_lengths_are_checked_against_the_model(tiny_checkpoint, tmp_path, torch_threads):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--quiet"]
    before = tree_state(tmp_path)
    result = run_main("bench", "--model", str(tiny_checkpoint), "--new-tokens", "200000", *cache)
    refused(result, "--prompt-len 1040 + --new-tokens 200000 exceed the model's 131072 positions")
    result = run_main("bench", "--model", str(tiny_checkpoint), "--prompt-len", "100000", "--new-tokens", "2", *cache)
    refused(result, "--prompt-len 100000: longer than any prompt this model reads")
    assert changed_entries(before, tree_state(tmp_path)) == []
