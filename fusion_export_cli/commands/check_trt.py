"""`fusion-export check-trt`: static TensorRT-compatibility check of an artifact's graphs (or .onnx files).

Checks ops, attributes, constant/absent inputs, dtypes and dynamic dims against the TensorRT ONNX parser's
published operator support for the target. Exit status 1 when TensorRT would reject anything, 2 when a
file cannot be read as an ONNX graph (or another input error).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fusion_export.trt_rules.targets import TrtTarget

    p = sub.add_parser("check-trt", help="static TensorRT-compatibility check", description=__doc__)
    p.add_argument("paths", nargs="+", metavar="ART|GRAPH.onnx", help="an artifact folder, or ONNX files")
    p.add_argument(
        "--trt-target", type=TrtTarget, choices=list(TrtTarget), default=None, help="default: the artifact's target"
    )
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument(
        "--parser",
        action="store_true",
        help="also parse every graph with the installed TensorRT (or TensorRT-RTX) and report disagreements",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fusion_export.manifest import open_artifact
    from fusion_export.output_files import OutputKind, check_output_file
    from fusion_export.trt_rules.operator_check import check_graphs, save_report
    from fusion_export.trt_rules.targets import TrtTarget
    from reference_model.errors import FusionError

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
    parsed_ok = True
    if args.parser:
        parsed_ok = _real_parser(graphs, report)
    if args.json:
        save_report(report, Path(args.json))
    return 0 if report.ok and parsed_ok else 1


def _real_parser(graphs: dict[str, Path], report) -> bool:
    """Parse each graph with the installed TensorRT and print its verdict next to the static one."""
    from engines.tensorrt.flavours import load_trt

    trt = load_trt()
    print(f"TensorRT's own parser ({trt.describe()}; the check's target {report.target} may differ from it):")
    all_ok = True
    for name, path in graphs.items():
        _, _, errors = trt.parse(path)
        static_ok = not [f for f in report.errors if f.graph == name]
        agree = "" if static_ok == (not errors) else "  <- DISAGREES with the static check"
        print(f"  {name}: {'parses' if not errors else 'REJECTED'}{agree}")
        for error in errors[:5]:
            print(f"    {error}")
        all_ok &= not errors
    return all_ok
