"""`fusion-export validate`: run the reference and a deployment (an artifact's graphs on ONNX Runtime, or an
engine folder on TensorRT) on the same inputs, stage by stage.

Reports vision tokens, init latents, global context, prefill logits, the KV cache, each decode step's logits
(teacher-forced on the reference's greedy tokens) and the first divergent generated token: max abs / max rel
error, cosine and top-1 agreement, as a table (and as JSON with --json). Exit status 1 when a tolerance is
exceeded (fp32 defaults: 1e-4 absolute, identical greedy ids), 2 on bad input. The gates follow the precision of
the deployment's graphs, never a manifest field. On ONNX Runtime (CPU) INT4 and INT8 weight-only layers run as
MatMulNBits in float32 (accuracy level 1), so only the artifact's own rounding is measured; --ort-accuracy-level 4
validates the INT8-activation kernels generate and bench use.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from engines.onnxruntime.providers import Device

from ..options import add_image_options, add_ort_attention_option, max_new_tokens, non_negative_float, require_module


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="stage-by-stage parity of a deployment vs the reference", description=__doc__)
    p.add_argument("deployment", metavar="ART|ENG", help="artifact folder (export) or engine folder (build)")
    p.add_argument("--model", required=True, metavar="DIR", help="the checkpoint it was exported from")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--inputs", metavar="INPUTS.safetensors", help="oracle-format inputs (input_ids, instructs, images)"
    )
    src.add_argument("--image", metavar="PATH", help="an image (with --question); default: the bundled demo picture")
    p.add_argument("--question", metavar="TEXT", help="question about --image")
    p.add_argument(
        "--max-new-tokens", type=max_new_tokens, default=8, metavar="N", help="decode steps compared (default 8)"
    )
    p.add_argument("--atol", type=non_negative_float, default=None, metavar="X",
                   help="override the absolute tolerance on every stage (a finite number >= 0)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="also plot the error by stage, decode step and layer")
    add_image_options(p)
    p.add_argument(
        "--provider", type=Device, choices=list(Device), default=None, help="ONNX Runtime device (default: cuda if any)"
    )
    p.add_argument("--device", help="TensorRT: CUDA device (default cuda:0)")
    add_ort_attention_option(p)
    p.add_argument("--ort-accuracy-level", type=int, choices=(1, 4), default=None, metavar="{1,4}",
                   help="ONNX Runtime on CPU, INT4/INT8 weight-only layers (MatMulNBits): 1 = float32 compute, only "
                   "the weights rounded (default); 4 = INT8 activations, as generate and bench run them")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from benchmarks.golden import read_batch
    from benchmarks.validation import VALIDATION_ACCURACY_LEVEL, Tolerances, validate_session
    from engines.backends import BackendKind, BackendOptions, kind_of_folder, open_backend
    from fusion_export.bundled import DEMO_IMAGE, DEMO_QUESTION
    from fusion_export.manifest import config_digest
    from fusion_export.output_files import OutputKind, check_output_file, write_json
    from reference_model import load_config, load_model, make_request, prepare_batch
    from reference_model.errors import FusionError
    from reference_model.prompt import load_tokenizer

    if args.json:
        inputs = [p for p in (args.deployment, args.model, args.inputs, args.image) if p]
        check_output_file(args.json, "--json", OutputKind.validation_report, inputs=inputs)
    if args.plot:
        inputs = [p for p in (args.deployment, args.model, args.inputs, args.image, args.json) if p]
        check_output_file(args.plot, "--plot", OutputKind.validation_plot, inputs=inputs)
        require_module("matplotlib", "--plot", "bench")
    if args.inputs is None and (args.image is None) != (args.question is None):
        raise FusionError("--image and --question go together")
    kind = kind_of_folder(args.deployment)
    if kind not in (BackendKind.onnxruntime, BackendKind.tensorrt):
        raise FusionError(f"{args.deployment}: neither an artifact folder (export) nor an engine folder (build)")
    if kind is BackendKind.onnxruntime and args.device is not None:
        raise FusionError("--device applies to engine folders (TensorRT); ONNX Runtime takes --provider")
    if kind is BackendKind.tensorrt and (args.provider or args.ort_attention or args.ort_accuracy_level) is not None:
        flag = next(f"--{name.replace('_', '-')}" for name in ("provider", "ort_attention", "ort_accuracy_level")
                    if getattr(args, name) is not None)  # fmt: skip
        raise FusionError(f"{flag} applies to artifact folders (ONNX Runtime); TensorRT takes --device")
    level = VALIDATION_ACCURACY_LEVEL if args.ort_accuracy_level is None else args.ort_accuracy_level
    options = BackendOptions(provider=args.provider, device=args.device, ort_attention=args.ort_attention,
                             ort_accuracy_level=level)  # fmt: skip
    candidate = open_backend(kind, args.deployment, options)
    config = candidate.config
    if config_digest(load_config(args.model)) != config_digest(config):
        raise FusionError(f"{args.model}: its config differs from the one {args.deployment} was exported from")
    if args.inputs:
        batch = read_batch(args.inputs, config, candidate.query_len)
    else:
        tokenizer = load_tokenizer(candidate.model_dir)
        image, question = args.image or DEMO_IMAGE, args.question or DEMO_QUESTION
        request = make_request(image, question, tokenizer, config, args.max_image_pixels)
        batch = prepare_batch([request], config, candidate.query_len)
    session = candidate.session(batch, args.max_new_tokens)  # request limits checked before any heavy work
    model = load_model(args.model)  # the float32 reference is the truth for every precision

    tolerances = Tolerances.for_precision(candidate.precision, candidate.quantization, candidate.kv_int8_scales)
    if args.atol is not None:
        tolerances = dataclasses.replace(tolerances, atol=args.atol)
    report = validate_session(model, batch, session, args.max_new_tokens, tolerances, candidate.kv_int8_scales)
    report.info.update(
        deployment=str(Path(args.deployment).resolve()),
        backend=candidate.describe(),
        precision=candidate.precision.value,
        quantization=candidate.quantization,
        kv_cache="int8" if candidate.kv_int8_scales else "float",
    )
    print(report.table())
    if args.json:
        write_json(args.json, OutputKind.validation_report, report.to_json())
        print(f"report: {args.json}")
    if args.plot:
        from benchmarks.validation_plot import plot_validation

        label = candidate.quantization or candidate.precision.value
        plot_validation(report.to_json(), args.plot, f"{Path(args.deployment).name} ({label}) vs the float32 reference")
        print(f"plot: {args.plot}")
    return 0 if report.passed else 1
