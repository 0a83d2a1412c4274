"""The plugin ops' definitions, which the exporter emits: reference op, ONNX schema and local
function (domain `fusion_export.plugins`). Kernels and TensorRT registrations: engines/plugins/."""
