"""Deciding what runs next: per-stream mailboxes of waiting frames, and batch selection.

No tensor math here.  The server offers frame notices as they arrive; the engine worker
asks for the next batch.  Newest frames win: a mailbox holds at most the frames one
engine step consumes, and an arriving frame pushes the oldest out (counted as a drop).
Among streams that are ready, the one whose oldest waiting frame arrived first goes
first (earliest deadline first, since every frame's deadline is arrival + one period),
and up to ``max_batch`` ready streams of the same engine share one step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class FrameRef:
    """A frame waiting in a ring slot (``slot``) or inline (``data``)."""

    seq: int
    ts: int
    slot: int | None = None
    data: bytes | memoryview | None = None
    stride: int = 0
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Mailbox:
    stream_id: int
    engine: str
    frames_per_step: int
    frames: deque[FrameRef] = field(default_factory=deque)
    dropped: int = 0
    offered: int = 0

    def ready(self) -> bool:
        return len(self.frames) >= self.frames_per_step


class Scheduler:
    """Thread-safe mailboxes plus the batching policy."""

    def __init__(self, max_batch: Callable[[str], int] = lambda engine: 16) -> None:
        self._max_batch = max_batch
        self._lock = threading.Condition()
        self._boxes: dict[int, Mailbox] = {}
        self._commands: deque = deque()
        self._stopping = False
        self._rr = 0  # round-robin start among engines

    # --- called by the server thread -----------------------------------------------

    def add_stream(self, stream_id: int, engine: str, frames_per_step: int) -> None:
        with self._lock:
            self._boxes[stream_id] = Mailbox(stream_id, engine, max(1, frames_per_step))

    def remove_stream(self, stream_id: int) -> None:
        with self._lock:
            self._boxes.pop(stream_id, None)

    def set_frames_per_step(self, stream_id: int, n: int) -> None:
        with self._lock:
            box = self._boxes.get(stream_id)
            if box is not None:
                box.frames_per_step = max(1, n)
                while len(box.frames) > box.frames_per_step:  # newest frames win here too
                    box.frames.popleft()
                    box.dropped += 1
                if box.ready():
                    self._lock.notify()

    def offer(self, stream_id: int, ref: FrameRef) -> bool:
        """Queue a frame; returns False if the stream is unknown (closing)."""
        with self._lock:
            box = self._boxes.get(stream_id)
            if box is None:
                return False
            box.offered += 1
            box.frames.append(ref)
            while len(box.frames) > box.frames_per_step:
                box.frames.popleft()
                box.dropped += 1
            if box.ready():
                self._lock.notify()
            return True

    def post(self, command: object) -> None:
        """Queue a command (open/params/close...) for the worker, ahead of frames."""
        with self._lock:
            self._commands.append(command)
            self._lock.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def dropped(self, stream_id: int) -> int:
        box = self._boxes.get(stream_id)
        return box.dropped if box else 0

    # --- called by the worker thread ---------------------------------------------------

    def wait(self, timeout: float) -> tuple[list, list[tuple[int, list[FrameRef]]], bool]:
        """Block until commands or a batch are available.

        Returns (commands, batch, stopping); ``batch`` is a list of (stream_id, frames) of
        one engine, taken out of the mailboxes.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                commands = list(self._commands)
                self._commands.clear()
                batch = self._take_batch()
                if commands or batch or self._stopping:
                    return commands, batch, self._stopping
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], [], False
                self._lock.wait(left)

    def _take_batch(self) -> list[tuple[int, list[FrameRef]]]:
        ready = [b for b in self._boxes.values() if b.ready()]
        if not ready:
            return []
        engines = sorted({b.engine for b in ready})
        engine = engines[self._rr % len(engines)]
        self._rr += 1
        chosen = sorted((b for b in ready if b.engine == engine),
                        key=lambda b: b.frames[0].arrived)
        chosen = chosen[:max(1, self._max_batch(engine))]
        out = []
        for box in chosen:
            frames = [box.frames.popleft() for _ in range(box.frames_per_step)]
            out.append((box.stream_id, frames))
        return out
