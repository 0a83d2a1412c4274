"""`fusion-export quantize`: an fp32 or fp16 artifact -> an INT8 (Q/DQ) or INT4 artifact; fp32 -> fp16.

int4 (weight-only): the decoder's and the interaction layers' weights as INT4 in blocks of --block-size input
rows (32, 64 or 128; symmetric, scales in the artifact's dtype), read by TensorRT as weight-only INT4 GEMMs and by
ONNX Runtime as MatMulNBits. --method awq (default) scales each layer's input channels by their calibrated
activations before rounding and clips each block by output error (it calibrates like W8A8); --method rtn rounds
to nearest (no calibration). --lm-head and --vision choose int4, int8 or float for the LM head (default int8)
and the vision tower (default int8). --exclude keeps more weights float. The artifact must be exported at opset
21 or later (trt-10.15, trt-11).

int8: INT8 weights per output channel on every linear layer of the vision tower and the decoder (prefill and
step share weights and scales), activations INT8 per tensor from calibration (or --weight-only: float
activations, INT8 weights only). Kept in float by default: the LM head's weights (*lm_head*). --exclude PATTERN
keeps more weights in float (fnmatch over weight names, e.g. 'model.layers.0.*'): the patterns add to the
default; --exclude none drops it (alone: every linear layer INT8, the LM head too; with patterns: only those).
W8A8 keeps the input of the MLP's down projection float by default (*down_proj*); --float-inputs PATTERN adds
layers whose input stays float, by the same rule (none: every input INT8); their weights are still INT8. A
pattern that matches no linear layer's weight is refused, with the closest names. Calibration runs real requests
through the graphs: --calib DIR (images, and DIR/questions.txt or the bundled questions) or the bundled offline
set. fp16: re-exports --model DIR at fp16 with the artifact's settings. Flags that would do nothing in the chosen
mode are refused. Everything is checked before any compute; the output folder appears only when complete.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch

from ..options import add_image_options, positive_int, threads

# steps per calibration request: each runs the whole step graph, and ranges settle within a few dozen steps
MAX_DECODE_STEPS = 256
DEFAULTS = {"num_samples": 16, "decode_steps": 8, "method": "percentile", "percentile": 99.9}  # None: not given
INT4_FLAGS = {"block_size": "--block-size", "lm_head": "--lm-head", "vision": "--vision"}
CALIBRATION_FLAGS = {"calib": "--calib", "num_samples": "--num-samples", "decode_steps": "--decode-steps",
                     "method": "--method", "percentile": "--percentile"}  # fmt: skip
LINEAR_FLAGS = {"exclude": "--exclude", "float_inputs": "--float-inputs", "method": "--method",
                "percentile": "--percentile"}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engines.quantization import int4
    from engines.quantization.calibrate import METHODS
    from engines.quantization.int4_graph import LAYER_FORMS

    p = sub.add_parser("quantize", help="INT8 (Q/DQ) or INT4 artifact from an fp32/fp16 one; fp16 from fp32",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", metavar="ART", help="fp32 or fp16 artifact folder (fusion-export export)")
    p.add_argument("--out", required=True, metavar="ART_Q", help="artifact folder to create (must not exist)")
    p.add_argument("--precision", choices=["int8", "int4", "fp16"], default="int8",
                   help="int8 (default), int4 (weight-only blocks) or fp16")  # fmt: skip
    p.add_argument("--block-size", type=int, choices=int4.BLOCK_SIZES, metavar="B",
                   help=f"int4: input rows per scale, one of {', '.join(map(str, int4.BLOCK_SIZES))} "
                        f"({int4.DEFAULT_BLOCK_SIZE})")  # fmt: skip
    p.add_argument("--lm-head", choices=LAYER_FORMS, help="int4: the LM head's weights (int8)")
    p.add_argument("--vision", choices=LAYER_FORMS, help="int4: the vision tower's weights (int8)")
    p.add_argument("--weight-only", action="store_true", help="int8 weights, float activations (no calibration)")
    p.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                   help="int8: an INT8 KV cache, its per-layer scales calibrated (a quarter of the bytes)")  # fmt: skip
    p.add_argument("--linear", choices=["int8", "float"], default="int8",
                   help="float: keep the linear layers as they are (with --kv-cache int8: only the cache)")  # fmt: skip
    p.add_argument("--calib", metavar="DIR", help="calibration images (+ questions.txt); default: bundled set")
    p.add_argument("--num-samples", type=positive_int, metavar="N", help="calibration requests (16)")
    p.add_argument("--decode-steps", type=positive_int, metavar="N", help="greedy steps per calibration request (8)")
    p.add_argument("--method", choices=METHODS + int4.METHODS,
                   help="int8: activation range, one of " + ", ".join(METHODS) + " (percentile); "
                        "int4: awq (default) or rtn")  # fmt: skip
    p.add_argument("--percentile", type=float, metavar="P", help="with --method percentile: in (0, 100) (99.9)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="also keep these weights in float, added to the default *lm_head*; 'none' drops the "
                        "default (alone: the LM head is quantized too)")  # fmt: skip
    p.add_argument("--float-inputs", action="append", metavar="PATTERN",
                   help="W8A8: also keep these layers' inputs float (weights INT8), added to the default "
                        "*down_proj*; 'none' drops the default (alone: every input INT8)")  # fmt: skip
    p.add_argument("--model", metavar="DIR", help="fp16: the checkpoint the artifact was exported from")
    p.add_argument("--threads", type=threads, default=None, metavar="N", help="ONNX Runtime threads")
    add_image_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)


def patterns(given: list[str] | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
    """The patterns in force: the defaults plus those given; 'none' drops the defaults."""
    if given is None:
        return defaults
    extra = tuple(dict.fromkeys(p for p in given if p != "none"))
    kept = () if "none" in given else defaults
    return kept + tuple(p for p in extra if p not in kept)


def check_patterns(flag: str, given: list[str] | None, names: list[str]) -> None:
    """Refuse a given pattern that matches no linear layer's weight, showing the names closest to it."""
    from reference_model.errors import FusionError

    for pattern in dict.fromkeys(given or []):
        if pattern == "none" or any(fnmatch.fnmatchcase(name, pattern) for name in names):
            continue
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0) or names[:3]
        raise FusionError(
            f"{flag} {pattern!r}: matches none of the {len(names)} linear layers' weights (fnmatch over names such "
            f"as {', '.join(close)})"
        )


