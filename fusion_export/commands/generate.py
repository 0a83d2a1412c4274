"""`fusion-export generate`: answer a question about an image, streaming tokens as they come.

`--backend reference` runs the PyTorch model from a checkpoint (--model, --dtype, --device); `--backend
onnxruntime` runs an exported artifact (--artifacts, --provider), whose folder carries its own config and
tokenizer. Prompt, batching, sampling and stop rules are the same for both.
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum

from ..providers import Device
from .options import Dtype, add_image_options, add_query_len_option, positive_int, probability, seed, temperature


class Backend(str, Enum):
    reference = "reference"
    onnxruntime = "onnxruntime"

    def __str__(self) -> str:
        return self.value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a question about an image", description=__doc__)
    p.add_argument(
        "--backend", type=Backend, choices=list(Backend), help="default: onnxruntime with --artifacts, else reference"
    )
    p.add_argument("--model", metavar="DIR", help="FUSION checkpoint folder (reference backend)")
    p.add_argument("--artifacts", metavar="ART", help="artifact folder from `fusion-export export` (onnxruntime)")
    p.add_argument("--image", required=True, metavar="PATH", help="image file (any format Pillow reads)")
    p.add_argument("--question", required=True, metavar="TEXT")
    add_query_len_option(p, note="; with --artifacts, the artifact's")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")
    add_image_options(p)
    p.add_argument("--dtype", type=Dtype, choices=list(Dtype), help="reference: weight dtype (default fp32)")
    p.add_argument("--device", help="reference: torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument(
        "--provider", type=Device, choices=list(Device), help="onnxruntime: device (default: cuda if available)"
    )
    p.add_argument("--quiet", action="store_true", help="print only the answer, no timings")
    p.set_defaults(run=run)


def _reject(args: argparse.Namespace, backend: Backend, flags: dict[str, str]) -> None:
    from reference_model.errors import FusionError

    for attr, flag in flags.items():
        if getattr(args, attr) is not None:
            raise FusionError(f"{flag} does not apply to --backend {backend}")


def run(args: argparse.Namespace) -> int:
    from reference_model import GenerationConfig, ReferenceSession, generate, load_config, make_request, prepare_batch
    from reference_model.errors import FusionError
    from reference_model.generation import check_positions
    from reference_model.prompt import load_tokenizer, stop_token_ids

    from ..text_stream import TextStreamer
    from .options import load_reference, resolve_query_len, torch_device

    if not args.model and not args.artifacts:
        raise FusionError(
            "give --model DIR (a checkpoint, PyTorch reference) or --artifacts ART (an export, ONNX Runtime)"
        )
    backend = args.backend or (Backend.onnxruntime if args.artifacts else Backend.reference)
    # Inputs are checked against the config before any weights are read: a bad request costs nothing.
    if backend is Backend.reference:
        _reject(args, backend, {"artifacts": "--artifacts", "provider": "--provider"})
        if not args.model:
            raise FusionError("--model DIR is required with --backend reference")
        config, model_dir = load_config(args.model), args.model
        query_len = resolve_query_len(args.query_len, config)
        torch_device(args.device or "cpu")
    else:
        _reject(args, backend, {"model": "--model", "dtype": "--dtype", "device": "--device"})
        if not args.artifacts:
            raise FusionError("--artifacts ART is required with --backend onnxruntime")
        from ..manifest import open_artifact

        artifact = open_artifact(args.artifacts)
        config, model_dir = artifact.config, artifact.model_dir
        query_len = args.query_len or artifact.query_len
        if query_len != artifact.query_len:
            raise FusionError(
                f"--query-len {query_len}: {args.artifacts} was exported for query_len {artifact.query_len}"
            )
    tokenizer = load_tokenizer(model_dir)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_token_ids(tokenizer, config.eos_token_id),
    )
    request = make_request(args.image, args.question, tokenizer, config, args.max_image_pixels)
    batch = prepare_batch([request], config, query_len)
    check_positions(batch.layout, gen.max_new_tokens, config.decoder.rope.max_position_embeddings)

    if backend is Backend.reference:
        model = load_reference(args.model, args.dtype or Dtype.fp32, args.device or "cpu")
        session = ReferenceSession(model, batch, gen.max_new_tokens)
    else:
        from ..ort_runtime import OrtModel

        session = OrtModel(artifact, device=args.provider).session(batch, gen.max_new_tokens)
    out = generate(session, gen, on_token=TextStreamer(tokenizer))
    print(flush=True)
    if not args.quiet:
        t = out.timings
        print(
            f"[{backend.value}: {len(out.token_ids[0])} tokens, finish={out.finish_reasons[0]}, prompt "
            f"{int(batch.layout.lengths[0])} positions, query_len {query_len}; prefill {t['prefill_s'] * 1e3:.0f} ms, "
            f"decode {t['decode_tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0
