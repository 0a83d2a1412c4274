"""Entropy calibration (TensorRT's classic INT8 calibrator): the clipping threshold whose 128-level quantized
histogram of |activation| is closest, by KL divergence, to the histogram itself.

`Histogram` accumulates |x| over calls into a fixed number of bins; when a call exceeds its range, the range doubles
and adjacent bins merge, so one pass suffices whatever order the calls come in.
"""

from __future__ import annotations

import numpy as np

BINS = 2048
LEVELS = 128  # |x| onto 0..127: the positive half of symmetric INT8


class Histogram:
    def __init__(self) -> None:
        self.counts = np.zeros(BINS, np.float64)
        self.top = 0.0  # the histogram covers [0, top)

    def add(self, values: np.ndarray) -> None:
        a = np.abs(values.astype(np.float32, copy=False)).ravel()
        peak = float(a.max()) if a.size else 0.0
        if self.top == 0.0:
            self.top = max(peak, np.finfo(np.float32).tiny) * 1.0001
        while peak >= self.top:  # double the range: pairs of bins merge
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2)])
            self.top *= 2
        self.counts += np.histogram(a, bins=BINS, range=(0.0, self.top))[0]

    def threshold(self) -> float:
        """The |x| at which to clip (the scale is threshold / 127)."""
        counts = self.counts
        last = int(np.nonzero(counts)[0][-1]) + 1 if counts.any() else BINS
        best, best_kl = last, np.inf
        for i in range(LEVELS, last + 1):
            p = counts[:i].copy()
            p[-1] += counts[i:].sum()  # clipped outliers land in the last bin
            sliced = counts[:i]
            edges = np.linspace(0, i, LEVELS + 1).astype(int)
            widths = np.diff(edges)
            level_sum = np.add.reduceat(sliced, edges[:-1])
            level_used = np.add.reduceat((sliced > 0).astype(np.float64), edges[:-1])
            per_bin = np.divide(level_sum, level_used, out=np.zeros(LEVELS), where=level_used > 0)
            q = np.repeat(per_bin, widths) * (sliced > 0)  # each level spread over its non-empty bins
            p_sum, q_sum = p.sum(), q.sum()
            if p_sum == 0 or q_sum == 0:
                continue
            p, q = p / p_sum, q / q_sum
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best, best_kl = i, kl
        return (best + 0.5) * self.top / BINS
