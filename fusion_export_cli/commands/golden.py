"""`fusion-export golden`: capture the reference's outputs for an inputs file, to validate deployments against.

Writes `logits` (prefill, every position, float32), `generated_ids` (greedy, KV cache, no EOS stop),
`generate_step_logits`, the vision stage outputs (`image_tokens`, `init_latents`, `global_ctx`), the sequence
layout (`attention_mask`, `vision_pos`, `instruct_pos`) and, with --hidden-states, `hidden_states_{k}`.
Batched rows are left padded, so row b of `logits` ends at the last column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.backends import resolve_query_len

from ..options import add_model_options, add_query_len_option, max_new_tokens


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("golden", help="capture golden reference outputs for an inputs file", description=__doc__)
    add_model_options(p)
    p.add_argument("--inputs", required=True, metavar="INPUTS.safetensors", help="input_ids, instructs, images")
    p.add_argument("--out", required=True, metavar="OUT.safetensors")
    add_query_len_option(p)
    p.add_argument("--max-new-tokens", type=max_new_tokens, default=16, metavar="N", help="greedy steps (default 16)")
    p.add_argument("--hidden-states", action="store_true", help="also save the decoder hidden states")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from benchmarks.golden import GoldenSettings, capture_golden, read_batch, save_golden
    from fusion_export import __version__
    from fusion_export.output_files import OutputKind, check_output_file
    from reference_model import load_config
    from reference_model.checkpoint import resolve_device
    from reference_model.generation import check_positions

    from ..options import load_reference

    # every input and the output path are checked before the weights are read or anything runs
    out = check_output_file(args.out, "--out", OutputKind.golden, inputs=[args.inputs, args.model])
    config = load_config(args.model)
    resolve_device(args.device)
    settings = GoldenSettings(
        query_len=resolve_query_len(args.query_len, config),
        max_new_tokens=args.max_new_tokens,
        hidden_states=args.hidden_states,
    )
    batch = read_batch(args.inputs, config, settings.query_len)
    check_positions(batch.layout, settings.max_new_tokens, config.decoder.rope.max_position_embeddings)
    model = load_reference(args.model, args.dtype, args.device)
    golden = capture_golden(model, batch, settings)
    metadata = {
        "fusion_export_version": __version__,
        "model": Path(args.model).resolve().name,
        "dtype": args.dtype.value,
        "query_len": settings.query_len,
        "max_new_tokens": settings.max_new_tokens,
    }
    save_golden(golden, out, metadata)
    print(
        f"wrote {out}: {len(golden)} tensors, batch {batch.layout.batch_size}, "
        f"logits {list(golden['logits'].shape)}, generated_ids {golden['generated_ids'].tolist()}"
    )
    return 0
