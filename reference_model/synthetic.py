"""Random FUSION checkpoints in the real format, for tests, the demo and full-size export rehearsals.

Weights are drawn with std 1/sqrt(fan_in) (HF's 0.02 gives near-identical image tokens and degenerate logits),
streamed tensor by tensor into safetensors shards so a full-size checkpoint never has to sit in memory whole.
The bundled tokenizer is byte-level: ids 3..258 are the 256 bytes, then the family's chat specials (Phi-3's or
Llama-3's) and FUSION's vision markers, the same layout as the two oracles' tiny tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint import SafetensorsWriter, checkpoint_tensors, write_config_files
from .config import FusionConfig, preset_config
from .model import FusionModel
from .staging import staging_folder

# Per decoder family: the added tokens after the bytes, EOS first (the oracles' layouts).
SPECIAL_TOKENS = {
    "phi3": ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<vision_start>", "<vision_end>"),
    "llama": ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<vision_start>",
              "<vision_end>"),
}  # fmt: skip


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_byte_tokenizer(family: str = "phi3"):
    """A byte-level tokenizer: <unk> <s> </s>, 256 bytes, the family's chat specials and the vision markers
    (266 tokens for Phi-3, 265 for Llama-3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + b for b, ch in enumerate(_byte_alphabet())})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    specials = SPECIAL_TOKENS[family]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token=specials[0], pad_token="<unk>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Drawn on the generator's device."""
    draw = torch.randn(shape, generator=generator, device=generator.device)
    if name.endswith("bias"):
        return draw * 0.02
    if len(shape) == 1:  # norm scales
        return 1.0 + 0.1 * draw
    if "embed" in name:  # token and position embeddings
        return draw
    return draw / math.sqrt(math.prod(shape[1:]))


@torch.no_grad()
def randomize_weights_(model: FusionModel, seed: int = 0) -> FusionModel:
    """Every weight of an in-memory model drawn by the same law as a written checkpoint's, on the model's device
    (a full-size model made on a GPU in seconds, never on the host)."""
    generator = torch.Generator(model.device).manual_seed(seed)
    for name, tensor in model.state_dict().items():
        tensor.copy_(_random_tensor(name, tuple(tensor.shape), generator))
    return model


def write_random_checkpoint(
    out_dir: str | Path,
    config: FusionConfig | str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Write a new random checkpoint folder (config, vision config, weights, tokenizer); appears atomically."""
    config = preset_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in FusionModel(config).state_dict().items()}
    if with_tokenizer and config.decoder.vocab_size < 256 + 3 + len(SPECIAL_TOKENS[config.decoder.family]):
        raise ValueError(f"vocab_size {config.decoder.vocab_size} cannot hold the byte-level test tokenizer")
    generator = torch.Generator().manual_seed(seed)
    with staging_folder(out_dir) as tmp:
        writer = SafetensorsWriter(tmp, shard_bytes)
        for name, shape in shapes.items():
            for key, tensor in checkpoint_tensors(name, _random_tensor(name, shape, generator).to(dtype), config):
                writer.add(key, tensor)
        writer.close()
        write_config_files(config, tmp)
        if with_tokenizer:
            build_byte_tokenizer(config.decoder.family).save_pretrained(str(tmp))
    return Path(out_dir)
