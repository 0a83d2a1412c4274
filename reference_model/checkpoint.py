"""Loading FUSION checkpoints (single or sharded safetensors, exact upstream key names) from a local folder.

Phi-3 checkpoints store the fused `qkv_proj` and `gate_up_proj` the model runs; Llama checkpoints store their
parts (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`), which are stacked by rows on load and split on save,
so every graph, backend and quantizer sees one decoder layout whatever the family.

Every tensor is checked before anything is assigned: missing, unexpected and misshaped tensors are reported
together in one error, never a silent partial load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DecoderConfig, FusionConfig, load_config
from .errors import FusionError
from .input_files import open_safetensors, read_json, relative_name
from .model import FusionModel
from .staging import staging_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_VISION = "model.vision_tower.vision_tower.vision_model."
# (our module prefix, upstream checkpoint prefix); `{k}` stands for a layer number.
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("embed_tokens.", "model.embed_tokens."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("vision.embeddings.", _VISION + "embeddings."),
    ("vision.layers.", _VISION + "encoder.layers."),
    ("mm_projector.", "model.mm_projector."),
    ("aux_projector.", "model.aux_projector."),
    ("interaction.{k}.", "model.vision_sampler_layers.{k}.layers.0."),
)
# In checkpoints but unused at inference (SigLIP's post_layernorm: FUSION reads hidden states before it).
IGNORED_KEYS = re.compile(re.escape(_VISION) + r"post_layernorm\.(weight|bias)$")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Llama's separate projections: our fused parameter (a key suffix) <- its parts, stacked by rows in this order,
# each part's rows given by the decoder's config.
LLAMA_PARTS: dict[str, tuple[tuple[str, Callable[[DecoderConfig], int]], ...]] = {
    "self_attn.qkv_proj.weight": (
        ("self_attn.q_proj.weight", lambda d: d.num_heads * d.head_dim),
        ("self_attn.k_proj.weight", lambda d: d.num_kv_heads * d.head_dim),
        ("self_attn.v_proj.weight", lambda d: d.num_kv_heads * d.head_dim),
    ),
    "mlp.gate_up_proj.weight": (
        ("mlp.gate_proj.weight", lambda d: d.intermediate_size),
        ("mlp.up_proj.weight", lambda d: d.intermediate_size),
    ),
}


class CheckpointError(FusionError):
    """A checkpoint folder cannot be loaded as the configured FUSION model."""


def to_checkpoint_key(name: str) -> str:
    """Our parameter name -> the upstream checkpoint key."""
    for ours, theirs in KEY_PREFIXES:
        if "{k}" in ours:
            head, tail = ours.split("{k}")
            m = re.match(re.escape(head) + r"(\d+)" + re.escape(tail), name)
            if m:
                return theirs.replace("{k}", m.group(1)) + name[m.end() :]
        elif name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(f"no checkpoint key for parameter {name}")


def checkpoint_parts(name: str, shape: tuple[int, ...], config: FusionConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Our parameter -> the checkpoint keys that hold it and their shapes: one key, or a Llama decoder layer's
    separate projections, whose rows stack (in order) into our fused one."""
    key = to_checkpoint_key(name)
    if config.decoder.family == "llama" and key.startswith("model.layers."):
        for fused, parts in LLAMA_PARTS.items():
            if key.endswith(fused):
                prefix = key[: -len(fused)]
                return [(prefix + part, (rows(config.decoder), *shape[1:])) for part, rows in parts]
    return [(key, shape)]


def checkpoint_keys(name: str, config: FusionConfig) -> list[str]:
    """The checkpoint keys that hold our parameter `name` (its parts' keys for a Llama fused layer)."""
    return [key for key, _ in checkpoint_parts(name, (0, 0), config)]


def checkpoint_tensors(name: str, tensor: torch.Tensor, config: FusionConfig) -> list[tuple[str, torch.Tensor]]:
    """Our parameter as the checkpoint stores it: (key, tensor) pairs, split by `checkpoint_parts`."""
    parts = checkpoint_parts(name, tuple(tensor.shape), config)
    pieces = tensor.split([shape[0] for _, shape in parts]) if len(parts) > 1 else (tensor,)
    return [(key, piece) for (key, _), piece in zip(parts, pieces)]


