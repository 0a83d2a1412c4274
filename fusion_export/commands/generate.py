"""`fusion-export generate`: answer a question about an image, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

from .options import add_model_options, add_query_len_option, positive_int, resolve_query_len


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a question about an image", description=__doc__)
    add_model_options(p)
    p.add_argument("--image", required=True, metavar="PATH", help="image file (any format Pillow reads)")
    p.add_argument("--question", required=True, metavar="TEXT")
    add_query_len_option(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only the answer, no timings")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reference_model import GenerationConfig, ReferenceSession, generate, make_request, prepare_batch
    from reference_model.prompt import load_tokenizer, stop_token_ids

    from ..text_stream import TextStreamer
    from .options import load_reference

    model = load_reference(args)
    tokenizer = load_tokenizer(args.model)
    query_len = resolve_query_len(args, model.config)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_token_ids(tokenizer, model.config.eos_token_id),
    )
    batch = prepare_batch([make_request(args.image, args.question, tokenizer, model.config)], model.config, query_len)
    streamer = TextStreamer(tokenizer)
    out = generate(ReferenceSession(model, batch, config.max_new_tokens), config, on_token=streamer)
    print(flush=True)
    if not args.quiet:
        t = out.timings
        print(
            f"[{len(out.token_ids[0])} tokens, finish={out.finish_reasons[0]}, prompt {int(batch.layout.lengths[0])} "
            f"positions, query_len {query_len}; prefill {t['prefill_s'] * 1e3:.0f} ms, "
            f"decode {t['decode_tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0
