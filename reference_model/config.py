"""Typed configuration of a FUSION checkpoint: any of the family's decoders and towers (docs/semantics.md 1.1).

One source of truth for every shape: the checkpoint's `config.json` (decoder, projectors, interaction layers,
RoPE) plus an optional `vision_config.json` (the tower's shape). Real checkpoints carry no vision config: upstream
takes the tower's shape from `mm_vision_tower`'s name (SigLIP2 giant-opt or SigLIP so400m), and so does this
module. The decoder family comes from `model_type` (`fusion_phi`: Phi-3.5-mini; `fusion_llama`: Llama-3.1).
Head counts cannot be read from weight shapes, so they come from these files or a preset, never a folder name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import FusionError
from .input_files import read_json

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("fusion-phi3.5-3b", "fusion-x-phi3.5-3b", "fusion-llama3.1-8b", "fusion-x-llama3.1-8b", "small",
           "small-llama", "tiny", "tiny-x-llama")  # fmt: skip


@dataclass(frozen=True)
class DecoderFamily:
    """What a FUSION decoder family is, in one place (its chat template: chat_template.TEMPLATES[model_type])."""

    name: str  # DecoderConfig.family
    model_type: str  # config.json's
    title: str  # in messages and reports
    rope_type: str  # the rope_scaling its checkpoints use
    hf_model_type: str  # the Hugging Face model its decoder is, key for key (peers, benchmarks/peers.py)
    hf_architecture: str
    hf_name: str  # that model's name in reports


PHI3 = DecoderFamily("phi3", "fusion_phi", "Phi-3.5-mini", "longrope", "phi3", "Phi3ForCausalLM", "Phi-3")
LLAMA = DecoderFamily("llama", "fusion_llama", "Llama-3.1", "llama3", "llama", "LlamaForCausalLM", "Llama")
DECODER_FAMILIES = {family.model_type: family for family in (PHI3, LLAMA)}  # by model_type
# mm_vision_tower's name -> the tower's shape when the checkpoint carries no vision config. Upstream's builder
# tests 'siglip2' before 'siglip' (fusion/model/multimodal_encoder/builder.py), and so does `tower_family`.
TOWER_PRESETS = {"siglip2": "siglip2-giant-opt.vision.json", "siglip": "so400m.vision.json"}
TOWER_NAMES = {"siglip2": "SigLIP2 giant-opt-patch16-384", "siglip": "SigLIP so400m-patch14-384"}
# Placeholder ids that upstream's tokenizer_image_token puts into input_ids.
IMAGE_TOKEN_ID = -200
LATENT_TOKEN_ID = -300

# Upper bounds on every size a config gives, checked before any module or tensor is made: a hostile or corrupt
# `num_hidden_layers: 1000000000` is refused at once instead of building layers for minutes. Each bound is far
# above the largest real model of its kind: Llama-3.1-405B (hidden 16384, MLP 53248, 126 layers, 128 heads),
# Gemma 3's 262,144-token vocabulary, Llama 4 Scout's 10M-token context, SigLIP2-giant (1536 wide, MLP 6144,
# 40 layers, 16 heads, 512 px); FUSION-Phi3.5 itself is 3072 / 8192 / 32 layers / 32 heads / 32064 tokens.
MAX_LAYERS = 1024  # decoder, vision tower and interaction layers (8x Llama-405B's 126)
MAX_HIDDEN = 65536  # channel widths (4x Llama-405B's 16384)
MAX_INTERMEDIATE = 262144  # MLP widths (~5x Llama-405B's 53248)
MAX_HEADS = 1024  # attention heads, query or key/value (8x Llama-405B's 128)
MAX_VOCAB = 1 << 22  # 4,194,304 tokens (16x Gemma 3's 262,144); token ids lie below it
MAX_POSITIONS = 1 << 24  # 16,777,216 positions (1.6x Llama 4 Scout's 10M); also bounds a latent count
MAX_IMAGE_SIZE = 2048  # crop side in pixels (4x SigLIP2's 512; 5 float crops of 2048^2 are 250 MB)
MAX_CHANNELS = 64  # image channels (real towers read 3)
MAX_WINDOW = 1024  # interaction window side (upstream: 3)
MAX_QUERY_LENS = 64  # entries of the trained `query_len` list (upstream lists 5)
MAX_EOS_IDS = 64  # entries of an `eos_token_id` list (Llama-3.1-Instruct lists 3)


class ConfigError(FusionError):
    """A checkpoint's configuration is missing, malformed or describes an unsupported model."""


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP or SigLIP2 tower as FUSION runs it (the checkpoint's last layer removed); both compute alike."""

    hidden_size: int  # channel width of the tower (so400m: 1152, giant-opt: 1536)
    intermediate_size: int  # MLP width, tanh-GELU (so400m: 4304, giant-opt: 6144)
    num_layers: int  # layers that run: the saved depth minus its deleted last layer (so400m: 26, giant-opt: 39)
    num_heads: int
    image_size: int  # side of every static_hd crop
    patch_size: int  # patch conv kernel and stride
    num_channels: int
    layer_norm_eps: float

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.num_layers < 2:
            raise ConfigError(f"vision tower needs at least 2 layers, got {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens per crop (so400m: 27^2 = 729, giant-opt: 24^2 = 576)."""
        return self.patches_per_side**2

    @property
    def num_early_layers(self) -> int:
        """Layers L0..L(half-1) whose instruction rows attend uniformly (docs/semantics.md section 4). Upstream
        hard-codes 13 (so400m) and 19 (giant-opt): half the layers that run at each tower's real depth."""
        return self.num_layers // 2

    @property
    def connector_ranges(self) -> tuple[range, range]:
        """Hidden-state indices the feature connector averages: hs[0:half] and hs[half:2*half]."""
        half = self.num_layers // 2
        return range(0, half), range(half, 2 * half)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding as transformers 4.48.1 computes it: `longrope` (Phi-3.5: short and long factor lists, a
    switch past the original context, a constant attention scaling) or `llama3` (Llama-3.1: one fixed frequency
    rescaling by wavelength, no switch, no scaling)."""

    head_dim: int
    theta: float
    short_factor: tuple[float, ...]  # longrope only (empty for llama3)
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int  # the original context; longrope: above it the long factors apply
    max_position_embeddings: int
    kind: str  # longrope or llama3 (DecoderFamily.rope_type)
    # llama3 only: low-frequency divisor and the wavelength band (original / low ... original / high) between
    # the unchanged and the divided frequencies, where the two are interpolated
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.kind == "llama3":
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError(
                    f"rope_scaling.high_freq_factor {self.high_freq_factor} must exceed low_freq_factor "
                    f"{self.low_freq_factor}"
                )
            return
        for name in ("short_factor", "long_factor"):
            if len(getattr(self, name)) != self.head_dim // 2:
                raise ConfigError(
                    f"rope_scaling.{name} has {len(getattr(self, name))} entries, "
                    f"expected head_dim/2 = {self.head_dim // 2}"
                )

    @property
    def switch_position(self) -> int | None:
        """Positions up to which a forward's rotation is fixed (LongRoPE's original context); None: never switches."""
        return self.original_max_position_embeddings if self.kind == "longrope" else None

    @property
    def attention_scaling(self) -> float:
        """Constant multiplier of cos and sin: longrope's sqrt(1 + ln(max/orig) / ln(orig)), or 1 when not extended
        and for llama3."""
        if self.kind != "longrope":
            return 1.0
        factor = self.max_position_embeddings / self.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))


@dataclass(frozen=True)
class DecoderConfig:
    """Phi-3.5-mini or Llama-3.1 decoder: the same layers (pre-norm RMSNorm, grouped-query attention, SiLU-gated
    MLP, no biases); they differ in checkpoint layout (fused or separate projections), RoPE and template."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope: RopeConfig
    family: str  # DecoderFamily.name

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class InteractionConfig:
    """Context-Aware Recursive Alignment layers (upstream `vision_sampler_layers`)."""

    num_layers: int  # num_of_vision_sampler_layers
    start: int  # start_of_vision_sampler_layers
    stride: int  # stride_of_vision_sampler_layers
    window_size: int  # w: each latent reads a w x w window of the global context
    num_heads: int = 16  # fixed upstream, independent of the LLM's head count
    layer_norm_eps: float = 1e-5

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        """Decoder layer indices after which interaction layer k runs: start + k * stride."""
        return tuple(self.start + k * self.stride for k in range(self.num_layers))


@dataclass(frozen=True)
class FusionConfig:
    vision: VisionConfig
    decoder: DecoderConfig
    interaction: InteractionConfig
    trained_query_lens: tuple[int, ...]  # the checkpoint's `query_len` list (upstream drew one per call)
    bos_token_id: int | None = 1
    eos_token_id: int | None = None  # the first EOS id; `eos_token_ids` holds every one
    eos_token_ids: tuple[int, ...] = ()  # transformers allows several (Llama-3.1-Instruct lists three)
    pad_token_id: int | None = None
    tokenizer_model_max_length: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # config.json as read

    def __post_init__(self) -> None:
        for layer in self.interaction.decoder_layers:
            if not 0 <= layer < self.decoder.num_layers:
                raise ConfigError(
                    f"interaction layer after decoder layer {layer} is outside the decoder's "
                    f"{self.decoder.num_layers} layers"
                )
        if self.decoder.hidden_size % self.interaction.num_heads:
            raise ConfigError(
                f"hidden_size {self.decoder.hidden_size} is not divisible by the "
                f"{self.interaction.num_heads} interaction heads"
            )

    @property
    def decoder_family(self) -> DecoderFamily:
        return next(f for f in DECODER_FAMILIES.values() if f.name == self.decoder.family)

    @property
    def model_type(self) -> str:
        return self.decoder_family.model_type

    @property
    def default_context(self) -> int:
        """The longest sequence upstream ran this checkpoint at: `tokenizer_model_max_length` (every training
        sequence was cut there), else the original (unscaled) RoPE context; the default fixed KV capacity."""
        return min(self.tokenizer_model_max_length or math.inf, self.decoder.rope.original_max_position_embeddings)

    @property
    def global_grid_side(self) -> int:
        """The four global crops laid out 2x2: a (2 * patches per side)^2 grid of image tokens (54^2, 48^2)."""
        return 2 * self.vision.patches_per_side

    @property
    def max_question_tokens(self) -> int:
        """Longest question (token ids) the vision tower is given. Upstream cuts every sequence at
        `tokenizer_model_max_length`, so no question it was trained or run with was longer; here a longer one
        is refused, not cut. Without that field: the original (unscaled) RoPE context."""
        return self.tokenizer_model_max_length or self.decoder.rope.original_max_position_embeddings

    @property
    def default_query_len(self) -> int:
        """64 when the checkpoint was trained with it, else the first length it lists."""
        return 64 if 64 in self.trained_query_lens else self.trained_query_lens[0]

    def check_query_len(self, query_len: int) -> int:
        """Validate an explicit query_len: a perfect square whose pooled grids fit the global grid."""
        if isinstance(query_len, bool) or not isinstance(query_len, int) or query_len <= 0:
            raise ConfigError(
                f"query_len must be a positive perfect square (4, 16, 36, 64, 144, ...), got {query_len!r}"
            )
        side = math.isqrt(query_len)
        if side * side != query_len:
            raise ConfigError(
                f"query_len {query_len} is not a perfect square; trained lengths are "
                f"{', '.join(map(str, self.trained_query_lens))} "
                "(any perfect square such as 4, 16, 36, 64, 144 is accepted)"
            )
        if side * self.interaction.window_size > self.global_grid_side:
            raise ConfigError(
                f"query_len {query_len} needs a {side * self.interaction.window_size}^2 global context, "
                f"larger than the {self.global_grid_side}x{self.global_grid_side} global grid"
            )
        return query_len

    def to_json_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json, vision_config.json) in the checkpoint format."""
        d, v, i, r = self.decoder, self.vision, self.interaction, self.decoder.rope
        config = dict(self.raw)
        for key in ("rope_scaling", "original_max_position_embeddings", "head_dim"):
            config.pop(key, None)  # written below as this decoder family writes them
        config.update(
            model_type=self.model_type,
            vocab_size=d.vocab_size,
            hidden_size=d.hidden_size,
            intermediate_size=d.intermediate_size,
            num_hidden_layers=d.num_layers,
            num_attention_heads=d.num_heads,
            num_key_value_heads=d.num_kv_heads,
            rms_norm_eps=d.rms_norm_eps,
            rope_theta=r.theta,
            max_position_embeddings=r.max_position_embeddings,
            mm_hidden_size=v.hidden_size,
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="static_hd",
            mm_use_im_start_end=True,
            num_of_vision_sampler_layers=i.num_layers,
            start_of_vision_sampler_layers=i.start,
            stride_of_vision_sampler_layers=i.stride,
            window_size=i.window_size,
            query_len=",".join(map(str, self.trained_query_lens)),
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
        )
        if r.kind == "llama3":
            config.update(head_dim=d.head_dim, attention_bias=False, mlp_bias=False, rope_scaling={
                "rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings})  # fmt: skip
        else:
            factors = {"long_factor": list(r.long_factor), "short_factor": list(r.short_factor), "type": "longrope"}
            config.update(original_max_position_embeddings=r.original_max_position_embeddings, rope_scaling=factors)
        if self.tokenizer_model_max_length is not None:
            config["tokenizer_model_max_length"] = self.tokenizer_model_max_length
        vision = {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers + 1,  # as SigLIP saves it, before FUSION deletes the last layer
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": v.layer_norm_eps,
        }
        return config, vision

    def digest_dict(self) -> dict[str, Any]:
        """Everything that determines the computation (for manifests and config digests)."""
        out = asdict(self)
        out.pop("raw")
        return out


_MISSING = object()


def _require(config: dict[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise ConfigError(f"{source}: missing required field '{key}'")
    return config[key]


def _int(
    config: dict[str, Any], key: str, source: str, default: Any = _MISSING, minimum: int = 1, *, maximum: int
) -> int:
    """An integer field (JSON integer, not a string, float or bool) in minimum..maximum."""
    value = _require(config, key, source) if default is _MISSING else config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise ConfigError(f"{source}: {key} is {value}, over the limit of {maximum} (far above any real model's)")
    return value


def _positive_float(config: dict[str, Any], key: str, source: str, default: Any = _MISSING) -> float:
    """A finite number > 0 (JSON integer or float)."""
    value = _require(config, key, source) if default is _MISSING else config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{source}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _factors(scaling: dict[str, Any], key: str, source: str, count: int) -> tuple[float, ...]:
    """`count` positive factors (head_dim / 2), the length checked before any entry is read."""
    value = _require(scaling, key, f"{source} rope_scaling")
    if not isinstance(value, list):
        raise ConfigError(f"{source}: rope_scaling.{key} must be a list of numbers, got {value!r}")
    if len(value) != count:
        raise ConfigError(f"{source}: rope_scaling.{key} has {len(value)} entries, expected head_dim/2 = {count}")
    return tuple(_positive_float({f"rope_scaling.{key}[{i}]": x}, f"rope_scaling.{key}[{i}]", source)
                 for i, x in enumerate(value))  # fmt: skip


def _optional_token_id(config: dict[str, Any], key: str, source: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    return _int({key: value}, key, source, minimum=0, maximum=MAX_VOCAB - 1)


def _eos_token_ids(config: dict[str, Any], source: str) -> tuple[int, ...]:
    """`eos_token_id` as one id or a list of them (transformers allows several: Llama-3.1-Instruct lists
    <|end_of_text|>, <|eom_id|> and <|eot_id|>); generation stops at any."""
    value = config.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_EOS_IDS:
        raise ConfigError(f"{source}: eos_token_id lists {len(values)} ids, over the limit of {MAX_EOS_IDS}")
    names = ["eos_token_id"] if len(values) == 1 else [f"eos_token_id[{i}]" for i in range(len(values))]
    ids = [_optional_token_id({name: v}, name, source) for name, v in zip(names, values)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def tower_family(name: Any, source: str) -> str:
    """The tower family `mm_vision_tower` names, by upstream's rule ('siglip2' tested before 'siglip')."""
    lowered = name.lower() if isinstance(name, str) else ""
    family = next((f for f in TOWER_PRESETS if f in lowered), None)
    if family is None:
        raise ConfigError(
            f"{source}: mm_vision_tower {name!r} names no tower FUSION uses; its checkpoints name "
            "google/siglip-so400m-patch14-384 or google/siglip2-giant-opt-patch16-384"
        )
    return family


