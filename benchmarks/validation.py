"""Stage-by-stage parity of a deployed backend against the PyTorch reference.

Both run the same requests. The reference decodes greedily; the candidate is fed the reference's tokens
(teacher forcing), so every step compares logits for the same context, and the first step where the
candidate's argmax differs is exactly where its own greedy output would first diverge. Compared stages:
vision tokens, init latents, global context, prefill logits, the KV cache after prefill, each decode step's
logits and the KV cache at the end.

Tolerances (`Tolerances.for_precision`), with the reason for each number:
- fp32: 1e-4 absolute everywhere, cosine >= 0.99999 and identical greedy ids. Both sides compute in float32;
  reduction order differs between ONNX Runtime and PyTorch kernels, which moves results by ~1e-6..1e-5 on the
  oracle (relative ~1e-6, so cosines agree to ~1e-12; 1e-5 of slack still catches a wrong row or channel).

`max_rel` is the stage's max absolute error over its max |reference| (an elementwise ratio explodes near 0).
- fp16: weights and activations are rounded to 10-bit mantissas (relative 4.9e-4 per rounding) and errors
  compound over the layers (the oracle's fp16 export lands at 1.4e-3 of each stage's range), so the bound is
  1e-2 of the stage's max |reference| with cosine >= 0.9995; greedy ids may legitimately part at near-ties, so
  they are reported, and gated by top-1 agreement >= 0.9 over the steps.
- int8 (W8A8): each linear layer rounds its input to 1/254 of the calibrated range and its weights to 1/254 of
  each column's; measured worst stage at 7.7e-2 of its range on the demo model and 4.9e-2 on `small`
  (cosines 0.9975-0.9997), so 0.15 of the range and cosine >= 0.99 (the accuracy target for prefill logits).
  Top-1 flips happen at near-ties (reference top-2 margins ~0.04 against a median of 0.18 on `small`), so
  agreement is gated at >= 0.9 and the flips' margins are reported.
- int8-weight-only: only weight rounding (measured 2.6e-2 of the range on `small`, cosines >= 0.9995): 0.08
  of the range, cosine >= 0.995, top-1 >= 0.9.
- int4-weight-only (INT4 blocks in the decoder, the LM head and the vision tower INT4, INT8 or float): each
  weight is rounded to 1/14 of its block's range, ~16x INT8's step, and the error compounds over the layers.
  Measured on `small` (random weights; `python -m benchmarks.quant_accuracy`, 256 steps, blocks of 32/64/128,
  AWQ and RTN, the plain checkpoint and its outlier variant; ONNX Runtime at VALIDATION_ACCURACY_LEVEL): worst
  stage 0.28-0.36 of its range with AWQ, up to 0.46 with RTN; lowest stage cosine 0.954-0.971 with AWQ, down to
  0.927 with RTN (the outlier variant's, blocks of 128). So 0.5 of the range and cosine >= 0.93: one decoder
  layer's INT4 values misplaced (half-blocks swapped; RTN-128 otherwise) brings the prefill logits' cosine from
  0.966 to 0.80 / 0.89 / 0.92 (layer 0 down_proj / layer 4 qkv / layer 7 gate_up), so a wiring fault fails the
  gate except late in the stack; a scale taken from the neighbouring block moves it by < 0.01 (random blocks
  have similar ranges), which only the quantizer's own tests catch. RTN at blocks of 128 on the outlier variant
  fails it, as it should. Top-1 agreement is 48-57% with AWQ (29-57% with RTN): random weights make near-ties
  everywhere (the reference's median top-2 margin is 0.18 on logits of std ~1) and INT4's logit error is about
  that size (RMS ~0.2 at cosine 0.98), so half the steps part at near-ties (the flips' median margin is
  0.10-0.15). The issue's 90% target presumes a trained model's decided logits, which random weights cannot
  show. So top-1 is a floor here, >= 0.25: a broken graph agrees on almost no step (~1 / vocabulary at random),
  while rounding alone stayed above 0.28 on `small`.
- an INT8 KV cache (fp32 linear layers): the reference quantizes its cache with the artifact's scales, so both
  sides store the same integers except where a value lies within float32 noise of a rounding boundary: there
  the two round apart by exactly one step (30 of 1.3M cache values on the demo model, 24 steps). So the cache
  stages are bounded by one step (the largest scale), and the steps' logits at 1e-3 (those flips moved them by
  up to 1.5e-4; against the float32 reference the INT8 cache moves them by 8.7e-3); a flip can part a near-tie,
  so greedy ids are gated by top-1 >= 0.9 as for fp16. The vision stages and the prefill's logits (its
  attention reads its own keys unquantized) keep fp32's 1e-4. With INT8 linear layers too, their gates apply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from fusion_export.precision import Precision
from reference_model import FusionModel, ReferenceSession
from reference_model.generation import NonFiniteError
from reference_model.sequence import PreparedBatch


class CandidateSession(Protocol):
    """A DecoderSession that also exposes its vision outputs and KV cache for comparison."""

    vision: Any

    def prefill(self) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def cache_arrays(self) -> list[np.ndarray]: ...


# ONNX Runtime on CPU runs weight-only layers as MatMulNBits; at accuracy level 1 it computes in float32 on the
# dequantized weights (TensorRT's W4A16 arithmetic), so validation measures the artifact's own rounding. Level 4
# (generate's and bench's, for speed) also rounds the activations to INT8 per block inside the kernel.
VALIDATION_ACCURACY_LEVEL = 1


@dataclass(frozen=True)
class Tolerances:
    atol: float | None  # absolute bound on every stage (None: use rtol_of_range)
    rtol_of_range: float | None  # bound relative to the stage's max |reference|
    min_cosine: float
    identical_ids: bool  # greedy ids must match exactly
    min_top1: float  # else: fraction of steps whose argmax must agree
    kv_atol: float | None = None  # the KV cache stages' absolute bound, where it is not `atol` (an INT8 cache)
    step_atol: float | None = None  # the decode steps' logits' absolute bound, where it is not `atol` (idem)

    @staticmethod
    def for_precision(
        precision: Precision,
        quantization: str | None = None,
        kv_int8_scales: list[tuple[float, float]] | None = None,
    ) -> Tolerances:
        if quantization is not None:
            return QUANTIZED_GATES[quantization]
        if kv_int8_scales is not None and precision is Precision.fp32:
            step = max(s for pair in kv_int8_scales for s in pair) * 1.001  # + float32 rounding of q * scale
            return Tolerances(atol=1e-4, rtol_of_range=None, min_cosine=0.99999, identical_ids=False, min_top1=0.9,
                              kv_atol=step, step_atol=1e-3)  # fmt: skip
        if precision is Precision.fp32:
            return Tolerances(atol=1e-4, rtol_of_range=None, min_cosine=0.99999, identical_ids=True, min_top1=1.0)
        if precision is Precision.fp16:
            return Tolerances(atol=None, rtol_of_range=1e-2, min_cosine=0.9995, identical_ids=False, min_top1=0.9)
        raise ValueError(f"no validation gates for {precision!r}")


# Q/DQ graphs, by the mode their Q/DQ nodes make them (Artifact.quantization; module docstring for the reasons).
QUANTIZED_GATES = {
    "int8": Tolerances(atol=None, rtol_of_range=0.15, min_cosine=0.99, identical_ids=False, min_top1=0.9),
    "int8-weight-only": Tolerances(atol=None, rtol_of_range=0.08, min_cosine=0.995, identical_ids=False, min_top1=0.9),
    "int4-weight-only": Tolerances(atol=None, rtol_of_range=0.5, min_cosine=0.93, identical_ids=False, min_top1=0.25),
}


@dataclass
class StageMetrics:
    stage: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    cosine: float
    bound: float  # the absolute bound applied
    passed: bool
    top1_agreement: float | None = None


@dataclass
class ValidationReport:
    stages: list[StageMetrics]
    reference_ids: list[list[int]]
    candidate_ids: list[list[int]]  # the candidate's own argmax at each teacher-forced step
    first_divergence: list[int | None]  # per row: first step whose argmax differs, or None
    top1_agreement: float
    tolerances: Tolerances
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the candidate stopped (e.g. produced NaN); later stages were not compared

    @property
    def passed(self) -> bool:
        ids_ok = self.top1_agreement >= self.tolerances.min_top1 and (
            not self.tolerances.identical_ids or all(d is None for d in self.first_divergence)
        )
        return self.error is None and ids_ok and all(s.passed for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerances": asdict(self.tolerances),
            "stages": [asdict(s) for s in self.stages],
            "reference_ids": self.reference_ids,
            "candidate_ids": self.candidate_ids,
            "first_divergence": self.first_divergence,
            "top1_agreement": self.top1_agreement,
            "error": self.error,
            **self.info,
        }

    def table(self) -> str:
        rows = [f"{'stage':<22} {'shape':<20} {'max_abs':>10} {'max_rel':>10} {'cosine':>10} {'bound':>9}  result"]
        for s in self.stages:
            shape = "x".join(map(str, s.shape))
            result = "ok" if s.passed else "FAIL"
            if s.top1_agreement is not None:
                result += f" (top-1 {s.top1_agreement:.0%})"
            numbers = f"{s.max_abs:>10.2e} {s.max_rel:>10.2e} {s.cosine:>10.6f} {s.bound:>9.1e}"
            rows.append(f"{s.stage:<22} {shape:<20} {numbers}  {result}")
        for b, (ref, div) in enumerate(zip(self.reference_ids, self.first_divergence)):
            where = (
                "identical"
                if div is None
                else f"first divergence at step {div}: {self.candidate_ids[b][div]} vs {ref[div]}"
            )
            rows.append(f"row {b} greedy ids {ref}: {where}")
        if self.error:
            rows.append(f"candidate stopped: {self.error}")
        margins = self.info.get("top1_margins")
        if margins and margins["at_disagreements"]:
            flips = margins["at_disagreements"]
            rows.append(
                f"top-1 disagreements: {len(flips)}, at reference top-2 margins {np.median(flips):.3g} (median; max "
                f"{max(flips):.3g}) against {margins['median_all']:.3g} over all steps"
            )
        rows.append(f"top-1 agreement {self.top1_agreement:.1%}; {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(rows)


class _Accumulator:
    """Streams comparison statistics over pieces of a stage (e.g. one KV layer at a time)."""

    def __init__(self) -> None:
        self.max_abs = self.scale = self.dot = self.norm_a = self.norm_b = 0.0
        self.finite = True

    def update(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        a, b = candidate.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
        if not a.size:
            return
        self.finite &= bool(np.isfinite(a).all())
        self.max_abs = max(self.max_abs, float(np.abs(a - b).max()))
        self.scale = max(self.scale, float(np.abs(b).max()))
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)

    def metrics(self, stage: str, shape: list[int], tol: Tolerances) -> StageMetrics:
        denom = (self.norm_a * self.norm_b) ** 0.5
        cosine = self.dot / denom if denom > 0 else float(self.norm_a == self.norm_b)
        bound = tol.atol if tol.atol is not None else tol.rtol_of_range * self.scale
        passed = self.finite and self.max_abs <= bound and cosine >= tol.min_cosine
        rel = self.max_abs / self.scale if self.scale else 0.0
        return StageMetrics(stage, shape, self.max_abs, rel, cosine, bound, passed)


def compare(stage: str, candidate: np.ndarray, reference: np.ndarray, tol: Tolerances) -> StageMetrics:
    if candidate.shape != reference.shape:
        return StageMetrics(stage, list(reference.shape), float("inf"), float("inf"), 0.0, 0.0, False)
    acc = _Accumulator()
    acc.update(candidate, reference)
    return acc.metrics(stage, list(reference.shape), tol)


def _reference_cache(session: ReferenceSession) -> list[np.ndarray]:
    return [t.float().numpy() for t in session.cache.dequantized()]


def _kv_stage(
    name: str, candidate: list[np.ndarray], reference: list[np.ndarray], written: np.ndarray, tol
) -> tuple[StageMetrics, list[dict[str, float]]]:
    """Every layer's keys and values over the columns both sides have written (written: (B, C) bool); also
    each layer's own key and value metrics (where a quantized or fp16 model loses accuracy)."""
    acc = _Accumulator()
    per_layer: list[dict[str, float]] = []
    rows, cols = np.nonzero(written)
    if tol.kv_atol is not None:
        tol = replace(tol, atol=tol.kv_atol)
    for i, (cand, ref) in enumerate(zip(candidate, reference)):
        piece = (cand[rows, :, cols], ref[rows, :, cols])  # (n_written, kv_heads, head_dim)
        acc.update(*piece)
        own = _Accumulator()
        own.update(*piece)
        m = own.metrics("", [], tol)
        if i % 2 == 0:
            per_layer.append({"layer": i // 2})
        kind = "key" if i % 2 == 0 else "value"
        per_layer[-1].update({f"{kind}_cosine": m.cosine, f"{kind}_max_rel": m.max_rel})
    B, H, _, hd = reference[0].shape
    return acc.metrics(name, [len(reference), B, H, int(written.sum(axis=1).max()), hd], tol), per_layer


def validate_session(
    model: FusionModel,
    batch: PreparedBatch,
    candidate: CandidateSession,
    max_new_tokens: int,
    tolerances: Tolerances,
    kv_int8_scales: list[tuple[float, float]] | None = None,
) -> ValidationReport:
    """Compare `candidate` with the reference stage by stage; a candidate stage that produces NaN/Inf ends the
    comparison there, as a failed report naming that stage (the reference's own failure is an input error).
    kv_int8_scales: the candidate's INT8 KV cache scales, which the reference then quantizes its cache with."""
    reference = ReferenceSession(model, batch, max_new_tokens, kv_int8_scales)
    tol = tolerances
    step_tol = tol if tol.step_atol is None else replace(tol, atol=tol.step_atol)  # the decode steps' logits
    stages: list[StageMetrics] = []
    info = {"seq_len": batch.layout.seq_len, "batch": batch.layout.batch_size, "query_len": batch.query_len}

    ref_logits = [reference.prefill()]
    try:
        cand_logits = [candidate.prefill()]
    except NonFiniteError as e:
        rows = [[] for _ in range(batch.layout.batch_size)]
        return ValidationReport([], rows, rows, [None] * len(rows), 0.0, tol, info, error=str(e))
    for name in ("image_tokens", "init_latents", "global_ctx"):
        cand, ref = getattr(candidate.vision, name), getattr(reference.vision, name)
        stages.append(compare(name, cand.float().numpy(), ref.float().numpy(), tol))
    stages.append(compare("prefill logits", cand_logits[0].numpy(), ref_logits[0].float().numpy(), tol))
    valid = batch.layout.attention_mask.numpy()
    kv_stage, info["kv_layers_after_prefill"] = _kv_stage(
        "kv cache after prefill", candidate.cache_arrays(), _reference_cache(reference), valid, tol
    )
    stages.append(kv_stage)

    error = None
    ref_ids: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = ref_logits[-1].argmax(dim=-1)
        ref_ids.append(token)
        if step == max_new_tokens - 1:
            break
        ref_logits.append(reference.step(token))
        try:
            cand_logits.append(candidate.step(token))
        except NonFiniteError as e:
            error = str(e)
            break
        stages.append(
            compare(f"step {step + 1} logits", cand_logits[-1].numpy(), ref_logits[-1].float().numpy(), step_tol)
        )
    if max_new_tokens > 1 and error is None:
        written = np.concatenate([valid, np.ones((valid.shape[0], len(ref_logits) - 1), dtype=bool)], axis=1)
        kv_stage, info["kv_layers_at_the_end"] = _kv_stage(
            "kv cache at the end", candidate.cache_arrays(), _reference_cache(reference), written, tol
        )
        stages.append(kv_stage)

    reference_ids = torch.stack(ref_ids, dim=1)  # (B, N), N = the steps both sides completed
    candidate_ids = torch.stack([logits.argmax(dim=-1) for logits in cand_logits], dim=1)
    agree = (reference_ids == candidate_ids).numpy()
    for s, step_agree in zip([st for st in stages if st.stage.endswith("logits")], agree.T):
        s.top1_agreement = float(step_agree.mean())
    divergence = [int(np.argmin(row)) if not row.all() else None for row in agree]
    # How close the reference's own choice was where the candidate disagrees: flips at near-ties (a top-2 margin
    # within the stage's error) are rounding, flips at wide margins are a fault.
    top2 = torch.stack([logits.float().topk(2, dim=-1).values for logits in ref_logits[: agree.shape[1]]], dim=1)
    margins = (top2[..., 0] - top2[..., 1]).numpy()  # (B, N)
    info["top1_margins"] = {
        "median_all": float(np.median(margins)),
        "at_disagreements": sorted(float(m) for m in margins[~agree]),
    }
    return ValidationReport(
        stages=stages,
        reference_ids=reference_ids.tolist(),
        candidate_ids=candidate_ids.tolist(),
        first_divergence=divergence,
        top1_agreement=float(agree.mean()),
        tolerances=tol,
        info=info,
        error=error,
    )
