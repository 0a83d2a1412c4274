"""`fusion-export bench`: latency and memory of every backend and peer, side by side, in one run.

Contenders: the reference (`--model DIR`, or `--preset NAME`: random weights written once to a cache folder and
reused), ONNX Runtime on artifacts (`--artifacts ART`, repeatable; with a preset, `--export trt-10.3,trt-10.15`
exports it once per flavour into the cache), TensorRT engines (`--engines ENG`), and peers on the same decoder
weights (`--peers genai,genai-int8,genai-int4,transformers`: onnxruntime-genai built by its own model builder,
transformers' Phi-3 or Llama; text decoder only). They run round-robin, one request each per round, after warm-up
rounds; the report gives medians with spread, ratios to the first contender and each one's fraction of the bandwidth
bound measured in the same run. `--sweep 512,1024,2048,4096` adds decode latency against context length.

    fusion-export bench compare A.json B.json ...    side by side, ratios to the first row
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from engines.tensorrt.plan import MAX_BATCH

from ..options import (
    MAX_ROUNDS,
    MAX_TOKENS,
    ORT_ATTENTION_FORMS,
    add_torch_options,
    count_up_to,
    positive_int,
    positive_int_up_to,
    require_module,
    threads,
)

PEERS = ("genai", "genai-int8", "genai-int4", "transformers")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from reference_model.config import PRESETS

    p = sub.add_parser("bench", help="latency/memory benchmark of backends and peers", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("compare", nargs="*", metavar="compare REPORT.json", help="compare saved reports instead")
    p.add_argument("--model", metavar="DIR", help="checkpoint: the reference, and the peers' decoder weights")
    p.add_argument("--preset", choices=PRESETS, help="random checkpoint of this shape (cached) instead of --model")
    several = {"action": "extend", "nargs": "+", "default": []}
    p.add_argument("--artifacts", **several, metavar="ART", help="ONNX Runtime on artifacts")
    p.add_argument("--engines", **several, metavar="ENG", help="TensorRT on engine folders")
    p.add_argument("--export", metavar="TARGETS", help="with --preset/--model: export for these targets (cached)")
    p.add_argument("--peers", metavar="LIST", help=f"comma-separated: {', '.join(PEERS)}")
    p.add_argument("--no-reference", action="store_true", help="leave the PyTorch reference out")
    p.add_argument("--torch", action="store_true", help="the torch backend on the checkpoint (--dtype, --device)")
    add_torch_options(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="reference dtype (fp32)")
    p.add_argument("--device", default="cpu", help="reference torch device (cpu)")
    tokens = positive_int_up_to(MAX_TOKENS)  # the model's own limit is checked once it is known (run_bench)
    p.add_argument("--batch", type=positive_int_up_to(MAX_BATCH), default=1, metavar="N")
    p.add_argument("--prompt-len", type=tokens, default=1040, metavar="N", help="positions, image included")
    p.add_argument("--new-tokens", type=tokens, default=64, metavar="N")
    p.add_argument("--query-len", type=positive_int, metavar="N", help="latents per image (default 64)")
    p.add_argument("--threads", type=threads, default=2, metavar="N", help="CPU threads per backend (2)")
    p.add_argument(
        "--ort-weights",
        choices=["auto", "shared", "packed"],
        default="auto",
        help="ONNX Runtime on CPU: decoder weights shared by the sessions or prepacked per session",
    )
    p.add_argument(
        "--ort-int8-kernels",
        choices=["auto", "on", "off"],
        default="auto",
        help="ONNX Runtime on CPU, W8A8 artifacts: integer kernels, or float math on the dequantized values; auto: "
        "integer kernels only where the CPU has VNNI/AMX (x86 without them saturates)",
    )
    p.add_argument(
        "--ort-attention",
        type=_attention_forms,
        default=["fused"],
        metavar="FORMS",
        help="ONNX Runtime on CPU: fused (GroupQueryAttention, default), graph (as exported), or both: fused,graph",
    )
    p.add_argument(
        "--ort-prefill-arena",
        type=_arena_forms,
        default=["on"],
        metavar="FORMS",
        help="ONNX Runtime on CPU: the vision and prefill sessions with their memory arena (on, default), without "
        "it (off: as `serve` runs them, memory flat across batch shapes), or both: on,off",
    )
    p.add_argument("--warmup", type=count_up_to(MAX_ROUNDS), default=1, metavar="N", help="rounds dropped first (1)")
    p.add_argument("--iters", type=positive_int_up_to(MAX_ROUNDS), default=3, metavar="N", help="measured rounds (3)")
    p.add_argument("--sweep", type=_contexts, metavar="CONTEXTS",
                   help="also decode latency at these contexts, e.g. 512,1024,2048")  # fmt: skip
    p.add_argument("--out", metavar="JSON", help="write the report")
    p.add_argument("--plot", metavar="PNG", help="write the plot")
    p.add_argument("--cache-dir", metavar="DIR", help="preset checkpoints, exports, peer models (~/.cache/...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def _attention_forms(text: str) -> list[str]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    if not forms or any(f not in ORT_ATTENTION_FORMS for f in forms) or len(set(forms)) != len(forms):
        raise argparse.ArgumentTypeError(f"{text!r}: fused, graph, or fused,graph")
    return forms


def _arena_forms(text: str) -> list[bool]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    if not forms or any(f not in ("on", "off") for f in forms) or len(set(forms)) != len(forms):
        raise argparse.ArgumentTypeError(f"{text!r}: on, off, or on,off")
    return [f == "on" for f in forms]


MAX_SWEEP = 64  # contexts in one --sweep (each one runs every contender twice)


def _contexts(text: str) -> list[int]:
    """'512,1024' -> [512, 1024]: positive context lengths, each within the token bound, at most MAX_SWEEP."""
    pieces = [piece.strip() for piece in text.split(",")]
    if not all(pieces) or len(pieces) > MAX_SWEEP:
        raise argparse.ArgumentTypeError(
            f"expected up to {MAX_SWEEP} comma-separated positive integers, got {text[:60]!r}"
        )
    return [positive_int_up_to(MAX_TOKENS)(piece) for piece in pieces]


def cache_dir(args: argparse.Namespace) -> Path:
    import os

    if args.cache_dir:
        return Path(args.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusion-export" / "bench"


def _model_dir(args: argparse.Namespace, progress) -> Path | None:
    """--model, or the preset's random checkpoint (written once)."""
    from reference_model.synthetic import write_random_checkpoint

    if args.model:
        return Path(args.model)
    if not args.preset:
        return None
    folder = cache_dir(args) / f"{args.preset}-seed0"
    if not folder.exists():
        progress(f"writing a random {args.preset} checkpoint to {folder} (once)")
        write_random_checkpoint(folder, args.preset, seed=0)
    return folder