def parse_query_lens(value: Any, source: str = "config.json") -> tuple[int, ...]:
    """Upstream stores `query_len` as a comma-separated string ("16" or "4,16,36,64,144")."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{source}: query_len {value!r} is not a comma-separated list of integers")
    pieces = [x for x in str(value).split(",", MAX_QUERY_LENS) if x.strip()]
    if len(pieces) > MAX_QUERY_LENS:
        raise ConfigError(f"{source}: query_len lists more than {MAX_QUERY_LENS} lengths")
    try:
        lens = tuple(int(x) for x in pieces)
    except ValueError:
        raise ConfigError(f"{source}: query_len {value!r} is not a comma-separated list of integers") from None
    if not lens or min(lens) < 1:
        raise ConfigError(f"{source}: query_len {value!r} must list positive integers")
    if max(lens) > MAX_POSITIONS:
        raise ConfigError(f"{source}: query_len {max(lens)} is over the limit of {MAX_POSITIONS} latents")
    return lens


def vision_config_from_dict(vision: dict[str, Any], source: str) -> VisionConfig:
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
    hidden = _int(vision, "hidden_size", source, maximum=MAX_HIDDEN)
    heads = _int(vision, "num_attention_heads", source, maximum=MAX_HEADS)
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    image_size = _int(vision, "image_size", source, 384, maximum=MAX_IMAGE_SIZE)
    patch_size = _int(vision, "patch_size", source, 14, maximum=MAX_IMAGE_SIZE)
    if patch_size > image_size:
        raise ConfigError(f"{source}: patch_size {patch_size} is larger than image_size {image_size}")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=_int(vision, "intermediate_size", source, maximum=MAX_INTERMEDIATE),
        # SigLIP's saved depth; FUSION deletes the last layer before use, and the connector needs 2 that run.
        num_layers=_int(vision, "num_hidden_layers", source, minimum=3, maximum=MAX_LAYERS + 1) - 1,
        num_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=_int(vision, "num_channels", source, 3, maximum=MAX_CHANNELS),
        layer_norm_eps=_positive_float(vision, "layer_norm_eps", source, 1e-6),
    )


def config_from_dicts(
    config: dict[str, Any],
    vision: dict[str, Any] | None,
    source: str = "config.json",
    vision_source: str = "vision_config.json",
) -> FusionConfig:
    """Build a FusionConfig from a checkpoint's config.json dict and optional vision_config.json dict; every size
    is checked against the bounds above before anything is built (`source`, `vision_source`: named in errors)."""
    model_type = config.get("model_type")
    if model_type not in DECODER_FAMILIES:
        raise ConfigError(
            f"{source}: model_type is {model_type!r}, expected one of FUSION's "
            f"{', '.join(map(repr, DECODER_FAMILIES))} ({' or '.join(f.title for f in DECODER_FAMILIES.values())} "
            "decoders)"
        )
    family = DECODER_FAMILIES[model_type]
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"{source}: mm_projector_type {projector!r} is not supported (FUSION uses mlp2x_gelu)")
    aspect = config.get("image_aspect_ratio", "static_hd")
    if aspect != "static_hd":
        raise ConfigError(f"{source}: image_aspect_ratio {aspect!r} is not supported (FUSION uses static_hd)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (FUSION uses silu)")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if config.get(key, False) is not False:
            raise ConfigError(f"{source}: {key} {config[key]!r} is not supported (FUSION's decoders have none)")

    if vision is None:  # upstream's rule: the tower's shape from its name
        tower = tower_family(config.get("mm_vision_tower"), source)
        vision = _read_json(PRESET_DIR / TOWER_PRESETS[tower])
        vision_source = f"mm_vision_tower {config.get('mm_vision_tower')!r}: {TOWER_NAMES[tower]}"
    vision_cfg = vision_config_from_dict(vision, vision_source)
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and _int(config, "mm_hidden_size", source, maximum=MAX_HIDDEN) != vision_cfg.hidden_size:
        raise ConfigError(
            f"{source}: mm_hidden_size {mm_hidden} disagrees with the vision tower width "
            f"{vision_cfg.hidden_size} ({vision_source})"
        )

    # head counts first: every derived size (head_dim, RoPE factor counts) depends on them
    hidden = _int(config, "hidden_size", source, maximum=MAX_HIDDEN)
    heads = _int(config, "num_attention_heads", source, maximum=MAX_HEADS)
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = hidden // heads
    explicit = config.get("head_dim")
    if explicit is not None and _int(config, "head_dim", source, maximum=MAX_HIDDEN) != head_dim:
        raise ConfigError(
            f"{source}: head_dim {explicit} differs from hidden_size / num_attention_heads = {head_dim}; "
            "FUSION's decoders and interaction layers need hidden_size = heads x head_dim"
        )
    if head_dim % 2:
        raise ConfigError(
            f"{source}: head size hidden_size / num_attention_heads = {hidden} / {heads} = {head_dim} is odd; "
            "rotary embeddings rotate pairs of channels"
        )
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != family.rope_type:
        raise ConfigError(
            f"{source}: rope_scaling type {rope_type!r} is not supported for model_type {model_type!r} "
            f"(its checkpoints use {family.rope_type!r})"
        )
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    max_pos = _int(config, "max_position_embeddings", source, maximum=MAX_POSITIONS)
    theta = _positive_float(config, "rope_theta", source, 10000.0)
    if rope_type == "llama3":
        where = f"{source} rope_scaling"
        rope = RopeConfig(
            head_dim=head_dim,
            theta=theta,
            short_factor=(),
            long_factor=(),
            original_max_position_embeddings=_int(
                scaling, "original_max_position_embeddings", where, maximum=MAX_POSITIONS
            ),
            max_position_embeddings=max_pos,
            kind="llama3",
            factor=_positive_float(scaling, "factor", where),
            low_freq_factor=_positive_float(scaling, "low_freq_factor", where),
            high_freq_factor=_positive_float(scaling, "high_freq_factor", where),
        )
    else:
        rope = RopeConfig(
            head_dim=head_dim,
            theta=theta,
            short_factor=_factors(scaling, "short_factor", source, head_dim // 2),
            long_factor=_factors(scaling, "long_factor", source, head_dim // 2),
            original_max_position_embeddings=_int(
                config, "original_max_position_embeddings", source, max_pos, maximum=MAX_POSITIONS
            ),
            max_position_embeddings=max_pos,
            kind="longrope",
        )
    kv_heads = config.get("num_key_value_heads")
    decoder = DecoderConfig(
        vocab_size=_int(config, "vocab_size", source, maximum=MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size", source, maximum=MAX_INTERMEDIATE),
        num_layers=_int(config, "num_hidden_layers", source, maximum=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else _int(config, "num_key_value_heads", source, maximum=MAX_HEADS),
        rms_norm_eps=_positive_float(config, "rms_norm_eps", source, 1e-5),
        rope=rope,
        family=family.name,
    )
    interaction = InteractionConfig(
        num_layers=_int(config, "num_of_vision_sampler_layers", source, maximum=MAX_LAYERS),
        start=_int(config, "start_of_vision_sampler_layers", source, 0, minimum=0, maximum=MAX_LAYERS),
        stride=_int(config, "stride_of_vision_sampler_layers", source, 1, maximum=MAX_LAYERS),
        window_size=_int(config, "window_size", source, 3, maximum=MAX_WINDOW),
    )
    max_length = config.get("tokenizer_model_max_length")
    eos_ids = _eos_token_ids(config, source)
    return FusionConfig(
        vision=vision_cfg,
        decoder=decoder,
        interaction=interaction,
        trained_query_lens=parse_query_lens(config.get("query_len", "64"), source),
        bos_token_id=_optional_token_id(config, "bos_token_id", source),
        eos_token_id=next(iter(eos_ids), None),
        eos_token_ids=eos_ids,
        pad_token_id=_optional_token_id(config, "pad_token_id", source),
        tokenizer_model_max_length=(
            None if max_length is None else _int(config, "tokenizer_model_max_length", source, maximum=MAX_POSITIONS)
        ),
        raw=dict(config),
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A config file: a regular file holding a JSON object, bounded in size and nesting (input_files.py)."""
    return read_json(path, error=ConfigError)


