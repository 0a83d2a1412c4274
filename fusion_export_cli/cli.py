"""`fusion-export` command line. Each command lives in `fusion_export_cli.commands.<name>`; heavy imports (torch,
onnxruntime) happen inside the command that needs them so `--help` stays instant.

Exit status: 0 success, 1 a check failed (validate, check-trt, demo), 2 bad input (one message naming the file,
tensor or flag at fault), 130 Ctrl-C, 143 SIGTERM (129 SIGHUP). Interrupted commands leave nothing behind: every
output is built under a temporary name that is removed as the interruption unwinds, and a signal that a library
swallowed is raised again before anything is published (reference_model/interruption.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from fusion_export import __version__
from reference_model import interruption
from reference_model.interruption import Terminated

from .commands import COMMANDS


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


def _stopped(name: str, signum: int) -> int:
    """Say why the command stopped; the exit status a shell expects of a process ended by `signum`."""
    reason = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    print(f"{name}: {reason}", file=sys.stderr)
    return 128 + signum


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

    previous = interruption.install()
    name = f"fusion-export {args.command}"
    try:
        code = int(args.run(args) or 0)
        interruption.raise_if_signalled()  # a signal a library swallowed still ends the command as one
        return code
    except (FusionError, FileExistsError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled up or a file that vanished mid-run: say so, without a traceback
        print(f"{name}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(name, signal.SIGINT)
    except Terminated as e:
        return _stopped(name, e.signum)
    except Exception as e:
        # the signal a library turned into its own error, or one it swallowed before this error came about
        behind = _signal_behind(e)
        signum = interruption.signalled() if behind is None else getattr(behind, "signum", signal.SIGINT)
        if signum is None:
            raise
        return _stopped(name, signum)
    finally:
        interruption.restore(previous)


def exit_as_main(code: int) -> None:
    """Exit `python -m fusion_export_cli.cli` with `code`. After a Ctrl-C, CPython run as `-m` exits by SIGINT (-2 to
    a parent process) whatever the status, once a KeyboardInterrupt has passed through code evaluated from source
    text (`exec`/`eval` of a string, which libraries use to generate functions): its unhandled-interrupt flag is
    set there and checked after finalization. The installed `fusion-export` script is not affected; the suite's
    Ctrl-C export test saw it as a flaky -2. An interrupted command has already cleaned up as it unwound, so it
    leaves without finalization, with the status it reported."""
    if code == 128 + signal.SIGINT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_as_main(main())
