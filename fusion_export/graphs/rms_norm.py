"""`fusion_export::rms_norm`: the decoder's RMSNorm as one torch op with one ONNX translation per opset, swapped
into the model's RMSNorm modules by the decoder graph wrappers (`use_export_norms`); the model code is unchanged.

Same math as `reference_model.decoder.RMSNorm` (normalise in float32, scale in the model dtype):
- opset >= 23: ONNX `RMSNormalization(x, weight, axis=-1, stash_type=float32)`, which TensorRT 10.15 parses;
- opset <= 22: `x / Sqrt(ReduceMean(x^2) + eps) * weight`, the exact pattern ONNX Runtime fuses into one
  SimplifiedLayerNormalization (and, after a residual Add, SkipSimplifiedLayerNormalization). The exporter's
  own `x * rsqrt(...)` came out as Sqrt + Reciprocal + Mul, which nothing fuses: 7 nodes per norm, 119 of the
  `small` step graph's. Division by the square root instead of multiplication by its reciprocal differs by at
  most an ulp.
"""

from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset20 as op
from onnxscript.values import Opset
from torch import nn

from reference_model.decoder import RMSNorm

RMS_NORMALIZATION_OPSET = 23


@torch.library.custom_op("fusion_export::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.fusion_export.rms_norm(x, self.weight, self.eps)


def use_export_norms(model: nn.Module) -> nn.Module:
    """Route every RMSNorm of `model` through the custom op (idempotent; the math is unchanged)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(_forward, module)
    return model


def _constant(value: float, dtype: ir.DataType):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


def _decomposed(x, weight, eps):
    wide = x.dtype != ir.DataType.FLOAT
    x32 = op.Cast(x, to=ir.DataType.FLOAT) if wide else x
    variance = op.ReduceMean(op.Pow(x32, _constant(2.0, ir.DataType.FLOAT)), op.Constant(value_ints=[-1]))
    normed = op.Div(x32, op.Sqrt(op.Add(variance, _constant(eps, ir.DataType.FLOAT))))
    return op.Mul(op.Cast(normed, to=x.dtype) if wide else normed, weight)


_op23 = Opset("", RMS_NORMALIZATION_OPSET)


def _normalization(x, weight, eps):
    return _op23.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=int(ir.DataType.FLOAT))


def translation_table(opset: int) -> dict:
    fn = _normalization if opset >= RMS_NORMALIZATION_OPSET else _decomposed
    return {torch.ops.fusion_export.rms_norm.default: fn}
