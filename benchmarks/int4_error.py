"""Rounding error of INT4 blocks and INT8 columns on one Gaussian layer: the RMS output error relative to the
output's RMS (`python -m benchmarks.int4_error`; docs/quantization.md). Trained weights are not Gaussian; this is
the yardstick for the random-weight presets the accuracy tables use."""

from __future__ import annotations

import numpy as np

from engines.quantization.int4 import BLOCK_SIZES, dequantize_blocks, quantize_blocks
from engines.quantization.qdq import quantize_weight


def relative_errors(k: int = 1536, n: int = 512, rows: int = 256, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    reference = x @ w

    def relative(y: np.ndarray) -> float:
        return float(np.sqrt(np.square(y - reference).mean() / np.square(reference).mean()))

    errors = {f"int4 rtn, blocks of {b}": relative(x @ dequantize_blocks(*quantize_blocks(w, b))) for b in BLOCK_SIZES}
    q, scale = quantize_weight(w)
    errors["int8 per column"] = relative(x @ (q.astype(np.float32) * scale))
    return errors


if __name__ == "__main__":
    for name, error in relative_errors().items():
        print(f"{name}: {error:.4f}")
