"""The containment rule (fusion_export/containment.py) as a hostile user meets it.

Artifacts and engine folders travel, and anyone can edit a manifest and reseal its digests. Each test here plants
real files, real symlinks and resealed manifests, runs the command a user would run, and checks its exit status,
that the message names the path at fault, and that no file of the test's folder changed outside the command's own
output (every file hashed before and after). The sweep runs every command that reads a folder against a
traversal, an absolute path and an outward symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from engines.tensorrt.flavours import TrtFlavour, installed_flavours
from fusion_export.manifest import MANIFEST, file_entries, open_artifact, save_manifest

from .conftest import DEMO_IMAGE, changed_entries, run_main, tree_state

ENGINES = "engines.json"
HAS_RTX = TrtFlavour.tensorrt_rtx in installed_flavours()
QUESTION = ["--image", str(DEMO_IMAGE), "--question", "What is this?", "--max-new-tokens", "1", "--quiet"]


@pytest.fixture(scope="module")
def demo_artifact(export_demo) -> Path:
    return export_demo("trt-10.3")


@pytest.fixture(scope="module")
def demo_engines(demo_artifact, tmp_path_factory) -> Path:
    if not HAS_RTX:
        pytest.skip("needs TensorRT-RTX to build an engine folder")
    out = tmp_path_factory.mktemp("containment-engines") / "eng"
    result = run_main("build", str(demo_artifact), "--out", str(out), "--trt", "tensorrt-rtx", "--max-context",
                      "1024", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def _digest(path: Path) -> dict:
    data = path.read_bytes()  # follows links, as a forger's sha256sum would
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def reseal(folder: Path, manifest_name: str, change: Callable[[dict], None] = lambda m: None) -> None:
    """Edit the manifest as a deliberate forger: change it, then recompute every listed file's size and sha256
    (through links, wherever they point) and the manifest's own digest."""
    path = folder / manifest_name
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["files"] = {name: _digest(Path(name) if name.startswith("/") else folder / name)
                         for name in manifest["files"]}  # fmt: skip
    save_manifest(folder, manifest, manifest_name)


def rename_listed(manifest: dict, old: str, new: str) -> None:
    """Point every field naming `old` at `new` (the files table, embeddings, graphs, engines)."""
    manifest["files"] = {(new if k == old else k): v for k, v in manifest["files"].items()}
    sections = [manifest.get("embeddings", {}), *manifest.get("graphs", {}).values(),
                *manifest.get("engines", {}).values()]  # fmt: skip
    for section in sections:
        for key in ("file", "weights"):
            if section.get(key) == old:
                section[key] = new


# --- the three plants of the sweep: (folder, manifest name, a folder outside it) -> the path the message names


def plant_traversal(folder: Path, manifest_name: str, outside: Path) -> str:
    """The embedding table moved next to the folder and named `../outside/...`."""
    name = f"../{outside.name}/embed_tokens.safetensors"
    shutil.move(folder / "embed_tokens.safetensors", outside / "embed_tokens.safetensors")
    reseal(folder, manifest_name, lambda m: rename_listed(m, "embed_tokens.safetensors", name))
    return name


def plant_absolute(folder: Path, manifest_name: str, outside: Path) -> str:
    """The config named by an absolute path outside the folder."""
    target = outside / "config.json"
    shutil.move(folder / "model" / "config.json", target)
    reseal(folder, manifest_name, lambda m: rename_listed(m, "model/config.json", str(target)))
    return str(target)


def plant_outward_link(folder: Path, manifest_name: str, outside: Path) -> str:
    """A listed file replaced by a link to a file outside the folder (same bytes: only the link is wrong)."""
    inside = folder / "model" / "tokenizer_config.json"
    shutil.move(inside, outside / "tokenizer_config.json")
    inside.symlink_to(outside / "tokenizer_config.json")
    reseal(folder, manifest_name)
    return "model/tokenizer_config.json"


