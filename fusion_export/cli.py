"""`fusion-export` command line. Each command lives in `fusion_export.commands.<name>`; heavy imports (torch,
onnxruntime) happen inside the command that needs them so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-export",
        description="Export FUSION checkpoints to ONNX/TensorRT, run them, and validate them against the reference.",
    )
    parser.add_argument("--version", action="version", version=f"fusion-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reference_model.errors import FusionError

    try:
        return int(args.run(args) or 0)
    except FusionError as e:
        print(f"fusion-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"fusion-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fusion-export {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
