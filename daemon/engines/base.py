"""The interface every engine implements, and the plain data that crosses it.

The scheduler decides which streams run in the next step and hands the engine a batch of
``StreamInput``; the engine does the math and returns ``StreamOutput``.  Engines never see
sockets or rings; the scheduler never sees tensors.  All calls come from one worker
thread, so an engine owns its device state without locks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from livediffusion.shared.protocol import FrameSpec


class EngineError(Exception):
    """A failure inside an engine; carries a protocol error code for the reply."""

    def __init__(self, message: str, code: str = "engine_error") -> None:
        super().__init__(message)
        self.code = code


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, "..." marking a cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: Any, limit: int = 40) -> str:
    """A client's value in a message: its repr, cut to ``limit`` characters."""
    return clip(repr(value), limit)


def prompt_texts(params: Mapping[str, Any]) -> list[str]:
    """The texts an effective parameter map asks to be encoded: its weighted ``prompts``
    (else its ``prompt``), those with a weight above 0."""
    return [t for t, w in params.get("prompts") or [(params.get("prompt", ""), 1.0)] if w > 0]


class ParamError(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="bad_params")


@dataclass
class StreamConfig:
    """What an engine needs to open a stream."""

    stream_id: int
    input: FrameSpec
    output: FrameSpec
    fps: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputFrame:
    """One input frame.  For engines that borrow input, ``pixels`` is a view into shared
    memory that the writer can overwrite after ``submit`` returns."""

    seq: int
    pixels: np.ndarray
    spec: FrameSpec
    ts: int = 0


@dataclass
class StreamInput:
    stream_id: int
    frames: list[InputFrame]


@dataclass
class OutputFrame:
    """One finished frame in the stream's output spec, with the input it came from."""

    pixels: Any  # numpy array or torch tensor of shape output.shape, dtype output.dtype
    in_seq: int
    ts: int = 0


@dataclass
class StreamOutput:
    stream_id: int
    frames: list[OutputFrame]


def check_size(engine: str, spec: FrameSpec, lo: int, hi: int, multiple: int) -> None:
    """Refuse a frame size the engine cannot take, with a sentence that says what it can."""
    for side, value in (("width", spec.width), ("height", spec.height)):
        if value % multiple or not lo <= value <= hi:
            raise ParamError(f"{engine} needs a {side} that is a multiple of {multiple} from "
                             f"{lo} to {hi}, not {value}.")


class Engine(ABC):
    """A streaming generator serving many streams; one instance per daemon per engine kind."""

    #: name clients use in OPEN
    name: str = ""
    #: True if ``submit`` may return (views of) the input pixels and finishes quickly: the
    #: worker then hands it zero-copy views of the shared-memory slots and checks them after
    #: publishing.  False (the default): the worker copies each frame out of its slot first.
    borrows_input: bool = False

    @abstractmethod
    def capabilities(self) -> dict[str, Any]:
        """Static facts for WELCOME: parameters, limits, frames per step."""

    @abstractmethod
    def open_stream(self, config: StreamConfig) -> dict[str, Any]:
        """Allocate the stream's state and return the effective parameters (defaults filled
        in); raises EngineError/ParamError if it cannot."""

    @abstractmethod
    def update_params(self, stream_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a live parameter change at the next step; returns the effective params."""

    @abstractmethod
    def submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        """Process the newest frames of several streams in one step."""

    @abstractmethod
    def close_stream(self, stream_id: int) -> None:
        """Free everything the stream holds. Must not raise for unknown ids."""

    def check_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        """The effective parameters ``changes`` would give the stream, validated but not
        applied (a timed transition checks its target before it starts); raises
        ParamError."""
        raise ParamError(f"the {self.name} engine cannot check parameters ahead, so it "
                         f"takes no timed transitions.")

    def prepare(self, stream_id: int, params: Mapping[str, Any]) -> bool:
        """Start what effective parameters ``params`` need done beside the stream before a
        transition can move towards them (their prompts encoded), and say whether it is
        done; asked again at each step until it is.  A transition's clock starts then."""
        return True

    def settle(self, timeout: float | None = 30.0) -> None:
        """Wait for work an engine does beside its streams (a prompt being encoded) and
        apply it: for warm-ups, benchmarks and tests that need a stream ready at once."""

    def stream_ready(self, stream_id: int) -> bool:
        """False while a just-opened stream still waits for work done beside it (its first
        prompt being encoded); the daemon answers ``opened`` once it is True."""
        return True

    def frames_per_step(self, stream_id: int) -> int:
        """How many input frames the next step of this stream consumes (video: a chunk)."""
        return 1

    def max_batch(self) -> int:
        """How many streams one ``submit`` may carry."""
        return 16

    def warm_up_steps(self, params: Mapping[str, Any]) -> int:
        """Steps a throwaway stream needs to reach the steady state (every kernel compiled)."""
        return 3

    def warm_up(self, spec: FrameSpec, params: Mapping[str, Any] | None = None, *,
                streams: int = 1) -> tuple[float, float]:
        """Run ``streams`` throwaway streams of this size together until they are steady, so
        that the first real batch of that shape does not wait for kernel compilation or
        autotuning; returns (seconds it took, milliseconds of the last, steady step)."""
        import time

        params = dict(params or {})
        started = time.perf_counter()
        ids = [-1 - i for i in range(streams)]
        step_ms = 0.0
        opened = []
        try:
            for stream_id in ids:
                self.open_stream(StreamConfig(stream_id, spec, spec, 30.0, params))
                opened.append(stream_id)
            self.settle()
            rng = np.random.default_rng(0)
            seq = 0
            for _ in range(self.warm_up_steps(params)):
                batch = []
                for stream_id in ids:
                    frames = []
                    for _ in range(self.frames_per_step(stream_id)):
                        seq += 1
                        pixels = rng.integers(0, 256, spec.shape, dtype=np.uint8)
                        frames.append(InputFrame(seq, pixels, spec, seq))
                    batch.append(StreamInput(stream_id, frames))
                t0 = time.perf_counter()
                self.submit(batch)
                step_ms = (time.perf_counter() - t0) * 1000.0
        finally:
            for stream_id in opened:
                self.close_stream(stream_id)
        return time.perf_counter() - started, step_ms

    def shutdown(self) -> None:
        """Release device memory when the daemon stops."""
