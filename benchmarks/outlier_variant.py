"""A reproducible outlier-channel variant of a FUSION checkpoint: the same float model, with the activation
outliers that make weight quantization hard.

Random weights have none: every channel a norm hands to a linear layer carries about the same magnitude, so
rounding to nearest already does well and activation-aware methods (AWQ) have nothing to find. Trained LLMs are
different: a few fixed hidden channels run one to two orders of magnitude above the rest (LLM.int8(), SmoothQuant
and AWQ measure ~20-100x on OPT and LLaMA), mostly because the norms' scales are large there, and the weight
rows that read those channels are correspondingly small. A weight row is an input channel of `W [out, in]`,
which blockwise INT4 shares a scale with its block's other rows: rounded to nearest, the small rows fall to zero
and the outlier channel's whole contribution is lost.

The recipe makes that case without changing what the model computes:
- one seeded set of channels of the decoder's hidden size (`channels_per` of them, at least 2; the same set in
  every layer, as trained LLMs keep theirs in the same residual dimensions), and one of the vision tower's, each
  with a seeded factor drawn from `factors` (powers of two);
- every norm that feeds linear layers gets its scale (and a LayerNorm its bias) multiplied by the factor on
  those channels, and the input columns of the linear layers reading that norm's output are divided by it:
  each decoder layer's `input_layernorm` -> `qkv_proj` and `post_attention_layernorm` -> `gate_up_proj`, the final
  `norm` -> `lm_head`, each interaction layer's three cross-attention LayerNorms -> their q/k/v projections and
  its `norm` -> `proj_out.linear_1`, each vision layer's `layer_norm1` -> q/k/v and `layer_norm2` -> `fc1`;
- `y = (W / s) (s * norm(x))` is `W norm(x)` again, and with power-of-two factors both products are exact in
  binary floating point, so the float model computes the same products as the source (bit-identical in float32;
  in fp16/bf16 checkpoints too, unless a divided weight falls below the dtype's normal range).

The variant is written atomically (a staging folder beside the output) as a checkpoint folder in the source's
format: its config and tokenizer files copied as they are, the tensors in the source's dtype, and the recipe in
`outlier_variant.json`.

    python -m benchmarks.outlier_variant MODEL_DIR OUT_DIR [--seed 0] [--factors 16,32,64] [--channels-per 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reference_model.checkpoint import SafetensorsWriter, checkpoint_files, checkpoint_keys, to_checkpoint_key
from reference_model.config import FusionConfig, load_config
from reference_model.errors import FusionError
from reference_model.input_files import open_safetensors
from reference_model.prompt import TOKENIZER_FILES, tokenizer_folder
from reference_model.staging import staging_folder

RECIPE_FILE = "outlier_variant.json"
CONFIG_FILES = ("config.json", "vision_config.json")


@dataclass(frozen=True)
class OutlierRecipe:
    seed: int = 0
    factors: tuple[int, ...] = (16, 32, 64)  # powers of two (the products stay exact), ~the 20-50x of trained LLMs
    channels_per: int = 128  # one outlier channel per this many hidden channels (at least 2 per hidden space)

    def __post_init__(self) -> None:
        bad = [f for f in self.factors if f < 2 or f & (f - 1)]
        if not self.factors or bad:
            raise FusionError(f"--factors {','.join(map(str, self.factors))}: powers of two >= 2 (e.g. 16,32,64)")
        if self.channels_per < 1:
            raise FusionError(f"--channels-per {self.channels_per}: a positive number of channels")


@dataclass(frozen=True)
class NormFeed:
    """A norm and the linear layers that read its output (our module names), in one hidden space."""

    norm: str
    linears: tuple[str, ...]
    space: str  # "decoder" | "vision"


def norm_feeds(config: FusionConfig) -> Iterator[NormFeed]:
    """Every norm whose output only linear layers read, with those layers."""
    for i in range(config.decoder.num_layers):
        yield NormFeed(f"layers.{i}.input_layernorm", (f"layers.{i}.self_attn.qkv_proj",), "decoder")
        yield NormFeed(f"layers.{i}.post_attention_layernorm", (f"layers.{i}.mlp.gate_up_proj",), "decoder")
    yield NormFeed("norm", ("lm_head",), "decoder")
    for k in range(config.interaction.num_layers):
        cross = f"interaction.{k}.cross_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):  # Sequential(LayerNorm, Linear)
            yield NormFeed(f"{cross}.{proj}.0", (f"{cross}.{proj}.1",), "decoder")
        yield NormFeed(f"interaction.{k}.norm", (f"interaction.{k}.proj_out.linear_1",), "decoder")
    for i in range(config.vision.num_layers):
        layer = f"vision.layers.{i}"
        attention = tuple(f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
        yield NormFeed(f"{layer}.layer_norm1", attention, "vision")
        yield NormFeed(f"{layer}.layer_norm2", (f"{layer}.mlp.fc1",), "vision")


def channel_factors(config: FusionConfig, recipe: OutlierRecipe) -> dict[str, torch.Tensor]:
    """Per hidden space, the factor of every channel (1 except the outlier channels), drawn from the seed."""
    generator = torch.Generator().manual_seed(recipe.seed)
    out = {}
    for space, width in (("decoder", config.decoder.hidden_size), ("vision", config.vision.hidden_size)):
        count = min(width, max(2, width // recipe.channels_per))
        channels = torch.randperm(width, generator=generator)[:count]
        picks = torch.randint(len(recipe.factors), (count,), generator=generator)
        factors = torch.ones(width, dtype=torch.float32)
        factors[channels] = torch.tensor(recipe.factors, dtype=torch.float32)[picks]
        out[space] = factors
    return out


def tensor_edits(config: FusionConfig, recipe: OutlierRecipe) -> dict[str, tuple[str, torch.Tensor]]:
    """Checkpoint key -> ("scale", s) for a norm's weight and bias (times s per channel) or ("divide", s) for a
    linear weight [out, in] (its input columns divided by s)."""
    factors = channel_factors(config, recipe)
    edits: dict[str, tuple[str, torch.Tensor]] = {}
    for feed in norm_feeds(config):
        s = factors[feed.space]
        for part in ("weight", "bias"):  # RMSNorm has no bias; its key is simply absent from the checkpoint
            edits[to_checkpoint_key(f"{feed.norm}.{part}")] = ("scale", s)
        for linear in feed.linears:  # a Llama checkpoint's fused layers are stored as their parts: each divided
            for key in checkpoint_keys(f"{linear}.weight", config):
                edits[key] = ("divide", s)
    return edits


def edited(tensor: torch.Tensor, edit: tuple[str, torch.Tensor], key: str) -> torch.Tensor:
    how, s = edit
    width = tensor.shape[-1]
    if width != s.numel():
        raise FusionError(f"tensor {key}: last dimension {width}, expected {s.numel()} (the hidden size)")
    values = tensor.float()
    values = values * s if how == "scale" else values / s
    return values.to(tensor.dtype)


def write_outlier_variant(model_dir: str | Path, out_dir: str | Path, recipe: OutlierRecipe | None = None) -> Path:
    """Write the outlier-channel variant of the checkpoint at `model_dir` to the new folder `out_dir`."""
    model_dir, recipe = Path(model_dir), recipe or OutlierRecipe()
    config = load_config(model_dir)
    edits = tensor_edits(config, recipe)
    files = checkpoint_files(model_dir)
    missing = sorted(key for key in edits if key.endswith(".weight") and key not in files)  # biases: LayerNorms
    if missing:
        raise FusionError(f"{model_dir}: the checkpoint lacks {', '.join(missing[:3])} (not a FUSION checkpoint?)")
    sources = sorted(set(files.values()))
    shard_bytes = None if len(sources) == 1 else max(p.stat().st_size for p in sources)
    with staging_folder(out_dir) as tmp:
        writer = SafetensorsWriter(tmp, shard_bytes)
        for path in sources:
            with open_safetensors(path, error=FusionError) as f:
                for key in f.keys():
                    if files.get(key) != path:
                        continue  # an index names another shard for it
                    tensor = f.get_tensor(key)
                    if key in edits:
                        tensor = edited(tensor, edits[key], key)
                    writer.add(key, tensor)
        writer.close()
        _copy_side_files(model_dir, tmp)
        factors = channel_factors(config, recipe)
        channels = {
            space: {str(int(c)): int(s[c]) for c in torch.nonzero(s != 1).ravel()} for space, s in factors.items()
        }
        record = {"source": str(model_dir.resolve()), "recipe": asdict(recipe), "channels": channels}
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2))
    return Path(out_dir)


def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Config and tokenizer files as they are (the tokenizer in its own `tokenizer/` where the source keeps it)."""
    from fusion_export.containment import copy_data

    for name in CONFIG_FILES:
        if (model_dir / name).exists():
            copy_data(model_dir / name, out / name)
    try:
        source = tokenizer_folder(model_dir)
    except FusionError:
        return  # a checkpoint without a tokenizer (weights only): the variant has none either
    target = out / source.relative_to(model_dir)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            copy_data(source / name, target / name)


def _factors(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(piece) for piece in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated powers of two, e.g. 16,32,64") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outlier_variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the source checkpoint folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the new checkpoint folder (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factors", type=_factors, default=OutlierRecipe.factors, help="16,32,64 (default)")
    parser.add_argument("--channels-per", type=int, default=OutlierRecipe.channels_per, metavar="N",
                        help="one outlier channel per N hidden channels, at least 2 (default 128)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        recipe = OutlierRecipe(args.seed, args.factors, args.channels_per)
        out = write_outlier_variant(args.model_dir, args.out_dir, recipe)
    except FusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = json.loads((out / RECIPE_FILE).read_text())
    for space, channels in record["channels"].items():
        print(f"{space}: {len(channels)} outlier channels {channels}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
