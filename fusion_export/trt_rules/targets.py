"""TensorRT targets: which ONNX opset and ops the exported graphs may use (docs/export-design.md, docs/tensorrt.md)."""

from __future__ import annotations

import json
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

TABLE_DIR = Path(__file__).parent / "operator_tables"
MIN_EXPORT_OPSET = 18  # the torch dynamo exporter's floor


class TrtTarget(str, Enum):
    """`trt-10.3`: Jetson Orin on JetPack 6 (opset <= 20, no TensorScatter). `trt-10.15`: datacenter GPUs and
    newer JetPacks (opset 24, TensorScatter KV updates). `trt-11`: TensorRT 11 (always strongly typed)."""

    trt_10_3 = "trt-10.3"
    trt_10_15 = "trt-10.15"
    trt_11 = "trt-11"

    def __str__(self) -> str:  # argparse shows choices with str()
        return self.value

    @property
    def table(self) -> dict[str, Any]:
        return operator_table(self.value)

    @property
    def max_opset(self) -> int:
        return int(self.table["opset_max"])

    def resolve_opset(self, opset: int | None) -> int:
        """The requested opset, or the target's highest; rejected when the target's parser cannot read it."""
        from reference_model.errors import FusionError  # imported here: the CLI builds parsers from this enum

        if opset is None:
            return min(self.max_opset, 24)
        if not MIN_EXPORT_OPSET <= opset <= self.max_opset:
            raise FusionError(
                f"--opset {opset} is outside what {self.value} parses with this exporter "
                f"({MIN_EXPORT_OPSET}..{self.max_opset})"
            )
        return opset


@cache
def operator_table(target: str) -> dict[str, Any]:
    path = TABLE_DIR / f"{target}.json"
    return json.loads(path.read_text())
