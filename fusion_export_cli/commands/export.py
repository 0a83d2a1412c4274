"""`fusion-export export`: a checkpoint -> an artifact folder of ONNX graphs with a manifest.

The graphs are checked with the ONNX checker and the static TensorRT check for --trt-target on every export,
and the check's result is printed; a failing export leaves nothing behind. The folder appears only when
complete (built under a temporary name, removed on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse

from ..options import add_query_len_option, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fusion_export.precision import Precision
    from fusion_export.trt_rules.targets import TrtTarget

    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs", description=__doc__)
    p.add_argument("--model", required=True, metavar="DIR", help="FUSION checkpoint folder")
    p.add_argument("--out", required=True, metavar="ART", help="artifact folder to create (must not exist)")
    add_query_len_option(p, note=" (fixed per export)")
    p.add_argument(
        "--dtype", type=Precision, choices=list(Precision), default=Precision.fp32, help="graph precision (fp32)"
    )
    p.add_argument(
        "--trt-target",
        type=TrtTarget,
        choices=list(TrtTarget),
        default=TrtTarget.trt_10_3,
        help="TensorRT the graphs must parse on: trt-10.3 (JetPack 6, opset <= 20, the default: parses everywhere), "
        "trt-10.15 (opset 24, TensorScatter in-place KV updates), trt-11",
    )
    p.add_argument(
        "--opset", type=positive_int, default=None, metavar="N", help="ONNX opset (default: the target's highest)"
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=None,
        metavar="N",
        help="fix the decoder graphs' KV capacity (prompt + generated tokens) at N; TensorRT's KV-cache update needs "
        "it (trt-10.15, trt-11: default the longest sequence upstream ran the model at, its "
        "tokenizer_model_max_length: 4096 for FUSION-Phi3.5); trt-10.3: default dynamic",
    )
    p.add_argument(
        "--plugins",
        choices=["on", "off"],
        default="off",
        help="on: plugin nodes, each with an ONNX local function that runs wherever the plugin is not registered: "
        "DecodeAttention (decode steps read only the written KV columns), InteractionAttention (each latent reads "
        "its context window in place), WindowMaxPool (the vision encoder's irregular pooling); off: standard ops "
        "inline (default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display (the TensorRT check is still shown)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from engines.backends import resolve_query_len
    from fusion_export.export import ExportOptions, export_artifact, resolve_max_context
    from fusion_export.output_files import check_output_folder
    from reference_model import load_config

    check_output_folder(args.out, "--out", inputs=[args.model])
    config = load_config(args.model)
    query_len = resolve_query_len(args.query_len, config)  # names the flag in its error
    opset = args.trt_target.resolve_opset(args.opset)  # bad flags are refused before the weights are read
    resolve_max_context(args.max_context, config, opset, query_len)
    options = ExportOptions(
        query_len=query_len,
        precision=args.dtype,
        trt_target=args.trt_target,
        opset=args.opset,
        max_context=args.max_context,
        plugins=args.plugins == "on",
    )
    result = export_artifact(args.model, args.out, options, verbose=not args.quiet)
    print(result.trt_report.table())
    return 0
