"""`fusion-export check-trt`: static TensorRT-compatibility check of an artifact's graphs (or .onnx files).

Checks ops, attributes, constant/absent inputs, dtypes and dynamic dims against the TensorRT ONNX parser's
published operator support for the target. Exit status 1 when TensorRT would reject anything, 2 when a
file cannot be read as an ONNX graph (or another input error).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..trt_targets import TrtTarget

    p = sub.add_parser("check-trt", help="static TensorRT-compatibility check", description=__doc__)
    p.add_argument("paths", nargs="+", metavar="ART|GRAPH.onnx", help="an artifact folder, or ONNX files")
    p.add_argument(
        "--trt-target", type=TrtTarget, choices=list(TrtTarget), default=None, help="default: the artifact's target"
    )
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reference_model.errors import FusionError

    from ..manifest import open_artifact
    from ..output_files import OutputKind, check_output_file
    from ..trt_compat import check_graphs, save_report
    from ..trt_targets import TrtTarget

    if args.json:
        check_output_file(args.json, "--json", OutputKind.trt_report, inputs=args.paths)
    graphs: dict[str, Path] = {}
    target = args.trt_target
    for raw in args.paths:
        path = Path(raw)
        if path.is_dir():
            artifact = open_artifact(path, verify_hashes=False)
            graphs.update({name: artifact.graph_path(name) for name in artifact.manifest["graphs"]})
            target = target or TrtTarget(artifact.manifest["export"]["trt_target"])
        elif path.suffix == ".onnx" and path.is_file():
            graphs[path.stem] = path
        else:
            raise FusionError(f"{path}: neither an artifact folder nor an existing .onnx file")
    report = check_graphs(graphs, target or TrtTarget.trt_10_3)  # GraphReadError (exit 2) for unreadable files
    print(report.table())
    if args.json:
        save_report(report, Path(args.json))
    return 0 if report.ok else 1
