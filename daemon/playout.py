"""The playout clock: each stream's output leaves at the cadence its input arrived.

A chunked engine finishes four frames at once; written to the ring together, a host that
polls the newest frame sees only the last of them (7.5 distinct FPS out of 30, measured).
Here output frame k is due at ``arrived_k + delay``: the arrival time of the input frame it
came from plus the stream's current end-to-end delay, so frames leave one period apart, as
they came in, and a host polling at its own rate sees each frame once.

The delay follows what the engine needs, smoothly and without reordering:
  * ``lag`` = how long after its input arrived an output frame was ready.  A frame ready
    later than its due time (the engine slowed down) leaves at once and the delay jumps up to
    its lag, so the frames after it keep their cadence;
  * otherwise the delay glides down towards the largest lag of the last ``window`` frames
    (plus a small margin): each frame by 3% of the excess, at most ``glide`` seconds (a
    quarter of a 30 FPS frame: the picture runs at most 1.33x for a moment, never jumps),
    so a stall's extra latency is gone within a few seconds;
  * due times never decrease, so frames never leave out of order.

Unpaced streams (a client that records every frame) get every frame as soon as it is ready.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pending:
    due: float
    frame: Any          # an OutFrame (pixels, in_seq, ts, arrived)


@dataclass
class Playout:
    paced: bool = True
    #: the most added to the largest recent lag to absorb step-time jitter, seconds; the
    #: margin used is a quarter of the recent lags' spread within this bound, so a steady
    #: one-frame engine (passthrough: lags within 0.1 ms) is not held back (a fixed 4 ms
    #: put 5 ms on every passthrough round trip)
    margin: float = 0.004
    min_margin: float = 0.0003
    #: the most the delay may shrink per frame, seconds
    glide: float = 0.008
    window: int = 90
    #: the most frames held back; beyond it the oldest leaves at once (never lost)
    max_pending: int = 32
    delay: float = 0.0
    queue: deque[Pending] = field(default_factory=deque)
    lags: deque[float] = field(default_factory=deque)
    last_due: float = 0.0
    late: int = 0       # frames that were ready after their due time (deadline misses)
    pushed: int = 0

    def push(self, frame: Any, now: float) -> None:
        """A finished frame (ready now) joins the queue with its due time."""
        if not self.paced:
            self.queue.append(Pending(now, frame))
            return
        lag = max(now - frame.arrived, 0.0)
        self.lags.append(lag)
        while len(self.lags) > self.window:
            self.lags.popleft()
        self.pushed += 1
        margin = self.current_margin()
        if self.pushed == 1:
            self.delay = lag + margin
            self.last_due = now  # the very first frame leaves at once
            self.queue.append(Pending(now, frame))
            return
        if lag > self.delay:
            self.late += 1
            self.delay = lag + margin
        else:
            excess = self.delay - (max(self.lags) + margin)
            if excess > 0:
                self.delay -= min(excess, max(0.0005, 0.03 * excess), self.glide)
        due = max(frame.arrived + self.delay, self.last_due)
        self.last_due = due
        self.queue.append(Pending(due, frame))

    def current_margin(self) -> float:
        if len(self.lags) < 2:
            return self.margin
        spread = max(self.lags) - min(self.lags)
        return min(self.margin, max(self.min_margin, 0.25 * spread))

    def due(self, now: float, tolerance: float = 0.001) -> list[Any]:
        """Frames whose time has come (oldest first); with too many held back, the oldest
        leave early rather than pile up."""
        out = []
        while self.queue and (self.queue[0].due <= now + tolerance or
                              len(self.queue) > self.max_pending):
            out.append(self.queue.popleft().frame)
        return out

    def next_due(self) -> float | None:
        return self.queue[0].due if self.queue else None

    def clear(self) -> None:
        self.queue.clear()
