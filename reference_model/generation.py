"""Generation: one loop over any backend's prefill/step session (reference, ONNX Runtime, TensorRT).

Backends implement `DecoderSession`; the loop owns sampling, stop tokens and the token budget, so every
backend produces tokens by the same rules and the same seeded sampler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .decoder import attention_mask
from .errors import FusionError
from .model import FusionModel, VisionOutputs
from .rope import rope_cos_sin
from .sequence import PreparedBatch, SequenceLayout, assemble_embeddings


class GenerationError(FusionError):
    """Generation settings or a request exceed what the model supports."""


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling mass (1 = off); only with temperature > 0
    seed: int = 0  # sampling seed: equal seeds give equal tokens on every backend
    stop_token_ids: tuple[int, ...] = ()  # a row ends after emitting one of these; empty = run to max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # also refuses NaN, which would sample token 0 forever
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise GenerationError(f"seed must be in 0..2^63-1, got {self.seed}")


class NonFiniteError(GenerationError):
    """A stage produced NaN or Inf: refused where it first appears instead of decoding garbage from it."""


def _numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    """A CPU float tensor as numpy (no copy), else None: numpy's reductions over one step's logits are ~10x
    quicker than torch's small-tensor dispatch, and every decode step runs two (finiteness, greedy choice)."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16, torch.float64):
        return tensor.detach().numpy()
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    view = _numpy_view(tensor)
    return bool(np.isfinite(view).all()) if view is not None else bool(torch.isfinite(tensor).all())


def require_finite(stage: str, **tensors: torch.Tensor) -> None:
    """Raise NonFiniteError naming the stage and tensor when any value is NaN or Inf."""
    for name, tensor in tensors.items():
        if _all_finite(tensor):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteError(
                f"{stage} produced {bad} non-finite value(s) in {name} {list(tensor.shape)} "
                "(NaN/Inf: overflow in a low precision, or corrupt weights or inputs)"
            )


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis (first index among equal maxima), by numpy for CPU tensors: ~5 us against torch's
    ~65 us on one step's 32064 logits (2 threads), a cost every greedy decode step pays."""
    view = _numpy_view(logits)
    return torch.from_numpy(np.argmax(view, axis=-1)) if view is not None else logits.argmax(dim=-1)


class TokenSampler:
    """Greedy argmax, or temperature + top-p sampling from a generator seeded per request, both on the device the
    logits are on: a GPU backend sends only the chosen ids to the host. Greedy ids are the same on any device;
    sampled ones are the same across the backends whose logits are on the CPU (a CUDA generator draws its own
    repeatable stream)."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.config.seed)
        return self.generators[device]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,) int64 on the CPU."""
        logits = logits.detach()
        if self.config.temperature == 0:
            return greedy_tokens(logits).cpu()
        logits = logits.float() / self.config.temperature
        if self.config.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1)  # ascending
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - self.config.top_p
            drop_sorted[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self._generator(logits.device))[:, 0].cpu()


class DecoderSession(Protocol):
    """One batch of requests on one backend: a prefill, then single-token steps."""

    batch_size: int

    def prefill(self) -> torch.Tensor:
        """Logits (B, V) float32 of each row's last prompt token."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) int64 -> logits (B, V) float32."""
        ...

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the host): called before every timer read."""
        ...

    # after prefill(): seconds of its stages, "vision_encoder" and "decoder_prefill" (device-synchronised)
    stage_seconds: dict[str, float]


class StageClock:
    """Times the stages of one call: each lap synchronises the device first, so a GPU stage is not credited
    to the next one."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.seconds: dict[str, float] = {}
        synchronize()
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        self.synchronize()
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # per row, generated ids (a final stop token included)
    finish_reasons: list[str]  # "stop" or "length"
    step_logits: torch.Tensor | None = None  # (B, N, V) float32 logits each sampled token was drawn from
    timings: dict[str, float] = field(default_factory=dict)


