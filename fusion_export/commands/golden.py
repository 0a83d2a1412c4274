"""`fusion-export golden`: capture the reference's outputs for an inputs file, to validate deployments against.

Writes `logits` (prefill, every position, float32), `generated_ids` (greedy, KV cache, no EOS stop),
`generate_step_logits`, the vision stage outputs (`image_tokens`, `init_latents`, `global_ctx`), the sequence
layout (`attention_mask`, `vision_pos`, `instruct_pos`) and, with --hidden-states, `hidden_states_{k}`.
Batched rows are left padded, so row b of `logits` ends at the last column.
"""

from __future__ import annotations

import argparse

from .options import add_model_options, add_query_len_option, positive_int, resolve_query_len


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("golden", help="capture golden reference outputs for an inputs file", description=__doc__)
    add_model_options(p)
    p.add_argument("--inputs", required=True, metavar="INPUTS.safetensors", help="input_ids, instructs, images")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    add_query_len_option(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=16, metavar="N", help="greedy steps (default 16)")
    p.add_argument("--hidden-states", action="store_true", help="also save the decoder hidden states")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..golden import GoldenSettings, capture_golden, read_requests, save_golden
    from .options import load_reference

    requests = read_requests(args.inputs)
    model = load_reference(args.model, args.dtype, args.device)
    settings = GoldenSettings(
        query_len=resolve_query_len(args.query_len, model.config),
        max_new_tokens=args.max_new_tokens,
        hidden_states=args.hidden_states,
    )
    golden = capture_golden(model, requests, settings)
    metadata = {
        "fusion_export_version": __version__,
        "model": str(args.model),
        "dtype": args.dtype.value,
        "query_len": settings.query_len,
        "max_new_tokens": settings.max_new_tokens,
    }
    save_golden(golden, args.out, metadata)
    print(
        f"wrote {args.out}: {len(golden)} tensors, batch {len(requests)}, "
        f"logits {list(golden['logits'].shape)}, generated_ids {golden['generated_ids'].tolist()}"
    )
    return 0
