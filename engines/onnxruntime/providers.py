"""ONNX Runtime execution providers by device (light: onnxruntime is imported only when resolving)."""

from __future__ import annotations

from enum import Enum


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"

    def __str__(self) -> str:
        return self.value


_PROVIDERS = {Device.cpu: ["CPUExecutionProvider"], Device.cuda: ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def resolve_providers(device: Device | None) -> list[str]:
    """Execution providers for a device; None picks CUDA when onnxruntime-gpu provides it, else CPU."""
    import onnxruntime as ort

    from reference_model.errors import FusionError

    available = ort.get_available_providers()
    if device is None:
        device = Device.cuda if "CUDAExecutionProvider" in available else Device.cpu
    if _PROVIDERS[device][0] not in available:
        raise FusionError(
            f"--provider {device}: ONNX Runtime here offers only {', '.join(available)} "
            "(CUDA needs the onnxruntime-gpu package in place of onnxruntime)"
        )
    return _PROVIDERS[device]
