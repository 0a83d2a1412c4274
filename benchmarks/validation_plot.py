"""One PNG per validation report: error by stage, by decode step (with the top-1 disagreements marked), and by
decoder layer (the KV cache after prefill). Marked as written by `fusion-export validate` in its PNG text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion_export.output_files import OutputKind, write_atomically


def plot_validation(report: dict[str, Any], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    stages = report["stages"]
    fixed = [s for s in stages if not s["stage"].startswith("step ")]
    steps = [s for s in stages if s["stage"].startswith("step ")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    floor = 1e-9  # log axes: an exact match is drawn at the floor

    ax = axes[0]
    names = [s["stage"] for s in fixed]
    ax.barh(names, [max(s["max_rel"], floor) for s in fixed], label="max abs error / max |reference|")
    ax.barh(names, [max(1 - s["cosine"], floor) for s in fixed], height=0.4, label="1 - cosine")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_title("error by stage")
    ax.legend(fontsize=8)

    ax = axes[1]
    if steps:
        x = list(range(1, len(steps) + 1))
        ax.plot(x, [max(s["max_rel"], floor) for s in steps], label="max rel")
        ax.plot(x, [max(1 - s["cosine"], floor) for s in steps], label="1 - cosine")
        flips = [i for i, s in zip(x, steps) if s.get("top1_agreement") is not None and s["top1_agreement"] < 1]
        ax.plot(flips, [max(steps[i - 1]["max_rel"], floor) for i in flips], "rx", label="top-1 differs")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("decode step (teacher-forced)")
    ax.set_title(f"decode steps: top-1 agreement {report['top1_agreement']:.1%}")

    ax = axes[2]
    layers = report.get("kv_layers_after_prefill") or []
    if layers:
        x = [e["layer"] for e in layers]
        ax.plot(x, [max(1 - e["key_cosine"], floor) for e in layers], "o-", label="keys: 1 - cosine")
        ax.plot(x, [max(1 - e["value_cosine"], floor) for e in layers], "s-", label="values: 1 - cosine")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_title("KV cache after prefill, by layer")

    fig.suptitle(title)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": OutputKind.validation_plot.marker})

    write_atomically(path, save)
    plt.close(fig)
    return Path(path)
