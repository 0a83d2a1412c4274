"""Latency and accuracy benchmarks that write JSON and plots."""

import engines  # noqa: F401  (ONNX Runtime's telemetry off: fusion_export/__init__.py)
