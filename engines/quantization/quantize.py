"""An fp32 or fp16 artifact -> a quantized artifact folder (same layout, same manifest format, a `quantization`
record and/or a `kv_cache` record), its scales in the source's activation dtype.

int8: calibrate activation ranges through the source graphs (unless --weight-only), rewrite every graph's linear
layers with Q/DQ (qdq.py). int4: weight-only INT4 blocks (int4.py, int4_graph.py), AWQ's searches run on
activations sampled through the same calibration. Either way, with an INT8 KV cache, the decoder graphs' cache is
rewritten too (kv_cache.py, its ranges calibrated on the same requests); then the weights groups are written once
each, the ONNX checker and the static TensorRT check for the source's target run, and the manifest is sealed.
fp16 (the CLI's): re-export the checkpoint at fp16 with the source's settings (the exporter keeps norm
statistics, softmax, RoPE tables and logits in float32).
The folder is built under a temporary name and renamed at the end, so it exists only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from fusion_export.containment import copy_listed, staged_path
from fusion_export.export import check_written_graphs
from fusion_export.graph_inputs import past_names
from fusion_export.manifest import GRAPHS, MANIFEST, Artifact, graph_io, write_manifest
from fusion_export.onnx_export import save_group
from fusion_export.precision import Precision
from fusion_export.progress import Progress
from fusion_export.trt_rules.targets import TrtTarget
from fusion_export.trt_rules.targets import check_int4 as check_int4_target
from reference_model.errors import FusionError
from reference_model.generation import GenerationError
from reference_model.limits import DEFAULT_MAX_IMAGE_PIXELS
from reference_model.staging import staging_folder

from .calibrate import RangeObserver, calibrate
from .calibration_set import CalibrationSet
from .int4 import ActivationSample
from .int4_graph import Int4Options, Int4Plan, plan_folds, quantize_graph_int4
from .kv_cache import quantize_kv_cache
from .qdq import DEFAULT_EXCLUDE, DEFAULT_FLOAT_INPUTS, is_linear_weight, quantize_graph

# int4: what --lm-head and --vision default to (docs/quantization.md: the sensitivity sweep on `small`)
INT4_DEFAULT_FORMS = {"decoder": "int4", "lm_head": "int8", "vision": "int8"}


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str = "int8"  # int8 | int4 (weight-only blocks)
    weight_only: bool = False
    method: str = "percentile"  # calibrate.METHODS
    percentile: float = 99.9  # on `small`: 91.0% top-1 with every input INT8, against 86.7% for max
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    float_inputs: tuple[str, ...] = DEFAULT_FLOAT_INPUTS
    decode_steps: int = 8  # greedy steps per calibration request: the step graph sees real decode activations
    threads: int | None = None
    calibration: CalibrationSet | None = None  # required unless weight_only (and linear) without kv_cache
    linear: bool = True  # quantize the linear layers (False: only the KV cache, with kv_cache)
    kv_cache: bool = False  # an INT8 KV cache (kv_cache.py), its scales calibrated at max |x|
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # calibration images larger than this are refused
    int4: Int4Options | None = None  # precision int4: block size, method, per-class forms (exclude above applies)


@dataclass
class QuantizeResult:
    folder: Path
    quantized: dict[str, list[str]] = field(default_factory=dict)  # graph -> weights quantized
    excluded: list[str] = field(default_factory=list)
    kv_int8_scales: list[tuple[float, float]] | None = None
    trt_report: Any = None
    int4_plan: Int4Plan | None = None


def linear_weight_names(artifact: Artifact) -> list[str]:
    """The weights of every graph's linear layers (qdq.linear_layers' rule), sorted: what --exclude and
    --float-inputs patterns match. Read from the graphs' protos alone (no weights loaded)."""
    names: set[str] = set()
    for name in GRAPHS:
        graph = onnx.load(artifact.graph_path(name), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
                weight = inits.get(node.input[1])
                if weight is not None and is_linear_weight(weight.name, len(weight.dims)):
                    names.add(weight.name)
    return sorted(names)


def quantization_mode(options: QuantizeOptions) -> str:
    if options.precision == "int4":
        return "int4-weight-only"
    return "int8-weight-only" if options.weight_only else "int8"


def activation_dtype(artifact: Artifact) -> type:
    """The dtype scales are stored in: the graphs' activations' (a DequantizeLinear's output takes its scale's)."""
    return np.float16 if artifact.precision is Precision.fp16 else np.float32


def _activation_rule(options: QuantizeOptions) -> str:
    rule = f"INT8 per tensor, symmetric, {options.method}"
    if options.method == "smoothquant":
        from .qdq import SMOOTHQUANT_ALPHA

        return rule + f" (alpha {SMOOTHQUANT_ALPHA}, x / s by a Mul before each quantized input, s folded into W)"
    return rule + (f" {options.percentile}" if options.method == "percentile" else "")


def check_int4(artifact: Artifact, options: QuantizeOptions) -> None:
    """Before any compute: the graphs' opset has blockwise DequantizeLinear, the target's parser reads it, and
    every layer that becomes INT4 is a whole number of blocks (shapes read from the graphs, no weights loaded)."""
    check_int4_target(TrtTarget(artifact.manifest["export"]["trt_target"]), artifact.manifest["export"]["opset"])
    from .int4 import check_block_size

    for name in GRAPHS:
        graph = onnx.load(artifact.graph_path(name), load_external_data=False).graph
        for weight in graph.initializer:
            if is_linear_weight(weight.name, len(weight.dims)) and options.int4.form(name, weight.name) == "int4":
                check_block_size(weight.name, list(weight.dims), options.int4.block_size)


def kv_scales(observer: RangeObserver, num_layers: int) -> list[tuple[float, float]]:
    """Per layer (key, value) INT8 scales from the largest |key| / |value| written (max: a clipped key outlier
    changes which columns a query attends to)."""
    names = past_names(num_layers)
    missing = [n for n in names if n not in observer.absmax]
    if missing:
        raise FusionError(f"{missing[0]}: no calibration range (the calibration never wrote that cache)")
    scales = observer.scales()
    return [(scales[names[2 * i]], scales[names[2 * i + 1]]) for i in range(num_layers)]


def quantize_artifact(artifact: Artifact, out_dir: str | Path, options: QuantizeOptions, verbose: bool = True):
    if artifact.quantization or artifact.kv_int8_scales:
        done = artifact.quantization or "an INT8 KV cache"
        raise FusionError(f"{artifact.folder}: quantization starts from an fp32 or fp16 artifact that is not "
                          f"quantized yet (this one is {done})")  # fmt: skip
    if not (options.linear or options.kv_cache):
        raise FusionError("nothing to quantize: neither the linear layers nor the KV cache")
    out_dir = Path(out_dir)
    calibration = options.calibration
    int4 = options.int4 if options.precision == "int4" and options.linear else None
    if int4 is not None:
        check_int4(artifact, options)
    awq = int4 is not None and int4.method == "awq"
    activations = options.linear and not options.weight_only and int4 is None
    calibrated = activations or options.kv_cache or awq
    steps = 4 + (1 if calibrated else 0)
    layers = artifact.config.decoder.num_layers
    scale_dtype = activation_dtype(artifact)
    progress = Progress(total_steps=steps, enabled=verbose)
    manifest = artifact.manifest
    result = QuantizeResult(out_dir)
    with staging_folder(out_dir) as tmp:
        scales, channel_max, cache_scales, sample = None, None, None, None
        if calibrated:
            if calibration is None:
                raise FusionError("W8A8, AWQ and an INT8 KV cache need a calibration set (or --weight-only, rtn)")
            what = "awq activations" if awq else options.method
            progress.step(f"calibrate: {calibration.num_samples} requests from {calibration.source} ({what})")
            observer, kv_observer = RangeObserver(options.method, options.percentile), RangeObserver("max")
            sample = ActivationSample() if awq else None
            try:
                calibrate(artifact, calibration, sample or observer, options.decode_steps, options.threads,
                          on_sample=lambda n: progress.detail(f"{n}/{calibration.num_samples} requests"),
                          scratch_parent=tmp, kv_observer=kv_observer if options.kv_cache else None,
                          max_image_pixels=options.max_image_pixels)  # fmt: skip
            except GenerationError as e:  # a calibration request's prompt + decode steps past the graphs' limits
                raise FusionError(f"--decode-steps {options.decode_steps}: {e}") from None
            scales = observer.scales() if activations else None
            channel_max = observer.channel_max if activations and options.method == "smoothquant" else None
            cache_scales = kv_scales(kv_observer, layers) if options.kv_cache else None
            result.kv_int8_scales = cache_scales
        progress.step("rewrite graphs with Q/DQ" + (f" (INT4 {int4.method}, blocks of {int4.block_size})"
                                                    if int4 else ""))  # fmt: skip
        models = {name: ir.load(artifact.graph_path(name)) for name in GRAPHS}
        plan = Int4Plan(int4, scale_dtype, sample) if int4 else None
        if plan is not None:
            plan_folds(plan, {name: model.graph for name, model in models.items()})
            result.int4_plan = plan
        groups: dict[str, dict[str, ir.Model]] = {}
        excluded: set[str] = set()
        for name, model in models.items():
            if plan is not None:
                done, skipped = quantize_graph_int4(plan, name, model.graph)
                result.quantized[name] = done
                excluded.update(skipped)
            elif options.linear:
                done, skipped = quantize_graph(model.graph, options.exclude, scales, options.float_inputs,
                                               channel_max, scale_dtype=scale_dtype)  # fmt: skip
                result.quantized[name] = done
                excluded.update(skipped)
            if cache_scales is not None and name != "vision_encoder":
                quantize_kv_cache(model, layers, artifact.config.decoder.num_kv_heads, cache_scales, scale_dtype)
            groups.setdefault(manifest["graphs"][name]["weights"], {})[name] = model
        del models
        result.excluded = sorted(excluded)
        progress.step("write graphs and weights")
        data_hashes: dict[str, str] = {}
        # the graphs keep export's names; the other files the input's, each written once inside the staging folder
        written = [f"{name}.onnx" for name in GRAPHS] + [*groups, manifest["embeddings"]["file"], *artifact.model_files]
        clashes = sorted({name for name in written + ["trt_compat.json"] if written.count(name) > 1})
        if clashes:
            raise FusionError(f"{artifact.folder / MANIFEST}: {', '.join(clashes)} named for more than one file")
        for data_name, models in groups.items():
            staged_path(tmp, data_name, f"{artifact.folder / MANIFEST}: weights")  # a name from the input's manifest
            data_hashes.update(save_group(models, tmp, data_name))
        del groups
        # as data, each source inside the artifact and each destination inside the staging folder (containment.py)
        copy_listed(artifact.folder, [manifest["embeddings"]["file"], *artifact.model_files], tmp,
                    f"{artifact.folder / MANIFEST}: files")  # fmt: skip

        progress.step("check graphs (ONNX checker, TensorRT compatibility)")
        paths = {name: tmp / f"{name}.onnx" for name in GRAPHS}  # as save_group wrote them
        report = check_written_graphs(paths, TrtTarget(manifest["export"]["trt_target"]), tmp, "quantized")
        result.trt_report = report

        progress.step("write manifest (sha256 of every file)")
        calibration_record = None if calibration is None else {
            "source": calibration.source,
            "samples": calibration.num_samples,
            "decode_steps": options.decode_steps,
            "sha256": calibration.digest(),
        }  # fmt: skip
        source = {"name": artifact.folder.resolve().name, "manifest_sha256": manifest["manifest_sha256"]}
        content = {k: manifest[k] for k in ("model", "export", "embeddings")}
        content["graphs"] = {name: {**manifest["graphs"][name], "file": path.name, **graph_io(path)}
                             for name, path in paths.items()}  # fmt: skip
        content["trt_compat"] = {"target": report.target, "ok": report.ok, "report": "trt_compat.json"}
        if options.linear:
            content["quantization"] = _quantization_record(options, result, scale_dtype, source, calibration_record)
        if cache_scales is not None:
            content["kv_cache"] = {
                "dtype": "int8",
                "scales": [[float(k), float(v)] for k, v in cache_scales],
                "rule": "per layer and tensor (key, value), symmetric, zero point 0, scale = max |x| / 127",
                "calibration": calibration_record,
                "source": source,
            }
        write_manifest(tmp, content, data_hashes)
    elapsed = progress.done()
    if verbose:
        print(f"quantized {out_dir} in {elapsed:.1f} s")
    return result


def _quantization_record(options: QuantizeOptions, result: QuantizeResult, scale_dtype, source, calibration):
    dtype = np.dtype(scale_dtype).name
    common = {
        "quantized_layers": {name: len(done) for name, done in result.quantized.items()},
        "excluded": result.excluded,
        "exclude_patterns": list(options.exclude),
        "source": source,
    }
    if options.precision == "int4":
        plan, int4 = result.int4_plan, options.int4
        return {
            "mode": quantization_mode(options),
            "method": int4.method,
            "block_size": int4.block_size,
            "weights": f"INT4 in blocks of {int4.block_size} input rows per output column, symmetric (no zero "
            f"point), {dtype} scales, DequantizeLinear axis 0 block_size {int4.block_size}",
            "layers": dict(int4.forms),  # decoder (with the interaction layers), lm_head, vision
            **({"awq": {"scaled_groups": len(plan.inverse), "folded": sum(plan.fold.get(k, False)
                                                                           for k in plan.inverse),
                        "rule": "x / s, s = mean|x|^alpha per group of layers sharing an input, folded into the "
                                "normalisation where exact, else a Mul; per-block clipping by output error"},
                "calibration": calibration} if int4.method == "awq" else {}),
            **common,
        }  # fmt: skip
    return {
        "mode": quantization_mode(options),
        "weights": f"INT8 per output channel, symmetric (zero-point 0), MSE-optimal clipping, {dtype} scales, "
        "DQ axis 1",
        "activations": None if options.weight_only else _activation_rule(options),
        "float_inputs": [] if options.weight_only else list(options.float_inputs),
        **common,
        **({} if options.weight_only else {"calibration": calibration}),
    }
