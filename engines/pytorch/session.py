"""A batch of requests on the torch backend: an eager prefill into the static KV cache, then decode steps over it
(replayed from a CUDA graph on a GPU)."""

from __future__ import annotations

import torch

from reference_model.decoder import attention_mask
from reference_model.generation import DecodeState, GenerationError, StageClock, require_finite
from reference_model.kv_cache import KVCache
from reference_model.model import FusionModel, VisionOutputs
from reference_model.rope import rope_cos_sin
from reference_model.sequence import PreparedBatch, assemble_embeddings

from .decode_step import CapturedStep, DecodeStep, StepAttention, StepInputs
from .prefill import decode_prefill, encode_images


class StaticBatch:
    """What the sessions of one batch size share: the KV cache, the step's input tensors and the step itself,
    captured into a CUDA graph once. One session uses them at a time: a newer session takes them over."""

    def __init__(self, model: FusionModel, batch: int, capacity: int, attention: StepAttention, graph: bool,
                 compiled: bool = False):  # fmt: skip
        d, device = model.config.decoder, model.device
        self.batch, self.capacity = batch, capacity
        self.cache = KVCache(d.num_layers, batch, d.num_kv_heads, capacity, d.head_dim, model.dtype, device)
        self.inputs = StepInputs(batch, capacity, device)
        split = None
        if attention is StepAttention.kernel:
            from engines.plugins.split_decode_attention import SplitDecodeAttention

            split = SplitDecodeAttention(batch, d.num_heads, d.head_dim, capacity, device)
        self.step = DecodeStep(model, self.cache, self.inputs, attention, split)
        self.run = torch.compile(self.step, dynamic=False) if compiled else self.step
        self.captured = None
        if graph:  # before any prefill: the warm-up writes column 0, which every prefill overwrites
            self.inputs.load(torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64), 1)
            self.captured = CapturedStep(self.run)
        self.owner: object | None = None


class TorchSession:
    """The torch backend's DecoderSession (reference_model/generation.py)."""

    def __init__(self, model: FusionModel, static: StaticBatch, batch: PreparedBatch, state: DecodeState,
                 kernels: bool):  # fmt: skip
        self.state = state  # made against static.capacity by the backend, before the cache was
        self.model, self.static, self.batch, self.kernels = model, static, batch, kernels
        self.batch_size = batch.layout.batch_size
        self.vision: VisionOutputs | None = None
        self.stage_seconds: dict[str, float] = {}

    def synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _check_owner(self) -> None:
        if self.static.owner is not self:
            raise GenerationError("this session's KV cache was taken over by a newer session of the same batch "
                                  "size: the torch backend runs one session per batch size at a time")  # fmt: skip

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        model, layout, static = self.model, self.batch.layout, self.static
        device = model.device
        static.owner = self
        cache, inputs = static.cache, static.inputs
        cache.length = 0
        clock = StageClock(self.synchronize)
        pixels, instructs = self.batch.pixel_values.to(device, model.dtype), self.batch.instructs.to(device)
        self.vision = encode_images(model, pixels, instructs, self.batch.query_len, self.kernels)
        clock.lap("vision_encoder")
        require_finite("vision encoder", **vars(self.vision))
        embeds = assemble_embeddings(layout, model.embed_tokens(layout.text_ids.to(device)), self.vision)
        cos, sin = (t.to(device) for t in rope_cos_sin(layout.position_ids, model.config.decoder.rope))
        mask = attention_mask(layout.attention_mask.to(device), torch.arange(layout.seq_len, device=device))
        vision_pos, instruct_pos = layout.vision_pos.to(device), layout.instruct_pos.to(device)
        if self.kernels:
            h = decode_prefill(model, embeds, cos, sin, mask, cache, vision_pos, instruct_pos, self.vision.global_ctx)
        else:
            interaction = model.interaction_inputs(self.vision.global_ctx, vision_pos, instruct_pos)
            h = model.decode(embeds, cos, sin, mask, cache, interaction)
        cache.advance(layout.seq_len)
        logits = model.logits(h[:, -1])
        inputs.start.copy_((~layout.attention_mask).sum(dim=1).to(torch.int32))  # each row's left padding
        inputs.key_valid.copy_(self.state.key_valid)
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits

    def kept_cache(self, row: int, length: int) -> list[torch.Tensor]:
        """One row's first `length` KV columns as stored, layer by layer (key, value): what a conversation keeps."""
        self._check_owner()
        return self.static.cache.kept_columns(row, length)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_owner()
        positions = self.state.advance()[:, 0]
        self.static.inputs.load(tokens, positions, self.state.length)
        logits = self.static.captured() if self.static.captured is not None else self.static.run()
        require_finite("decoder step", logits=logits)
        return logits