def _shard_name(index_path: Path, key: object, name: object) -> str:
    """A weight_map entry's file: a relative name inside the checkpoint folder (links are fine: a Hugging Face
    cache snapshot's files are links into ../../blobs/, resolved as transformers resolves them)."""
    where = f"{index_path}: weight_map entry {key!r}"
    if not isinstance(key, str):
        raise CheckpointError(f"{where}: not a tensor name")
    return str(relative_name(name, where, CheckpointError))


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it. Every file is a regular file with a readable header,
    and an index's every key is in the shard it names (checked here, before any tensor is read)."""
    index_path, single_path = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if index_path.exists() or index_path.is_symlink():
        weight_map = read_json(index_path, error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' object")
        names = {key: _shard_name(index_path, key, name) for key, name in weight_map.items()}
        missing_shards = sorted({f for f in names.values() if not (model_dir / f).exists()})
        if missing_shards:
            raise CheckpointError(f"{index_path}: shard file(s) not found: {', '.join(missing_shards)}")
        held: dict[str, set[str]] = {}
        for name in sorted(set(names.values())):
            with open_safetensors(model_dir / name, error=CheckpointError) as f:
                held[name] = set(f.keys())
        strays = sorted(f"{key} (in {name})" for key, name in names.items() if key not in held[name])
        if strays:
            more = f", ... and {len(strays) - 3} more" if len(strays) > 3 else ""
            raise CheckpointError(
                f"{index_path}: weight_map names shards that do not hold these tensors: {', '.join(strays[:3])}{more}"
            )
        return {key: model_dir / name for key, name in names.items()}
    if single_path.exists() or single_path.is_symlink():
        with open_safetensors(single_path, error=CheckpointError) as f:
            return {key: single_path for key in f.keys()}
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:10])
    more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a clear error naming it."""
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise FusionError(f"--device {device!r} is not a torch device ({e})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FusionError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def _require_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """A NaN or Inf weight makes every output NaN (and greedy ids 0) without any error: refuse it at load.
    A float64 sum is finite for every finite checkpoint tensor and costs one read; only a non-finite sum pays
    for the exact count."""
    if torch.isfinite(tensor.sum(dtype=torch.float64)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(
            f"{path}: tensor {key} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the checkpoint is corrupt"
        )


def _tower_named_wrongly(model_dir: Path, config: FusionConfig, misshaped: list[str]) -> str | None:
    """The message for a tower whose shape came from `mm_vision_tower`'s name (no vision_config.json) and whose
    weights have another: the name is what is wrong."""
    if (model_dir / "vision_config.json").exists() or not any(k.startswith(_VISION) for k in misshaped):
        return None
    v = config.vision
    return (
        f"{model_dir / 'config.json'}: mm_vision_tower {config.raw.get('mm_vision_tower')!r} names a tower "
        f"{v.hidden_size} wide with {v.num_layers + 1} layers and {v.patch_size} px patches ({v.num_patches} per "
        "crop), but the checkpoint's tower weights have other shapes: the name disagrees with the weights"
    )


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    config: FusionConfig | None = None,
) -> FusionModel:
    """Build the model on the meta device and fill it from the folder's safetensors, cast to `dtype`."""
    model_dir = Path(model_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = config or load_config(model_dir)
    with torch.device("meta"):
        model = FusionModel(config)
    parts = {name: checkpoint_parts(name, tuple(t.shape), config) for name, t in model.state_dict().items()}
    expected = {key: (name, shape) for name, keys in parts.items() for key, shape in keys}
    files = checkpoint_files(model_dir)

    missing = sorted(set(expected) - set(files))
    unexpected = sorted(k for k in files if k not in expected and not IGNORED_KEYS.match(k))
    misshaped: list[str] = []
    handles = {}
    try:
        for path in sorted(set(files.values())):
            try:
                handles[path] = safe_open(path, "pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        for key, (_, shape) in expected.items():
            if key in files:
                got = tuple(handles[files[key]].get_slice(key).get_shape())
                if got != shape:
                    misshaped.append(f"{key}: checkpoint {list(got)}, model {list(shape)}")
        if missing or unexpected or misshaped:
            lines = [_tower_named_wrongly(model_dir, config, misshaped)
                     or f"{model_dir}: checkpoint does not match the model described by its config.json"]  # fmt: skip
            for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
                if items:
                    lines.append(_listing(title, items))
            raise CheckpointError("\n".join(lines))

        state = {}
        for name, keys in parts.items():
            pieces = []
            for key, _ in keys:
                path = files[key]
                try:
                    tensor = handles[path].get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: tensor {key} could not be read ({e})") from None
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {key} has dtype {tensor.dtype}, expected a float tensor")
                _require_finite(path, key, tensor)
                pieces.append(tensor.to(device=device, dtype=dtype))
            state[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    finally:
        handles.clear()
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


class SafetensorsWriter:
    """Streams tensors into `model.safetensors`, or into shards of about `shard_bytes` plus an index json."""

    def __init__(self, folder: Path, shard_bytes: int | None = None):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # keys of each written shard
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard_bytes is not None and self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[key] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(
            self.pending, self.folder / f"model-{len(self.shards) + 1:05d}.safetensors", metadata={"format": "pt"}
        )
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.shard_bytes is None:
            save_file(self.pending, self.folder / SINGLE_FILE, metadata={"format": "pt"})
            return
        if self.pending:
            self._flush()
        n, weight_map = len(self.shards), {}
        for i, keys in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / f"model-{i:05d}.safetensors").rename(self.folder / final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_config_files(config: FusionConfig, folder: Path) -> None:
    config_json, vision_json = config.to_json_dicts()
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    (folder / "vision_config.json").write_text(json.dumps(vision_json, indent=2))


def save_checkpoint(
    model: FusionModel, model_dir: str | Path, shard_bytes: int | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a new checkpoint folder: config files and the weights under upstream key names (sharded if asked)."""
    with staging_folder(model_dir) as tmp:
        writer = SafetensorsWriter(tmp, shard_bytes)
        for name, t in model.state_dict().items():
            for key, piece in checkpoint_tensors(name, t.to(dtype) if dtype else t, model.config):
                writer.add(key, piece)
        writer.close()
        write_config_files(model.config, tmp)
    return Path(model_dir)
