"""Deciding what runs next: per-stream mailboxes, fair rates, admission, and step plans.

No tensor math here, and no engine objects: the front offers frame notices as they arrive;
when a worker is free it asks for the next ``StepPlan``; each ``StepResult`` comes back
through ``update_from_result`` (measured step time into the cost model, the engine's new
frames-per-step of each stream).  All calls come from the daemon's front thread.

Policy "edf" (the default):
  * every stream has a serve rate.  While the GPU keeps up it is the stream's own input rate;
    under overload it is a fair share computed from the online cost model: each stream's
    floor (``min_fps``) first, then max-min fair (equal rates, capped at each stream's real
    input rate) for the rest, or plain max-min shares when the floors do not fit.  Every
    stream keeps an even cadence instead of bursts and gaps, and no stream starves.  Frames
    above the serve rate are skipped evenly at the mailbox (counted as ``decimated``), and
    the front copies the kept ones out of the input ring (``held_long``);
  * a mailbox holds at most the frames one step consumes; a newer frame pushes the oldest
    out (``dropped``): no queue grows, the newest frames win;
  * among ready streams, earliest deadline first (deadline = the oldest waiting frame's
    arrival + the stream's chunk period); the ready streams of the same batch key (engine,
    frame size and the parameters that change a step's cost, ``step.batch_key``) join it,
    as many as the cost model says is cheapest per stream (a step of several streams is not
    always cheaper than several steps);
  * admission: a new stream that would push any stream below its ``min_fps`` is refused with
    the rate it could have (``Refused.sustainable_fps``); otherwise it is accepted, at a
    lower rate when the GPU is full.

Policy "rr" keeps the previous behaviour for comparison (``bench stream`` runs both):
engines take turns, streams of one engine go oldest-first, no rates, no admission.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection

from .costs import CostModel
from .step import FrameRef, StepPlan, PlanItem, StepResult


POLICIES = ("edf", "rr")

__all__ = ["FrameRef", "Mailbox", "Refused", "Scheduler", "POLICIES"]


class Refused(Exception):
    """Admission refused: serving the stream would break the others' rates."""

    def __init__(self, message: str, sustainable_fps: float) -> None:
        super().__init__(message)
        self.sustainable_fps = sustainable_fps


@dataclass
class Mailbox:
    stream_id: int
    engine: str
    frames_per_step: int
    key: tuple = ()
    fps: float = 30.0          # declared by the client
    min_fps: float = 0.0       # the lowest rate the client accepts
    frames: deque[FrameRef] = field(default_factory=deque)
    dropped: int = 0
    decimated: int = 0
    #: frames per second this stream is served at (inf: every frame)
    serve_fps: float = math.inf
    _credit: float = 1.0
    _last_arrival: float | None = None
    #: measured input rate (moving average of inter-arrival times), 0 until known
    _interval: float = 0.0
    busy: bool = False         # its frames are in a step that has not come back yet
    #: frames a step takes in the steady state (a chunk), whatever the next step takes
    steady_frames: int = 1
    #: the newest frame skipped by the rate limit: served after all if nothing newer comes
    #: within a serve period (the input paused or stopped), so the last frame a client sends
    #: is never left unanswered
    skipped: FrameRef | None = None

    def ready(self) -> bool:
        return not self.busy and len(self.frames) >= self.frames_per_step

    def take_skipped(self, now: float) -> None:
        """Queue the skipped frame if no newer frame has come for a serve period."""
        ref = self.skipped
        if ref is None or now - ref.arrived < 1.0 / max(self.serve_fps, 1e-3):
            return
        self.skipped = None
        self.decimated -= 1
        self.push(ref)

    def push(self, ref: FrameRef) -> None:
        """Queue a frame; the mailbox keeps the newest ``frames_per_step``."""
        self.frames.append(ref)
        self.trim()

    def trim(self) -> None:
        while len(self.frames) > self.frames_per_step:  # newest frames win
            self.frames.popleft()
            self.dropped += 1

    @property
    def input_fps(self) -> float:
        """What the client really sends (its declared fps until measured)."""
        return 1.0 / self._interval if self._interval > 0 else self.fps

    @property
    def demand(self) -> float:
        return min(self.fps, self.input_fps) if self._interval > 0 else self.fps

    def period(self) -> float:
        """Seconds between this stream's steps at its serve rate."""
        rate = self.serve_fps if math.isfinite(self.serve_fps) else self.demand
        return self.frames_per_step / max(rate, 1e-3)

    def chunk(self) -> int:
        return max(self.frames_per_step, self.steady_frames)

    def deadline(self) -> float:
        return self.deadline_of(self.frames)

    def deadline_of(self, frames) -> float:
        return frames[0].arrived + self.period() if frames else math.inf

    def accept(self, arrived: float) -> bool:
        """Rate-limit at the serve rate with an even spread (a running credit), so that a
        stream served at 12 of its 30 FPS gets every 2nd or 3rd frame, not bursts."""
        last, self._last_arrival = self._last_arrival, arrived
        if last is not None:
            dt = max(arrived - last, 0.0)
            if dt < 5.0:  # a pause in the input is not a rate
                self._interval = dt if self._interval == 0 else \
                    0.9 * self._interval + 0.1 * dt
            if math.isfinite(self.serve_fps):
                self._credit = min(self._credit + dt * self.serve_fps, 1.5)
        if not math.isfinite(self.serve_fps) or self.serve_fps >= 0.97 * self.input_fps:
            self._credit = 1.0
            return True
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


