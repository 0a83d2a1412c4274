"""The PyTorch reference as a backend: a checkpoint folder on any torch device, any query_len, no fixed capacity."""

from __future__ import annotations

from pathlib import Path

from reference_model import load_config
from reference_model.generation import ReferenceSession
from reference_model.sequence import PreparedBatch


class ReferenceBackend:
    kind = "reference"
    query_len = None
    max_context = None
    precision = None
    quantization = None
    kv_int8_scales = None
    attends_to_valid_columns = True  # its attention reads the cache's written columns only

    def __init__(self, model_dir: Path, dtype: str = "fp32", device: str = "cpu"):
        from reference_model.checkpoint import resolve_device

        self.model_dir, self.dtype = model_dir, dtype
        self.device = resolve_device(device)  # refused now, not after the weights are read
        self.config = load_config(model_dir)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from reference_model import load_model

            self._model = load_model(self.model_dir, dtype=self.dtype, device=self.device)
        return self._model

    def load(self) -> ReferenceBackend:
        self.model  # noqa: B018  (reads the weights)
        return self

    def describe(self) -> str:
        return f"reference (PyTorch {self.dtype} on {self.device}) from {self.model_dir}"

    def session(self, batch: PreparedBatch, max_new_tokens: int) -> ReferenceSession:
        return ReferenceSession(self.model, batch, max_new_tokens)

    def follow_up(self, turn, chunks: list[list[int]], max_new_tokens: int):
        """A conversation's later turn on top of `turn` (reference_model/conversation.py)."""
        from reference_model.conversation import ReferenceFollowUp

        return ReferenceFollowUp(self.model, turn, chunks, max_new_tokens)


def open_backend(path: Path, options) -> ReferenceBackend:
    return ReferenceBackend(path, options.dtype or "fp32", options.device or "cpu")
