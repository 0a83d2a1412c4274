"""The turn states a server keeps so that a conversation's next request continues from them (docs/serving.md)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

History = list[tuple[str, str]]  # (question, answer text) per turn


class KeptConversations:
    """Turn states by (image digest, the turns so far as text), least recently used first out, within a byte
    budget: a later request whose history matches continues from its state, any other is recomputed. A
    conversation holds one state, its latest: each turn's state holds the turns before it."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.states: OrderedDict[tuple[str, tuple], Any] = OrderedDict()

    def get(self, digest: str, history: History) -> Any:
        key = (digest, tuple(history))
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def replace(self, digest: str, before: History | None, history: History, state: Any) -> None:
        """Keep `state` for `history`, instead of the state of the turns `before` it (None: a first turn)."""
        if before is not None:
            self._drop((digest, tuple(before)))
        key = (digest, tuple(history))
        if state is None or state.nbytes > self.budget or key in self.states:
            return
        self.states[key] = state
        self.used += state.nbytes
        while self.used > self.budget:
            self._drop(next(iter(self.states)))

    def _drop(self, key: tuple[str, tuple]) -> None:
        state = self.states.pop(key, None)
        if state is not None:
            self.used -= state.nbytes