def load_config(model_dir: str | Path) -> FusionConfig:
    """Read `config.json` (and `vision_config.json` when present) from a checkpoint folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: checkpoint folder not found")
    config_path = model_dir / "config.json"
    vision_path = model_dir / "vision_config.json"
    present = vision_path.exists() or vision_path.is_symlink()  # a dangling link is refused, not skipped
    vision = _read_json(vision_path) if present else None
    return config_from_dicts(_read_json(config_path), vision, source=str(config_path), vision_source=str(vision_path))


def preset_config(name: str) -> FusionConfig:
    """A named preset:
    - the four full-size FUSION shapes: `fusion-phi3.5-3b` (Phi-3.5-mini + SigLIP so400m), `fusion-x-phi3.5-3b`
      (+ SigLIP2 giant-opt), `fusion-llama3.1-8b` (Llama-3.1-8B-Instruct + so400m; vocabulary 128256 + the two
      vision markers upstream adds), `fusion-x-llama3.1-8b` (+ giant-opt);
    - `small`: realistic CPU timings on 2 cores: decoder 512 wide, MLP 1536, 8 layers x 8 heads (8 KV heads),
      vocabulary 32064, Phi-3.5's LongRoPE (131072 / 4096; its factor curves resampled from 48 to 32 pairs);
      SigLIP-shaped tower 8 layers x 256 (4 heads, MLP 1024) at 384 px; 3 interaction layers (start 0, stride 3);
    - `small-llama`: `small` with the Llama-3.1 decoder's traits (2 KV heads: the 8B's 4:1 grouping, llama3 RoPE,
      untied head); vocabulary and tower kept, so the two differ only in the decoder family;
    - `tiny`, `tiny-x-llama`: the shapes of the two upstream oracles."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    vision_path = PRESET_DIR / f"{name}.vision.json"
    vision = _read_json(vision_path) if vision_path.exists() else None
    return config_from_dicts(
        _read_json(PRESET_DIR / f"{name}.json"), vision, source=f"preset {name}", vision_source=f"preset {name} vision"
    )
