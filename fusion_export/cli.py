"""`fusion-export` command line. Each command lives in `fusion_export.commands.<name>`; heavy imports (torch,
onnxruntime) happen inside the command that needs them so `--help` stays instant.

Exit status: 0 success, 1 a check failed (validate, check-trt, demo), 2 bad input (one message naming the file,
tensor or flag at fault), 130 Ctrl-C, 143 SIGTERM (129 SIGHUP). Interrupted commands leave nothing behind: every
output is built under a temporary name that is removed as the interruption unwinds.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so cleanup handlers run as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def _signal_behind(error: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM that a library turned into its own error (onnxruntime's import re-raises whatever
    interrupted it as ImportError), found along the exception's cause/context chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        error = error.__cause__ or error.__context__
    return None


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

    previous = {signum: signal.signal(signum, _raise_terminated) for signum in (signal.SIGTERM, signal.SIGHUP)}
    name = f"fusion-export {args.command}"
    try:
        return int(args.run(args) or 0)
    except (FusionError, FileExistsError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled up or a file that vanished mid-run: say so, without a traceback
        print(f"{name}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{name}: terminated by {e}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        signalled = _signal_behind(e)
        if isinstance(signalled, Terminated):
            print(f"{name}: terminated by {signalled}", file=sys.stderr)
            return 128 + signalled.signum
        if isinstance(signalled, KeyboardInterrupt):
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
