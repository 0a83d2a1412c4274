"""Step-by-step progress for long commands, on stderr: one line per step, live byte counts on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from reference_model.interruption import raise_if_signalled


class Progress:
    def __init__(self, total_steps: int, out: TextIO = sys.stderr, enabled: bool = True):
        self.total, self.out, self.enabled = total_steps, out, enabled
        self.step_no = 0
        self.started = time.perf_counter()
        self._step_start = self.started
        self._title = ""
        self._tty = enabled and out.isatty()

    def step(self, title: str) -> None:
        raise_if_signalled()  # a Ctrl-C a library swallowed in the last step: stop before the next
        self._finish()
        self.step_no += 1
        self._title = title
        self._step_start = time.perf_counter()
        self._write(f"[{self.step_no}/{self.total}] {title} ...", final=False)

    def bytes(self, done: int, total: int) -> None:
        """Report bytes written in the current step (redrawn in place on a terminal)."""
        self.detail(f"{done / 1e9:.2f}/{total / 1e9:.2f} GB")

    def detail(self, text: str) -> None:
        """Where the current step stands (redrawn in place on a terminal, dropped elsewhere)."""
        if self._tty:
            self._write(f"[{self.step_no}/{self.total}] {self._title} ... {text}", False)

    def done(self) -> float:
        self._finish()
        return time.perf_counter() - self.started

    def _finish(self) -> None:
        if self._title:
            elapsed = time.perf_counter() - self._step_start
            self._write(f"[{self.step_no}/{self.total}] {self._title} ... done ({elapsed:.1f} s)", final=True)
            self._title = ""

    def _write(self, text: str, final: bool) -> None:
        if not self.enabled:
            return
        if self._tty:
            self.out.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()
