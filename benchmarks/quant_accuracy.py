"""Accuracy of quantized artifacts against the float32 reference, one row per model variant, method and block
size: the figures `validate` measures, condensed.

Each row is one `validate_session` run (benchmarks/validation.py): the reference decodes greedily, the artifact
on ONNX Runtime is fed the reference's tokens (teacher forcing), and the row keeps
- the prefill logits' cosine;
- the worst stage error: the largest max |error| / max |reference| over every compared stage (vision outputs,
  prefill logits, KV caches, each step's logits), as `validate` reports each stage's;
- top-1 agreement over the steps (the prefill's token and every teacher-forced step's);
- greedy agreement length: the tokens the artifact's own greedy output shares with the reference's before the
  first difference (teacher forcing makes the first differing argmax exactly that point);
- whether `validate`'s gates for the artifact's mode pass.

    python -m benchmarks.quant_accuracy --case plain MODEL_DIR ART [ART ...] [--case outlier DIR2 ART ...]
                                        [--steps 256] [--threads 2] [--ort-accuracy-level 1|4] [--json OUT.json]

Each case is a checkpoint (the truth) and artifacts exported from it; a row's method and block size are read
from the artifact's manifest (`quantization` record). The prompt is the bundled demo picture and question. As in
`validate`, ONNX Runtime runs weight-only layers as MatMulNBits in float32 (accuracy level 1: TensorRT's W4A16
arithmetic, only the weights rounded); level 4 (INT8 activations, `bench`'s speed setting) on request.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reference_model.errors import FusionError

from .validation import VALIDATION_ACCURACY_LEVEL, ValidationReport


@dataclass(frozen=True)
class AccuracyRow:
    variant: str  # the model variant's label (e.g. plain, outlier)
    deployment: str  # the artifact's folder name
    mode: str | None  # the manifest's quantization mode (None: float)
    method: str | None  # awq | rtn (INT4), else None
    block_size: int | None  # INT4 block size, else None
    lm_head: str | None  # INT4: the LM head's form (int4, int8, float), else None
    steps: int  # argmaxes compared: the prefill's and every teacher-forced step's
    prefill_cosine: float
    worst_stage: str
    worst_stage_error: float  # max |error| / max |reference| of that stage
    lowest_cosine: float  # the lowest cosine over every compared stage (what validate's cosine gate reads)
    top1_agreement: float
    greedy_agreement: int  # tokens identical to the reference's greedy output before the first difference
    # the reference's top-2 logit margin, median over all steps and over those where the argmaxes differ: flips at
    # margins far below the typical one are near-ties parted by rounding
    margin_median: float
    flip_margin_median: float | None
    passed: bool  # validate's gates for this mode

    @staticmethod
    def of(report: ValidationReport, variant: str, deployment: str, quantization: dict[str, Any]) -> AccuracyRow:
        prefill = next(s for s in report.stages if s.stage == "prefill logits")
        worst = max(report.stages, key=lambda s: s.max_rel)
        steps = len(report.reference_ids[0])
        agreement = min(steps if d is None else d for d in report.first_divergence)
        margins = report.info["top1_margins"]
        flips = margins["at_disagreements"]
        return AccuracyRow(
            variant=variant,
            deployment=deployment,
            mode=quantization.get("mode"),
            method=quantization.get("method"),
            block_size=quantization.get("block_size"),
            lm_head=(quantization.get("layers") or {}).get("lm_head"),
            steps=steps,
            prefill_cosine=prefill.cosine,
            worst_stage=worst.stage,
            worst_stage_error=worst.max_rel,
            lowest_cosine=min(s.cosine for s in report.stages),
            top1_agreement=report.top1_agreement,
            greedy_agreement=agreement,
            margin_median=margins["median_all"],
            flip_margin_median=float(np.median(flips)) if flips else None,
            passed=report.passed,
        )


def measure_artifact(model, model_dir: Path, artifact: Path, steps: int, threads: int | None,
                     accuracy_level: int = VALIDATION_ACCURACY_LEVEL) -> ValidationReport:  # fmt: skip
    """`validate`'s comparison of one artifact (ONNX Runtime, CPU, weight-only layers as MatMulNBits at
    `accuracy_level`) against `model` over `steps` argmaxes."""
    from benchmarks.validation import Tolerances, validate_session
    from engines.backends import BackendKind, BackendOptions, open_backend
    from engines.onnxruntime.providers import Device
    from fusion_export.bundled import DEMO_IMAGE, DEMO_QUESTION
    from fusion_export.manifest import config_digest
    from reference_model import load_config, make_request, prepare_batch
    from reference_model.prompt import load_tokenizer

    options = BackendOptions(provider=Device.cpu, threads=threads, ort_accuracy_level=accuracy_level)
    candidate = open_backend(BackendKind.onnxruntime, artifact, options)
    if config_digest(load_config(model_dir)) != config_digest(candidate.config):
        raise FusionError(f"{model_dir}: its config differs from the one {artifact} was exported from")
    config = candidate.config
    request = make_request(DEMO_IMAGE, DEMO_QUESTION, load_tokenizer(candidate.model_dir), config)
    batch = prepare_batch([request], config, candidate.query_len)
    tolerances = Tolerances.for_precision(candidate.precision, candidate.quantization, candidate.kv_int8_scales)
    session = candidate.session(batch, steps)
    return validate_session(model, batch, session, steps, tolerances, candidate.kv_int8_scales)


def measure_case(variant: str, model_dir: Path, artifacts: list[Path], steps: int, threads: int | None,
                 accuracy_level: int = VALIDATION_ACCURACY_LEVEL, progress=None) -> list[AccuracyRow]:  # fmt: skip
    """One row per artifact of the checkpoint at `model_dir` (loaded once, in float32)."""
    from fusion_export.manifest import open_artifact
    from reference_model import load_model

    model = load_model(model_dir)
    rows = []
    for artifact in artifacts:
        report = measure_artifact(model, model_dir, artifact, steps, threads, accuracy_level)
        record = open_artifact(artifact).manifest.get("quantization") or {}
        rows.append(AccuracyRow.of(report, variant, Path(artifact).name, record))
        if progress:
            progress(table([rows[-1]]).splitlines()[-1])
    return rows


COLUMNS = ("variant", "artifact", "mode", "method", "block", "LM head", "prefill cos", "worst stage (of range)",
           "lowest cos", "top-1", "greedy agreement", "top-2 margin: median / at flips", "gates")  # fmt: skip


def table(rows: list[AccuracyRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = (r.variant, r.deployment, r.mode or "float", r.method or "-", str(r.block_size or "-"),
                 r.lm_head or "-", f"{r.prefill_cosine:.5f}", f"{r.worst_stage_error:.2e} ({r.worst_stage})",
                 f"{r.lowest_cosine:.5f}", f"{r.top1_agreement:.1%}", f"{r.greedy_agreement}/{r.steps}",
                 f"{r.margin_median:.3f} / " + ("-" if r.flip_margin_median is None else f"{r.flip_margin_median:.3f}"),
                 "pass" if r.passed else "FAIL")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cases(raw: list[list[str]]) -> list[tuple[str, Path, list[Path]]]:
    cases = []
    for case in raw:
        if len(case) < 3:
            raise FusionError(f"--case {' '.join(case)}: give LABEL MODEL_DIR ART [ART ...]")
        cases.append((case[0], Path(case[1]), [Path(a) for a in case[2:]]))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--case", nargs="+", action="append", required=True, metavar="LABEL MODEL_DIR ART",
                        help="a model variant: its label, its checkpoint and artifacts exported from it")  # fmt: skip
    parser.add_argument("--steps", type=int, default=256, help="argmaxes compared per artifact (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ONNX Runtime and the reference)")
    parser.add_argument(
        "--ort-accuracy-level",
        type=int,
        choices=(1, 4),
        default=VALIDATION_ACCURACY_LEVEL,
        help="MatMulNBits: 1 = float32 compute (default, as validate), 4 = INT8 activations (speed)",
    )
    parser.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    import torch

    from reference_model.staging import write_atomically

    torch.set_num_threads(args.threads)
    rows: list[AccuracyRow] = []
    try:
        if args.steps < 1:
            raise FusionError(f"--steps {args.steps}: at least 1")
        for variant, model_dir, artifacts in _cases(args.case):
            rows += measure_case(variant, model_dir, artifacts, args.steps, args.threads, args.ort_accuracy_level,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    except FusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        document = {"steps": args.steps, "threads": args.threads, "ort_accuracy_level": args.ort_accuracy_level,
                    "rows": [asdict(r) for r in rows]}  # fmt: skip
        write_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(document, indent=2)))
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
