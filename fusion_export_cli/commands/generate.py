"""`fusion-export generate`: answer a question about an image, streaming tokens as they come.

One of: `--model DIR` (a checkpoint, PyTorch reference; --dtype, --device; or `--backend torch`, PyTorch with a
static KV cache, CUDA-graph decode and Triton kernels: --max-context, --torch-kernels, --cuda-graph), `--artifacts
ART` (an export, ONNX Runtime; --provider) or `--engines ENG` (TensorRT engines; --device). Artifact and engine
folders carry their own config and tokenizer. Prompt, batching, sampling and stop rules are the same for every backend.
"""

from __future__ import annotations

import argparse
import sys

from engines.backends import backend_query_len
from engines.onnxruntime.providers import Device

from ..options import (
    Dtype,
    add_image_options,
    add_ort_attention_option,
    add_query_len_option,
    add_torch_options,
    max_new_tokens,
    probability,
    seed,
    temperature,
)

# backend -> (its folder flag, the flags that apply to it); a folder flag alone implies the backend IMPLIED names
FOLDER_FLAGS = {"reference": "model", "onnxruntime": "artifacts", "tensorrt": "engines", "torch": "model"}
IMPLIED = {"model": "reference", "artifacts": "onnxruntime", "engines": "tensorrt"}
TORCH_FLAGS = {"dtype", "device", "max_context", "torch_kernels", "cuda_graph", "torch_compile"}
OPTION_FLAGS = {"reference": {"dtype", "device"}, "onnxruntime": {"provider", "ort_attention"}, "tensorrt": {"device"},
                "torch": TORCH_FLAGS}  # fmt: skip
ALL_OPTION_FLAGS = set().union(*OPTION_FLAGS.values())


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engines.backends import BackendKind

    p = sub.add_parser("generate", help="answer a question about an image", description=__doc__)
    p.add_argument(
        "--backend", type=BackendKind, choices=list(BackendKind), help="default: the one the folder flag implies"
    )
    p.add_argument("--model", metavar="DIR", help="FUSION checkpoint folder (reference backend)")
    p.add_argument("--artifacts", metavar="ART", help="artifact folder from `fusion-export export` (onnxruntime)")
    p.add_argument("--engines", metavar="ENG", help="engine folder from `fusion-export build` (tensorrt)")
    p.add_argument("--image", required=True, metavar="PATH", help="image file (any format Pillow reads)")
    p.add_argument("--question", required=True, metavar="TEXT")
    add_query_len_option(p, note="; exported graphs fix their own")
    p.add_argument("--max-new-tokens", type=max_new_tokens, default=256, metavar="N")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")
    add_image_options(p)
    p.add_argument("--dtype", type=Dtype, choices=list(Dtype), help="reference: weight dtype (default fp32)")
    p.add_argument("--device", help="reference: torch device (default cpu); tensorrt: CUDA device (default cuda:0)")
    p.add_argument(
        "--provider", type=Device, choices=list(Device), help="onnxruntime: device (default: cuda if available)"
    )
    add_ort_attention_option(p)
    add_torch_options(p)
    p.add_argument("--quiet", action="store_true", help="print only the answer, no timings")
    p.set_defaults(run=run)


def open_backend_from_args(args: argparse.Namespace):
    """The backend the flags name, with every flag that does not apply to it refused by name."""
    from engines.backends import BackendKind, BackendOptions, open_backend
    from reference_model.errors import FusionError

    given = [kind for flag, kind in IMPLIED.items() if getattr(args, flag)]
    if args.backend is None and len(given) != 1:
        raise FusionError(
            "give one of --model DIR (a checkpoint, PyTorch reference), --artifacts ART (an export, ONNX Runtime) "
            "or --engines ENG (TensorRT engines)"
        )
    kind = BackendKind(args.backend or given[0])
    for flag in IMPLIED:
        if flag != FOLDER_FLAGS[kind.value] and getattr(args, flag):
            raise FusionError(f"--{flag} does not apply to --backend {kind}")
    if not getattr(args, FOLDER_FLAGS[kind.value]):
        raise FusionError(f"--{FOLDER_FLAGS[kind.value]} is required with --backend {kind}")
    for flag in sorted(ALL_OPTION_FLAGS - OPTION_FLAGS[kind.value]):
        if getattr(args, flag) is not None:
            raise FusionError(f"--{flag.replace('_', '-')} does not apply to --backend {kind}")
    dtype = args.dtype.value if args.dtype else None
    options = BackendOptions(device=args.device, dtype=dtype, provider=args.provider, ort_attention=args.ort_attention,
                             max_context=args.max_context, kernels=args.torch_kernels,
                             cuda_graph=args.cuda_graph, compiled=args.torch_compile)  # fmt: skip
    return open_backend(kind, getattr(args, FOLDER_FLAGS[kind.value]), options)


def run(args: argparse.Namespace) -> int:
    from reference_model import GenerationConfig, generate, make_request, prepare_batch
    from reference_model.generation import check_positions
    from reference_model.prompt import load_tokenizer, stop_token_ids

    from ..text_stream import TextStreamer

    backend = open_backend_from_args(args)  # cheap: folder and flags checked, nothing loaded yet
    config = backend.config
    query_len = backend_query_len(backend, args.query_len)
    tokenizer = load_tokenizer(backend.model_dir)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_token_ids(tokenizer, config.eos_token_ids),
    )
    # the request is checked against the config before any weights or engines are loaded
    request = make_request(args.image, args.question, tokenizer, config, args.max_image_pixels)
    batch = prepare_batch([request], config, query_len)
    check_positions(batch.layout, gen.max_new_tokens, config.decoder.rope.max_position_embeddings)

    session = backend.session(batch, gen.max_new_tokens)
    out = generate(session, gen, on_token=TextStreamer(tokenizer))
    print(flush=True)
    if not args.quiet:
        t = out.timings
        print(
            f"[{backend.kind}: {len(out.token_ids[0])} tokens, finish={out.finish_reasons[0]}, prompt "
            f"{int(batch.layout.lengths[0])} positions, query_len {query_len}; prefill {t['prefill_s'] * 1e3:.0f} ms, "
            f"decode {t['decode_tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0
