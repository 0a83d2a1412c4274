"""`fusion-export demo`: the whole job on an embedded default, with no download.

Builds a small random FUSION checkpoint in the real format (once, under --out), answers a question about the
bundled picture with the PyTorch reference, exports the model to ONNX (once), validates the graphs stage by
stage against the reference, answers again with ONNX Runtime, and builds TensorRT engines from the export when a
TensorRT is installed (run and validated when there is a GPU). The weights are random, so the answer is noise;
the point is the pipeline and its numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from fusion_export.bundled import DEMO_IMAGE, DEMO_QUESTION

from ..options import max_new_tokens

DEMO_VISION_LAYERS = 4  # the oracles' tiny shapes with a shallower tower, so the demo's export stays quick
DEMO_SEED = 4  # random weights whose greedy answer does not collapse into one repeated token
# The family's four members at toy sizes: (decoder preset, tower preset). `phi` is FUSION-Phi3.5, `x-` the
# SigLIP2 tower; the LLaMA decoder is the llama oracle's with 16-wide heads (8 heads over 2 KV heads), which
# ONNX Runtime's fused grouped-query attention takes.
DEMO_FAMILIES = {"phi": ("tiny", "tiny"), "x-phi": ("tiny", "tiny-x-llama"), "llama": ("tiny-x-llama", "tiny"),
                 "x-llama": ("tiny-x-llama", "tiny-x-llama")}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline on a bundled tiny random model", description=__doc__)
    p.add_argument("--out", default="demo-output", metavar="DIR", help="work folder (default ./demo-output)")
    p.add_argument("--question", default=DEMO_QUESTION, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=max_new_tokens, default=24, metavar="N")
    p.add_argument("--family", choices=sorted(DEMO_FAMILIES), default="phi",
                   help="which of FUSION's four models to imitate: Phi-3.5 or Llama-3.1 decoder, SigLIP or (x-) "
                        "SigLIP2 tower (default phi)")  # fmt: skip
    p.set_defaults(run=run)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def demo_config(family: str = "phi"):
    """The demo's model of a family: its tiny decoder and tower with a shallow tower."""
    from reference_model import preset_config

    decoder_preset, tower_preset = DEMO_FAMILIES[family]
    base, tower = preset_config(decoder_preset), preset_config(tower_preset)
    decoder = base.decoder
    if decoder.family == "llama":
        rope = dataclasses.replace(decoder.rope, head_dim=16)
        decoder = dataclasses.replace(decoder, hidden_size=128, intermediate_size=256, rope=rope)
    vision = dataclasses.replace(tower.vision, num_layers=DEMO_VISION_LAYERS)
    raw = dict(base.raw, mm_vision_tower=tower.raw["mm_vision_tower"])
    return dataclasses.replace(base, decoder=decoder, vision=vision, raw=raw)


