"""CLI commands: each module exposes `add_parser(subparsers)`, which sets `run` on its arguments."""

from . import bench, build, check_trt, demo, export, generate, golden, quantize, serve, validate

COMMANDS = (demo, generate, golden, export, quantize, build, validate, check_trt, bench, serve)
