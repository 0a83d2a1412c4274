"""CLI commands: each module exposes `add_parser(subparsers)`, which sets `run` on its arguments."""

from . import bench, build, check_trt, demo, export, generate, golden, validate

COMMANDS = (demo, generate, golden, export, build, validate, check_trt, bench)
