"""A conversation of several turns about one image, asked turn by turn (each later turn continues the kept state)
and recomputed from scratch at every turn (the image encoded again, the first turn's prompt and every later turn's
chunk prefilled again, the answers given as the ids generated for them): time to first token of each, and whether
their tokens are equal. One JSON report.

    python -m benchmarks.conversation FOLDER --out conversation.json [--turns 3] [--new-tokens 32] [--threads 2]

`FOLDER` is anything `Pipeline.open` opens (a checkpoint, an artifact, an engine folder); without one the `small`
preset is written and exported once under --cache-dir (as benchmarks/serve_load.py does). Greedy decoding; both
forms run in this process, one after the other per turn, so the ratio is measured on the same machine state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

QUESTIONS = ["What is in front of the house?", "And what colour is it?", "Why would it be there?",
             "What else is near it?", "Describe the sky."]  # fmt: skip


def _timed(conversation, question: str, sampling) -> tuple[object, float]:
    """(the answer, seconds from the call to its first token)."""
    first: list[float] = []
    start = time.perf_counter()
    answer = conversation.ask(question, sampling, on_token=lambda *_: first or first.append(time.perf_counter()))
    return answer, first[0] - start


def run(folder: Path, turns: int, new_tokens: int, threads: int | None) -> dict:
    from engines.backends import BackendOptions
    from engines.pipeline import Pipeline, Sampling
    from fusion_export.bundled import DEMO_IMAGE

    fusion = Pipeline.open(folder, options=BackendOptions(threads=threads))
    sampling = Sampling(max_new_tokens=new_tokens)
    warm = fusion.conversation(DEMO_IMAGE)  # warm-up: first-run allocations, the follow-up's decoder (made once)
    started = time.perf_counter()
    for question in QUESTIONS[:2]:
        warm.ask(question, max_new_tokens=2)
    warm_s = time.perf_counter() - started
    chat = fusion.conversation(DEMO_IMAGE)
    rows, history = [], []  # history: (question, the ids generated for it) of the turns so far
    for k in range(turns):
        question = QUESTIONS[k % len(QUESTIONS)]
        kept, kept_s = _timed(chat, question, sampling)
        again, again_s = _timed(fusion.conversation(DEMO_IMAGE, history), question, sampling)
        rows.append({"turn": k + 1, "prompt_positions": kept.prompt_positions, "ttft_kept_s": round(kept_s, 4),
                     "ttft_recomputed_s": round(again_s, 4), "speedup": round(again_s / kept_s, 2),
                     "tokens_equal": kept.token_ids == again.token_ids})  # fmt: skip
        history.append((question, kept.token_ids))
    return {"backend": fusion.describe(), "warm_up_s": round(warm_s, 2), "turns": rows}


def main(argv: list[str] | None = None) -> int:
    from .report import write_json
    from .serve_load import preset_artifact

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, help="default: the small preset, exported")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fusion-export" / "serve-load")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    folder = args.folder or preset_artifact(args.cache_dir)
    report = {"folder": str(folder), "new_tokens": args.new_tokens, "threads": args.threads,
              **run(folder, args.turns, args.new_tokens, args.threads)}  # fmt: skip
    print(write_json(args.out, report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
