"""NVIDIA ModelOpt's ONNX INT4 AWQ against ours, on the same exported decoder (issue 25): a tool run by hand.

ModelOpt (`nvidia-modelopt[onnx]`) pins onnx, onnxruntime-gpu and cupy versions of its own, so it lives in a
separate virtual environment and this repo never depends on it: nothing imports this module, its top level
imports only numpy and onnx, and each step imports what it needs when it runs. Four steps, two environments:

  # 1. this repo's venv: real requests through the fp32 artifact (ONNX Runtime, graphs as exported): the
  #    prefill feeds of the calibration requests `quantize` uses, and held-out requests decoded greedily
  python -m benchmarks.modelopt_awq feeds ART --out FEEDS
  # 2. ModelOpt's venv: its INT4 on a copy of decoder_prefill, calibrated on FEEDS; decoder_step gets the same
  #    tensors (ModelOpt quantizes one graph at a time; the artifact's two graphs share every weight)
  python -m benchmarks.modelopt_awq modelopt ART FEEDS --out MO --method awq_lite
  # 3. either venv: prefill-logits cosine and top-1 agreement of each candidate against the float graphs,
  #    teacher-forced with the float graphs' greedy tokens
  python -m benchmarks.modelopt_awq compare ART FEEDS --candidate ours=ART_Q --candidate modelopt=MO
  # 4. this repo's venv: the form each candidate writes, ONNX Runtime's fusion and our session's rewrites,
  #    TensorRT-RTX's parser and builder (no GPU needed)
  python -m benchmarks.modelopt_awq check ART --candidate ours=ART_Q --candidate modelopt=MO

A candidate is a folder holding `decoder_prefill.onnx` and `decoder_step.onnx` (an artifact, or step 2's output).
Each step writes a JSON report (`--report`) besides what it prints. Run from the repo root: `-m` imports only
`engines/__init__` and `fusion_export/__init__` on the way, which import nothing else.

ModelOpt's venv, CPU only (the artifact must be exported for trt-10.15 or trt-11, as `quantize --precision int4`
requires; the onnxruntime-gpu 1.24 the [onnx] extra pins has no TensorScatter-24, which those exports use, so the
CPU wheel of the ONNX Runtime this repo uses replaces it; cupy installs but finds no CUDA and ModelOpt falls back
to numpy; `modelopt.torch` also needs `requests` and `huggingface_hub`, which its base install lacks):

  python3.11 -m venv /tmp/modelopt-venv
  /tmp/modelopt-venv/bin/pip install torch==2.13.0 "nvidia-modelopt[onnx]==0.47.0"
  /tmp/modelopt-venv/bin/pip uninstall -y onnxruntime-gpu && /tmp/modelopt-venv/bin/pip install onnxruntime==1.32.0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as fusion_export/__init__.py: nothing leaves the machine

PREFILL, STEP = "decoder_prefill", "decoder_step"
CACHE_PREFIX = "past_key_values."
LINEAR_SUFFIX = ".weight.T"  # the exporter's linear weights (quantize's rule); other MatMul constants stay float
LM_HEAD = "lm_head"
CALIBRATION, EVALUATION, FEEDS_JSON = "calibration", "evaluation", "feeds.json"
MODELOPT_METHODS = ("awq_lite", "awq_clip", "awq_full", "rtn_dq")


def _fail(message: str) -> None:
    print(f"modelopt_awq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _write_json(path: Path | None, report: dict) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        staged = path.with_name(f".{path.name}.partial")
        staged.write_text(text + "\n")
        staged.replace(path)


def _graph_file(folder: Path, name: str) -> Path:
    path = folder / f"{name}.onnx"
    if not path.is_file():
        _fail(f"{folder}: no {path.name}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. feeds (this repo's venv)


def dump_feeds(art: Path, out: Path, num_samples: int, eval_requests: int, eval_tokens: int, threads: int) -> dict:
    """Calibration prefill feeds (the requests `quantize` calibrates on: the bundled set, first `num_samples`)
    and `eval_requests` held-out requests (the demo picture, then the bundled photos after the calibration ones)
    decoded greedily for `eval_tokens` tokens by the float graphs, every step's feeds kept."""
    from engines.onnxruntime.session import OrtModel
    from engines.quantization.calibration_set import load_calibration_set
    from fusion_export.bundled import DEMO_IMAGE, DEMO_QUESTION
    from fusion_export.manifest import open_artifact
    from reference_model.prompt import load_tokenizer

    if out.exists():
        _fail(f"--out {out}: already exists")
    artifact = open_artifact(art)
    tokenizer = load_tokenizer(artifact.model_dir)
    held_out = eval_requests - 1  # the demo picture is the first
    calibration = load_calibration_set(None, num_samples + held_out, tokenizer=tokenizer)
    samples = calibration.samples()
    requests = {CALIBRATION: samples[:num_samples], EVALUATION: [(DEMO_IMAGE, DEMO_QUESTION), *samples[num_samples:]]}
    # the graphs as exported (no fused rewrite), one shared copy of the weights: what ModelOpt and `compare` run
    model = OrtModel(artifact, threads=threads, weights="shared", attention="graph").load()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _record(staging, requests, model, artifact, tokenizer, eval_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    meta.update({"artifact": str(art.resolve()), "calibration_source": calibration.source, "num_samples": num_samples,
                 "decoder_prefill_bytes": artifact.manifest["files"][f"{PREFILL}.onnx"]["bytes"]})  # fmt: skip
    (staging / FEEDS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(out)
    return meta


def _record(staging: Path, requests: dict, model, artifact, tokenizer, eval_tokens: int) -> dict:
    """Run each request, writing `<role>/<i>.npz` under `staging`: the prefill's feeds, the KV capacity, and for
    evaluation requests every step's feeds (stacked) and the generated tokens."""
    from engines.onnxruntime.session import OrtSession
    from reference_model import make_request, prepare_batch
    from reference_model.generation import GenerationConfig, generate

    class Recording(OrtSession):
        """The ONNX Runtime session, keeping copies of what the decoder graphs were fed (KV buffers aside)."""

        def _run(self, session, inputs):  # the prefill (steps run through their own binding)
            self.prefill_feeds = {k: np.array(v, copy=True) for k, v in inputs.items()}
            return super()._run(session, inputs)

        def step(self, tokens):
            logits = super().step(tokens)
            self.step_feeds.append({k: v.copy() for k, v in self.feeds.arrays.items()})  # updated in place
            return logits

    def run(pairs: list, tokens: int) -> tuple[Recording, list[int]]:
        batch = prepare_batch([make_request(image, question, tokenizer, artifact.config) for image, question in pairs],
                              artifact.config, artifact.query_len)  # fmt: skip
        session = Recording(model, batch, tokens)
        session.step_feeds = []
        return session, generate(session, GenerationConfig(max_new_tokens=tokens)).token_ids[0]

    def save(role: str, i: int, arrays: dict, pair: tuple, positions: int, tokens: int) -> None:
        file = f"{role}/{i:03d}.npz"
        np.savez(staging / file, **arrays)
        listed[role].append({"file": file, "image": Path(pair[0]).name, "question": pair[1],
                             "prompt_positions": positions, "tokens": tokens})  # fmt: skip
        print(f"{role} {i}: {Path(pair[0]).name}, {positions} prompt positions", file=sys.stderr)

    started = time.perf_counter()
    listed: dict[str, list[dict]] = {CALIBRATION: [], EVALUATION: []}
    for role in listed:
        (staging / role).mkdir()
    # Calibration: one batch, so every request comes left-padded to the longest (as the runtime batches them):
    # ModelOpt concatenates each activation over the calibration feeds along the batch axis, so their shapes
    # must agree ("all the input array dimensions except for the concatenation axis must match exactly")
    session, _ = run(requests[CALIBRATION], 1)
    for i, pair in enumerate(requests[CALIBRATION]):
        arrays = {f"prefill/{k}": v[i : i + 1] for k, v in session.prefill_feeds.items()}
        arrays["capacity"] = np.int64(session.state.capacity)
        save(CALIBRATION, i, arrays, pair, int(session.prefill_feeds["attention_mask"][i].sum()), 1)
    for i, pair in enumerate(requests[EVALUATION]):
        session, generated = run([pair], eval_tokens)
        arrays = {f"prefill/{k}": v for k, v in session.prefill_feeds.items()}
        arrays["capacity"] = np.int64(session.state.capacity)
        for name in session.step_feeds[0] if session.step_feeds else ():
            arrays[f"step/{name}"] = np.stack([feeds[name] for feeds in session.step_feeds])
        arrays["tokens"] = np.asarray(generated, np.int64)
        save(EVALUATION, i, arrays, pair, int(session.prefill_feeds["attention_mask"].shape[1]), eval_tokens)
    return {"eval_tokens": eval_tokens, "requests": listed, "seconds": round(time.perf_counter() - started, 1)}


def _read_feeds(feeds: Path) -> dict:
    path = feeds / FEEDS_JSON
    if not path.is_file():
        _fail(f"{feeds}: no {FEEDS_JSON} (make it with the `feeds` step)")
    return json.loads(path.read_text())


def _load_npz(feeds: Path, entry: dict) -> dict[str, np.ndarray]:
    with np.load(feeds / entry["file"]) as data:
        return {k: data[k] for k in data.files}


def _cache_inputs(graph_inputs, capacity: int) -> dict[str, tuple[type, tuple[int, ...]]]:
    """(dtype, shape) of each KV buffer for a batch of one, as the graph declares them (`graph_inputs`: ONNX
    Runtime's NodeArg list), the capacity from the feeds where the graph leaves it symbolic."""
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
    out = {}
    for arg in graph_inputs:
        if arg.name.startswith(CACHE_PREFIX):
            batch, heads, length, dim = arg.shape
            length = length if isinstance(length, int) else capacity
            out[arg.name] = (dtypes[arg.type], (1, heads, length, dim))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. ModelOpt (its own venv)


def _excluded_matmuls(graph: onnx.GraphProto, lm_head: bool) -> list[str]:
    """MatMul nodes with a constant right operand that quantize's INT4 rule leaves alone: constants that are not
    linear weights (the RoPE rotation), and the LM head unless asked for. As anchored patterns: ModelOpt matches
    node names with re.match, and its own default (r"/lm_head") matches none of our node names."""
    constants = {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants:
            weight = node.input[1]
            if not weight.endswith(LINEAR_SUFFIX) or (LM_HEAD in weight and not lm_head):
                names.append(f"^{re.escape(node.name)}$")
    return names


def _calibration_reader(feeds: Path, meta: dict, graph_path: Path):
    """ModelOpt's data reader (an ONNX Runtime CalibrationDataReader): each calibration request's prefill feeds,
    with zeroed KV buffers (shared between requests: the prefill only writes its own copy)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

    inputs = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"]).get_inputs()
    zeros: dict[tuple, np.ndarray] = {}
    dicts = []
    for entry in meta["requests"][CALIBRATION]:
        data = _load_npz(feeds, entry)
        feed = {k.removeprefix("prefill/"): v for k, v in data.items() if k.startswith("prefill/")}
        for name, (dtype, shape) in _cache_inputs(inputs, int(data["capacity"])).items():
            feed[name] = zeros.setdefault((dtype, shape), np.zeros(shape, dtype))
        dicts.append(feed)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(dicts)

        def get_next(self):
            return next(self.pending, None)

    return Reader()


def _node_index(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, onnx.TensorProto]]:
    return {o: n for n in graph.node for o in n.output}, {t.name: t for t in graph.initializer}


def _modelopt_layers(float_graph: onnx.GraphProto, quantized: onnx.GraphProto) -> dict[str, dict]:
    """Per weight ModelOpt quantized in the prefill: its DequantizeLinear node with the node's constants, and the
    Mul by 1/s it put before the MatMul (awq_lite, awq_full), with its constant. Matched through the MatMul's node name,
    which ModelOpt keeps."""
    float_matmuls = {n.name: n for n in float_graph.node if n.op_type == "MatMul"}
    producers, constants = _node_index(quantized)
    layers = {}
    for node in quantized.node:
        original = float_matmuls.get(node.name) if node.op_type == "MatMul" else None
        dq = producers.get(node.input[1]) if original is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        pre = None
        if node.input[0] != original.input[0]:
            mul = producers.get(node.input[0])
            known = mul is not None and mul.op_type == "Mul" and mul.input[0] == original.input[0]
            if not known or mul.input[1] not in constants:
                _fail(f"{node.name}: ModelOpt changed the MatMul's input in a way this transplant does not know")
            pre = (mul, constants[mul.input[1]])
        layers[original.input[1]] = {"dq": dq, "dq_constants": [constants[i] for i in dq.input if i], "pre": pre}
    return layers


def transplant(float_prefill: onnx.ModelProto, quantized: onnx.ModelProto, step: onnx.ModelProto) -> dict:
    """Give `step` (loaded with its weights) the tensors ModelOpt wrote into the prefill: per quantized weight the
    same DequantizeLinear and constants, and the same Mul by 1/s before the MatMul. A constant ModelOpt changed in
    place (1/s folded into a parent; none of our parents qualify) is copied by name. Returns counts."""
    layers = _modelopt_layers(float_prefill.graph, quantized.graph)
    old = {t.name: t for t in float_prefill.graph.initializer}
    changed = {
        t.name: t
        for t in quantized.graph.initializer
        if t.name in old and not t.name.endswith(LINEAR_SUFFIX)
        and not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(old[t.name]))
    }  # fmt: skip
    graph = step.graph
    used: set[str] = set()
    nodes = []
    for node in graph.node:
        layer = layers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if layer is not None:
            weight = node.input[1]
            if weight not in used:  # one DequantizeLinear per weight, before its first MatMul
                dq = onnx.NodeProto()
                dq.CopyFrom(layer["dq"])
                nodes.append(dq)
                used.add(weight)
            node.input[1] = layer["dq"].output[0]
            if layer["pre"] is not None:
                mul = onnx.NodeProto()
                mul.CopyFrom(layer["pre"][0])
                mul.name, mul.output[0] = f"{node.name}/pre_quant_scale", f"{node.name}/pre_quant_scale_out"
                mul.input[0] = node.input[0]
                nodes.append(mul)
                node.input[0] = mul.output[0]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in used]
    added = {}
    for weight in used:
        layer = layers[weight]
        for t in layer["dq_constants"] + ([layer["pre"][1]] if layer["pre"] else []):
            added[t.name] = t
    for i, t in enumerate(keep):
        if t.name in changed:
            keep[i] = changed[t.name]
    del graph.initializer[:]
    graph.initializer.extend(keep + list(added.values()))
    for opset in step.opset_import:  # blockwise DequantizeLinear needs opset 21
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, quantized_opset(quantized))
    step.ir_version = max(step.ir_version, quantized.ir_version)
    return {"weights": len(used), "pre_quant_muls": sum(1 for w in used if layers[w]["pre"]), "folded": len(changed)}


def quantized_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_modelopt(
    art: Path, feeds: Path, out: Path, method: str, block_size: int, lm_head: bool, fast_path: bool
) -> dict:
    """ModelOpt's `modelopt.onnx.quantization.quantize(quantize_mode="int4")` on a copy of the prefill graph,
    calibrated on the calibration feeds with ONNX Runtime's CPU provider; the step graph gets the same tensors.
    `fast_path`: awq_lite/awq_full keep every layer's calibration input in memory from one pass
    (`enable_fast_path_using_high_sysram`) instead of running every calibration feed again for each layer (the
    default: ~30 s per layer on `small` here); the searches are the same."""
    import modelopt
    import modelopt.onnx.quantization as moq
    import onnxruntime as ort

    meta = _read_feeds(feeds)
    if out.exists():
        _fail(f"--out {out}: already exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    scratch = staging / "scratch"
    scratch.mkdir()
    # copies, not links: ModelOpt rewrites its input file in place (onnx.shape_inference.infer_shapes_path), and
    # onnx 1.21 refuses external data behind a hard link
    source = _graph_file(art, PREFILL)
    float_prefill = onnx.load(source, load_external_data=False)
    for name in {t.external_data[0].value for t in float_prefill.graph.initializer if t.external_data} | {source.name}:
        shutil.copyfile(art / name, scratch / name)
    reader = _calibration_reader(feeds, meta, source)
    exclude = _excluded_matmuls(float_prefill.graph, lm_head)
    ort.set_default_logger_severity(3)  # its sessions warn once per TensorScatter run that it copies the cache
    started = time.perf_counter()
    moq.quantize(
        str(scratch / source.name),
        quantize_mode="int4",
        calibration_method=method,
        calibration_data_reader=reader,
        calibration_eps=["cpu"],
        block_size=block_size,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        output_path=str(staging / source.name),
        log_level="WARNING",
        **({"enable_fast_path_using_high_sysram": True} if fast_path else {}),
    )
    quantize_s = time.perf_counter() - started
    started = time.perf_counter()
    quantized = onnx.load(staging / source.name)
    float_prefill = onnx.load(art / source.name)
    step = onnx.load(_graph_file(art, STEP))
    counts = transplant(float_prefill, quantized, step)
    onnx.save_model(step, staging / f"{STEP}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{STEP}.onnx_data", size_threshold=1024)  # fmt: skip
    onnx.checker.check_model(staging / f"{STEP}.onnx")
    transplant_s = time.perf_counter() - started
    shutil.rmtree(scratch)
    report = {
        "modelopt": modelopt.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "method": method,
        "block_size": block_size,
        "lm_head": "int4" if lm_head else "float",
        "calibration_requests": len(meta["requests"][CALIBRATION]),
        "excluded_nodes": len(exclude),
        "fast_path": fast_path,
        "quantize_s": round(quantize_s, 1),
        "transplant_s": round(transplant_s, 1),
        "step_graph": counts,
    }
    (staging / "modelopt.json").write_text(json.dumps(report, indent=2) + "\n")
    staging.rename(out)
    return report


# ---------------------------------------------------------------------------------------------------------------
# 3. compare (either venv)


class DecoderGraphs:
    """A candidate's prefill and step graphs on ONNX Runtime's CPU provider, the KV buffers bound in place."""

    def __init__(self, folder: Path, threads: int, accuracy_level: int):
        import onnxruntime as ort

        self.ort = ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # the level of the MatMulNBits ONNX Runtime fuses DQ + MatMul into: 1 = float32 activations (only the
        # weights' rounding is measured), 4 = its default, activations rounded to INT8 on the CPU
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        providers = ["CPUExecutionProvider"]
        self.prefill = ort.InferenceSession(str(_graph_file(folder, PREFILL)), opts, providers=providers)
        self.step = ort.InferenceSession(str(_graph_file(folder, STEP)), opts, providers=providers)
        self.cache_names = [i.name for i in self.prefill.get_inputs() if i.name.startswith(CACHE_PREFIX)]

    def _bind(self, session, feeds: dict[str, np.ndarray], cache: dict):
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for name, value in cache.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)  # in place
        return binding

    def run(self, request: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        """(prefill logits [V], step logits [T-1, V], median step seconds), the steps fed the recorded tokens."""
        shapes = _cache_inputs(self.prefill.get_inputs(), int(request["capacity"]))
        cache = {n: self.ort.OrtValue.ortvalue_from_numpy(np.zeros(s, d)) for n, (d, s) in shapes.items()}
        prefill = {k.removeprefix("prefill/"): v for k, v in request.items() if k.startswith("prefill/")}
        binding = self._bind(self.prefill, prefill, cache)
        self.prefill.run_with_iobinding(binding)
        first = binding.get_outputs()[0].numpy()[0].copy()
        names = [k for k in request if k.startswith("step/")]
        steps, seconds = [], []
        for t in range(request[names[0]].shape[0] if names else 0):
            feeds = {k.removeprefix("step/"): request[k][t] for k in names}
            binding = self._bind(self.step, feeds, cache)
            started = time.perf_counter()
            self.step.run_with_iobinding(binding)
            seconds.append(time.perf_counter() - started)
            steps.append(binding.get_outputs()[0].numpy()[0].copy())
        vocab = first.shape[-1]
        return first, np.array(steps).reshape(-1, vocab), float(np.median(seconds)) if seconds else 0.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(art: Path, feeds: Path, candidates: dict[str, Path], threads: int, accuracy_level: int) -> dict:
    """Every candidate against the float graphs on the held-out requests: prefill-logits cosine and max error
    over the float logits' max |value|, top-1 agreement with the float graphs' greedy tokens over every
    generated token (prefill and steps), the length of the agreeing run (where greedy decoding would part), and
    the steps' logits cosine."""
    meta = _read_feeds(feeds)
    requests = [_load_npz(feeds, e) for e in meta["requests"][EVALUATION]]
    runs = {"float": DecoderGraphs(art, threads, accuracy_level)}
    runs.update({name: DecoderGraphs(folder, threads, accuracy_level) for name, folder in candidates.items()})
    results: dict[str, dict] = {name: {"requests": []} for name in runs}
    for i, request in enumerate(requests):
        outputs = {name: graphs.run(request) for name, graphs in runs.items()}
        float_prefill, float_steps, _ = outputs["float"]
        reference = np.vstack([float_prefill[None], float_steps])
        for name, (prefill, steps, step_s) in outputs.items():
            logits = np.vstack([prefill[None], steps])
            agree = logits.argmax(-1) == request["tokens"][: len(logits)]
            step_cosines = [_cosine(a, b) for a, b in zip(steps, float_steps)]
            results[name]["requests"].append({
                "prefill_cosine": _cosine(prefill, float_prefill),
                "prefill_max_rel": float(np.abs(prefill - float_prefill).max() / np.abs(float_prefill).max()),
                "top1": float(agree.mean()),
                "agreeing_run": int(agree.argmin()) if not agree.all() else len(agree),
                "tokens": len(agree),
                "step_cosine_min": min(step_cosines) if step_cosines else None,
                "logits_cosine_mean": float(np.mean([_cosine(a, b) for a, b in zip(logits, reference)])),
                "median_step_ms": round(step_s * 1e3, 2),
            })  # fmt: skip
            r = results[name]["requests"][-1]
            print(f"request {i} {name}: prefill cosine {r['prefill_cosine']:.6f}, top-1 {r['top1']:.1%} over "
                  f"{r['tokens']} tokens, agreeing run {r['agreeing_run']}", file=sys.stderr)  # fmt: skip
    for result in results.values():
        rows = result["requests"]
        tokens = sum(r["tokens"] for r in rows)
        result["prefill_cosine_mean"] = float(np.mean([r["prefill_cosine"] for r in rows]))
        result["prefill_cosine_min"] = min(r["prefill_cosine"] for r in rows)
        result["top1"] = sum(r["top1"] * r["tokens"] for r in rows) / tokens
        result["agreeing_run_min"] = min(r["agreeing_run"] for r in rows)
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "accuracy_level": accuracy_level, "threads": threads,
            "feeds": str(feeds.resolve()), "candidates": {k: str(v.resolve()) for k, v in candidates.items()},
            "results": results}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 4. check (this repo's venv)


def describe_form(path: Path) -> dict:
    """What a quantized graph looks like: opset and IR, its DequantizeLinear nodes' attributes, value and scale
    types, zero points, name patterns, the extra Mul nodes, and the file holding its weights."""
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    producers, constants = _node_index(graph)
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    type_name = onnx.TensorProto.DataType.Name
    attributes, value_types, scale_types, zero_points, scale_ranks = set(), set(), set(), 0, set()
    for dq in dqs:
        attributes.add(tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in dq.attribute)))
        value_types.add(type_name(constants[dq.input[0]].data_type) if dq.input[0] in constants else "activation")
        if dq.input[1] in constants:
            scale_types.add(type_name(constants[dq.input[1]].data_type))
            scale_ranks.add(len(constants[dq.input[1]].dims))
        zero_points += len(dq.input) > 2 and bool(dq.input[2])
    # AWQ's 1/s where it was not folded: a Mul by a per-channel constant feeding a MatMul (the export has none)
    muls_before_matmul = sum(
        1 for n in graph.node if n.op_type == "MatMul" and (p := producers.get(n.input[0])) is not None
        and p.op_type == "Mul" and any(i in constants and len(constants[i].dims) in (1, 2) for i in p.input)
    )  # fmt: skip
    example = {"node": dqs[0].name, "inputs": list(dqs[0].input), "output": dqs[0].output[0]} if dqs else None
    return {
        "opset": quantized_opset(model),
        "ir_version": model.ir_version,
        "nodes": len(graph.node),
        "dequantize_nodes": len(dqs),
        "dequantize_attributes": [dict(a) for a in sorted(attributes)],
        "value_types": sorted(value_types),
        "scale_types": sorted(scale_types),
        "scale_ranks": sorted(scale_ranks),
        "zero_points": zero_points,
        "pre_quant_scale_muls": muls_before_matmul,
        "example": example,
        "data_files": sorted({t.external_data[0].value for t in graph.initializer if t.external_data}),
    }


def _ort_fusion(path: Path, accuracy_level: int) -> dict:
    """How ONNX Runtime (this venv's) optimizes the graph on CPU: the MatMulNBits it fuses, the DequantizeLinear
    left over."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        started = time.perf_counter()
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - started
        optimized = onnx.load(Path(scratch) / "optimized.onnx", load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    return {"session_s": round(seconds, 2), "MatMulNBits": ops.count("MatMulNBits"),
            "DequantizeLinear": ops.count("DequantizeLinear"), "MatMul": ops.count("MatMul")}  # fmt: skip


def check(art: Path, candidates: dict[str, Path], build: bool, accuracy_level: int) -> dict:
    from engines.onnxruntime.attention import fuse_attention
    from engines.tensorrt.build import BuildOptions, build_graph
    from engines.tensorrt.flavours import TrtFlavour, load_trt
    from engines.tensorrt.plan import BuildLimits, plan_build
    from fusion_export.manifest import open_artifact
    from fusion_export.progress import Progress
    from fusion_export.trt_rules.operator_check import check_graph
    from fusion_export.trt_rules.targets import TrtTarget

    artifact = open_artifact(art)
    d = artifact.config.decoder
    target = TrtTarget(artifact.manifest["export"]["trt_target"])
    trt = load_trt(TrtFlavour.tensorrt_rtx)
    plan = {g.name: g for g in plan_build(artifact, BuildLimits()).graphs}
    options = BuildOptions(flavour=TrtFlavour.tensorrt_rtx)
    report: dict = {"tensorrt": trt.describe(), "target": target.value, "candidates": {}}
    for name, folder in candidates.items():
        per_graph = {}
        for graph in (PREFILL, STEP):
            path = _graph_file(folder, graph)
            entry = {"form": describe_form(path), "onnxruntime": _ort_fusion(path, accuracy_level)}
            model, form = fuse_attention(path, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, False)
            entry["our_attention_rewrite"] = form if model is not None else f"not applied: {form}"
            findings, _ = check_graph(path, target)
            entry["static_check_errors"] = [f.message for f in findings if f.severity == "error"]
            started = time.perf_counter()
            _, _, errors = trt.parse(path)
            entry["trt_parse"] = {"ok": not errors, "errors": errors[:8], "s": round(time.perf_counter() - started, 1)}
            if build and not errors:
                with tempfile.TemporaryDirectory() as scratch:
                    try:
                        info, _ = build_graph(trt, path, plan[graph], options, Progress(1, enabled=False), None,
                                              Path(scratch) / f"{graph}.engine")  # fmt: skip
                        engine_bytes = (Path(scratch) / f"{graph}.engine").stat().st_size
                        entry["trt_build"] = {"ok": True, "s": info["build_s"], "engine_bytes": engine_bytes,
                                              "layers": info["layers"]}  # fmt: skip
                    except Exception as e:  # a failed build is a finding, reported with TensorRT's words
                        entry["trt_build"] = {"ok": False, "error": str(e)[:2000]}
            per_graph[graph] = entry
            print(f"{name} {graph}: parse {'ok' if not errors else 'REJECTED'}"
                  + (f", build {'ok' if entry['trt_build']['ok'] else 'FAILED'}" if "trt_build" in entry else ""),
                  file=sys.stderr)  # fmt: skip
        report["candidates"][name] = per_graph
    return report


# ---------------------------------------------------------------------------------------------------------------


def _candidates(values: list[str]) -> dict[str, Path]:
    out = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or not name or name in out or name == "float":
            _fail(f"--candidate {value!r}: give NAME=FOLDER, each name once ('float' is the reference)")
        out[name] = Path(folder)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.modelopt_awq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("feeds", help="calibration and evaluation feeds from the fp32 artifact (this repo's venv)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=16, help="calibration requests (quantize's default, 16)")
    p.add_argument("--eval-requests", type=int, default=3, help="the demo picture + held-out photos (3)")
    p.add_argument("--eval-tokens", type=int, default=256, help="greedy tokens per evaluation request (256)")
    p.add_argument("--threads", type=int, default=2)
    p = steps.add_parser("modelopt", help="ModelOpt's INT4 on the decoder graphs (ModelOpt's venv)")
    p.add_argument("artifact", type=Path)
    p.add_argument("feeds", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", choices=MODELOPT_METHODS, default="awq_lite")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lm-head", choices=["int4", "float"], default="float")
    p.add_argument("--fast-path", action="store_true", help="awq_lite/awq_full: one calibration pass, kept in memory")
    p = steps.add_parser("compare", help="accuracy of candidates against the float graphs (either venv)")
    p.add_argument("artifact", type=Path)
    p.add_argument("feeds", type=Path)
    p.add_argument("--candidate", action="append", metavar="NAME=FOLDER", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accuracy-level", type=int, choices=[1, 4], default=1, help="MatMulNBits' (1: fp32 inputs)")
    p = steps.add_parser("check", help="form, ONNX Runtime fusion, TensorRT-RTX parse and build (this repo's venv)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--candidate", action="append", metavar="NAME=FOLDER", required=True)
    p.add_argument("--no-build", action="store_true", help="parse only")
    p.add_argument("--accuracy-level", type=int, choices=[1, 4], default=1)
    for sub in steps.choices.values():
        sub.add_argument("--report", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.step == "feeds":
        if args.num_samples < 1 or args.eval_requests < 1 or args.eval_tokens < 2:
            _fail("--num-samples and --eval-requests must be >= 1, --eval-tokens >= 2")
        report = dump_feeds(args.artifact, args.out, args.num_samples, args.eval_requests, args.eval_tokens,
                            args.threads)  # fmt: skip
    elif args.step == "modelopt":
        if args.fast_path and args.method not in ("awq_lite", "awq_full"):
            _fail(f"--fast-path: only awq_lite and awq_full have it, not {args.method}")
        lm_head = args.lm_head == "int4"
        report = run_modelopt(
            args.artifact, args.feeds, args.out, args.method, args.block_size, lm_head, args.fast_path
        )
    elif args.step == "compare":
        report = compare(args.artifact, args.feeds, _candidates(args.candidate), args.threads, args.accuracy_level)
    else:
        report = check(args.artifact, _candidates(args.candidate), not args.no_build, args.accuracy_level)
    _write_json(args.report, report)


if __name__ == "__main__":
    main()
