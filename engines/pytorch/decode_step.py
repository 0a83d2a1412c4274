"""One decode step of the whole batch over static buffers: the forward a CUDA graph captures once and replays.

Everything a step varies by lives in device tensors written before the call (`StepInputs`): the fed tokens, each
row's RoPE position, the column the step writes (shared by the batch: rows are left padded), each row's first
valid column and its written length. The step reads them, writes its keys and values into the fixed-capacity cache
in place (`index_copy_`), attends and returns the logits into the same output tensor every time, so one captured
graph serves every step of every request of that batch size.

Attention, by what the step may do:
- `kernel`: the split decode-attention Triton kernel over each row's valid columns (engines/plugins);
- `masked`: SDPA over the whole capacity under the valid-column mask (capturable, reads every column);
- `valid`: SDPA over the columns written so far, sliced by a host-side length (not capturable: the CPU path).
The arithmetic is the reference's (reference_model/decoder.py) with the same weights; cos and sin are formed on
the device exactly as `reference_model.rope` forms them on the host (float32 angles, float64 cos/sin).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from reference_model.kv_cache import KVCache, quantize_int8
from reference_model.model import FusionModel
from reference_model.rope import apply_rope, inverse_frequencies


class StepAttention(str, Enum):
    kernel = "kernel"
    masked = "masked"
    valid = "valid"

    def __str__(self) -> str:
        return self.value


class StepInputs:
    """The device tensors a step reads, filled by one host-to-device copy of a pinned buffer per step."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.batch = batch
        pinned = device.type == "cuda"
        # [tokens (B) | positions (B) | end (B) | column (1)]: one copy per step
        self.host = torch.zeros(3 * batch + 1, dtype=torch.int64, pin_memory=pinned)
        self.packed = torch.zeros(3 * batch + 1, dtype=torch.int64, device=device)
        self.tokens = self.packed[:batch]
        self.positions = self.packed[batch : 2 * batch]
        self.end = self.packed[2 * batch : 3 * batch]  # columns written through this step's token
        self.column = self.packed[3 * batch :]  # the column this step writes
        self.start = torch.zeros(batch, dtype=torch.int32, device=device)  # first valid column (left padding)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # the `masked` path's mask
        self.length = 0  # host copy of end (every row's), for the `valid` path's slice
        self.copied = torch.cuda.Event() if pinned else None  # the last copy out of `host` has finished

    def load(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        B = self.batch
        if self.copied is not None:  # never rewrite the pinned buffer while its last copy may still be reading it
            self.copied.synchronize()
        self.host[:B] = tokens
        self.host[B : 2 * B] = positions
        self.host[2 * B : 3 * B] = length
        self.host[3 * B] = length - 1
        self.packed.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.length = length


class DecodeStep:
    """`model`'s decode step over `cache` (the backend's static KV buffers) for `batch` rows."""

    def __init__(self, model: FusionModel, cache: KVCache, inputs: StepInputs, attention: StepAttention, split=None):
        """split: an engines.plugins.split_decode_attention.SplitDecodeAttention for the `kernel` path."""
        self.model, self.cache, self.inputs, self.attention, self.split = model, cache, inputs, attention, split
        rope = model.config.decoder.rope
        short, long = inverse_frequencies(rope)
        self.short, self.long = short.to(model.device), long.to(model.device)
        self.switch, self.rope_scale = rope.switch_position, rope.attention_scaling

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, head_dim] float32 for each row's position, as reference_model.rope.rope_cos_sin."""
        positions = self.inputs.positions
        inv_freq = self.short[None] if self.switch is None else torch.where(
            (positions + 1 > self.switch)[:, None], self.long[None], self.short[None])  # fmt: skip
        angles = positions.float()[:, None] * inv_freq  # (B, d/2), one float32 rounding
        angles = torch.cat((angles, angles), dim=-1).double()[:, None]
        return (angles.cos() * self.rope_scale).float(), (angles.sin() * self.rope_scale).float()

    def __call__(self, check_values: bool = True) -> torch.Tensor:
        """logits (B, V) float32. check_values=False while a CUDA graph captures (no device value read)."""
        model, inputs = self.model, self.inputs
        if self.attention is not StepAttention.kernel:
            inputs.key_valid.index_fill_(1, inputs.column, True)
        end = inputs.end.to(torch.int32)
        cos, sin = self.rope()
        h = model.embed_tokens(inputs.tokens)[:, None]  # (B, 1, D)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            B, H, KVH, hd = h.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
            x = layer.input_layernorm(h)
            q, k, v = attn.qkv_proj(x).split((H * hd, KVH * hd, KVH * hd), dim=-1)
            q = apply_rope(q.view(B, 1, H, hd).transpose(1, 2), cos, sin)  # (B, H, 1, hd)
            k = apply_rope(k.view(B, 1, KVH, hd).transpose(1, 2), cos, sin)
            v = v.view(B, 1, KVH, hd).transpose(1, 2)
            out = self._attend(i, q, k, v, end, check_values)  # (B, H, 1, hd)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(B, 1, H * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.logits(model.norm(h)[:, -1])

    def _attend(self, i: int, q, k, v, end, check_values: bool) -> torch.Tensor:
        cache, inputs = self.cache, self.inputs
        keys, values = cache.keys[i], cache.values[i]
        scales = cache.int8_scales[i] if cache.int8_scales is not None else (1.0, 1.0)
        if cache.int8_scales is not None:
            k, v = quantize_int8(k, scales[0]), quantize_int8(v, scales[1])
        keys.index_copy_(2, inputs.column, k)
        values.index_copy_(2, inputs.column, v)
        if self.attention is StepAttention.kernel:
            return self.split(q, keys, values, inputs.start, end, *scales, check_values=check_values)
        if self.attention is StepAttention.valid:
            keys, values = keys[:, :, : inputs.length], values[:, :, : inputs.length]
        keys, values = cache.read(keys, i, 0), cache.read(values, i, 1)
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        if self.attention is StepAttention.valid:
            mask = inputs.key_valid[:, None, None, : inputs.length]
        else:
            mask = inputs.key_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class CapturedStep:
    """A DecodeStep captured once into a CUDA graph (torch.cuda.CUDAGraph; the PyTorch docs' "CUDA Graphs" notes:
    warm up on a side stream, capture, then `replay()` reads and writes the same memory every time)."""

    def __init__(self, step: DecodeStep, warmup: int = 2):
        device = step.model.device
        with torch.no_grad():  # nothing captured may record autograd history (the weights require grad)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compiles the Triton kernels and lets cuBLAS pick its algorithms
                for _ in range(warmup):
                    step(check_values=False)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(check_values=False)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits
