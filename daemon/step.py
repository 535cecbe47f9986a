"""The plain data that crosses the line between deciding and doing.

The front (server + scheduler) decides; the engine worker does.  Everything that passes
between them is one of the dataclasses below: no engine, ring or worker object crosses, and
nothing on one side reads the other's state by reference (a worker in another process, or
the pipeline ranks of several GPUs, take exactly these messages).

    front                                  worker
    -----                                  ------
    OpenStream / UpdateParams / CloseStream   ->  executes in order
    StepPlan (streams, frames, batch key)     ->  one engine step
                 <-  CommandResult (opened / params_ok / closed / error)
                 <-  StepResult (frames with their input's times, stage times, new
                     frames_per_step of each stream, errors)
                 <-  WorkerReady (each engine's capabilities)

Shape borrowed from vLLM's engine core (schedule -> execute(plan) -> update_from_output);
the framing stays ours (no pickle anywhere, and these never leave the process as pickles).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livediffusion.shared.protocol import FrameSpec


def batch_key(engine: str, width: int, height: int, capabilities: dict[str, Any],
              params: dict[str, Any] | None = None) -> tuple:
    """The key of a stream's steps: streams with the same key may share a step and share an
    entry of the cost model.  Besides the engine and the frame size, the parameters the
    engine names in ``capabilities["cost_params"]`` (video: steps, decoder, stream_batch),
    with the engine's defaults for those not given."""
    values = {**(capabilities.get("params") or {}), **(params or {})}
    return (engine, width, height,
            *(values.get(name) for name in capabilities.get("cost_params", ())))


@dataclass
class FrameRef:
    """An input frame waiting in a ring slot (``slot``) or inline (``data``).

    ``arrived`` is the daemon's monotonic clock when the notice came in: the playout clock
    paces output frames by it, and deadlines are measured from it."""

    seq: int
    ts: int
    slot: int | None = None
    data: bytes | memoryview | None = None
    stride: int = 0
    arrived: float = field(default_factory=time.monotonic)


# --- commands ---------------------------------------------------------------------------------

@dataclass
class OpenStream:
    request: Any
    stream_id: int
    engine: str
    input: FrameSpec
    output: FrameSpec
    fps: float
    params: dict[str, Any]
    #: the input ring's segment name (None: inline frames); the worker attaches it itself
    ring_in: str | None = None
    paced: bool = True


@dataclass
class UpdateParams:
    request: Any
    stream_id: int
    params: dict[str, Any]
    #: (seconds, curve, blend): move there over time (daemon/transitions.py); None: at once
    transition: tuple[float, str, str] | None = None


@dataclass
class CueCommand:
    """A stream's cue list: op play (with ``cues``: maps of params, transition, hold,
    label), pause, resume, next, jump (``index``), stop or status."""

    request: Any
    stream_id: int
    op: str
    cues: list[dict[str, Any]] | None = None
    loop: bool = False
    index: int = 0


@dataclass
class CloseStream:
    request: Any
    stream_id: int


Command = OpenStream | UpdateParams | CueCommand | CloseStream


@dataclass
class CommandResult:
    """kind: opened / params_ok / cues / closed / error.  ``body`` holds the reply's fields
    (opened: params and frames_per_step; error: code and message).  A params_ok whose body
    has ``quiet`` comes from a transition moving: the front books it and answers no one."""

    kind: str
    stream_id: int
    request: Any = None
    body: dict[str, Any] = field(default_factory=dict)


# --- one engine step --------------------------------------------------------------------------

@dataclass
class PlanItem:
    stream_id: int
    frames: list[FrameRef]


@dataclass
class StepPlan:
    """What the scheduler decided: these streams, these frames, in one engine step.

    ``key`` is the batch key (engine, width, height): streams sharing it share the forward.
    ``deadline`` is the earliest deadline among them (monotonic seconds) and
    ``predicted_ms`` what the cost model expected the step to take (0: nothing measured)."""

    step_id: int
    engine: str
    key: tuple
    items: list[PlanItem]
    deadline: float = 0.0
    predicted_ms: float = 0.0

    @property
    def batch_size(self) -> int:
        return len(self.items)


@dataclass
class OutFrame:
    """One finished frame, in host memory, in the stream's output spec.  ``arrived`` is the
    arrival time of the input frame it was made from (the playout clock paces by it)."""

    pixels: np.ndarray
    in_seq: int
    ts: int
    arrived: float
    #: (slot, seq) of input slots ``pixels`` is still a view of (an unpaced stream of an
    #: engine that borrows its input, published at once): the front re-checks them after
    #: its copy into the output ring, instead of the worker copying the frame once more
    borrowed: tuple[tuple[int, int], ...] = ()


@dataclass
class StreamReport:
    """What one step did to one stream."""

    stream_id: int
    frames: list[OutFrame] = field(default_factory=list)
    frames_in: int = 0
    torn: int = 0
    bad_frames: int = 0
    #: input frames the engine takes next step (first chunk 1 + 4, and again after a reset)
    frames_per_step: int = 1
    errors: list[tuple[str, str]] = field(default_factory=list)  # (code, message)


@dataclass
class StepResult:
    step_id: int
    engine: str
    key: tuple
    batch_size: int
    reports: list[StreamReport]
    started: float          # monotonic seconds
    elapsed_ms: float       # the whole step as the worker saw it (reads, engine, download)
    engine_ms: float = 0.0  # the engine's submit alone
    failed: bool = False


@dataclass
class WorkerReady:
    """Sent once the worker has built (and warmed up) its engines."""

    capabilities: dict[str, dict[str, Any]]
    #: (batch key, batch size, ms) of the warm-up's steady steps: the cost model's first data
    costs: list[tuple[tuple, int, float]] = field(default_factory=list)
