"""Messages between pipeline ranks over torch.distributed: a msgpack header and tensors.

A message is ``(header, tensors)``.  The header (plain data, never a pickle) travels over a
gloo group on the CPU; the tensors over the data group (NCCL between GPUs, the same gloo
group on CPUs), sent with ``isend`` so that a rank hands off its activations and goes on
with its next chunk while they travel (NCCL runs them on its own stream, beside compute).
At most ``max_outstanding`` sends are kept in flight per channel; older ones are waited on.

Messages between two ranks arrive in the order they were sent.  A receive never waits
without limit: it polls, checks that the peers are alive (``alive``), and gives up with
``RankFailed`` after ``timeout`` seconds.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable

import msgpack
import torch
import torch.distributed as dist

_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.uint8, torch.bool, torch.float8_e4m3fn)}
#: dtypes that travel as their bytes (NCCL and gloo have no float8 reductions or types)
_AS_BYTES = {torch.float8_e4m3fn}


class RankFailed(RuntimeError):
    """A pipeline rank died, stopped answering or failed a step it cannot recover from."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class Channel:
    """One rank's end of the pipeline's messages (see the module docstring).

    gloo completes a transfer only inside ``wait()`` (its ``is_completed()`` does not make
    progress), so receives block: on the ranks' own loops that is what they should do; on
    rank 0, which must never block on a rank, a receiver thread per watched source takes
    whole messages and queues them, and ``ready``/``recv`` poll that queue."""

    def __init__(self, rank: int, device: torch.device, meta_group=None, data_groups=None, *,
                 world: int = 1, max_outstanding: int = 8,
                 alive: Callable[[], str | None] | None = None, timeout: float = 600.0,
                 watch: tuple[int, ...] = ()) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        self.meta = meta_group
        #: "fwd" (rank r to r + 1), "back" (the last rank to rank 0), "move" (blocks): NCCL
        #: runs a communicator's transfers one after another on one stream, so with two
        #: ranks a result coming back must not share one with the next tick going out
        self.data_groups = data_groups or {}
        self.on_device = bool(self.data_groups) and \
            any(g is not meta_group for g in self.data_groups.values())
        self.max_outstanding = max_outstanding
        #: returns None while every peer is alive, else a sentence saying which is not
        self.alive = alive or (lambda: None)
        self.timeout = timeout
        self._sends: deque = deque()
        self._queues: dict[int, queue.Queue] = {}
        for src in watch:
            self._queues[src] = queue.Queue()
            threading.Thread(target=self._receiver, args=(src,), daemon=True,
                             name=f"pipeline-recv-{src}").start()

    # --- sending ------------------------------------------------------------------------------

    def send(self, dst: int, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        on_device = self.on_device  # NCCL: tensors travel from GPU memory
        tensors = [(t.to(self.device) if on_device and t.device != self.device else t)
                   .contiguous() for t in tensors]
        data = self._data(self.rank, dst)
        body = msgpack.packb({**header, "_t": [(str(t.dtype).removeprefix("torch."),
                                                 list(t.shape)) for t in tensors]})
        tensors = [t.view(torch.uint8) if t.dtype in _AS_BYTES else t for t in tensors]
        size = torch.tensor([len(body)], dtype=torch.int64)
        raw = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        try:
            works = [dist.isend(size, dst, group=self.meta),
                     dist.isend(raw, dst, group=self.meta)]
            works += [dist.isend(t, dst, group=data) for t in tensors]
        except RuntimeError as exc:
            raise RankFailed(f"cannot send to pipeline rank {dst}: {exc}", dst) from None
        self._sends.append((works, (size, raw, tensors), dst))  # kept alive until sent
        while len(self._sends) > self.max_outstanding:
            self._wait_send()

    def _data(self, src: int, dst: int):
        """The group a tensor from ``src`` to ``dst`` travels in (both ends agree)."""
        if not self.data_groups:
            return self.meta
        if (src, dst) == (self.world - 1, 0) and self.world > 1:
            return self.data_groups["back"]
        if dst == (src + 1) % self.world:
            return self.data_groups["fwd"]
        return self.data_groups["move"]

    def _wait_send(self) -> None:
        works, _, dst = self._sends.popleft()
        try:
            for work in works:
                work.wait()
        except RuntimeError as exc:
            raise RankFailed(f"a send to pipeline rank {dst} failed: {exc}", dst) from None

    def flush(self) -> None:
        """Wait until every message sent has left."""
        while self._sends:
            self._wait_send()

    # --- receiving ----------------------------------------------------------------------------

    def _receive(self, src: int) -> tuple[dict, list[torch.Tensor]]:
        """One whole message from ``src``, blocking."""
        try:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src, group=self.meta)
            raw = torch.empty(int(size[0]), dtype=torch.uint8)
            dist.recv(raw, src, group=self.meta)
            header = msgpack.unpackb(raw.numpy().tobytes(), strict_map_key=False)
            specs = header.pop("_t")
            tensors = []
            for dtype, shape in specs:
                if dtype not in _DTYPES:
                    raise RankFailed(f"rank {src} sent a tensor of unknown type {dtype!r}.",
                                     src)
                kind = _DTYPES[dtype]
                t = torch.empty(shape, dtype=torch.uint8 if kind in _AS_BYTES else kind,
                                device=self.device if self.on_device else "cpu")
                dist.recv(t, src, group=self._data(src, self.rank))
                t = t.view(kind) if kind in _AS_BYTES else t
                tensors.append(t if t.device == self.device else t.to(self.device))
            return header, tensors
        except RuntimeError as exc:
            raise RankFailed(f"receiving from pipeline rank {src} failed: {exc}", src) \
                from None

    def _receiver(self, src: int) -> None:
        q = self._queues[src]
        if self.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.device)
        while True:
            try:
                message = self._receive(src)
            except BaseException as exc:  # noqa: BLE001 - handed to the polling thread
                q.put(exc)
                return
            q.put(message)
            if message[0].get("kind") == "stop":
                return

    def ready(self, src: int) -> bool:
        """True if a whole message from ``src`` is waiting (never waits; watched sources)."""
        return not self._queues[src].empty()

    def recv(self, src: int, timeout: float | None = None) -> tuple[dict, list[torch.Tensor]]:
        """The next message from ``src``.  A watched source is polled, with the peers'
        liveness checked and ``timeout`` seconds at most; others are received directly."""
        q = self._queues.get(src)
        if q is None:
            return self._receive(src)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                dead = self.alive()
                if dead:
                    raise RankFailed(dead, src) from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"pipeline rank {src} sent nothing for {limit:.0f} s",
                                     src) from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item
