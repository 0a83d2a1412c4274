"""Peers measured by the same harness on the same decoder weights: the text decoder alone (no vision encoder, no
interaction layers), prompted with as many token ids as our prompt has positions.

- onnxruntime-genai: a folder built by its model builder from our checkpoint's decoder (`build_genai_model`;
  `-e cpu`, fp32 / int8 / int4, `prune_lm_head`), run with the harness's intra-op thread count.
- transformers' Phi-3 or Llama (sdpa attention, fp32) over the same weights: the second reference users know.

FUSION checkpoints store the decoder under Hugging Face Phi-3's or Llama's own key names, so the decoder's folder is
the checkpoint's config (FUSION fields dropped, the family's model_type), its decoder tensors and its tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference_model.config import load_config
from reference_model.errors import FusionError
from reference_model.input_files import read_json

from .harness import BenchSettings, Sample
from .machine import rss_bytes

DECODER_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
FUSION_ONLY_FIELDS = ("mm_", "num_of_vision", "start_of_vision", "stride_of_vision", "window_size", "query_len",
                      "image_", "tokenizer_", "unfreeze", "use_mm")  # fmt: skip


def save_decoder(model_dir: Path, out: Path) -> Path:
    """A Hugging Face Phi-3 or Llama folder (config, decoder weights, tokenizer) from a FUSION checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fusion_export.containment import copy_data
    from reference_model.checkpoint import checkpoint_files
    from reference_model.prompt import TOKENIZER_FILES, tokenizer_folder

    config = read_json(model_dir / "config.json")  # bounded in size and nesting, a regular file
    family = load_config(model_dir).decoder_family  # the Hugging Face model its decoder is, key for key
    decoder = {k: v for k, v in config.items() if not k.startswith(FUSION_ONLY_FIELDS)}
    decoder.update(model_type=family.hf_model_type, architectures=[family.hf_architecture])
    tensors = {}
    for key, path in checkpoint_files(model_dir).items():
        if key.startswith(DECODER_PREFIXES):
            with safe_open(path, "pt") as f:
                tensors[key] = f.get_tensor(key)
    decoder["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(decoder, indent=2))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    source = tokenizer_folder(model_dir)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            copy_data(source / name, out / name)
    return out


def build_genai_model(model_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder on the checkpoint's decoder (CPU, lm_head pruned to the last token)."""
    if (out / "genai_config.json").exists():
        return out
    decoder = save_decoder(model_dir, out.parent / f"{out.name}.hf")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(decoder), "-o", str(out),
               "-p", precision, "-e", "cpu", "--extra_options", "prune_lm_head=true"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").exists():
        raise FusionError(f"onnxruntime-genai's builder failed ({' '.join(command)}):\n{proc.stderr[-2000:]}")
    return out


def prompt_ids(vocab_size: int, length: int, batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (batch, length), generator=generator).tolist()


@dataclass
class GenaiContender:
    label: str
    folder: Path
    settings: BenchSettings
    vocab_size: int
    precision: str = "fp32"  # what the builder was asked for: fp32 | int8 | int4 (weights; cache and I/O fp32)
    kind: str = "onnxruntime-genai"
    text_only: bool = True
    load_s: float = 0.0
    rss_after_load: int = 0

    def prepare(self) -> None:
        import onnxruntime_genai as og

        start = time.perf_counter()
        config = og.Config(str(self.folder))
        threads = {"intra_op_num_threads": self.settings.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - start
        self.rss_after_load = rss_bytes()[0]

    def precision_name(self) -> str:
        return self.precision

    def retarget(self, settings: BenchSettings) -> None:
        self.settings = settings

    def run(self, new_tokens: int | None = None) -> Sample:
        import onnxruntime_genai as og

        settings = self.settings
        new_tokens = new_tokens or settings.new_tokens
        ids = prompt_ids(self.vocab_size, settings.prompt_len, settings.batch)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=settings.prompt_len + new_tokens, batch_size=settings.batch)
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        session = time.perf_counter() - start
        start = time.perf_counter()
        generator.append_tokens(ids)  # the prefill (its logits give the first token)
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - begin)
        parts = {"preprocess": 0.0, "session": session, "vision_encoder": 0.0, "decoder_prefill": prefill}
        return Sample.of_request(parts, steps)

    def kv_columns(self, context: int) -> float:
        return context + self.settings.new_tokens / 2

    def weight_value_bytes(self) -> float:
        return {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}[self.precision]

    def kv_value_bytes(self) -> float:
        return 4  # the CPU builder keeps fp32 I/O and cache for every weight precision

    def weight_bytes(self) -> float | None:
        """Quantized models: the bytes their graph stores (MatMulNBits' packed weights and block scales, the LM
        head included, which the builder quantizes too unless told otherwise), the embedding table aside."""
        if self.precision not in ("int8", "int4"):
            return None  # counted from the config at weight_value_bytes
        from .roofline import graph_weight_bytes

        decoder = read_json(self.folder / "genai_config.json").get("model", {}).get("decoder", {})
        return graph_weight_bytes(self.folder / decoder.get("filename", "model.onnx"))


@dataclass
class TransformersContender:
    label: str
    model_dir: Path
    settings: BenchSettings
    vocab_size: int
    kind: str = "transformers"
    text_only: bool = True
    load_s: float = 0.0
    rss_after_load: int = 0

    def prepare(self) -> None:
        import tempfile

        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_decoder(self.model_dir, Path(tmp) / "decoder")
            self.model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa",
                                                              torch_dtype=torch.float32)  # fmt: skip
        self.model.eval()
        self.load_s = time.perf_counter() - start
        self.rss_after_load = rss_bytes()[0]

    def precision_name(self) -> str:
        return "fp32"

    def retarget(self, settings: BenchSettings) -> None:
        self.settings = settings

    @torch.inference_mode()
    def run(self, new_tokens: int | None = None) -> Sample:
        from transformers import DynamicCache

        settings = self.settings
        new_tokens = new_tokens or settings.new_tokens
        ids = torch.tensor(prompt_ids(self.vocab_size, settings.prompt_len, settings.batch))
        start = time.perf_counter()
        cache = DynamicCache()
        out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        steps = []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            out = self.model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - begin)
        parts = {"preprocess": 0.0, "session": 0.0, "vision_encoder": 0.0, "decoder_prefill": prefill}
        return Sample.of_request(parts, steps)

    def kv_columns(self, context: int) -> float:
        return context + self.settings.new_tokens / 2

    def weight_value_bytes(self) -> float:
        return 4

    def kv_value_bytes(self) -> float:
        return 4

    def weight_bytes(self) -> None:
        return None  # counted from the config at weight_value_bytes


Contender = Any  # BackendContender | GenaiContender | TransformersContender
