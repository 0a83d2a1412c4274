"""INT4 weight-only quantization in blocks along the input dimension, in the one ONNX form TensorRT and ONNX
Runtime both read.

A linear layer's weight W [K, N] (the exporter's `<param>.weight.T`) becomes an INT4 initializer [K, N] and a scale
[K / B, N] in the activation dtype: one scale per block of B consecutive input rows of each output column,
symmetric, no zero point. A `DequantizeLinear` (opset 21: axis 0, block_size B) feeds the MatMul; TensorRT fuses
it into a weight-only INT4 GEMM, ONNX Runtime into `MatMulNBits`.

Two ways to choose the INT4 values:
- rtn: round to nearest, each block's scale its max |w| / 7.
- awq (activation-aware, Lin et al. 2023): the input channels that carry large activations matter more, so before
  rounding, W's input rows are multiplied by s = mean|x|^alpha and the input divided by s (the product is
  unchanged); alpha is searched per group of layers sharing an input on the calibration activations, by the
  layer outputs' squared error. Then each block's range is clipped to the ratio of its max |w| that minimises
  the block's output error on the same activations. 1 / s is folded into the normalisation that produces the
  input where that is exact (its scale, and bias for LayerNorm), elsewhere applied by a Mul before the layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from reference_model.errors import FusionError

from .qdq import stored_scale

QMAX = 7  # symmetric signed INT4: [-7, 7]; -8 unused, so zero needs no zero point
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 128  # see docs/quantization.md: accuracy and speed per block size on `small`
METHODS = ("awq", "rtn")
MIN_SCALE = 1e-8  # an all-zero block still needs a positive scale (TensorRT requires scales > 0)
ALPHAS = np.linspace(0.0, 1.0, 11)  # alpha 0 is s = 1: plain RTN is always a candidate
CLIP_RATIOS = np.linspace(1.0, 0.5, 11)  # candidate block ranges, as fractions of the block's max |w|
MAX_SAMPLE_ROWS = 256  # calibration rows kept per input for the searches (their cost is rows * K * N)
ROWS_PER_CALL = 64  # rows drawn from each run's activation, so a long prefill does not crowd out decode steps
COLUMN_CHUNK = 1024  # output columns per clip-search chunk: bounds the [rows, blocks, columns] error tensor


def check_block_size(weight: str, shape: Sequence[int], block_size: int) -> None:
    """A layer's input dimension must be a whole number of blocks, its output dimension even (two INT4 values
    per byte along the last dimension, as TensorRT stores them)."""
    k, n = shape
    if k % block_size:
        raise FusionError(f"--block-size {block_size}: does not divide {weight}'s input dimension {k}")
    if n % 2:
        raise FusionError(f"{weight}: output dimension {n} is odd (INT4 is packed two values per byte)")


def quantize_blocks(
    weight: np.ndarray, block_size: int, clip: np.ndarray | None = None, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (INT4 values as int8 [K, N], scale [K / B, N] in scale_dtype); `clip` [K / B, N] scales
    each block's range (1: its max |w|). The values are rounded with the stored (dtype-rounded) scale, so the
    dequantized weight is exactly q * scale as the runtimes compute it."""
    k, n = weight.shape
    blocks = weight.astype(np.float32, copy=False).reshape(k // block_size, block_size, n)
    absmax = np.abs(blocks).max(axis=1)
    if clip is not None:
        absmax = absmax * clip
    scale = stored_scale(np.maximum(absmax / QMAX, MIN_SCALE), scale_dtype)
    q = np.clip(np.rint(blocks / scale.astype(np.float32)[:, None, :]), -QMAX, QMAX).astype(np.int8)
    return q.reshape(k, n), scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    k, n = q.shape
    blocks = scale.shape[0]
    return (q.reshape(blocks, k // blocks, n).astype(np.float32) * scale.astype(np.float32)[:, None, :]).reshape(k, n)


@dataclass
class ActivationSample:
    """Per group of weights sharing an input: the mean |x| per input channel over every calibration row, and a
    seeded random sample of at most MAX_SAMPLE_ROWS rows (ROWS_PER_CALL per run) for AWQ's searches. Keyed by
    the group's sorted weight names, so the prefill's and the step's runs of one layer merge."""

    max_rows: int = MAX_SAMPLE_ROWS
    seed: int = 0
    channel_sum: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)
    count: dict[tuple[str, ...], int] = field(default_factory=dict)
    rows: dict[tuple[str, ...], list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def observe(self, weights: list[str], activation: np.ndarray) -> None:
        key = tuple(sorted(weights))
        x = activation.astype(np.float32, copy=False).reshape(-1, activation.shape[-1])
        total = self.channel_sum.get(key)
        sums = np.abs(x).sum(axis=0, dtype=np.float64)
        self.channel_sum[key] = sums if total is None else total + sums
        self.count[key] = self.count.get(key, 0) + x.shape[0]
        pick = self.rng.choice(x.shape[0], min(ROWS_PER_CALL, x.shape[0]), replace=False)
        self.rows.setdefault(key, []).append(x[np.sort(pick)].copy())

    def group_of(self, weight: str) -> tuple[str, ...] | None:
        return next((key for key in self.channel_sum if weight in key), None)

    def statistics(self, key: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(mean |x| per channel [K], sample rows [R, K])."""
        mean = (self.channel_sum[key] / self.count[key]).astype(np.float32)
        rows = np.concatenate(self.rows[key])
        if rows.shape[0] > self.max_rows:
            rows = rows[np.sort(self.rng.choice(rows.shape[0], self.max_rows, replace=False))]
        return mean, rows


def _output_error(x: np.ndarray, weight: np.ndarray, reference: np.ndarray, block_size: int, scale_dtype) -> float:
    q, scale = quantize_blocks(weight, block_size, scale_dtype=scale_dtype)
    return float(np.square(x @ dequantize_blocks(q, scale) - reference).mean())


def search_scales(
    mean: np.ndarray, rows: np.ndarray, weights: Iterable[np.ndarray], block_size: int, scale_dtype=np.float32
) -> tuple[np.ndarray, float]:
    """AWQ's per-input-channel scale s = mean^alpha (normalised around 1) for a group of weights sharing the
    input `rows`: the alpha whose scaled, rounded weights give the outputs closest to the float ones. Returns
    (s [K], alpha); alpha 0 (s = 1) wins when scaling does not help."""
    w = np.concatenate([np.asarray(x, np.float32) for x in weights], axis=1)
    reference = rows @ w
    mean = np.maximum(mean, 1e-6)
    best = (np.inf, np.ones_like(mean), 0.0)
    for alpha in ALPHAS:
        s = np.power(mean, alpha)
        s = np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4).astype(np.float32)
        error = _output_error(rows / s, w * s[:, None], reference, block_size, scale_dtype)
        if error < best[0]:
            best = (error, s, float(alpha))
    return best[1], best[2]


def search_clip(rows: np.ndarray, weight: np.ndarray, block_size: int, scale_dtype=np.float32) -> np.ndarray:
    """Per block, the fraction of its max |w| whose rounding error changes the block's share of the outputs
    least on the sample `rows` (AWQ's clipping): [K / B, N]. Blocks are scored apart, as in AWQ."""
    k, n = weight.shape
    nb = k // block_size
    x = rows.reshape(rows.shape[0], nb, block_size)
    best = np.ones((nb, n), np.float32)
    for start in range(0, n, COLUMN_CHUNK):
        w = weight[:, start : start + COLUMN_CHUNK].astype(np.float32)
        cols = w.shape[1]
        best_error = np.full((nb, cols), np.inf, np.float32)
        for ratio in CLIP_RATIOS:
            clip = np.full((nb, cols), ratio, np.float32)
            q, scale = quantize_blocks(w, block_size, clip, scale_dtype)
            delta = (dequantize_blocks(q, scale) - w).reshape(nb, block_size, cols)
            error = np.square(np.einsum("rkb,kbn->rkn", x, delta, optimize=True)).sum(axis=0)
            better = error < best_error
            best_error[better] = error[better]
            best[:, start : start + cols][better] = ratio
    return best
