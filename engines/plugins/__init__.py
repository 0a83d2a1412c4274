"""FUSION's TensorRT plugins: one op each, with one definition of its semantics (a PyTorch reference op) and the
kernels that implement it. Triton kernels run on NVIDIA GPUs and, under `TRITON_INTERPRET=1`, on the CPU."""
