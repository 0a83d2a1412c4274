"""Precision as a type: what an artifact's graphs compute in, read from the graphs themselves.

Every consumer (validation gates, runtimes, builders) takes a `Precision`, never a loose string; an artifact's
precision comes from the element type of its graphs' activations, so an edited manifest cannot change it.
"""

from __future__ import annotations

from enum import Enum

from reference_model.errors import FusionError


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"

    def __str__(self) -> str:
        return self.value

    @property
    def onnx_dtype(self) -> str:
        """The ONNX element type name of activations and weights at this precision."""
        return _ONNX[self]

    @classmethod
    def from_onnx_dtype(cls, name: str, where: str) -> Precision:
        for precision, onnx_name in _ONNX.items():
            if onnx_name == name:
                return precision
        raise FusionError(f"{where}: element type {name} is not an exported precision ({', '.join(_ONNX.values())})")


_ONNX = {Precision.fp32: "FLOAT", Precision.fp16: "FLOAT16"}
