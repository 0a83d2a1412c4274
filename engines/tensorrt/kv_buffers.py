"""The decoder engines' KV cache on the device: which buffers each layer's `past_*` input and `present_*` output are
bound to, run after run.

TensorRT documents one buffer bound as both input and output only where the engine says the two alias
(`ICudaEngine.get_aliased_input_tensor(present)` names `past`): its KV-cache update layer, which the trt-10.15
graphs' TensorScatter becomes, updates the cache in place and requires it (docs/tensorrt.md section 7.1). Every other
write (the trt-10.3 graphs' ScatterElements, every INT8 cache's ScatterND) is an ordinary layer whose output is a new
tensor: bound to its own input it reads what it is writing (TensorRT issue #4681 reports wrong results so). Those
layers get two buffers that take turns, as TensorRT-LLM's runtime does for a cache it does not update in place:
run n reads buffer n % 2 and writes the other, so after it the cache is in buffer (n + 1) % 2.

Where every layer is in place a run's bindings never change; otherwise they depend on the run's parity, and a CUDA
graph captured for one parity replays only runs of that parity (`turns`).

The planner counts the same buffers (device_memory.kv_buffers), so its memory figure is what this allocates.
Device-agnostic (plain torch tensors): tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .device_memory import kv_buffers


class KvBuffers:
    """Per layer tensor (`past` input name, `present` output name): its buffers, and the bindings of a run."""

    def __init__(
        self,
        names: Sequence[tuple[str, str]],
        in_place: Callable[[str, str], bool],
        allocate: Callable[[], torch.Tensor],
    ):
        """`names`: (past, present) per cache tensor; `in_place(past, present)`: the engine aliases them;
        `allocate()`: one zeroed buffer at the engines' capacity."""
        self.names = list(names)
        self.buffers = {past: [allocate() for _ in range(kv_buffers(in_place(past, present)))]
                        for past, present in self.names}  # fmt: skip
        self.runs = 0  # runs so far: the next one reads buffer runs % 2 of a taking-turns tensor

    @property
    def turns(self) -> int:
        """How many different sets of bindings runs cycle through: 1 (all in place) or 2."""
        return max(len(b) for b in self.buffers.values())

    @property
    def turn(self) -> int:
        """The next run's place in that cycle (its captured graph's key)."""
        return self.runs % self.turns

    def bindings(self) -> dict[str, torch.Tensor]:
        """The next run's KV bindings: `past` reads the cache as it is, `present` receives it updated."""
        bound = {}
        for past, present in self.names:
            buffers = self.buffers[past]
            bound[past] = buffers[self.runs % len(buffers)]
            bound[present] = buffers[(self.runs + 1) % len(buffers)]
        return bound

    def advance(self) -> None:
        """A run was enqueued: the cache now lives where it wrote."""
        self.runs += 1

    def current(self) -> list[torch.Tensor]:
        """The cache as the last run left it, one tensor per (past, present) in order."""
        return [self.buffers[past][self.runs % len(self.buffers[past])] for past, _ in self.names]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for buffers in self.buffers.values() for t in buffers)