PLANTS = {"traversal": plant_traversal, "absolute": plant_absolute, "outward-link": plant_outward_link}

# one short round, no reference: the folder check comes first, before any of it runs
BENCH = ["--no-reference", "--iters", "1", "--warmup", "0", "--new-tokens", "2", "--prompt-len", "300", "--quiet"]
ARTIFACT_COMMANDS = {
    "generate": lambda f, ckpt, out: ["generate", "--artifacts", str(f), *QUESTION],
    "validate": lambda f, ckpt, out: ["validate", str(f), "--model", str(ckpt), "--max-new-tokens", "1"],
    "build --dry-run": lambda f, ckpt, out: ["build", str(f), "--out", str(out), "--dry-run"],
    "build": lambda f, ckpt, out: ["build", str(f), "--out", str(out), "--trt", "tensorrt-rtx", "--quiet"],
    "quantize": lambda f, ckpt, out: ["quantize", str(f), "--out", str(out), "--weight-only", "--quiet"],
    "check-trt": lambda f, ckpt, out: ["check-trt", str(f)],
    "bench": lambda f, ckpt, out: ["bench", "--artifacts", str(f), *BENCH],
}
ENGINE_COMMANDS = {
    "generate": lambda f, ckpt, out: ["generate", "--engines", str(f), *QUESTION],
    "validate": lambda f, ckpt, out: ["validate", str(f), "--model", str(ckpt), "--max-new-tokens", "1"],
    "bench": lambda f, ckpt, out: ["bench", "--engines", str(f), *BENCH],
}


def run_hostile(tmp_path: Path, args: list[str], out: Path) -> tuple:
    """Run a command with the whole test folder hashed before and after: (result, entries changed outside out)."""
    before = tree_state(tmp_path)
    result = run_main(*args)
    after = tree_state(tmp_path)
    return result, changed_entries(before, after, allowed=(out.relative_to(tmp_path).as_posix(),))


def _stage(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = shutil.copytree(source, tmp_path / "shipped", symlinks=True)
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "private.txt").write_text("the user's own file\n")
    return folder, outside


def sweep(source: Path, manifest_name: str, command: list[str], plant: str, checkpoint: Path, tmp_path: Path) -> None:
    """Plant in a copy of `source`, run the command on it: exit 2 naming the planted path, nothing changed."""
    folder, outside = _stage(source, tmp_path)
    named = PLANTS[plant](folder, manifest_name, outside)
    out = tmp_path / "out"
    result, changed = run_hostile(tmp_path, command(folder, checkpoint, out), out)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert named in result.stderr and "Traceback" not in result.stderr
    assert changed == [] and not out.exists()


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("command", ARTIFACT_COMMANDS)
def test_sweep_artifact_readers(demo_artifact, demo_checkpoint, tmp_path, command, plant):
    if command == "build" and not HAS_RTX:
        pytest.skip("needs TensorRT-RTX")
    sweep(demo_artifact, MANIFEST, ARTIFACT_COMMANDS[command], plant, demo_checkpoint, tmp_path)


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_sweep_engine_folder_readers(demo_engines, demo_checkpoint, tmp_path, command, plant):
    sweep(demo_engines, ENGINES, ENGINE_COMMANDS[command], plant, demo_checkpoint, tmp_path)


def test_untouched_copies_still_open(demo_artifact, tmp_path):
    """The control for the sweep: the same copy, unplanted and resealed the same way, opens (so each refusal
    above is the plant's doing, not the copy's or the reseal's)."""
    folder, _ = _stage(demo_artifact, tmp_path)
    reseal(folder, MANIFEST)
    open_artifact(folder)
    result = run_main("build", str(folder), "--out", str(tmp_path / "plan"), "--dry-run")
    assert result.returncode == 0, result.stderr


def test_untouched_engine_copies_still_open(demo_engines, tmp_path):
    from engines.tensorrt.engine_manifest import open_engines

    engines = shutil.copytree(demo_engines, tmp_path / "eng", symlinks=True)
    reseal(engines, ENGINES)
    open_engines(engines)


