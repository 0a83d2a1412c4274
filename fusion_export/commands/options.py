"""Options shared by several commands, as Enums and argument helpers."""

from __future__ import annotations

import argparse
from enum import Enum


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
    import torch

    from reference_model import load_model
    from reference_model.errors import FusionError

    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise FusionError(f"--device {device!r} is not a torch device ({e})") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise FusionError(f"--device {device}: CUDA is not available on this machine")
    return load_model(model_dir, dtype=dtype.value, device=torch_device)


def resolve_query_len(query_len: int | None, config) -> int:
    from reference_model.errors import FusionError

    query_len = config.default_query_len if query_len is None else query_len
    try:
        return config.check_query_len(query_len)
    except FusionError as e:
        raise FusionError(f"--query-len: {e}") from None
