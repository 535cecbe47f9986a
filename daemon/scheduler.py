"""Deciding what runs next: per-stream mailboxes of waiting frames, and batch selection.

No tensor math here.  The server offers frame notices as they arrive and queues commands;
the daemon loop then takes the commands and the next batch for the engine worker.  Newest frames win: a mailbox holds at most the frames one
engine step consumes, and an arriving frame pushes the oldest out (counted as a drop).
Among streams that are ready, the one whose oldest waiting frame arrived first goes
first (earliest deadline first, since every frame's deadline is arrival + one period),
and up to ``max_batch`` ready streams of the same engine share one step.
"""

from __future__ import annotations

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

    def ready(self) -> bool:
        return len(self.frames) >= self.frames_per_step


class Scheduler:
    """Mailboxes plus the batching policy (used from the daemon loop's one thread)."""

    def __init__(self, max_batch: Callable[[str], int] = lambda engine: 16) -> None:
        self._max_batch = max_batch
        self._boxes: dict[int, Mailbox] = {}
        self._commands: deque = deque()
        self._rr = 0  # round-robin start among engines

    # --- called when messages arrive ----------------------------------------------------

    def add_stream(self, stream_id: int, engine: str, frames_per_step: int) -> None:
        self._boxes[stream_id] = Mailbox(stream_id, engine, max(1, frames_per_step))

    def remove_stream(self, stream_id: int) -> None:
        self._boxes.pop(stream_id, None)

    def set_frames_per_step(self, stream_id: int, n: int) -> None:
        box = self._boxes.get(stream_id)
        if box is not None:
            box.frames_per_step = max(1, n)
            while len(box.frames) > box.frames_per_step:  # newest frames win here too
                box.frames.popleft()
                box.dropped += 1

    def offer(self, stream_id: int, ref: FrameRef) -> bool:
        """Queue a frame; returns False if the stream is unknown (closing)."""
        box = self._boxes.get(stream_id)
        if box is None:
            return False
        box.frames.append(ref)
        while len(box.frames) > box.frames_per_step:
            box.frames.popleft()
            box.dropped += 1
        return True

    def post(self, command: object) -> None:
        """Queue a command (open/params/close...) for the worker, ahead of frames."""
        self._commands.append(command)

    def dropped(self, stream_id: int) -> int:
        box = self._boxes.get(stream_id)
        return box.dropped if box else 0

    # --- called by the daemon loop --------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._commands) or any(b.ready() for b in self._boxes.values())

    def take(self) -> tuple[list, list[tuple[int, list[FrameRef]]]]:
        """Pending commands, and the next batch: (stream_id, frames) of one engine, taken out
        of the mailboxes (empty when no stream is ready)."""
        commands = list(self._commands)
        self._commands.clear()
        return commands, self._take_batch()

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