def test_quantize_cannot_overwrite_a_file_outside_its_output(demo_artifact, tmp_path):
    """The reported attack: the embedding table named `../victim_dir/embed_tokens.safetensors`, digests resealed;
    quantize copied it to `<staging>/../victim_dir/...`, over the user's file. Now refused when the artifact opens."""
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "embed_tokens.safetensors").write_bytes((art / "embed_tokens.safetensors").read_bytes())
    (art / "embed_tokens.safetensors").unlink()
    reseal(
        art, MANIFEST, lambda m: rename_listed(m, "embed_tokens.safetensors", "../victim_dir/embed_tokens.safetensors")
    )
    (victim / "embed_tokens.safetensors").write_bytes(b"the user's own data")  # what quantize would overwrite
    out = tmp_path / "q"
    for args in (["quantize", str(art), "--out", str(out), "--weight-only", "--quiet"], ["generate", "--artifacts",
                 str(art), *QUESTION]):  # fmt: skip
        result, changed = run_hostile(tmp_path, args, out)
        assert result.returncode == 2 and "'../victim_dir/embed_tokens.safetensors' leaves the folder" in result.stderr
        assert changed == [] and (victim / "embed_tokens.safetensors").read_bytes() == b"the user's own data"


@pytest.mark.parametrize("name", ["../../../etc/hostname", "/etc/hostname", "model/../../x", "a\\..\\b", "./x"])
def test_manifest_paths_outside_the_folder(demo_artifact, tmp_path, name):
    """Listed names that leave the folder, or are not plain relative paths, are refused before anything is read:
    the file they name is never hashed or opened."""
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    save_manifest(art, manifest)
    result, changed = run_hostile(tmp_path, ["check-trt", str(art)], tmp_path / "none")
    assert result.returncode == 2 and repr(name) in result.stderr and changed == []


def test_graph_pointing_into_another_artifact(demo_artifact, tmp_path):
    """A graph path aimed at another artifact's graph ran that graph; now it names a path outside the folder."""
    other = shutil.copytree(demo_artifact, tmp_path / "other")
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    (art / "decoder_step.onnx").unlink()
    reseal(art, MANIFEST, lambda m: rename_listed(m, "decoder_step.onnx", "../other/decoder_step.onnx"))
    assert (other / "decoder_step.onnx").is_file()
    result, changed = run_hostile(tmp_path, ["generate", "--artifacts", str(art), *QUESTION], tmp_path / "none")
    assert result.returncode == 2 and "'../other/decoder_step.onnx' leaves the folder" in result.stderr
    assert changed == []


