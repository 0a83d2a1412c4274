"""What a fixed KV capacity costs a decode step: the step graph's attention reads every column of the buffer
under a mask, so a graph exported with `--max-context N` pays for N columns whatever the request's length.

Runs one artifact on ONNX Runtime with the KV buffer sized to each capacity in turn (the graphs' cost depends on
the buffer they are given, so one dynamic-capacity export stands for every fixed-capacity one), interleaving the
capacities round by round so machine noise hits them alike, and prints per-step medians and ratios to the
smallest capacity (the request's own length).

    python -m benchmarks.kv_capacity ART [--capacities 2048,4096,16384] [--prompt-text 200] [--steps 32]
                                         [--rounds 3] [--threads 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_capacity", description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--capacities", default="2048,4096,16384", help="fixed capacities to compare")
    parser.add_argument("--prompt-text", type=int, default=200, help="question characters (prompt length)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    from engines.onnxruntime.session import OrtModel
    from fusion_export.bundled import DEMO_IMAGE
    from fusion_export.manifest import open_artifact
    from reference_model import make_request, prepare_batch
    from reference_model.prompt import load_tokenizer

    artifact = open_artifact(args.artifact)
    if artifact.max_context is not None:
        parser.error(f"{args.artifact} has a fixed capacity ({artifact.max_context}); export one without --max-context")
    model = OrtModel(artifact, threads=args.threads).load()
    config = model.config
    question = ("describe the picture " * (args.prompt_text // 20 + 1))[: args.prompt_text]
    batch = prepare_batch(
        [make_request(DEMO_IMAGE, question, load_tokenizer(artifact.model_dir), config)], config, artifact.query_len
    )
    needed = batch.layout.seq_len + args.steps + 1
    capacities = [needed] + [int(c) for c in args.capacities.split(",") if int(c) > needed]
    token = torch.zeros(1, dtype=torch.int64)
    times: dict[int, list[float]] = {c: [] for c in capacities}
    for _ in range(args.rounds):
        for capacity in capacities:
            model.max_context = capacity  # the buffer size; the dynamic-capacity graphs take any
            session = model.session(batch, args.steps + 1)
            session.prefill()
            session.step(token)  # warm-up
            for _ in range(args.steps):
                start = time.perf_counter()
                session.step(token)
                times[capacity].append(time.perf_counter() - start)
    base = statistics.median(times[needed])
    rows = []
    print(f"prompt {batch.layout.seq_len} positions, {args.steps} steps x {args.rounds} rounds, {args.threads} threads")
    print(f"{'capacity':>9} {'median ms':>10} {'p90 ms':>8} {'vs request-sized':>17}")
    for capacity in capacities:
        samples = sorted(times[capacity])
        median, p90 = statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]
        rows.append({"capacity": capacity, "median_ms": median * 1e3, "p90_ms": p90 * 1e3, "ratio": median / base})
        print(f"{capacity:>9} {median * 1e3:>10.2f} {p90 * 1e3:>8.2f} {median / base:>16.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompt_positions": batch.layout.seq_len, "threads": args.threads, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