def generate(
    session: DecoderSession,
    config: GenerationConfig | Sequence[GenerationConfig],
    on_token: Callable[[int, int], None] | None = None,
    keep_logits: bool = False,
    cancelled: Callable[[int], bool] | None = None,
) -> GenerationOutput:
    """Run prefill then decode steps until every row stopped; on_token(row, id) streams. `config`: one for every
    row, or one per row (its own max_new_tokens, sampling and seed: each row samples from its own generator, so a
    row's tokens are those it gets alone). `cancelled(row)`: asked after each token; a row it says True for ends
    there ("cancelled"), and the loop ends once no row is left."""
    B = session.batch_size
    configs = [config] * B if isinstance(config, GenerationConfig) else list(config)
    if len(configs) != B:
        raise GenerationError(f"{len(configs)} generation configs for a batch of {B}")
    samplers = [TokenSampler(c) for c in configs]
    stops = [set(c.stop_token_ids) for c in configs]
    filler = next((c.stop_token_ids[0] for c in configs if c.stop_token_ids), 0)  # fed to finished rows
    tokens_out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    kept: list[torch.Tensor] = []
    longest = max(c.max_new_tokens for c in configs)

    session.synchronize()
    t0 = time.perf_counter()
    logits = session.prefill()
    session.synchronize()  # a GPU backend's timer must not stop before its queue has drained
    t_prefill = time.perf_counter() - t0
    for step in range(longest):
        if keep_logits:
            kept.append(logits.detach().to("cpu", torch.float32))
        if all(c.temperature == 0 for c in configs):  # one argmax and one transfer for the whole batch
            tokens = greedy_tokens(logits.detach()).cpu()
        else:
            tokens = torch.cat([sampler(logits[b : b + 1]) for b, sampler in enumerate(samplers)])
        for b in range(B):
            if reasons[b] is not None:
                continue
            token = int(tokens[b])
            tokens_out[b].append(token)
            if on_token is not None:
                on_token(b, token)
            if token in stops[b]:
                reasons[b] = "stop"
            elif cancelled is not None and cancelled(b):
                reasons[b] = "cancelled"
            elif len(tokens_out[b]) == configs[b].max_new_tokens:
                reasons[b] = "length"
        if all(r is not None for r in reasons) or step == longest - 1:
            break
        fed = [filler if reasons[b] is not None else int(tokens[b]) for b in range(B)]
        logits = session.step(torch.tensor(fed, dtype=torch.int64))
    session.synchronize()
    elapsed = time.perf_counter() - t0
    n_steps = max(len(t) for t in tokens_out)
    return GenerationOutput(
        token_ids=tokens_out,
        finish_reasons=[r or "length" for r in reasons],
        step_logits=torch.stack(kept, dim=1) if keep_logits else None,
        timings={
            "prefill_s": t_prefill,
            "decode_s": elapsed - t_prefill,
            "decode_tokens_per_s": (n_steps - 1) / (elapsed - t_prefill) if n_steps > 1 else 0.0,
        },
    )


def check_positions(layout: SequenceLayout, max_new_tokens: int, max_positions: int) -> None:
    """The prompt and every token to be generated must fit the model's positions: checked before any work."""
    longest = int(layout.lengths.max())
    if longest + max_new_tokens > max_positions:
        raise GenerationError(
            f"prompt ({longest} positions after image expansion) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's {max_positions} positions"
        )


class DecodeState:
    """Where a batch stands after its prefill: each row's RoPE position, the valid cache columns, how many
    columns are written. Every backend's session keeps one, so all of them place tokens the same way."""

    def __init__(self, layout: SequenceLayout, max_new_tokens: int, max_positions: int, capacity: int | None = None,
                 capacity_source: str = "these graphs hold {capacity} (export --max-context)"):  # fmt: skip
        """capacity: the KV columns of graphs exported with a fixed one, or of a backend's static cache (None:
        prompt + max_new_tokens); capacity_source: what fixed it, for the error."""
        check_positions(layout, max_new_tokens, max_positions)
        needed = layout.seq_len + max_new_tokens
        if capacity is not None and needed > capacity:
            raise GenerationError(
                f"the request needs {needed} KV-cache columns (prompt {layout.seq_len} + max_new_tokens "
                f"{max_new_tokens}); {capacity_source.format(capacity=capacity)}; use fewer new tokens, a shorter "
                "prompt, or a larger --max-context"
            )
        self.capacity = capacity or needed  # KV columns a session allocates
        self.key_valid = torch.zeros(layout.batch_size, self.capacity, dtype=torch.bool)
        self.key_valid[:, : layout.seq_len] = layout.attention_mask
        self.positions = layout.position_ids[:, -1].clone()  # each row's last RoPE position
        self.length = layout.seq_len  # columns written once the prefill ran
        self.prefilled = layout.seq_len  # columns the prefill writes; decode steps follow
        self.prompt_positions = int(self.positions.max()) + 1  # the longest row's prompt, in positions

    @classmethod
    def resumed(cls, key_valid: torch.Tensor, position: int, columns: int, max_new_tokens: int, max_positions: int,
                capacity: int | None = None) -> DecodeState:  # fmt: skip
        """One row that continues kept columns (`key_valid`, its last RoPE position) with a prefill of `columns`
        more (a conversation's later turn, reference_model/conversation.py); `length` moves as they are written
        (`extend`)."""
        kept = int(key_valid.shape[0])
        needed = kept + columns + max_new_tokens
        if position + 1 + columns + max_new_tokens > max_positions:
            raise GenerationError(f"the conversation ({position + 1 + columns} positions) + max_new_tokens "
                                  f"({max_new_tokens}) exceeds the model's {max_positions} positions")  # fmt: skip
        if capacity is not None and needed > capacity:
            raise GenerationError(
                f"the conversation needs {needed} KV-cache columns (kept {kept} + this turn {columns} + "
                f"max_new_tokens {max_new_tokens}); these graphs hold {capacity} (export --max-context)"
            )
        state = cls.__new__(cls)
        state.capacity = capacity or needed
        state.key_valid = torch.zeros(1, state.capacity, dtype=torch.bool)
        state.key_valid[0, :kept] = key_valid
        state.positions = torch.tensor([position], dtype=torch.int64)
        state.length = state.prefilled = kept
        state.prompt_positions = position + 1
        return state

    def extend(self, n: int) -> None:
        """A prefill chunk of n columns written after the others (a resumed state)."""
        self.key_valid[:, self.length : self.length + n] = True
        self.length += n
        self.positions += n
        self.prefilled = self.length
        self.prompt_positions = int(self.positions.max()) + 1  # a conversation's positions (columns: + padding)

    def advance(self) -> torch.Tensor:
        """Allocate the next column (`length - 1` afterwards) and return its RoPE positions (B, 1)."""
        if self.length >= self.capacity:
            raise GenerationError(f"KV cache capacity {self.capacity} exhausted")
        self.positions += 1
        self.key_valid[:, self.length] = True
        self.length += 1
        return self.positions[:, None]


