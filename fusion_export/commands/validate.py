"""`fusion-export validate`: run the reference and an artifact's graphs on the same inputs, stage by stage.

Reports vision tokens, init latents, global context, prefill logits, the KV cache, each decode step's logits
(teacher-forced on the reference's greedy tokens) and the first divergent generated token: max abs / max rel
error, cosine and top-1 agreement, as a table and as JSON. Exit status 1 when a tolerance is exceeded
(fp32 defaults: 1e-4 absolute, identical greedy ids).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..providers import Device
from .options import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="stage-by-stage parity of an artifact vs the reference", description=__doc__)
    p.add_argument("artifact", metavar="ART", help="artifact folder from `fusion-export export`")
    p.add_argument("--model", required=True, metavar="DIR", help="the checkpoint the artifact was exported from")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--inputs", metavar="INPUTS.safetensors", help="oracle-format inputs (input_ids, instructs, images)"
    )
    src.add_argument("--image", metavar="PATH", help="an image (with --question); default: the bundled demo picture")
    p.add_argument("--question", metavar="TEXT", help="question about --image")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=8, metavar="N", help="decode steps compared (default 8)"
    )
    p.add_argument("--atol", type=float, default=None, help="override the absolute tolerance on every stage")
    p.add_argument("--json", default="validation.json", metavar="PATH", help="JSON report (default ./validation.json)")
    p.add_argument(
        "--provider",
        type=Device,
        choices=list(Device),
        default=None,
        help="ONNX Runtime device (default: cuda if available)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from reference_model import load_model, make_request, prepare_batch
    from reference_model.errors import FusionError
    from reference_model.prompt import load_tokenizer

    from ..golden import read_requests
    from ..manifest import config_digest, open_artifact
    from ..ort_runtime import OrtModel
    from ..validation import Tolerances, validate_session
    from .demo import DEMO_IMAGE, DEMO_QUESTION

    if not Path(args.json).resolve().parent.is_dir():
        raise FusionError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    artifact = open_artifact(args.artifact)
    model = load_model(args.model)  # the float32 reference is the truth for every artifact precision
    if config_digest(model.config) != artifact.manifest["model"]["config_digest"]:
        raise FusionError(f"{args.model}: its config differs from the one {args.artifact} was exported from")
    if args.inputs:
        requests = read_requests(args.inputs)
    else:
        if (args.image is None) != (args.question is None):
            raise FusionError("--image and --question go together")
        tokenizer = load_tokenizer(artifact.model_dir)
        image, question = args.image or DEMO_IMAGE, args.question or DEMO_QUESTION
        requests = [make_request(image, question, tokenizer, model.config)]
    batch = prepare_batch(requests, model.config, artifact.query_len)

    runtime = OrtModel(artifact, device=args.provider)
    tolerances = Tolerances.for_dtype(artifact.dtype)
    if args.atol is not None:
        tolerances = dataclasses.replace(tolerances, atol=args.atol)
    report = validate_session(
        model, batch, runtime.session(batch, args.max_new_tokens), args.max_new_tokens, tolerances
    )
    report.info.update(artifact=str(Path(args.artifact).resolve()), dtype=artifact.dtype, providers=runtime.providers)
    print(report.table())
    report.save(args.json)
    print(f"report: {args.json}")
    return 0 if report.passed else 1
