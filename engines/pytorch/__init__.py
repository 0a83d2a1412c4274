"""The `torch` backend: a checkpoint on PyTorch with a static KV cache, CUDA-graph decode and the Triton kernels
(`backend.py`; the step in `decode_step.py`, the prefill's kernels in `prefill.py`, a batch in `session.py`)."""