def _given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    return [flag for attr, flag in flags.items() if getattr(args, attr) is not None]


def run(args: argparse.Namespace) -> int:
    from engines.quantization.qdq import DEFAULT_EXCLUDE, DEFAULT_FLOAT_INPUTS
    from fusion_export.manifest import open_artifact
    from fusion_export.output_files import check_output_folder
    from reference_model.errors import FusionError

    check_output_folder(args.out, "--out", inputs=[args.artifact] + ([args.model] if args.model else []))
    if args.percentile is not None and not 0 < args.percentile < 100:  # NaN fails this too
        raise FusionError(f"--percentile {args.percentile}: must be in (0, 100)")
    artifact = open_artifact(args.artifact)
    if args.precision != "int4" and _given(args, INT4_FLAGS):
        raise FusionError(f"{_given(args, INT4_FLAGS)[0]} is for --precision int4")
    if args.precision == "fp16" and (args.kv_cache, args.linear) != ("float", "int8"):
        raise FusionError("--kv-cache and --linear are for --precision int8 and int4")
    if args.linear == "float" and (args.kv_cache == "float" or args.weight_only):
        raise FusionError("--linear float quantizes only the KV cache: give --kv-cache int8 (and no --weight-only)")
    if args.precision == "fp16":
        return _fp16(args, artifact)
    if args.model:
        raise FusionError(f"--model is for --precision fp16; {args.precision} reads the weights from the artifact")
    if args.precision == "int4":
        return _int4(args, artifact)
    from engines.quantization.calibrate import METHODS

    if args.method is not None and args.method not in METHODS:
        raise FusionError(f"--method {args.method} is for --precision int4; int8's are {', '.join(METHODS)}")
    # flags that would do nothing in this mode are refused, never ignored
    calibrated = args.kv_cache == "int8" or (args.linear == "int8" and not args.weight_only)
    if args.linear == "float" and _given(args, LINEAR_FLAGS):
        raise FusionError(f"{_given(args, LINEAR_FLAGS)[0]} applies to the linear layers, which --linear float keeps")
    if not calibrated and _given(args, CALIBRATION_FLAGS):
        raise FusionError(f"{_given(args, CALIBRATION_FLAGS)[0]}: --weight-only runs no calibration")
    if args.weight_only and args.float_inputs is not None:
        raise FusionError("--float-inputs: with --weight-only every layer's input stays float")
    if args.percentile is not None and (args.method or DEFAULTS["method"]) != "percentile":
        raise FusionError(f"--percentile is for --method percentile, not {args.method}")
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    from engines.quantization.quantize import QuantizeOptions, linear_weight_names, quantize_artifact

    if args.exclude or args.float_inputs:
        names = linear_weight_names(artifact)
        check_patterns("--exclude", args.exclude, names)
        check_patterns("--float-inputs", args.float_inputs, names)
    exclude = patterns(args.exclude, DEFAULT_EXCLUDE)
    floats = patterns(args.float_inputs, DEFAULT_FLOAT_INPUTS)
    # a request's prompt (at least image tokens + latents + 1) and its steps fit the graphs
    calibration = _calibration_checks(args, artifact) if calibrated else None
    options = QuantizeOptions(
        weight_only=args.weight_only,
        method=args.method,
        percentile=args.percentile,
        exclude=exclude,
        float_inputs=floats,
        decode_steps=args.decode_steps,
        threads=args.threads,
        calibration=calibration,
        linear=args.linear == "int8",
        kv_cache=args.kv_cache == "int8",
        max_image_pixels=args.max_image_pixels,
    )
    result = quantize_artifact(artifact, args.out, options, verbose=not args.quiet)
    _report(result, exclude)
    return 0


