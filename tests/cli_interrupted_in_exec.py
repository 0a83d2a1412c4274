"""Run as `python -m tests.cli_interrupted_in_exec [sys-exit]` by test_interruptions.py: a command whose Ctrl-C
first passes through code evaluated from a string (as libraries' generated functions are), then is caught by the
CLI, which reports 130. With `sys-exit`, the module exits the plain way, to show what that gives."""

import sys

from fusion_export_cli import cli


def _command(args) -> int:
    exec("raise KeyboardInterrupt")  # the Ctrl-C arrives inside generated code; CPython flags it there
    return 0


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.set_defaults(run=_command)
    return parser


if __name__ == "__main__":
    cli.build_parser = _parser
    code = cli.main(["export"])
    if sys.argv[1:] == ["sys-exit"]:
        sys.exit(code)
    cli.exit_as_main(code)
