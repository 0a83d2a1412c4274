"""`fusion-export quantize`: an fp32 artifact -> an INT8 (Q/DQ) or fp16 artifact.

int8: INT8 weights per output channel on every linear layer of the vision tower and the decoder (prefill and
step share weights and scales), activations INT8 per tensor from calibration (or --weight-only: float
activations, INT8 weights only). The LM head is excluded by default (--exclude adds fnmatch patterns over weight
names, e.g. 'model.layers.0.*'; --exclude none quantizes it too). W8A8 keeps the input of the MLP's down
projection float by default (--float-inputs PATTERN; none: every input INT8); its weights are still INT8.
Calibration runs real requests through the graphs: --calib DIR (images, and DIR/questions.txt or the bundled
questions) or the bundled offline set. fp16: re-exports --model DIR at fp16 with the artifact's settings.
Everything is checked before any compute; the output folder appears only when complete.
"""

from __future__ import annotations

import argparse

from .options import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..quantization.calibrate import METHODS

    p = sub.add_parser("quantize", help="INT8 (Q/DQ) or fp16 artifact from an fp32 one", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", metavar="ART", help="fp32 artifact folder (fusion-export export)")
    p.add_argument("--out", required=True, metavar="ART_Q", help="artifact folder to create (must not exist)")
    p.add_argument("--precision", choices=["int8", "fp16"], default="int8", help="int8 (default) or fp16")
    p.add_argument("--weight-only", action="store_true", help="int8 weights, float activations (no calibration)")
    p.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                   help="int8: an INT8 KV cache, its per-layer scales calibrated (a quarter of the bytes)")  # fmt: skip
    p.add_argument("--linear", choices=["int8", "float"], default="int8",
                   help="float: keep the linear layers as they are (with --kv-cache int8: only the cache)")  # fmt: skip
    p.add_argument("--calib", metavar="DIR", help="calibration images (+ questions.txt); default: bundled set")
    p.add_argument("--num-samples", type=positive_int, default=16, metavar="N", help="calibration requests (16)")
    p.add_argument("--decode-steps", type=positive_int, default=8, metavar="N", help="steps per request (8)")
    p.add_argument("--method", choices=METHODS, default="percentile", help="activation range (percentile)")
    p.add_argument("--percentile", type=float, default=99.9, metavar="P", help="with --method percentile (99.9)")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="weights kept in float (default: LM head)")
    p.add_argument("--float-inputs", action="append", metavar="PATTERN",
                   help="W8A8: layers whose input stays float, weights INT8 (default: *down_proj*)")  # fmt: skip
    p.add_argument("--model", metavar="DIR", help="fp16: the checkpoint the artifact was exported from")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="ONNX Runtime threads")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reference_model.errors import FusionError

    from ..manifest import open_artifact
    from ..output_files import check_output_folder
    from ..quantization.qdq import DEFAULT_EXCLUDE, DEFAULT_FLOAT_INPUTS

    check_output_folder(args.out, "--out", inputs=[args.artifact] + ([args.model] if args.model else []))
    if not 0 < args.percentile < 100:
        raise FusionError(f"--percentile {args.percentile}: must be in (0, 100)")
    artifact = open_artifact(args.artifact)
    if args.precision == "fp16" and (args.kv_cache, args.linear) != ("float", "int8"):
        raise FusionError("--kv-cache and --linear are for --precision int8")
    if args.linear == "float" and (args.kv_cache == "float" or args.weight_only):
        raise FusionError("--linear float quantizes only the KV cache: give --kv-cache int8 (and no --weight-only)")
    if args.precision == "fp16":
        return _fp16(args, artifact)
    if args.model:
        raise FusionError("--model is for --precision fp16; int8 reads the weights from the artifact")
    from ..quantization.calibration_set import load_calibration_set
    from ..quantization.quantize import QuantizeOptions, quantize_int8

    exclude = DEFAULT_EXCLUDE if args.exclude is None else tuple(p for p in args.exclude if p != "none")
    floats = DEFAULT_FLOAT_INPUTS if args.float_inputs is None else tuple(p for p in args.float_inputs if p != "none")
    calibrated = args.kv_cache == "int8" or (args.linear == "int8" and not args.weight_only)
    calibration = load_calibration_set(args.calib, args.num_samples) if calibrated else None
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
    )
    result = quantize_int8(artifact, args.out, options, verbose=not args.quiet)
    if options.linear:
        counts = ", ".join(f"{name} {len(done)}" for name, done in result.quantized.items())
        print(f"INT8 linear layers: {counts}; kept in float: {', '.join(result.excluded) or 'none'}")
    if result.kv_int8_scales:
        keys, values = zip(*result.kv_int8_scales)
        print(f"INT8 KV cache: {len(keys)} layers, key scales {min(keys):.3g}-{max(keys):.3g}, "
              f"value scales {min(values):.3g}-{max(values):.3g}")  # fmt: skip
    print(result.trt_report.table())
    return 0


def _fp16(args: argparse.Namespace, artifact) -> int:
    from reference_model import load_config
    from reference_model.errors import FusionError

    from ..export import ExportOptions, export_artifact
    from ..manifest import config_digest
    from ..precision import Precision
    from ..trt_targets import TrtTarget

    if args.model is None:
        raise FusionError("--precision fp16 re-exports the checkpoint: give --model DIR (the one ART came from)")
    if args.weight_only or args.calib:
        raise FusionError("--weight-only and --calib are for --precision int8")
    if config_digest(load_config(args.model)) != artifact.manifest["model"]["config_digest"]:
        raise FusionError(f"--model {args.model}: its config differs from the one {args.artifact} was exported from")
    export = artifact.manifest["export"]
    options = ExportOptions(query_len=artifact.query_len, precision=Precision.fp16,
                            trt_target=TrtTarget(export["trt_target"]), opset=export["opset"],
                            max_context=artifact.max_context)  # fmt: skip
    result = export_artifact(args.model, args.out, options, verbose=not args.quiet)
    print(result.trt_report.table())
    return 0
