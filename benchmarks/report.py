"""Benchmark reports: JSON (machine, versions, settings, every contender's stages with spread, roofline), a
side-by-side table with ratios to the first contender, and `compare` over several saved reports."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fusion_export.output_files import OutputKind
from reference_model.errors import FusionError
from reference_model.input_files import read_json

FORMAT = "fusion-export-bench"
STAGES = ("preprocess", "session", "vision_encoder", "decoder_prefill", "ttft", "decode", "end_to_end")


def write_json(path: Path, document: dict[str, Any]) -> str:
    """Write a `python -m benchmarks.*` tool's JSON report (atomically: a stopped run leaves no half file) and
    return its text, which the tools also print."""
    import json

    from reference_model.staging import write_atomically

    text = json.dumps(document, indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))
    return text


def result_json(result) -> dict[str, Any]:
    return {
        "label": result.label,
        "kind": result.kind,
        "precision": result.precision,
        "text_only": result.text_only,
        "stages_s": {name: asdict(stats) for name, stats in result.stage_stats().items()},
        "decode_step_s": asdict(result.step_stats()),
        "tokens_per_s": result.tokens_per_s,
        "load_s": result.load_s,
        "rss_after_load_bytes": result.rss_after_load,
        "roofline": result.roofline.to_json() if result.roofline else None,
        "roofline_fraction": (
            result.roofline.fraction([s.tokens_per_s for s in result.samples]) if result.roofline else None
        ),  # fmt: skip
    }


def table(report: dict[str, Any]) -> str:
    """Medians per contender, ratios to the first one, the roofline line."""
    results = report["results"]
    base = results[0]
    head = (f"{'contender':<44} {'preproc':>8} {'vision':>8} {'prefill':>8} {'TTFT':>8} {'step p50':>9} "
            f"{'p90':>7} {'p99':>7} {'tok/s':>7} {'vs 1st':>7} {'bound':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]

    def ms(stages: dict, name: str) -> str:
        return f"{stages[name]['median'] * 1e3:>8.1f}" if name in stages else f"{'-':>8}"

    for r in results:
        s = r["stages_s"]
        step = r["decode_step_s"]
        fraction = f"{r['roofline_fraction']:>6.0%}" if r["roofline_fraction"] is not None else f"{'-':>6}"
        label = r["label"] + (" *" if r["text_only"] else "")
        lines.append(
            f"{label:<44} {ms(s, 'preprocess')} {ms(s, 'vision_encoder')} {ms(s, 'decoder_prefill')} {ms(s, 'ttft')} "
            f"{step['median'] * 1e3:>9.2f} {step['p90'] * 1e3:>7.2f} {step['p99'] * 1e3:>7.2f} "
            f"{r['tokens_per_s']:>7.1f} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f}x {fraction}"
        )
    bw = report["bandwidth_bytes_per_s"]
    lines.append(
        f"times in ms (medians of {report['settings']['iters']} interleaved rounds); * text decoder only (no vision "
        "encoder, no interaction layers)"
    )
    threads = report["settings"]["threads"]
    per_round = report.get("bandwidths_bytes_per_s") or [bw]
    spread = f", {min(per_round) / 1e9:.1f}-{max(per_round) / 1e9:.1f} over {len(per_round)} rounds"
    lines.append(
        f"roofline: {bw / 1e9:.1f} GB/s measured in this run ({threads} threads, median{spread}); 'bound' = median "
        "over rounds of tok/s / (that round's bandwidth / bytes a step must read)"
    )
    for r in results:
        if r["roofline"]:
            rl = r["roofline"]
            lines.append(
                f"  {r['label']}: {rl['weight_bytes'] / 1e6:.0f} MB weights + {rl['kv_bytes'] / 1e6:.0f} MB KV per "
                f"step -> bound {rl['bound_tokens_per_s']:.0f} tok/s"
            )
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_number(value: Any, where: str, path: Path, optional: bool = False) -> None:
    """A finite number (> 0 unless `optional`, which also allows null): what `compare` divides by and prints."""
    if optional and value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (not optional and value <= 0):
        kind = "null or a finite number" if optional else "a finite number > 0"
        raise FusionError(f"{path}: not a valid benchmark report ({where} must be {kind}, got {_short(value)})")


def _check_report(report: dict[str, Any], path: Path) -> None:
    """Every field `compare` reads, of the type it needs: a hand-edited or hostile report is refused by name."""

    def bad(where: str, expected: str, got: Any) -> FusionError:
        return FusionError(f"{path}: not a valid benchmark report ({where} must be {expected}, got {_short(got)})")

    machine = report.get("machine")
    if not isinstance(machine, dict):
        raise bad("machine", "an object", machine)
    for key in ("cpu", "gpu"):
        if not isinstance(machine.get(key), (str, type(None))):
            raise bad(f"machine.{key}", "text or null", machine.get(key))
    results = report.get("results")
    if not isinstance(results, list) or not results:
        raise bad("results", "a non-empty list", results)
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise bad(f"results[{i}]", "an object", r)
        if not isinstance(r.get("label"), str):
            raise bad(f"results[{i}].label", "text", r.get("label"))
        stages = r.get("stages_s")
        ttft = stages.get("ttft") if isinstance(stages, dict) else None
        if not isinstance(ttft, dict):
            raise bad(f"results[{i}].stages_s.ttft", "an object", ttft)
        _check_number(ttft.get("median"), f"results[{i}].stages_s.ttft.median", path)
        _check_number(r.get("tokens_per_s"), f"results[{i}].tokens_per_s", path)
        _check_number(r.get("roofline_fraction"), f"results[{i}].roofline_fraction", path, optional=True)


def load_report(path: str | Path) -> dict[str, Any]:
    """A saved benchmark report: a regular file of bounded size and nesting, the fields `compare` reads checked."""
    path = Path(path)
    try:
        report = read_json(path, expect=None)
    except FusionError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise FusionError(f"{path}: not a readable benchmark report ({reason})") from None
    if not isinstance(report, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(report), "number")
        raise FusionError(f"{path}: not a fusion-export benchmark report (a JSON {kind}, expected an object)")
    if report.get("format") != FORMAT:
        raise FusionError(f"{path}: not a fusion-export benchmark report (format {_short(report.get('format'))})")
    _check_report(report, path)
    return report


def compare(paths: list[str]) -> str:
    """Every contender of every report, side by side, with ratios to the first row."""
    rows = []
    for path in paths:
        report = load_report(path)
        for r in report["results"]:
            rows.append((Path(path).name, report, r))
    base = rows[0][2]
    head = f"{'report':<22} {'contender':<40} {'TTFT ms':>9} {'tok/s':>8} {'TTFT x':>7} {'tok/s x':>8} {'bound':>6}"
    lines = [head, "-" * len(head)]
    for name, _, r in rows:
        ttft = r["stages_s"]["ttft"]["median"]
        fraction = f"{r['roofline_fraction']:>6.0%}" if r["roofline_fraction"] is not None else f"{'-':>6}"
        lines.append(
            f"{name:<22} {r['label']:<40} {ttft * 1e3:>9.1f} {r['tokens_per_s']:>8.1f} "
            f"{ttft / base['stages_s']['ttft']['median']:>6.2f}x {r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x "
            f"{fraction}"
        )
    machines = {(r[1]["machine"]["cpu"], r[1]["machine"]["gpu"]) for r in rows}
    if len(machines) > 1:
        lines.append("note: the reports come from different machines; ratios across them mean little")
    return "\n".join(lines)


OUTPUT_KIND = OutputKind.bench_report
