"""The exported graphs' input and output names: the contract between the exporter and every runtime.

How a runtime fills those inputs on the host (embedding gather, image-token scatter, LongRoPE tables,
masks, KV write columns) is engines/feeds.py.
"""

from __future__ import annotations

VISION_INPUTS = ("pixel_values", "instruct_embeds", "instruct_mask")
VISION_OUTPUTS = ("image_tokens", "init_latents", "global_ctx")
PREFILL_INPUTS = ("inputs_embeds", "attention_mask", "rope_cos", "rope_sin", "vision_pos", "instruct_pos", "global_ctx")
STEP_INPUTS = ("inputs_embeds", "attention_mask", "rope_cos", "rope_sin", "write_indices")
LOGITS = "logits"


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key|value` or `present.{i}.key|value`, layer by layer (Optimum / onnxruntime-genai)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return cache_names(num_layers, "past_key_values")


def present_names(num_layers: int) -> list[str]:
    return cache_names(num_layers, "present")
