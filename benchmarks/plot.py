"""One PNG per benchmark: the time-to-first-token stage breakdown and tokens/s per contender, and (with a sweep)
decode-step latency against context length. Marked as written by `fusion-export bench` in its PNG text, so a later
run may replace it and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion_export.output_files import write_atomically

STACK = (("preprocess", "preprocessing"), ("session", "session set-up"), ("vision_encoder", "vision encoder"),
         ("decoder_prefill", "prefill"))  # fmt: skip


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    results, sweep = report["results"], report.get("sweep")
    panels = 3 if sweep else 2
    # the sweep's legend goes under its panel (one line per contender), so it never covers the curves
    height = 4.5 + (0.16 * len(sweep) if sweep else 0.0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, height))
    labels = [r["label"] + (" *" if r["text_only"] else "") for r in results]

    ax = axes[0]
    bottom = [0.0] * len(results)
    for key, name in STACK:
        values = [r["stages_s"].get(key, {}).get("median", 0.0) * 1e3 for r in results]
        ax.barh(labels, values, left=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("ms to the first token (median)")
    ax.set_title("TTFT by stage")
    ax.legend(fontsize=8)
    ax.invert_yaxis()

    ax = axes[1]
    tokens = [r["tokens_per_s"] for r in results]
    ax.barh(labels, tokens, color="tab:green")
    for i, r in enumerate(results):
        if r["roofline"]:
            ax.plot([r["roofline"]["bound_tokens_per_s"]] * 2, [i - 0.4, i + 0.4], color="black")
    ax.set_xlabel("decode tokens/s (black: bandwidth bound)")
    ax.set_title("decode")
    ax.invert_yaxis()
    ax.set_yticklabels([])

    if sweep:
        ax = axes[2]
        for label, points in sweep.items():
            pairs = sorted((int(c), v * 1e3) for c, v in points.items() if v is not None)
            if pairs:
                ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        contexts = sorted({int(c) for points in sweep.values() for c in points})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (positions)")
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title("decode latency vs context")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))

    machine = report["machine"]
    fig.suptitle(f"{machine['cpu']} ({report['settings']['threads']} threads)"
                 + (f", {machine['gpu']}" if machine["gpu"] else "")  # fmt: skip
                 + f"; prompt {report['settings']['prompt_len']} positions, batch {report['settings']['batch']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": "fusion-export bench"})

    write_atomically(path, save)
    plt.close(fig)
    return Path(path)