def test_graph_weights_outside_the_folder(demo_artifact, tmp_path):
    """A graph whose external-data location points outside its folder (ONNX would read those bytes as weights)."""
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(art / "vision_encoder.onnx.data", outside / "vision_encoder.onnx.data")
    graph = onnx.load(art / "vision_encoder.onnx", load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere/vision_encoder.onnx.data"
    onnx.save(graph, art / "vision_encoder.onnx")

    def drop(manifest: dict) -> None:
        del manifest["files"]["vision_encoder.onnx.data"]
        manifest["graphs"]["vision_encoder"].pop("weights", None)

    reseal(art, MANIFEST, drop)
    result, changed = run_hostile(tmp_path, ["generate", "--artifacts", str(art), *QUESTION], tmp_path / "none")
    assert result.returncode == 2, result.stderr
    assert "'../elsewhere/vision_encoder.onnx.data' leaves the folder" in result.stderr and changed == []


def test_unlisted_files_and_links_are_refused_by_name(demo_artifact, tmp_path):
    """An unlisted link to a system file was copied by build and quantize into the new folder and sealed; an
    unlisted file, a linked folder or a FIFO is now refused by name, and nothing is copied."""
    cases = {
        "model/leak.txt": lambda p: p.symlink_to("/etc/passwd"),
        "model/notes.txt": lambda p: p.write_text("not listed\n"),
        "model/tree": lambda p: p.symlink_to("/usr/share", target_is_directory=True),
        "model/pipe": lambda p: os.mkfifo(p),
    }
    for rel, plant in cases.items():
        case = tmp_path / rel.replace("/", "-")
        case.mkdir()
        art = shutil.copytree(demo_artifact, case / "art")
        plant(art / rel)
        out = case / "q"
        for args in (["quantize", str(art), "--out", str(out), "--weight-only", "--quiet"],
                     ["build", str(art), "--out", str(out), "--dry-run"]):  # fmt: skip
            result, changed = run_hostile(case, args, out)
            assert result.returncode == 2 and rel in result.stderr, (rel, result.stderr)
            assert changed == [] and not out.exists()


def test_inner_links_are_copied_as_data(demo_artifact, tmp_path):
    """A link that stays inside the folder is fine to read, and a copy of the folder holds a file, not a link."""
    if not HAS_RTX:
        pytest.skip("needs TensorRT-RTX")
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    (art / "model" / "config.json").rename(art / "config-copy.json")
    (art / "model" / "config.json").symlink_to("../config-copy.json")
    reseal(art, MANIFEST, lambda m: m["files"].update({"config-copy.json": {}}))
    open_artifact(art)
    result = run_main("build", str(art), "--out", str(tmp_path / "eng"), "--trt", "tensorrt-rtx", "--quiet")
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "eng" / "model" / "config.json"
    assert copied.is_file() and not copied.is_symlink()
    assert not any(p.is_symlink() for p in (tmp_path / "eng").rglob("*"))


def hf_cache_snapshot(checkpoint: Path, cache: Path) -> Path:
    """The checkpoint laid out as a Hugging Face cache: every file of the snapshot a relative link into blobs/."""
    blobs, snapshot = cache / "blobs", cache / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    for source in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / source.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_hugging_face_cache_snapshot_exports_as_data(demo_checkpoint, tmp_path):
    """Checkpoint folders are the user's own: a cache snapshot whose files are links into blobs/ loads, and the
    artifact made from it holds plain files."""
    snapshot = hf_cache_snapshot(demo_checkpoint, tmp_path / "hub" / "models--fusion--demo")
    assert all(p.is_symlink() for p in snapshot.rglob("*") if not p.is_dir())
    result = run_main("generate", "--model", str(snapshot), *QUESTION)
    assert result.returncode == 0, result.stderr
    art = tmp_path / "art"
    result = run_main("export", "--model", str(snapshot), "--out", str(art), "--query-len", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not any(p.is_symlink() for p in art.rglob("*"))
    assert set(file_entries(art)) == set(open_artifact(art).manifest["files"])


def test_calibration_folder_links_that_leave_it(demo_artifact, tmp_path):
    """`quantize --calib DIR` reads DIR's images and questions.txt only where they stay inside it."""
    from engines.quantization.calibration_set import load_calibration_set

    calib, outside = tmp_path / "calib", tmp_path / "photos"
    calib.mkdir()
    outside.mkdir()
    shutil.copy(DEMO_IMAGE, calib / "inside.png")
    assert load_calibration_set(calib, 1).images == (calib / "inside.png",)  # the control: a plain folder works
    shutil.copy(DEMO_IMAGE, outside / "photo.png")
    (calib / "photo.png").symlink_to(outside / "photo.png")
    (outside / "questions.txt").write_text("What is this?\n")
    out = tmp_path / "q"
    args = ["quantize", str(demo_artifact), "--out", str(out), "--calib", str(calib), "--num-samples", "2", "--quiet"]
    result, changed = run_hostile(tmp_path, args, out)
    assert result.returncode == 2 and "'photo.png' is a link that leaves" in result.stderr, result.stderr
    assert changed == [] and not out.exists()
    (calib / "photo.png").unlink()
    (calib / "questions.txt").symlink_to(outside / "questions.txt")
    result, changed = run_hostile(tmp_path, [*args[:-2], "1", "--quiet"], out)
    assert result.returncode == 2 and "'questions.txt' is a link that leaves" in result.stderr, result.stderr
    assert changed == [] and not out.exists()


def test_tokenizer_config_cannot_name_a_file_elsewhere(demo_artifact, tmp_path, monkeypatch):
    """transformers lets tokenizer_config.json's `tokenizer_file` override the folder's own file and opens it as
    given: an absolute path read a vocabulary from anywhere, a relative one from the working directory."""
    from reference_model.prompt import load_tokenizer

    art = shutil.copytree(demo_artifact, tmp_path / "art")
    config_path = art / "model" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    stranger = tmp_path / "elsewhere" / "tokenizer.json"
    stranger.parent.mkdir()
    stranger.write_text((art / "model" / "tokenizer.json").read_text().replace("<vision_start>", "<other>"))
    config_path.write_text(json.dumps({**config, "tokenizer_file": str(stranger)}))
    reseal(art, MANIFEST)
    result, changed = run_hostile(tmp_path, ["generate", "--artifacts", str(art), *QUESTION], tmp_path / "none")
    assert result.returncode == 2 and f"tokenizer_file: {str(stranger)!r} leaves the folder" in result.stderr
    assert changed == []
    # a relative entry means the folder's own file, not the working directory's
    config_path.write_text(json.dumps({**config, "tokenizer_file": "tokenizer.json"}))
    shutil.copy(stranger, tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    assert "<vision_start>" in load_tokenizer(art / "model").get_vocab()


def test_link_loops_are_refused_by_name(demo_artifact, tmp_path):
    """Two links naming each other made Path.resolve raise RuntimeError (a traceback); listed or not, they are
    now refused by name."""
    for listed in (False, True):
        case = tmp_path / f"listed-{listed}"
        art = shutil.copytree(demo_artifact, case / "art")
        (art / "model" / "a").symlink_to("b")
        (art / "model" / "b").symlink_to("a")
        if listed:
            manifest = json.loads((art / MANIFEST).read_text())
            manifest["files"]["model/a"] = {"bytes": 0, "sha256": "0" * 64}
            save_manifest(art, manifest)
        result, changed = run_hostile(case, ["check-trt", str(art)], case / "none")
        assert result.returncode == 2 and "model/a" in result.stderr and "Traceback" not in result.stderr
        assert changed == []


def test_quantize_refuses_one_name_for_two_files(demo_artifact, tmp_path):
    """Quantize writes the input's weights names: one that is also another file's name would be overwritten by
    the copy and sealed with the first file's hash; it is refused before anything is written."""
    art = shutil.copytree(demo_artifact, tmp_path / "art")
    reseal(art, MANIFEST, lambda m: m["graphs"]["vision_encoder"].update(weights="embed_tokens.safetensors"))
    out = tmp_path / "q"
    result, changed = run_hostile(tmp_path, ["quantize", str(art), "--out", str(out), "--weight-only", "--quiet"], out)
    assert result.returncode == 2 and "embed_tokens.safetensors named for more than one file" in result.stderr
    assert changed == [] and not out.exists()


def test_external_sparse_indices_are_checked():
    """A sparse initializer keeps values and indices as two tensors: both are walked for external data."""
    from fusion_export.manifest import external_data_files

    values = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0])
    indices = onnx.helper.make_tensor("i", onnx.TensorProto.INT64, [1], [0])
    indices.data_location = onnx.TensorProto.EXTERNAL
    indices.external_data.add(key="location", value="../elsewhere.bin")
    graph = onnx.helper.make_graph([], "g", [], [], sparse_initializer=[onnx.helper.make_sparse_tensor(values, indices,
                                   [4])])  # fmt: skip
    assert external_data_files(onnx.helper.make_model(graph)) == {"../elsewhere.bin"}
