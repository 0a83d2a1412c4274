"""Export-friendly wrappers around the reference: one module per exported graph, each with a GraphSpec.

Static shapes where TensorRT wants them and no data-dependent Python branches live here, not in the model.
"""

import torch

from reference_model.errors import FusionError

# torch.onnx.export's dynamo path with dynamic_shapes (2.5) and custom_translation_table (2.6), and custom ops
# declared with string annotations (2.5): checked where the graphs are imported, before any op is declared, so an
# older torch gets this sentence instead of a traceback (the reference and the torch backend run on torch 2.4).
EXPORT_TORCH = (2, 6)


def torch_version(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if torch_version(torch.__version__) < EXPORT_TORCH:
    raise FusionError(f"exporting graphs needs torch >= {EXPORT_TORCH[0]}.{EXPORT_TORCH[1]} (torch.onnx.export with "
                      f"dynamic_shapes and custom_translation_table); this is torch {torch.__version__}")  # fmt: skip
