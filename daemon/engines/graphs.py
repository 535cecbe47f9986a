"""Replaying a fixed-shape GPU call as a CUDA graph.

A UNet or DiT call on a small frame is bound by kernel launches, not arithmetic: recording
the call once per input shape and replaying it removes the launches.  ``GraphedCall`` wraps
a function of tensors: per distinct input shape it keeps static input buffers, records the
call on first use (after one real run that also warms it up), and afterwards copies the new
inputs in, replays, and returns a copy of the output.

Safe by construction where it cannot record: off CUDA it calls the function directly; if a
recording fails it logs one line and calls directly from then on.  ``static=True`` without
CUDA runs the same buffer logic without recording, for tests.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

log = logging.getLogger("livediffusion.graphs")


class _Entry:
    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs = tuple(t.clone() for t in inputs)
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphedCall:
    def __init__(self, fn: Callable[..., torch.Tensor], *, enabled: bool, static: bool = False,
                 max_graphs: int = 8, name: str = "call") -> None:
        self.fn = fn
        self.enabled = enabled           # record CUDA graphs
        self.static = static or enabled  # use static buffers (what recording needs)
        self.max_graphs = max_graphs
        self.name = name
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.recorded = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.static:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(inputs)
            while len(self.entries) > self.max_graphs:  # bound the graphs' memory
                self.entries.popitem(last=False)
            return self._first(entry)
        self.entries.move_to_end(key)
        for dst, src in zip(entry.inputs, inputs):
            dst.copy_(src)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self.fn(*entry.inputs)
        return entry.output.clone()

    def _first(self, entry: _Entry) -> torch.Tensor:
        if not self.enabled:
            entry.output = self.fn(*entry.inputs)
            return entry.output.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.fn(*entry.inputs)  # the real call, and the warm-up recording needs
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a prompt being encoded on the text thread meanwhile is not an
            # error for this capture (its work is on its own stream and is not recorded)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                entry.output = self.fn(*entry.inputs)
            entry.graph = graph
            self.recorded += 1
        except Exception as exc:  # noqa: BLE001 - recording is an optimisation only
            log.warning("could not record %s as a CUDA graph (%s); running it directly",
                        self.name, exc)
            self.enabled = self.static = False
            self.entries.clear()
        return result.clone()
