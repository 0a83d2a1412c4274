"""CLI commands: each module exposes `add_parser(subparsers)`, which sets `run` on its arguments."""

from . import demo, generate, golden

COMMANDS = (demo, generate, golden)
