"""A module that lives in host memory and visits the GPU only while it works.

The umT5-XXL text encoder (about 11 GB in bf16) runs once per new prompt, never per frame.
Keeping it resident doubles a 1.3B stream's GPU memory, so the video engine keeps its weights
in pinned host memory and points the module's parameters at GPU copies only for the length of
an encode.  Nothing is copied back (the weights do not change), so leaving costs nothing and
arriving is one host-to-device copy of the weights at pinned-memory speed.

If the GPU has no room for the visit, the encode runs on the CPU instead (slow, but the stream
keeps running), with one log line.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger("livediffusion.offload")


class Offloaded:
    def __init__(self, module: torch.nn.Module, device: torch.device | str) -> None:
        self.module = module.to("cpu")
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._tensors = [t for _, t in self._named()]
        self._host = [t.data.pin_memory() if pin else t.data for t in self._tensors]
        for tensor, host in zip(self._tensors, self._host):
            tensor.data = host
        self.visits = 0
        self.fallbacks = 0

    def _named(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.module.named_parameters()   # tied weights come once
        yield from self.module.named_buffers()

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._host)

    @contextlib.contextmanager
    def visit(self) -> Iterator[torch.device]:
        """Inside: the module's weights are on ``device`` (or, without room there, still on
        the CPU: the yielded device says which).  Afterwards they point at host memory."""
        try:
            for tensor, host in zip(self._tensors, self._host):
                tensor.data = host.to(self.device, non_blocking=True)
        except torch.OutOfMemoryError:
            self._home()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.fallbacks += 1
            log.warning("no GPU memory for the text encoder (%.1f GB): encoding this prompt "
                        "on the CPU, which is slow", self.nbytes / 1e9)
            yield torch.device("cpu")
            return
        self.visits += 1
        try:
            yield self.device
        finally:
            self._home()

    def _home(self) -> None:
        for tensor, host in zip(self._tensors, self._host):
            tensor.data = host
