"""Print generated text as tokens arrive, holding back incomplete UTF-8 sequences."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class TextStreamer:
    """on_token callback for `generate` that prints one batch row's text (default row 0)."""

    def __init__(self, tokenizer: Any, out: TextIO = sys.stdout, row: int = 0):
        self.tokenizer, self.out, self.row = tokenizer, out, row
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token_id: int) -> None:
        if row != self.row:
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
