"""A module that lives in host memory and visits the GPU only while it works.

The umT5-XXL text encoder (about 11 GB in bf16) runs once per new prompt, never per frame.
Keeping it resident doubles a 1.3B stream's GPU memory, so the video engine keeps its weights
in pinned host memory and points the module's parameters at GPU copies only for the length of
an encode.  Nothing is copied back (the weights do not change), so leaving costs nothing and
arriving is one host-to-device copy of the weights at pinned-memory speed.

Two ways to visit:

- whole (``streamed=False``): every weight comes over before the encode; the GPU needs room
  for all of them (11 GB for umT5-XXL) for its length.
- streamed (``streamed=True``, for 16-24 GB cards): the encoder's layers come over one at a
  time, each just before it runs and gone right after, and the token embedding (2.1 GB of
  umT5-XXL's 11) never leaves the host: the lookup runs there and only the looked-up rows
  travel.  The GPU needs room for one layer (0.39 GB for umT5-XXL).  The copy time is about
  the same (the encode is copy-bound either way), so a prompt change costs the same.

If the GPU has no room for the visit, the encode runs on the CPU instead (slow, but the stream
keeps running), with one log line.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger("livediffusion.offload")


def _layers(module: nn.Module) -> nn.ModuleList:
    """The module's stack of layers: its largest ModuleList by parameter count."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no list of layers to stream.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class Offloaded:
    def __init__(self, module: nn.Module, device: torch.device | str, *,
                 streamed: bool = False) -> None:
        self.module = module.to("cpu")
        self.device = torch.device(device)
        self.streamed = streamed
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        tensors = self._tensors_of(self.module)
        self._host = {id(t): (t.data.pin_memory() if pin else t.data) for t in tensors}
        for t in tensors:
            t.data = self._host[id(t)]
        #: streamed: per layer, its tensors; the rest (norms, biases outside the layers)
        #: visits whole; embeddings stay home
        self._layer_tensors: list[list[torch.Tensor]] = []
        self._visiting: torch.device | None = None
        self._on_device_layers = 0
        #: most layers on the device at once during a streamed visit (tests read it)
        self.peak_layers = 0
        stay: set[int] = set()
        if streamed:
            for layer in _layers(self.module):
                own = self._tensors_of(layer)
                self._layer_tensors.append(own)
                stay.update(id(t) for t in own)
                layer.register_forward_pre_hook(self._layer_in(len(self._layer_tensors) - 1))
                layer.register_forward_hook(self._layer_out(len(self._layer_tensors) - 1))
            in_layers = {id(m) for m in _layers(self.module).modules()}
            # the token embedding (not the layers' own, such as relative position biases)
            for emb in (m for m in self.module.modules()
                        if isinstance(m, nn.Embedding) and id(m) not in in_layers):
                stay.update(id(t) for t in self._tensors_of(emb))
                emb.register_forward_pre_hook(self._embedding_in)
                emb.register_forward_hook(self._embedding_out)
        self._whole = [t for t in tensors if id(t) not in stay]
        self._all = tensors
        self.visits = 0
        self.fallbacks = 0

    @staticmethod
    def _tensors_of(module: nn.Module) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for t in list(module.parameters()) + list(module.buffers()):  # tied weights once
            seen.setdefault(id(t), t)
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._host.values())

    @property
    def visit_nbytes(self) -> int:
        """The most weight bytes on the device at once during a visit."""
        if not self.streamed:
            return self.nbytes
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return size(self._whole) + max((size(ts) for ts in self._layer_tensors), default=0)

    # --- streamed visits: hooks (no-ops outside a visit) ---------------------------------------

    def _move_in(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        for t in tensors:
            t.data = self._host[id(t)].to(device, non_blocking=True, copy=True)

    def _move_home(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.data = self._host[id(t)]

    def _layer_in(self, i: int):
        def hook(module, args):
            if self._visiting is not None:
                self._move_in(self._layer_tensors[i], self._visiting)
                self._on_device_layers += 1
                self.peak_layers = max(self.peak_layers, self._on_device_layers)
        return hook

    def _layer_out(self, i: int):
        def hook(module, args, output):
            if self._visiting is not None:
                self._move_home(self._layer_tensors[i])
                self._on_device_layers -= 1
        return hook

    def _embedding_in(self, module, args):
        if self._visiting is not None:
            return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)

    def _embedding_out(self, module, args, output):
        if self._visiting is not None:
            return output.to(self._visiting, non_blocking=True)

    # --- visits ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def visit(self) -> Iterator[torch.device]:
        """Inside: the module's weights are on ``device`` (streamed: they arrive layer by
        layer as it runs), or, without room there, still on the CPU: the yielded device says
        which.  Afterwards they point at host memory."""
        try:
            self._move_in(self._whole if self.streamed else self._all, self.device)
        except torch.OutOfMemoryError:
            self._home()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.fallbacks += 1
            log.warning("no GPU memory for the text encoder (%.1f GB): encoding this prompt "
                        "on the CPU, which is slow", self.visit_nbytes / 1e9)
            yield torch.device("cpu")
            return
        self.visits += 1
        self._visiting = self.device if self.streamed else None
        try:
            yield self.device
        finally:
            self._visiting = None
            self._on_device_layers = 0
            self._home()

    def _home(self) -> None:
        self._move_home(self._all)
