"""The `tensorrt` backend: TensorRT flavours, the build plan, engine builds, the engine folder's
manifest and the runtime."""
