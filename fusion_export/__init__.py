"""fusion-export: export FUSION to ONNX / TensorRT, run the graphs, validate them against the reference."""

import os

# ONNX Runtime 1.32's Linux wheels send telemetry (1DS, mobile.events.data.microsoft.com) from a background thread;
# `disable_telemetry_events()` comes too late for what its import already queued, this variable is read at import.
# Nothing leaves the machine (tests/test_no_network.py). The one place: engines and benchmarks import this package
# first, and the CLI imports it for its version.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


__version__ = "0.1.0"
