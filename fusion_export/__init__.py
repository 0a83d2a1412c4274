"""fusion-export: export FUSION to ONNX / TensorRT, run the graphs, validate them against the reference."""

__version__ = "0.1.0"
