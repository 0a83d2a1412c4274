"""Options shared by several commands, as Enums and argument helpers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from enum import Enum

from reference_model.config import MAX_POSITIONS


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    def __str__(self) -> str:  # argparse shows choices with str()
        return self.value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_int_up_to(maximum: int) -> Callable[[str], int]:
    """A positive integer of at most `maximum`: the bound catches a typo-sized value (1e9 rounds, threads or
    tokens) that would otherwise run for hours or exhaust memory before any model-specific check could refuse it."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected a positive integer of at most {maximum:,}, got {value}")
        return value

    parse.__name__ = "positive_int"
    return parse


def count_up_to(maximum: int) -> Callable[[str], int]:
    """An integer in 0..maximum (a count where none is meaningful, e.g. warm-up rounds)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text[:40]!r}") from None
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer in 0..{maximum:,}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


# Bounds of the count flags (see positive_int_up_to). Tokens and positions: the largest context any config may
# declare (reference_model/config.py MAX_POSITIONS); the model's own limit is checked once it is known. Requests per
# batch: engines/tensorrt/plan.py MAX_BATCH.
MAX_TOKENS = MAX_POSITIONS
MAX_ROUNDS = 10_000  # benchmark rounds (a full-size round takes seconds: 10,000 of them are hours)
max_new_tokens = positive_int_up_to(MAX_TOKENS)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (tolerances): a NaN or negative tolerance fails every comparison, an infinite one none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < math.inf:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


temperature = non_negative_float  # 0 is greedy


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2^63-1, got {value}")
    return value


def add_image_options(parser: argparse.ArgumentParser) -> None:
    from reference_model.limits import DEFAULT_MAX_IMAGE_PIXELS

    parser.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"refuse larger images before decoding them (default {DEFAULT_MAX_IMAGE_PIXELS:,}, 8000x8000)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="FUSION checkpoint folder (config.json, safetensors)"
    )
    parser.add_argument(
        "--dtype",
        type=Dtype,
        choices=list(Dtype),
        default=Dtype.fp32,
        help="weight and activation dtype (default fp32)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")


def add_query_len_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument(
        "--query-len",
        type=positive_int,
        default=None,
        metavar="N",
        help="latent tokens per image, a perfect square (4, 16, 36, 64, 144, ...); "
        f"default 64, or the checkpoint's first listed length when it was trained without 64{note}",
    )


def load_reference(model_dir: str, dtype: Dtype, device: str):
    """Load a checkpoint for the reference backend, with the flag named in any error."""
    from reference_model import load_model
    from reference_model.checkpoint import resolve_device

    return load_model(model_dir, dtype=dtype.value, device=resolve_device(device))


ORT_ATTENTION_FORMS = ("fused", "graph")  # OrtModel(attention=...)


def add_ort_attention_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ort-attention",
        choices=ORT_ATTENTION_FORMS,
        help="onnxruntime on CPU: fused = each decoder layer's attention as GroupQueryAttention or causal query "
        "blocks and the vision encoder's as MultiHeadAttention (default), graph = the graphs' own ops, as exported",
    )


def require_module(module: str, flag: str, extra: str) -> None:
    """Refuse a flag, before any work, when the optional module it needs is not installed."""
    import importlib.util

    from reference_model.errors import FusionError

    if importlib.util.find_spec(module) is None:
        raise FusionError(f"{flag} needs the Python module {module!r}: pip install 'fusion-export[{extra}]'")


MAX_THREADS = 1024  # a sanity bound: each thread is a real OS thread in ONNX Runtime's pool
threads = positive_int_up_to(MAX_THREADS)


def compute_capabilities(text: str) -> tuple[str, ...]:
    """'sm86, SM89' -> ('SM86', 'SM89'); empty and repeated names are refused (which names a TensorRT flavour
    offers is checked against that flavour)."""
    names = tuple(name.strip().upper() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names such as SM86,SM89, got {text!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once")
    return names


TORCH_SWITCHES = ("auto", "on", "off")


def add_torch_options(p: argparse.ArgumentParser) -> None:
    """The torch backend's flags (engines/pytorch/backend.py)."""
    p.add_argument("--max-context", type=positive_int, metavar="N",
                   help="torch: KV cache columns, allocated once (default: the checkpoint's context)")  # fmt: skip
    p.add_argument("--torch-kernels", choices=TORCH_SWITCHES,
                   help="torch: the Triton kernels (default auto: on CUDA in fp32/fp16)")  # fmt: skip
    p.add_argument("--cuda-graph", choices=TORCH_SWITCHES,
                   help="torch: replay the decode step as a CUDA graph (default auto: on CUDA)")  # fmt: skip
    p.add_argument("--torch-compile", action="store_const", const=True,
                   help="torch: the decode step through torch.compile (off by default)")  # fmt: skip