def run(args: argparse.Namespace) -> int:
    from benchmarks.validation import Tolerances, validate_session
    from engines.onnxruntime.session import OrtModel
    from fusion_export.export import ExportOptions, export_artifact
    from fusion_export.manifest import open_artifact
    from fusion_export.output_files import check_output_folder, protected_folder
    from reference_model import GenerationConfig, ReferenceSession, generate, load_model, make_request, prepare_batch
    from reference_model.errors import FusionError
    from reference_model.prompt import build_prompt, load_tokenizer, stop_token_ids, template_of
    from reference_model.synthetic import write_random_checkpoint

    from ..text_stream import TextStreamer

    out = Path(args.out)
    suffix = "" if args.family == "phi" else f"-{args.family}"  # each family's files side by side under --out
    model_dir, artifact_dir = out / f"tiny-random-fusion{suffix}", out / f"onnx-fp32{suffix}"
    if not out.exists():
        check_output_folder(out, "--out")
    elif not out.is_dir() or protected_folder(out):
        raise FusionError(f"--out {out}: not a demo work folder (it is a file, a checkpoint or an artifact)")
    started = time.perf_counter()

    t = _step("1. checkpoint")
    if model_dir.exists():
        print(f"reusing {model_dir}")
    else:
        write_random_checkpoint(model_dir, demo_config(args.family), seed=DEMO_SEED)
        print(f"wrote a random FUSION checkpoint in the real format to {model_dir}")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"loaded: {n_params / 1e6:.2f} M parameters; {cfg.model_type}; tower {cfg.raw.get('mm_vision_tower')} "
        f"{cfg.vision.num_layers} layers x {cfg.vision.hidden_size}, decoder {cfg.decoder.num_layers} layers x "
        f"{cfg.decoder.hidden_size} ({cfg.decoder.num_heads} heads, {cfg.decoder.num_kv_heads} KV heads), "
        f"{cfg.interaction.num_layers} interaction layers after decoder layers {list(cfg.interaction.decoder_layers)} "
        f"({time.perf_counter() - t:.2f} s)"
    )

    _step("2. inputs")
    query_len = cfg.default_query_len
    request = make_request(DEMO_IMAGE, args.question, tokenizer, cfg)
    batch = prepare_batch([request], cfg, query_len)
    print(f"image {DEMO_IMAGE.name} -> static_hd crops {list(request.pixel_values.shape)}")
    print(f"prompt: {build_prompt(args.question, template_of(tokenizer))!r}")
    print(
        f"{len(request.input_ids)} prompt ids + {cfg.vision.num_patches} image tokens + {query_len} latents "
        f"-> {batch.layout.seq_len} positions; {len(request.instructs)} instruction ids for the vision tower"
    )

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, cfg.eos_token_ids)
    )

    def answer(session, backend: str):
        t = _step(f"{backend}: generate (greedy)")
        print("answer: ", end="", flush=True)
        result = generate(session, config, on_token=TextStreamer(tokenizer))
        timings = result.timings
        print(f"\n{len(result.token_ids[0])} tokens {result.token_ids[0]} (finish: {result.finish_reasons[0]})")
        print(
            f"prefill {timings['prefill_s'] * 1e3:.0f} ms (vision encoder + {batch.layout.seq_len}-position prefill), "
            f"decode {timings['decode_tokens_per_s']:.1f} tok/s; total {time.perf_counter() - t:.2f} s"
        )
        return result

    reference = answer(ReferenceSession(model, batch, config.max_new_tokens), "3. PyTorch reference")

    t = _step("4. export to ONNX (vision encoder, decoder prefill + step, shared weights, manifest)")
    if artifact_dir.exists():
        print(f"reusing {artifact_dir}")
    else:
        export_artifact(model_dir, artifact_dir, ExportOptions(query_len=query_len), verbose=True)
    artifact = open_artifact(artifact_dir)
    files, trt = artifact.manifest["files"], artifact.manifest["trt_compat"]
    size_mb = sum(f["bytes"] for f in files.values()) / 1e6
    print(f"{len(files)} files, {size_mb:.1f} MB; TensorRT check ({trt['target']}): {'OK' if trt['ok'] else 'FAILED'}")

    _step(f"5. validate the graphs against the reference (ONNX Runtime, {artifact.precision} gates)")
    runtime = OrtModel(artifact)
    report = validate_session(model, batch, runtime.session(batch, 8), 8, Tolerances.for_precision(artifact.precision))
    print(report.table())

    onnx = answer(runtime.session(batch, config.max_new_tokens), "6. ONNX Runtime")
    same = onnx.token_ids == reference.token_ids
    print(f"\nONNX Runtime tokens {'identical to' if same else 'DIFFER from'} the reference's")

    engines_ok = build_demo_engines(artifact_dir, out / f"engines{suffix}", model, batch, config, answer, reference)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    print("(random weights: the answer is noise; `fusion-export generate --model DIR ...` runs a real checkpoint)")
    return 0 if same and report.passed and engines_ok else 1


def build_demo_engines(artifact_dir: Path, engine_dir: Path, model, batch, config, answer, reference) -> bool:
    """Step 7: TensorRT engines from the export, when a TensorRT is installed; run and validated on a GPU."""
    import torch

    from benchmarks.validation import Tolerances, validate_session
    from engines.backends import BackendKind, open_backend
    from engines.tensorrt.build import BuildOptions, build_engines
    from engines.tensorrt.flavours import TrtUnavailableError, load_trt
    from engines.tensorrt.plan import BuildLimits

    _step("7. build TensorRT engines (one per graph, strongly typed)")
    try:
        trt = load_trt()
    except TrtUnavailableError as e:
        print(f"skipped: {e}")
        return True
    if engine_dir.exists():
        print(f"reusing {engine_dir}")
    else:
        options = BuildOptions(limits=BuildLimits(max_context=1024))
        result = build_engines(artifact_dir, engine_dir, options, verbose=True)
        for name, engine in result.engines.items():
            print(f"{name}: {engine['layers']} layers, {engine['bytes'] / 1e6:.1f} MB in {engine['build_s']:.1f} s")
    backend = open_backend(BackendKind.tensorrt, engine_dir)
    print(f"{backend.describe()}; KV capacity {backend.max_context}")
    if not torch.cuda.is_available():
        print(
            f"built with {trt.describe()} without a GPU; running the engines needs an NVIDIA GPU: "
            f"fusion-export generate --engines {engine_dir} --image PATH --question TEXT"
        )
        return True
    _step("8. validate the engines against the reference (TensorRT)")
    report = validate_session(model, batch, backend.session(batch, 8), 8, Tolerances.for_precision(backend.precision))
    print(report.table())
    engines = answer(backend.session(batch, config.max_new_tokens), "9. TensorRT")
    same = engines.token_ids == reference.token_ids
    print(f"\nTensorRT tokens {'identical to' if same else 'DIFFER from'} the reference's")
    return same and report.passed