def _report(result, exclude: tuple[str, ...] = ()) -> None:
    from engines.quantization.qdq import DEFAULT_EXCLUDE

    if result.int4_plan is not None:
        counts = ", ".join(f"{name} {len(done)}" for name, done in result.quantized.items())
        plan = result.int4_plan
        forms = ", ".join(f"{k} {v}" for k, v in plan.options.forms.items())
        awq = ""
        if plan.options.method == "awq":
            folded = sum(plan.fold.get(k, False) for k in plan.inverse)
            awq = f"; AWQ scaled {len(plan.inverse)} of {len(plan.alphas)} input groups ({folded} folded into norms)"
        print(f"INT4 ({plan.options.method}, blocks of {plan.options.block_size}): {forms}; quantized layers: "
              f"{counts}{awq}; kept in float: {', '.join(result.excluded) or 'none'}")  # fmt: skip
    elif result.quantized:
        counts = ", ".join(f"{name} {len(done)}" for name, done in result.quantized.items())
        rule = ", ".join(f"{p}{' (default)' if p in DEFAULT_EXCLUDE else ''}" for p in exclude) or "none"
        print(f"INT8 linear layers: {counts}; kept in float (--exclude {rule}): {', '.join(result.excluded) or 'none'}")
    if result.kv_int8_scales:
        keys, values = zip(*result.kv_int8_scales)
        print(f"INT8 KV cache: {len(keys)} layers, key scales {min(keys):.3g}-{max(keys):.3g}, "
              f"value scales {min(values):.3g}-{max(values):.3g}")  # fmt: skip
    print(result.trt_report.table())


def _calibration_checks(args: argparse.Namespace, artifact):
    """--decode-steps within the graphs' positions, then every calibration image sized and question tokenized as
    calibration will run them, before any work; returns the calibration set."""
    from engines.quantization.calibration_set import load_calibration_set
    from reference_model.errors import FusionError
    from reference_model.prompt import load_tokenizer

    positions = artifact.max_context or artifact.config.decoder.rope.max_position_embeddings
    most = min(MAX_DECODE_STEPS, positions - (artifact.config.vision.num_patches + artifact.query_len + 1))
    if not 1 <= args.decode_steps <= most:
        raise FusionError(f"--decode-steps {args.decode_steps}: must be in 1..{most} (at most {MAX_DECODE_STEPS}, "
                          f"and a prompt plus the steps must fit the graphs' {positions} positions)")  # fmt: skip
    return load_calibration_set(args.calib, args.num_samples, max_pixels=args.max_image_pixels,
                                tokenizer=load_tokenizer(artifact.model_dir))  # fmt: skip


