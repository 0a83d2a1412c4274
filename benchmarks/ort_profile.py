"""Where ONNX Runtime spends its time: per-op-type kernel times of one artifact's vision encoder, prefill and decode
step, from ONNX Runtime's own profiler, over real requests driven by the bench harness.

    python -m benchmarks.ort_profile ARTIFACT [--requests 3] [--prompt-len 1040] [--new-tokens 64] [--threads 2]
                                     [--top 12] [--out ops.json]

The first request warms the sessions (arena growth, first-touch page faults: a first prefill ran ~1.6x slower
than later ones on the `small` preset); the vision encoder's and prefill's figures are the last request's, the step
figures every later step's. Not a timed test: a tool for the benchmark notes (README, `fusion-export bench` section).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

from engines.onnxruntime.session import OrtModel
from fusion_export.manifest import open_artifact
from reference_model.input_files import read_json

from .harness import BackendContender, BenchSettings


class ProfiledOrtModel(OrtModel):
    """The onnxruntime backend with ONNX Runtime's profiler on in every session, files under `folder`."""

    def __init__(self, artifact, folder: Path, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        self.folder = folder

    def _options(self, spin: bool = False):
        opts = super()._options(spin)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(self.folder / "ort")
        return opts


def op_breakdown(events: list[dict], since_run: int) -> dict:
    """Kernel time per op type, per run, over the runs from `since_run` on (0 = all)."""
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[since_run]["ts"]
    kept = [r for r in runs if r["ts"] >= start]
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = len(kept)
    return {
        "runs": n,
        "run_ms_median": statistics.median(r["dur"] for r in kept) / 1e3,
        "kernel_ms_per_run": sum(per_op.values()) / n / 1e3,
        "nodes_per_run": sum(count.values()) / n,
        "ops": {op: {"ms": t / n / 1e3, "count": count[op] / n} for op, t in per_op.most_common()},
    }


def profile(artifact_dir: Path, requests: int, settings: BenchSettings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = ProfiledOrtModel(open_artifact(artifact_dir), Path(tmp), settings.threads)
        contender = BackendContender("profiled", model, settings)
        contender.prepare()
        for _ in range(requests):
            contender.run()
        out = {"artifact": str(artifact_dir), "attention": model.attention_form}
        sessions = {"vision_encoder": model.vision, "decoder_prefill": model.prefill_session,
                    "decoder_step": model.step_session}  # fmt: skip
        for name, session in sessions.items():
            # onnxruntime's own trace (a JSON list, one event per op run): larger than a config, still bounded
            events = read_json(session.end_profiling(), "onnxruntime profile", max_bytes=1 << 30, expect=list)
            runs = sum(e.get("name") == "model_run" for e in events)
            # vision and prefill: the last request's run; step: every step after the first request's
            out[name] = op_breakdown(events, settings.new_tokens - 1 if name == "decoder_step" else runs - 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=1040)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.requests < 2:
        p.error("--requests must be at least 2 (the first one warms the sessions)")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token comes from the prefill, the rest from steps)")
    from reference_model.errors import FusionError

    settings = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads)
    try:
        result = profile(args.artifact, args.requests, settings)
    except FusionError as e:  # an unreadable artifact, a prompt that does not fit: said without a traceback
        p.error(str(e))
    for name in ("vision_encoder", "decoder_prefill", "decoder_step"):
        r = result[name]
        print(
            f"{name}: {r['runs']} runs, median {r['run_ms_median']:.2f} ms, kernels {r['kernel_ms_per_run']:.2f} ms, "
            f"{r['nodes_per_run']:.0f} nodes per run"
        )
        for op, v in list(r["ops"].items())[: args.top]:
            print(f"  {op:36s} {v['ms']:9.3f} ms  x{v['count']:.0f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