class ReferenceSession:
    """The PyTorch reference as a DecoderSession (eager, fixed-capacity KV cache)."""

    def __init__(
        self,
        model: FusionModel,
        batch: PreparedBatch,
        max_new_tokens: int,
        kv_int8_scales: list[tuple[float, float]] | None = None,
    ):
        """kv_int8_scales: an INT8 KV cache's per-layer (key, value) scales (an artifact's `kv_cache` record)."""
        max_positions = model.config.decoder.rope.max_position_embeddings
        self.state = DecodeState(batch.layout, max_new_tokens, max_positions)
        self.model, self.batch = model, batch
        self.batch_size = batch.layout.batch_size
        self.cache = model.new_cache(self.batch_size, self.state.capacity, kv_int8_scales)
        self.vision: VisionOutputs | None = None  # the prefill's vision stage outputs
        self.keep_prefill_logits = False  # set True to keep every position's prefill logits
        self.prefill_logits: torch.Tensor | None = None  # (B, S, V) float32 when kept
        self.hidden_states: list[torch.Tensor] | None = None  # set to [] to record the prefill's

    def synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(position_ids, self.model.config.decoder.rope)
        return cos.to(self.model.device), sin.to(self.model.device)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        model, layout, device = self.model, self.batch.layout, self.model.device
        clock = StageClock(self.synchronize)
        self.vision = model.encode_images(
            self.batch.pixel_values.to(device), self.batch.instructs.to(device), self.batch.query_len
        )
        clock.lap("vision_encoder")
        require_finite("vision encoder", **vars(self.vision))
        embeds = assemble_embeddings(layout, model.embed_tokens(layout.text_ids.to(device)), self.vision)
        cos, sin = self._rope(layout.position_ids)
        mask = attention_mask(layout.attention_mask.to(device), torch.arange(layout.seq_len, device=device))
        interaction = model.interaction_inputs(
            self.vision.global_ctx, layout.vision_pos.to(device), layout.instruct_pos.to(device)
        )
        h = model.decode(embeds, cos, sin, mask, self.cache, interaction, self.hidden_states)
        self.cache.advance(layout.seq_len)
        if self.keep_prefill_logits:
            self.prefill_logits = model.logits(h)
            logits = self.prefill_logits[:, -1]
        else:
            logits = model.logits(h[:, -1])
        clock.lap("decoder_prefill")
        self.stage_seconds = clock.seconds
        require_finite("decoder prefill", logits=logits)
        return logits

    def kept_cache(self, row: int, length: int) -> list[torch.Tensor]:
        """One row's first `length` KV columns as stored, layer by layer (key, value): what a conversation keeps."""
        return self.cache.kept_columns(row, length)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        model, device, state = self.model, self.model.device, self.state
        cos, sin = self._rope(state.advance())
        key_valid = state.key_valid[:, : state.length].to(device)
        mask = attention_mask(key_valid, torch.tensor([state.length - 1], device=device))
        h = model.decode(model.embed_tokens(tokens.to(device)[:, None]), cos, sin, mask, self.cache)
        self.cache.advance(1)
        logits = model.logits(h[:, -1])
        require_finite("decoder step", logits=logits)
        return logits