class Scheduler:
    """Mailboxes, rates, admission and plans (used from the daemon's front thread)."""

    def __init__(self, max_batch: Callable[[str], int] = lambda engine: 16, *,
                 policy: str = "edf", costs: CostModel | None = None,
                 batch_sizes: Callable[[str], Collection[int] | None] = lambda engine: None,
                 resource: Callable[[str], str] = lambda engine: "device",
                 utilisation: float = 0.9,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {', '.join(POLICIES)}, "
                             f"not {policy!r}.")
        self.policy = policy
        self.costs = costs or CostModel()
        self._max_batch = max_batch
        self._batch_sizes = batch_sizes
        self._resource = resource
        self.utilisation = utilisation
        self._boxes: dict[int, Mailbox] = {}
        self._steps = itertools.count(1)
        self._in_flight: dict[int, StepPlan] = {}
        self._rr = 0  # round-robin start among engines ("rr" policy)
        self._next_allocation = 0.0
        self._clock = clock

    # --- streams -----------------------------------------------------------------------------

    def add_stream(self, stream_id: int, engine: str, frames_per_step: int, *,
                   key: tuple | None = None, fps: float = 30.0, min_fps: float = 0.0,
                   steady_frames: int = 1) -> None:
        self._boxes[stream_id] = Mailbox(stream_id, engine, max(1, frames_per_step),
                                         key=key or (engine,), fps=fps, min_fps=min_fps,
                                         steady_frames=max(1, steady_frames))
        self._allocate()

    def set_key(self, stream_id: int, key: tuple) -> None:
        """A stream's batch key changed (its steps or decoder did): its rate is re-planned."""
        box = self._boxes.get(stream_id)
        if box is not None and box.key != key:
            box.key = key
            self._allocate()

    def remove_stream(self, stream_id: int) -> None:
        if self._boxes.pop(stream_id, None) is not None:
            self._allocate()

    def set_frames_per_step(self, stream_id: int, n: int) -> None:
        box = self._boxes.get(stream_id)
        if box is not None:
            box.frames_per_step = max(1, n)
            box.trim()

    def offer(self, stream_id: int, ref: FrameRef) -> bool:
        """Queue a frame; returns False if the stream is unknown (closing)."""
        box = self._boxes.get(stream_id)
        if box is None:
            return False
        if self.policy == "edf" and not box.accept(ref.arrived):
            box.decimated += 1
            box.skipped = ref
            return True
        box.skipped = None
        box.push(ref)
        return True

    def held_long(self, stream_id: int) -> list[FrameRef]:
        """The queued frames of a stream served below its input rate: its chunk then spans
        more input frames than the input ring has slots, so the front must copy each out of
        its slot at once (the client overwrites it before the step).  Empty otherwise."""
        box = self._boxes.get(stream_id)
        if box is None or not math.isfinite(box.serve_fps):
            return []
        return list(box.frames)

    def dropped(self, stream_id: int) -> int:
        box = self._boxes.get(stream_id)
        return box.dropped if box else 0

    def info(self, stream_id: int) -> dict[str, float | int]:
        box = self._boxes.get(stream_id)
        if box is None:
            return {}
        return {"dropped": box.dropped, "decimated": box.decimated,
                "serve_fps": round(box.serve_fps, 2) if math.isfinite(box.serve_fps)
                else round(box.demand, 2),
                "input_fps": round(box.input_fps, 2)}

    # --- admission and fair rates -----------------------------------------------------------

    def admit(self, engine: str, key: tuple, fps: float, min_fps: float,
              steady_frames: int = 1, explicit: bool = True) -> float:
        """The rate a new stream would be served at, or ``Refused`` if the device cannot
        give every other stream its ``min_fps`` (and, when the client named one, the new
        stream its own).  Unknown costs admit (optimistically)."""
        if self.policy != "edf":
            return fps
        probe = Mailbox(-1, engine, 1, key=key, fps=fps, min_fps=min_fps if explicit else 0.0,
                        steady_frames=steady_frames)
        boxes = [b for b in self._boxes.values()
                 if self._resource(b.engine) == self._resource(engine)] + [probe]
        coef = self._coefficients(boxes)
        floors = sum(coef[b.stream_id] * min(b.min_fps, b.demand) for b in boxes)
        if floors <= self.utilisation:
            return self._fair_rates(boxes)[probe.stream_id]
        # what is left for the newcomer once every other stream keeps its minimum
        others = floors - coef[probe.stream_id] * min(probe.min_fps, fps)
        spare = max(self.utilisation - others, 0.0)
        own = coef[probe.stream_id]
        sustainable = min(fps, spare / own) if own > 0 else fps
        raise Refused(f"the {engine} engine is full: it cannot serve one more stream and keep "
                      f"the others at the lowest rates they asked for; this one could have "
                      f"{sustainable:.1f} FPS now (open with a lower min_fps to accept that).",
                      math.floor(sustainable * 100) / 100)  # asking for it then fits

    def _coefficients(self, boxes: list[Mailbox]) -> dict[int, float]:
        """Seconds of device time per second, per unit of a stream's frame rate, with the
        streams of each batch key sharing steps of the cheapest batch size."""
        counts: dict[tuple, int] = {}
        for b in boxes:
            counts[b.key] = counts.get(b.key, 0) + 1
        return {b.stream_id: self.best_per_stream_ms(b.engine, b.key, counts[b.key]) /
                1000.0 / b.chunk() for b in boxes}

    def _fair_rates(self, boxes: list[Mailbox], floors: bool = True) -> dict[int, float]:
        """Max-min fair rates above each stream's floor: every stream gets its ``min_fps``
        (as far as the device allows), then one common rate r shared by the rest, capped at
        each stream's demand, with sum(coef * rate) <= utilisation (by bisection)."""
        coef = self._coefficients(boxes)

        def rates(r: float) -> dict[int, float]:
            return {b.stream_id: min(max(b.min_fps if floors else 0.0, min(r, b.demand)),
                                     b.demand) for b in boxes}

        def load(r: float) -> float:
            return sum(coef[i] * v for i, v in rates(r).items())

        top = max((b.demand for b in boxes), default=0.0)
        if load(top) <= self.utilisation:
            return rates(top)
        if floors and load(0.0) > self.utilisation:
            # the floors themselves do not fit (admitted before costs were known, or the
            # engine slowed down): plain max-min shares, so the plan stays what the device
            # can do instead of promising every floor
            return self._fair_rates(boxes, floors=False)
        lo, hi = 0.0, top
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if load(mid) <= self.utilisation else (lo, mid)
        return rates(lo)

    def _allocate(self) -> None:
        """Recompute every stream's serve rate (on changes, and twice a second)."""
        self._next_allocation = self._clock() + 0.5
        if self.policy != "edf":
            return
        by_resource: dict[str, list[Mailbox]] = {}
        for b in self._boxes.values():
            by_resource.setdefault(self._resource(b.engine), []).append(b)
        for boxes in by_resource.values():
            rates = self._fair_rates(boxes)
            for b in boxes:
                rate = rates[b.stream_id]
                new = math.inf if rate >= b.demand * 0.999 else rate
                old = b.serve_fps
                # hysteresis: small changes are noise of the cost model
                if math.isinf(new) != math.isinf(old) or (
                        math.isfinite(new) and abs(new - old) > 0.04 * old):
                    b.serve_fps = new

    # --- plans ------------------------------------------------------------------------------

    def has_work(self, engines: Collection[str] | None = None) -> bool:
        self._take_skipped()
        return any(b.ready() and (engines is None or b.engine in engines)
                   for b in self._boxes.values())

    def _take_skipped(self) -> None:
        now = self._clock()
        for box in self._boxes.values():
            if box.skipped is not None:
                box.take_skipped(now)

    def next_plan(self, engines: Collection[str] | None = None) -> StepPlan | None:
        """The next step for a worker serving ``engines`` (None: any), taken out of the
        mailboxes; None when no stream is ready."""
        self._take_skipped()
        ready = [b for b in self._boxes.values()
                 if b.ready() and (engines is None or b.engine in engines)]
        if not ready:
            return None
        if self.policy == "rr":
            chosen = self._pick_rr(ready)
            key = (chosen[0].engine,)
        else:
            chosen = self._pick_edf(ready)
            key = chosen[0].key
        items = []
        for box in chosen:
            frames = [box.frames.popleft() for _ in range(box.frames_per_step)]
            items.append(PlanItem(box.stream_id, frames))
            box.busy = True
        plan = StepPlan(next(self._steps), chosen[0].engine, key, items,
                        deadline=min(b.deadline_of(i.frames) for b, i in zip(chosen, items)),
                        predicted_ms=self.costs.predict(key, len(items)))
        self._in_flight[plan.step_id] = plan
        return plan

    def _pick_rr(self, ready: list[Mailbox]) -> list[Mailbox]:
        engines = sorted({b.engine for b in ready})
        engine = engines[self._rr % len(engines)]
        self._rr += 1
        chosen = sorted((b for b in ready if b.engine == engine),
                        key=lambda b: b.frames[0].arrived)
        return chosen[:max(1, self._max_batch(engine))]

    def _pick_edf(self, ready: list[Mailbox]) -> list[Mailbox]:
        ready.sort(key=Mailbox.deadline)
        first = ready[0]
        same = [b for b in ready if b.key == first.key]
        n = self._batch_size(first.engine, first.key, len(same))
        return same[:n]

    def _sizes(self, engine: str, limit: int) -> list[int]:
        """Batch sizes a step of ``engine`` may have, up to ``limit`` (warmed shapes only,
        when the engine names them)."""
        most = min(limit, max(1, self._max_batch(engine)))
        sizes = self._batch_sizes(engine)
        allowed = [s for s in sizes if s <= most] if sizes else list(range(1, most + 1))
        return allowed or [1]

    def _batch_size(self, engine: str, key: tuple, ready: int) -> int:
        """Dynamic batch size: of the shapes that fit the ready streams, the one with the
        least device time per stream by the cost model (the largest on a tie or when
        nothing is measured).  Batching is not always cheaper: measured on an H200 before
        the multi-stream graphs, 4 video streams in one step took 399 ms, 4 single steps
        360 ms."""
        sizes = self._sizes(engine, ready)
        if not self.costs.known(key):
            return max(sizes)
        return min(sizes, key=lambda n: (self.costs.per_stream_ms(key, n), -n))

    def best_per_stream_ms(self, engine: str, key: tuple, streams: int) -> float:
        """Device time per stream and step when ``streams`` streams of ``key`` are served
        with the best batch size (0.0 when nothing is measured)."""
        if not self.costs.known(key):
            return 0.0
        return min(self.costs.per_stream_ms(key, n) for n in self._sizes(engine, streams))

    def update_from_result(self, result: StepResult) -> None:
        plan = self._in_flight.pop(result.step_id, None)
        if plan is not None:
            for item in plan.items:
                box = self._boxes.get(item.stream_id)
                if box is not None:
                    box.busy = False
        for report in result.reports:
            self.set_frames_per_step(report.stream_id, report.frames_per_step)
        if not result.failed and result.batch_size:
            first = not self.costs.known(result.key)
            self.costs.observe(result.key, result.batch_size, result.elapsed_ms)
            if first:
                self._allocate()
        if self._clock() >= self._next_allocation:
            self._allocate()