def _int4(args: argparse.Namespace, artifact) -> int:
    from engines.quantization import int4
    from engines.quantization.int4_graph import Int4Options
    from engines.quantization.quantize import (
        INT4_DEFAULT_FORMS,
        QuantizeOptions,
        check_int4,
        linear_weight_names,
        quantize_artifact,  # fmt: skip
    )
    from reference_model.errors import FusionError

    if args.linear == "float":
        raise FusionError("--linear float keeps the linear layers: --precision int4 quantizes them (for only an "
                          "INT8 KV cache, use --precision int8 --linear float --kv-cache int8)")  # fmt: skip
    if args.weight_only:
        raise FusionError("--weight-only: --precision int4 is weight-only already")
    if args.float_inputs is not None:
        raise FusionError("--float-inputs: --precision int4 quantizes no layer's input")
    method = args.method or "awq"
    if method not in int4.METHODS:
        raise FusionError(f"--method {method} is for --precision int8; int4's are {', '.join(int4.METHODS)}")
    if args.percentile is not None:
        raise FusionError("--percentile is for --precision int8 --method percentile")
    calibrated = method == "awq" or args.kv_cache == "int8"
    requests = {k: v for k, v in CALIBRATION_FLAGS.items() if k not in ("method", "percentile")}
    if not calibrated and _given(args, requests):
        raise FusionError(f"{_given(args, requests)[0]}: --method rtn runs no calibration")
    if args.exclude:
        check_patterns("--exclude", args.exclude, linear_weight_names(artifact))
    exclude = patterns(args.exclude, ())
    forms = {**INT4_DEFAULT_FORMS, **{k: getattr(args, k) for k in ("lm_head", "vision") if getattr(args, k)}}
    settings = Int4Options(args.block_size or int4.DEFAULT_BLOCK_SIZE, method, forms, exclude)
    for name in ("num_samples", "decode_steps"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[name])
    options = QuantizeOptions(precision="int4", exclude=exclude, decode_steps=args.decode_steps,
                              threads=args.threads, kv_cache=args.kv_cache == "int8",
                              max_image_pixels=args.max_image_pixels, int4=settings)  # fmt: skip
    check_int4(artifact, options)  # opset, target and block sizes, before the calibration set is read
    if calibrated:
        from dataclasses import replace

        options = replace(options, calibration=_calibration_checks(args, artifact))
    result = quantize_artifact(artifact, args.out, options, verbose=not args.quiet)
    _report(result, exclude)
    return 0


def _fp16(args: argparse.Namespace, artifact) -> int:
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.manifest import config_digest
    from fusion_export.precision import Precision
    from fusion_export.trt_rules.targets import TrtTarget
    from reference_model import load_config
    from reference_model.errors import FusionError

    if args.model is None:
        raise FusionError("--precision fp16 re-exports the checkpoint: give --model DIR (the one ART came from)")
    if args.weight_only:
        raise FusionError("--weight-only is for --precision int8")
    int8_only = _given(args, {**CALIBRATION_FLAGS, **LINEAR_FLAGS, "threads": "--threads"})
    if int8_only:
        raise FusionError(f"{int8_only[0]} is for --precision int8 (fp16 re-exports the checkpoint)")
    if config_digest(load_config(args.model)) != artifact.manifest["model"]["config_digest"]:
        raise FusionError(f"--model {args.model}: its config differs from the one {args.artifact} was exported from")
    export = artifact.manifest["export"]
    options = ExportOptions(query_len=artifact.query_len, precision=Precision.fp16,
                            trt_target=TrtTarget(export["trt_target"]), opset=export["opset"],
                            max_context=artifact.max_context)  # fmt: skip
    result = export_artifact(args.model, args.out, options, verbose=not args.quiet)
    print(result.trt_report.table())
    return 0
