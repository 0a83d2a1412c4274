"""TensorRT engine building, plugins and runtimes behind the shared generation interface."""

import fusion_export  # noqa: F401  (its __init__ switches ONNX Runtime's telemetry off before any import)
