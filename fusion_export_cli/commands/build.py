"""`fusion-export build`: an artifact folder -> TensorRT engines (one per graph) in an engine folder.

Every network is strongly typed: the precision is the graphs' own. Profiles come from the artifact and the limits
below; `--device-memory` checks the plan against a device (a preset or GB) and reports the largest context that
fits. `--dry-run` runs every check the build runs (--out, the artifact, the plan, the device memory, the flags the
TensorRT flavour takes) and prints the plan (profiles, memory, equivalent trtexec / tensorrt_rtx command lines)
without TensorRT. `--dry-run --preset NAME` (or `--model DIR`) plans an export not yet made, from the config alone
(--dtype, --quantize, --trt-target, --query-len, --kv-cache say which): whether a model fits before its export.
TensorRT-RTX builds without a GPU (for --compute-capability targets); TensorRT 10/11 builds on the GPU it targets.
Flags the chosen flavour would ignore are refused. The folder appears only when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..options import compute_capabilities, positive_int

# The command-line tool of each flavour (tensorrt_rtx takes trtexec's flags) and whether it needs --stronglyTyped.
TOOLS = {"tensorrt": ("trtexec", True), "tensorrt-rtx": ("tensorrt_rtx", False)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engines.tensorrt.flavours import TrtFlavour
    from engines.tensorrt.plan import DEVICE_PRESETS
    from fusion_export.trt_rules.targets import TrtTarget

    p = sub.add_parser("build", help="build TensorRT engines from an artifact", description=__doc__)
    p.add_argument("artifact", metavar="ART", nargs="?", help="artifact folder from `fusion-export export`")
    p.add_argument("--out", metavar="ENG", help="engine folder to create (must not exist; not needed with --dry-run)")
    p.add_argument(
        "--trt", type=TrtFlavour, choices=list(TrtFlavour), help="TensorRT flavour (default: the one installed)"
    )
    limits = p.add_argument_group("engine limits (optimization profiles)")
    limits.add_argument("--max-batch", type=positive_int, default=1, metavar="N", help="requests per batch (1)")
    limits.add_argument("--opt-batch", type=positive_int, default=1, metavar="N", help="batch tuned for (1)")
    limits.add_argument(
        "--max-prompt", type=positive_int, metavar="N", help="prompt positions (default: the KV capacity - 1)"
    )
    limits.add_argument(
        "--max-question-tokens", type=positive_int, metavar="N", help="question tokens for the vision encoder (512)"
    )
    limits.add_argument("--max-step-tokens", type=positive_int, default=1, metavar="N", help="tokens per step (1)")
    limits.add_argument(
        "--max-context",
        type=positive_int,
        metavar="N",
        help="KV capacity (prompt + generated) for graphs exported without a fixed one (default: the longest "
        "sequence upstream ran the model at, 4096 for Phi-3.5)",
    )
    p.add_argument(
        "--device-memory",
        metavar="PRESET|GB",
        help=f"check the plan against a device: {', '.join(DEVICE_PRESETS)}, or a number of GB",
    )
    p.add_argument(
        "--compute-capability",
        type=compute_capabilities,
        metavar="SM86,SM89",
        help="TensorRT-RTX targets: SM75, SM80, SM86, SM89, SM120, SM121 (default: its own list, Ampere and newer)",
    )
    p.add_argument(
        "--opt-level", type=int, choices=range(6), default=3, metavar="0-5", help="builder optimization level (3)"
    )
    p.add_argument(
        "--timing-cache",
        metavar="PATH",
        help="timing cache file, read if present and replaced after the build (TensorRT 10/11 only; default one "
        "per version under ~/.cache/fusion-export)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and command lines; build nothing")
    planned = p.add_argument_group(
        "planning an export not yet made (--dry-run without ART: engines/tensorrt/planned_export.py)"
    )
    source = planned.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help="a preset's shape, e.g. fusion-llama3.1-8b")
    source.add_argument("--model", metavar="DIR", help="a checkpoint folder (its config.json; no weight is read)")
    planned.add_argument("--dtype", choices=["fp32", "fp16"], help="export --dtype (default fp32, as export's)")
    planned.add_argument("--quantize", choices=["int8", "int8-weight-only", "int4"],
                         help="quantize --precision (int8-weight-only: with --weight-only); default none")  # fmt: skip
    planned.add_argument("--trt-target", type=TrtTarget, choices=list(TrtTarget),
                         help="export --trt-target (default trt-10.3; int4 needs trt-10.15 or later)")  # fmt: skip
    planned.add_argument("--opset", type=positive_int, metavar="N", help="export --opset (default: the target's)")
    planned.add_argument("--query-len", type=positive_int, metavar="N", help="export --query-len")
    planned.add_argument("--kv-cache", choices=["float", "int8"], help="quantize --kv-cache (default float)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)


def size(n: int) -> str:
    """Bytes in GB, or in MB below 0.1 GB (tiny models' weights would read 0.00 GB)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def held(plan) -> str:
    """How the engines hold the decoder, in words."""
    if plan.decoder_engines == 1:
        return (f"the decoder's {size(plan.decoder_weights)} once, in one engine for prefill and decode, with the "
                f"interaction layers' {size(plan.interaction_weights)}")  # fmt: skip
    return (f"the decoder's {size(plan.decoder_weights)} twice: --plugins on keeps a prefill and a step engine, each "
            f"holding it; the prefill's interaction layers {size(plan.interaction_weights)}")  # fmt: skip


def format_plan(plan, artifact_dir: str, out: str, tools: list[tuple[str, bool, dict]], planned: bool = False) -> str:
    """The plan, then per tool (name, needs --stronglyTyped, extra command_lines arguments) its command lines."""
    from engines.tensorrt.plan import GB, command_lines

    lines = [
        f"precision {plan.precision} ({'export --dtype' if planned else 'from the graphs'}), query_len "
        f"{plan.query_len}, KV capacity {plan.capacity} "
        f"({'fixed at export' if plan.capacity_fixed_at_export else 'chosen at build'})",
        "limits: " + ", ".join(f"{k} {v}" for k, v in plan.limits.items()),
        f"planned for: {plan.planned_for()}",
    ]
    for graph in plan.graphs:
        weights = plan.weights[graph.name]
        # the types that hold a visible share (INT4 weights, their scales, an INT8 head), not the shape constants
        by_dtype = ", ".join(f"{t} {size(n)}" for t, n in weights.by_dtype.items() if n >= weights.bytes / 1000)
        lines.append(f"{graph.name} ({graph.onnx}): weights {size(weights.bytes)} ({by_dtype}), activations "
                     f"~{graph.activation_bytes / GB:.2f} GB")  # fmt: skip
        for name, shapes in graph.profile.items():
            lines.append(f"  {name:<26} min {shapes['min']}  opt {shapes['opt']}  max {shapes['max']}")
    m = plan.memory
    lines.append(
        f"device memory ~{m['total'] / GB:.2f} GB: weights {size(m['weights'])} ({held(plan)}), KV cache "
        f"{m['kv_cache'] / GB:.2f} ({kv_layout(plan)}), activations "
        f"{m['activations'] / GB:.2f} (one block the engines share), runtime {m['overhead'] / GB:.2f}"
    )
    if plan.device is not None:
        host = plan.device.get("host_bytes", 0)
        shared = f"; the runtime's embedding table ({size(host)}) is held there too" if host else ""
        lines.append(f"device: {plan.device['note']}{shared}; largest KV capacity that fits: {plan.largest_context}")
    for tool, strongly_typed, extra in tools:
        lines.append(f"equivalent {tool} command lines:")
        lines += [f"  {line}" for line in command_lines(plan, artifact_dir, out, tool, strongly_typed, **extra)]
    lines.append(
        "  (fp32 graphs with ONNX Attention need their attention marked decomposable, which only the Python "
        "builder (`fusion-export build`) can do)"
    )
    return "\n".join(lines)


def kv_layout(plan) -> str:
    """How the runtime will hold the KV cache, in words (engines/tensorrt/kv_buffers.py)."""
    ops = "/".join(plan.kv_write_ops)
    if plan.kv_in_place:
        return f"updated in place: {ops} becomes TensorRT's KV-cache update layer"
    return f"two buffers per tensor taking turns: {ops} writes a new tensor, which TensorRT does not alias"


def dry_run_flavour(args: argparse.Namespace) -> str | None:
    """The flavour a build would use, found without importing TensorRT: --trt, else the installed one in
    load_trt's order; where none is installed, the one the flags need (targets: TensorRT-RTX; a timing cache:
    TensorRT), else None (both tools' lines are printed)."""
    from engines.tensorrt.flavours import TrtFlavour

    if args.trt is not None:
        return TrtFlavour(args.trt).value
    for flavour in TrtFlavour:  # load_trt's order: enterprise TensorRT first
        if importlib.util.find_spec(flavour.module_name) is not None:
            return flavour.value
    if args.compute_capability:
        return TrtFlavour.tensorrt_rtx.value
    return TrtFlavour.tensorrt.value if args.timing_cache else None


def dry_run(args: argparse.Namespace, limits, device) -> int:
    """Every check of the real build short of TensorRT (flavour flags against the static table), then the plan."""
    from engines.tensorrt.plan import (
        COMPUTE_CAPABILITIES,
        HAS_TIMING_CACHE,
        check_flavour_flags,
        plan_build,
        plan_source,
    )
    from fusion_export.manifest import open_artifact

    flavour = dry_run_flavour(args)
    capabilities = args.compute_capability or ()
    timing_cache = Path(args.timing_cache) if args.timing_cache else None
    if flavour is not None:
        check_flavour_flags(flavour, COMPUTE_CAPABILITIES[flavour], HAS_TIMING_CACHE[flavour], capabilities,
                            timing_cache)  # fmt: skip
    if timing_cache is not None:
        from fusion_export.output_files import check_timing_cache_file

        inputs = [x for x in (args.artifact, args.model) if x]
        check_timing_cache_file(timing_cache, "--timing-cache", inputs, Path(args.out) if args.out else None)
    plan = (
        plan_source(plan_source_of(args), limits, device)
        if args.artifact is None
        else plan_build(open_artifact(args.artifact), limits, device)
    )
    # the lines of the flavour the flags select (--trt; targets are TensorRT-RTX's); both when nothing selects one
    chosen = [flavour] if args.trt is not None or capabilities or timing_cache else list(TOOLS)
    tools = []
    for name in chosen:
        tool, strongly_typed = TOOLS[name]
        extra = {"compute_capabilities": capabilities} if name == "tensorrt-rtx" else {}
        if name == "tensorrt" and timing_cache is not None:
            extra["timing_cache"] = str(timing_cache)
        tools.append((tool, strongly_typed, extra))
    print(format_plan(plan, args.artifact or "ART", args.out or "ENG", tools, planned=args.artifact is None))
    return 0


PLANNING_FLAGS = ("dtype", "quantize", "trt_target", "opset", "query_len", "kv_cache")


def plan_source_of(args: argparse.Namespace):
    """What the planned export would show the planner (--preset or --model, and the export's choices)."""
    from engines.tensorrt.planned_export import PlannedExport, planned_source
    from fusion_export.export import TENSOR_SCATTER_OPSET
    from fusion_export.trt_rules.targets import TrtTarget
    from reference_model import load_config, preset_config

    config = preset_config(args.preset) if args.preset else load_config(args.model)
    target = args.trt_target or TrtTarget.trt_10_3
    export = PlannedExport(
        precision=args.dtype or "fp32",
        quantization=args.quantize,
        target=target.value,
        opset=args.opset,
        query_len=args.query_len,
        # graphs that fix their capacity at export take --max-context there; the others at build
        max_context=args.max_context if target.resolve_opset(args.opset) >= TENSOR_SCATTER_OPSET else None,
        kv_cache=args.kv_cache or "float",
    )
    print(f"planned, not built: {args.preset or args.model} as {export.describe()} (no weight read)")
    return planned_source(config, export)


def run(args: argparse.Namespace) -> int:
    from engines.tensorrt.build import BuildOptions, build_engines
    from engines.tensorrt.plan import BuildLimits, parse_device_memory
    from fusion_export.output_files import check_output_folder
    from reference_model.errors import FusionError

    if not args.dry_run and not args.out:
        raise FusionError("--out ENG is required (or --dry-run)")
    planning = args.preset or args.model
    if args.artifact is None and not (args.dry_run and planning):
        raise FusionError("give an artifact folder ART (or --dry-run with --preset NAME or --model DIR)")
    if args.artifact is not None and planning:
        raise FusionError(f"{'--preset' if args.preset else '--model'} plans an export not yet made: give it "
                          "without ART")  # fmt: skip
    given = [f"--{flag.replace('_', '-')}" for flag in PLANNING_FLAGS if getattr(args, flag) is not None]
    if given and not planning:
        raise FusionError(f"{', '.join(given)}: only for planning an export (--dry-run --preset or --model); an "
                          "artifact's own graphs say what they hold")  # fmt: skip
    if args.out:  # the dry run checks it too: it promises what the build would do
        check_output_folder(args.out, "--out", inputs=[x for x in (args.artifact, args.model) if x])
    limits = BuildLimits(
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        max_prompt=args.max_prompt,
        max_question_tokens=args.max_question_tokens,
        max_step_tokens=args.max_step_tokens,
        max_context=args.max_context,
    )
    device = parse_device_memory(args.device_memory) if args.device_memory else None
    if args.dry_run:
        return dry_run(args, limits, device)
    options = BuildOptions(
        limits=limits,
        device_memory=device,
        flavour=args.trt,
        compute_capabilities=args.compute_capability or (),
        optimization_level=args.opt_level,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )
    result = build_engines(args.artifact, args.out, options, verbose=not args.quiet)
    print(f"engines for {result.plan.planned_for()} (recorded in engines.json)")
    for name, engine in result.engines.items():
        attention = engine["attention_layers_decomposable"]
        marked = f", {attention} attention layers marked decomposable" if attention else ""
        print(f"{name}: {engine['layers']} layers, {engine['bytes'] / 1e6:.1f} MB in {engine['build_s']:.1f} s{marked}")
    return 0
