"""TensorRT engine building, plugins and runtimes behind the shared generation interface (upcoming)."""
