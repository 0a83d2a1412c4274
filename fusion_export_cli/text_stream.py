"""Print generated text as tokens arrive, holding back incomplete UTF-8 sequences (engines.pipeline.TextPieces)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from engines.pipeline import TextPieces


class TextStreamer:
    """on_token callback for `generate` that prints one batch row's text (default row 0)."""

    def __init__(self, tokenizer: Any, out: TextIO | None = None, row: int = 0):
        self.pieces, self.out, self.row = TextPieces(tokenizer), out, row

    def __call__(self, row: int, token_id: int) -> None:
        if row != self.row:
            return
        piece = self.pieces.add(token_id)
        if piece:
            out = self.out or sys.stdout  # looked up now: a default bound at import would miss a redirection
            out.write(piece)
            out.flush()

    @property
    def text(self) -> str:
        return self.pieces.text
