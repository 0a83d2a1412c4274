"""The `onnxruntime` backend: an artifact folder in an ONNX Runtime session, its in-memory graph
rewrites and providers."""