def _exports(args: argparse.Namespace, model_dir: Path, query_len: int, progress) -> list[Path]:
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.trt_rules.targets import TrtTarget

    out = []
    for target in (t.strip() for t in args.export.split(",") if t.strip()):
        folder = cache_dir(args) / f"{model_dir.name}-{target}-q{query_len}"
        if not folder.exists():
            progress(f"exporting {model_dir.name} for {target} to {folder} (once)")
            export_artifact(model_dir, folder, ExportOptions(query_len=query_len, trt_target=TrtTarget(target)),
                            verbose=False)  # fmt: skip
        out.append(folder)
    return out


def run(args: argparse.Namespace) -> int:
    from reference_model.errors import FusionError

    if args.compare:
        if args.compare[0] != "compare" or len(args.compare) < 2:
            raise FusionError("usage: fusion-export bench compare REPORT.json [REPORT.json ...]")
        from benchmarks.report import compare

        print(compare(args.compare[1:]))
        return 0
    return run_bench(args)


def run_bench(args: argparse.Namespace) -> int:
    import statistics
    import time

    import torch

    from benchmarks.harness import BackendContender, BenchSettings, run_rounds, sweep_decode
    from benchmarks.machine import machine_info, measure_bandwidth, rss_bytes
    from benchmarks.peers import GenaiContender, TransformersContender, build_genai_model
    from benchmarks.plot import plot_report
    from benchmarks.report import FORMAT, result_json, table
    from benchmarks.roofline import decode_roofline
    from engines.backends import BackendKind, BackendOptions, open_backend, resolve_query_len
    from fusion_export.output_files import OutputKind, check_output_file, write_json
    from reference_model import load_config
    from reference_model.errors import FusionError

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    if args.out:
        check_output_file(args.out, "--out", OutputKind.bench_report)
    if args.plot:
        check_output_file(args.plot, "--plot", OutputKind.bench_plot)
        require_module("matplotlib", "--plot", "bench")
    if args.model and args.preset:
        raise FusionError("--model and --preset go separately: the preset is a random checkpoint of that shape")
    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise FusionError(f"--peers {','.join(unknown)}: choose from {', '.join(PEERS)}")
    if any(p.startswith("genai") for p in peers):
        require_module("onnxruntime_genai", "--peers genai*", "bench")
    sweep = args.sweep or []
    settings = BenchSettings(
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        query_len=args.query_len,
        warmup=args.warmup,
        iters=args.iters,
        threads=args.threads,
    )
    torch.set_num_threads(args.threads)

    model_dir = _model_dir(args, progress)
    if model_dir is None and not (args.artifacts or args.engines):
        raise FusionError("give --model DIR or --preset NAME, and/or --artifacts ART / --engines ENG")
    if (peers or args.export) and model_dir is None:
        raise FusionError("--peers and --export need the checkpoint: --model DIR or --preset NAME")
    config = load_config(model_dir) if model_dir else None
    contenders = []
    if model_dir and not args.no_reference:
        backend = open_backend(BackendKind.reference, model_dir, BackendOptions(dtype=args.dtype, device=args.device))
        contenders.append(BackendContender(f"reference (PyTorch {args.dtype}, {args.device})", backend, settings))
    for flag in ("max_context", "torch_kernels", "cuda_graph", "torch_compile"):
        if getattr(args, flag) is not None and not args.torch:
            raise FusionError(f"--{flag.replace('_', '-')} applies to the torch backend: add --torch")
    if args.torch:
        if model_dir is None:
            raise FusionError("--torch needs the checkpoint: --model DIR or --preset NAME")
        options = BackendOptions(dtype=args.dtype, device=args.device, max_context=args.max_context,
                                 kernels=args.torch_kernels, cuda_graph=args.cuda_graph,
                                 compiled=args.torch_compile)  # fmt: skip
        backend = open_backend(BackendKind.torch, model_dir, options)
        label = f"torch (PyTorch {args.dtype}, {args.device}; attention {backend.settings.attention}"
        label += ", CUDA graph" * backend.settings.graph + ", Triton kernels" * backend.settings.kernels
        label += ", torch.compile" * backend.settings.compiled + ")"
        contenders.append(BackendContender(label, backend, settings))
    artifacts = list(args.artifacts)
    if args.export:
        artifacts += _exports(args, model_dir, resolve_query_len(args.query_len, config), progress)
    for folder, attention, arena in itertools.product(artifacts, args.ort_attention, args.ort_prefill_arena):
        options = BackendOptions(threads=args.threads, ort_weights=args.ort_weights, ort_attention=attention,
                                 ort_int8_kernels=args.ort_int8_kernels, ort_prefill_arena=arena)  # fmt: skip
        backend = open_backend(BackendKind.onnxruntime, folder, options)
        target = backend.artifact.manifest["export"]["trt_target"]
        numbers = (backend.quantization or backend.precision) + ("" if backend.int8_kernels else " as float math")
        numbers += ", INT8 KV" if backend.kv_int8_scales else ""
        form = ", graph attention" if attention == "graph" and len(args.ort_attention) > 1 else ""
        form += ", no prefill arena" if not arena and len(args.ort_prefill_arena) > 1 else ""
        contenders.append(BackendContender(f"onnxruntime {target} {numbers} ({Path(folder).name}{form})",
                                           backend, settings))  # fmt: skip
    for folder in args.engines:
        backend = open_backend(BackendKind.tensorrt, folder, BackendOptions(device=args.device.replace("cpu", "cuda")))
        contenders.append(BackendContender(f"tensorrt {backend.precision} ({Path(folder).name})", backend, settings))
    model_config = config or contenders[0].backend.config
    vocab, positions = model_config.decoder.vocab_size, model_config.decoder.rope.max_position_embeddings
    if settings.prompt_len + settings.new_tokens > positions:  # before any peer is built or weights are read
        raise FusionError(
            f"--prompt-len {settings.prompt_len} + --new-tokens {settings.new_tokens} exceed the model's "
            f"{positions} positions"
        )
    for peer in peers:
        if peer.startswith("genai"):
            precision = peer.partition("-")[2] or "fp32"
            folder = cache_dir(args) / f"{model_dir.name}-genai-{precision}"
            if not (folder / "genai_config.json").exists():
                progress(f"building the onnxruntime-genai {precision} model into {folder} (once)")
            build_genai_model(model_dir, folder, precision)
            contenders.append(GenaiContender(f"onnxruntime-genai {precision}", folder, settings, vocab, precision))
        else:
            name = f"transformers {config.decoder_family.hf_name} sdpa fp32"
            contenders.append(TransformersContender(name, model_dir, settings, vocab))

    for contender in contenders:
        progress(f"loading {contender.label}")
        contender.prepare()
    device = "cuda" if any(c.kind == "tensorrt" for c in contenders) or args.device.startswith("cuda") else "cpu"

    def bandwidth_probe() -> float:
        rate = measure_bandwidth(args.threads, device)
        progress(f"memory bandwidth ({args.threads} threads, {device}): {rate / 1e9:.1f} GB/s")
        return rate

    started = time.perf_counter()
    results, bandwidths = run_rounds(contenders, settings, progress, probe=bandwidth_probe)
    for contender, result in zip(contenders, results):
        columns = contender.kv_columns(settings.prompt_len)
        cfg = config or contender.backend.config
        result.roofline = decode_roofline(cfg, contender.weight_value_bytes(), contender.kv_value_bytes(), columns,
                                          settings.batch, bandwidths, contender.weight_bytes())  # fmt: skip
    report = {
        "format": FORMAT,
        "machine": machine_info(),
        "settings": {**vars(settings), "image": str(settings.image) if settings.image else None},
        "bandwidth_bytes_per_s": statistics.median(bandwidths),
        "bandwidths_bytes_per_s": bandwidths,  # one per timed round, measured at its start
        "bandwidth_device": device,
        "results": [result_json(r) for r in results],
        "peak_rss_bytes": rss_bytes()[1],
        "peak_device_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    if sweep:
        report["sweep"] = {k: {str(c): v for c, v in d.items()} for k, d in
                           sweep_decode(contenders, settings, sweep, progress).items()}  # fmt: skip
    report["elapsed_s"] = time.perf_counter() - started
    print(table(report))
    if args.out:
        write_json(args.out, OutputKind.bench_report, {k: v for k, v in report.items() if k != "format"})
        print(f"report: {args.out}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot: {args.plot}")
    return 0
