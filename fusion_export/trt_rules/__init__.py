"""Static TensorRT target rules: which opset and operators a target's ONNX parser takes, checked
without TensorRT (the installed TensorRT: engines/tensorrt/)."""
