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

    @property
    def int4_rules(self) -> dict[str, Any]:
        """How the target's parser reads INT4 weights (the table's `int4_weights`; its README says where from)."""
        return self.table["int4_weights"]

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


@cache
def blockwise_dequantize_opset() -> int:
    """The first ai.onnx opset whose DequantizeLinear takes INT4 and `block_size`, read from onnx's own schemas."""
    from onnx import defs

    return min(
        int(schema.since_version)
        for schema in defs.get_all_schemas_with_history()
        if schema.name == "DequantizeLinear" and schema.domain == "" and "block_size" in schema.attributes
    )


def check_int4(target: TrtTarget, opset: int) -> None:
    """Refuse INT4 weights, before any work, for graphs of `opset` that `target`'s parser could not read: they are
    written as INT4 -> DequantizeLinear(block_size) -> MatMul, which needs ai.onnx opset 21 or later."""
    from reference_model.errors import FusionError

    need = blockwise_dequantize_opset()
    if target.max_opset < need:
        readers = " or ".join(t.value for t in TrtTarget if t.max_opset >= need)
        raise FusionError(
            f"--precision int4 writes blockwise DequantizeLinear (ONNX opset {need}+), and {target.value}'s parser "
            f"reads opsets up to {target.max_opset}: quantize an artifact exported for {readers}"
        )
    if opset < need:
        raise FusionError(
            f"--precision int4 writes blockwise DequantizeLinear (ONNX opset {need}+), and this artifact's graphs "
            f"are opset {opset}: export it again for {target.value} with --opset {need}..{target.max_opset} "
            f"(without --opset it gets {target.resolve_opset(None)})"
        )
