"""The engine worker: the one owner of the engines and their device state.

It builds the engines (and warms them up), then executes what the front hands it, in order:
commands (open, params, close) and step plans.  For a plan it reads the announced input
slots, calls the engine once, brings the finished frames to host memory and returns them in
a ``StepResult`` with the arrival time of each frame's input; the front's playout clock then
writes each one to the output ring when it is due.  It never touches sockets, and nothing
crosses back but the plain data of ``step.py``.

``ThreadedWorker`` runs a worker on its own thread, so that the front (sockets, heartbeats,
rings, pacing) never waits on an engine step, a prompt encode or a compilation;
``InlineWorker`` runs one on the caller's thread, for engines whose step is a copy
(passthrough), where a thread hand-off would cost more than the step (about 0.19 ms of round
trip on a 2-core machine, twice the whole ZeroMQ loopback hop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from livediffusion.shared.protocol import ErrorCode, FrameSpec
from livediffusion.shared.ring import FrameRing, RingError, TornRead

from .engines import PIPELINE_PARTS, REGISTRY, pipeline_factory
from .engines.base import Engine, EngineError, InputFrame, StreamConfig, StreamInput
from .step import (CloseStream, CommandResult, CueCommand, FrameRef, OpenStream, OutFrame,
                   StepPlan, StepResult, StreamReport, UpdateParams, WorkerReady, batch_key)
from .transitions import CueList, Transition, parse_cues

log = logging.getLogger("livediffusion.worker")


@dataclass
class WorkerStream:
    """What the worker keeps per stream (the engine keeps the stream's model state)."""

    config: StreamConfig
    engine: Engine
    ring_in: FrameRing | None
    paced: bool = True
    #: input seq -> arrival time, for the frames the engine may still return
    arrivals: dict[int, float] = field(default_factory=dict)
    #: the timed transition under way and the cue list playing (daemon/transitions.py)
    transition: Transition | None = None
    cues: CueList | None = None
    #: the changes last handed to the engine by the transition, and when the front last
    #: heard where it is
    moved: dict[str, Any] = field(default_factory=dict)
    told: float = 0.0


def is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class EngineWorker:
    """Builds engines and executes commands and plans on them (see the module docstring)."""

    def __init__(self, engine_names: tuple[str, ...], device: str = "cpu", *,
                 explicit: bool = True, warm_up: tuple[tuple[int, int], ...] = (),
                 warm_up_params: tuple[dict[str, Any], ...] = (),
                 gpus: tuple[str, ...] = ()) -> None:
        self.engine_names = engine_names
        #: the devices of pipeline ranks for engines that can split over them
        self.gpus = gpus
        self.device = device
        self.explicit = explicit
        self.warm_up_sizes = warm_up
        #: parameter sets to warm up with (each compiles its own shapes: steps, decoder)
        self.warm_up_params = warm_up_params or ({},)
        self.engines: dict[str, Engine] = {}
        self.streams: dict[int, WorkerStream] = {}
        #: "opened" answers held back until the engine has the stream ready
        self.held: list[CommandResult] = []
        #: (key, batch size, ms) of the warm-up's steady steps: the cost model's first entries
        self.warm_costs: list[tuple[tuple, int, float]] = []
        #: engine name -> parameter name -> kind (its schema), for transitions
        self._kinds: dict[str, dict[str, str]] = {}

    # --- building --------------------------------------------------------------------------

    def build(self) -> WorkerReady:
        for name in self.engine_names:
            factory, _ = REGISTRY[name]
            if self.gpus and name in PIPELINE_PARTS:
                factory = pipeline_factory(name, self.gpus)
            try:
                self.engines[name] = factory(self.device)
            except Exception as exc:  # noqa: BLE001 - reported, or fatal if asked for
                if self.explicit:
                    raise
                log.error("engine %s could not be loaded and is left out: %s", name, exc)
        for width, height in self.warm_up_sizes:  # before serving: nobody waits on compiling
            for name, engine in self.engines.items():
                for params in self.warm_up_params:
                    self._warm_up(name, engine, width, height, params)
        return WorkerReady({name: self.capabilities(engine)
                            for name, engine in self.engines.items()}, list(self.warm_costs))

    @staticmethod
    def capabilities(engine: Engine) -> dict[str, Any]:
        """The engine's own facts plus how many streams one step may carry (travels to the
        front in messages: nothing there asks the engine)."""
        caps = dict(engine.capabilities())
        caps.setdefault("max_batch", engine.max_batch())
        return caps

    def _warm_up(self, name: str, engine: Engine, width: int, height: int,
                 params: dict[str, Any]) -> None:
        sizes = sorted(set(self.capabilities(engine).get("batch_sizes") or [1]))
        with_params = "".join(f", {k}={v}" for k, v in params.items())
        for n in sizes:
            try:
                seconds, step_ms = engine.warm_up(FrameSpec(width, height), params, streams=n)
            except Exception as exc:  # noqa: BLE001 - a size or parameter it cannot take
                log.warning("no warm-up of %s at %dx%d%s: %s", name, width, height, with_params,
                            exc)
                return
            key = batch_key(name, width, height, self.capabilities(engine), params)
            self.warm_costs.append((key, n, step_ms))
            log.info("warmed up %s at %dx%d%s%s in %.1f s (steady step %.1f ms)", name, width,
                     height, with_params, f" for {n} streams" if n > 1 else "", seconds,
                     step_ms)

    def shutdown(self) -> None:
        """Close every stream and release the engines' devices."""
        for sid in list(self.streams):
            self._close(sid)
        for engine in self.engines.values():
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("engine %s failed to shut down cleanly", engine.name)

    # --- executing -------------------------------------------------------------------------

    def execute(self, item: OpenStream | UpdateParams | CloseStream | StepPlan
                ) -> list[CommandResult | StepResult]:
        """Run one command or plan; returns its result and any held-back ``opened`` answer
        whose stream became ready meanwhile."""
        if isinstance(item, StepPlan):
            moved = self._move(item)
            out = moved + [self._step(item)]
        elif isinstance(item, OpenStream):
            result = self._open(item)
            if result.kind == "opened" and not self.engines[item.engine].stream_ready(
                    item.stream_id):
                self.held.append(result)
                out = []
            else:
                out = [result]
        elif isinstance(item, UpdateParams):
            out = [self._params(item)]
        elif isinstance(item, CueCommand):
            out = self._cues(item)
        else:
            self.held = [r for r in self.held if r.stream_id != item.stream_id]
            self._close(item.stream_id)
            out = [CommandResult("closed", item.stream_id, item.request)]
        return self.ready_opens() + out

    def ready_opens(self) -> list[CommandResult]:
        """Held-back ``opened`` answers whose streams are ready now."""
        if not self.held:
            return []
        ready, waiting = [], []
        for result in self.held:
            stream = self.streams.get(result.stream_id)
            if stream is None:
                continue
            (ready if stream.engine.stream_ready(result.stream_id) else waiting).append(result)
        self.held = waiting
        return ready

    def _open(self, command: OpenStream) -> CommandResult:
        engine = self.engines[command.engine]
        sid = command.stream_id
        config = StreamConfig(sid, command.input, command.output, command.fps,
                              dict(command.params))
        ring_in = None
        try:
            if command.ring_in is not None:
                ring_in = FrameRing.attach(command.ring_in)
            effective = engine.open_stream(config)
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes a reply
            if ring_in is not None:
                ring_in.close()
            code = getattr(exc, "code", ErrorCode.OUT_OF_MEMORY if is_oom(exc)
                           else ErrorCode.ENGINE_ERROR)
            return CommandResult("error", sid, command.request,
                                 {"code": code, "message": f"cannot open stream: {exc}"})
        config.params = dict(effective)
        self.streams[sid] = WorkerStream(config, engine, ring_in, command.paced)
        return CommandResult("opened", sid, command.request,
                             {"params": dict(effective),
                              "frames_per_step": engine.frames_per_step(sid)})

    def _params(self, command: UpdateParams) -> CommandResult:
        stream = self.streams.get(command.stream_id)
        if stream is None:
            return self._not_open(command)
        now = time.monotonic()
        try:
            if command.transition is not None and command.transition[0] > 0:
                self._begin(stream, command.params, command.transition, now)
                moved = self._move_one(stream, now)
                if moved is not None and moved.kind == "error":
                    moved.request = command.request
                    return moved
                return self._where(stream, "params_ok", command.request, now)
            changes = dict(command.params)
            running = stream.transition
            if running is not None:  # a plain change takes these parameters over
                changes = {**running.take_over(set(changes) - {"reset"}), **changes}
                if running.empty:
                    stream.transition = None
            effective = stream.engine.update_params(command.stream_id, changes)
        except Exception as exc:  # noqa: BLE001
            code = getattr(exc, "code", ErrorCode.BAD_PARAMS)
            return CommandResult("error", command.stream_id, command.request,
                                 {"code": code, "message": str(exc)})
        stream.config.params = dict(effective)
        return self._where(stream, "params_ok", command.request, now)

    @staticmethod
    def _not_open(command) -> CommandResult:
        return CommandResult("error", command.stream_id, command.request,
                             {"code": ErrorCode.UNKNOWN_STREAM,
                              "message": f"stream {command.stream_id} is not open."})

    def _where(self, stream: WorkerStream, kind: str, request: Any, now: float,
               quiet: bool = False) -> CommandResult:
        """A result with the stream's parameters, transition and cue list as they are."""
        sid = stream.config.stream_id
        body: dict[str, Any] = {"params": dict(stream.config.params),
                                "frames_per_step": stream.engine.frames_per_step(sid),
                                "transition": stream.transition.state(now)
                                if stream.transition is not None else None,
                                "cues": stream.cues.report(now) if stream.cues else None}
        if stream.transition is not None:
            body["target"] = {**stream.config.params, **stream.transition.target}
        if quiet:
            body["quiet"] = True
        stream.told = now
        return CommandResult(kind, sid, request, body)

    def _begin(self, stream: WorkerStream, changes: dict[str, Any],
               spec: tuple[float, str, str], now: float) -> None:
        """Start a transition towards ``changes`` (a running one is replaced: it goes on
        from where it is, and its changes not overridden are kept)."""
        if "reset" in changes:
            raise EngineError("reset cannot be part of a timed transition.", "bad_params")
        sid = stream.config.stream_id
        if stream.transition is not None:
            changes = {**stream.transition.changes, **changes}
        target = stream.engine.check_params(sid, changes)
        seconds, curve, blend = spec
        kinds = self._kinds.get(stream.engine.name)
        if kinds is None:
            schema = stream.engine.capabilities().get("schema") or []
            kinds = self._kinds[stream.engine.name] = {e["name"]: e["kind"] for e in schema}
        stream.transition = Transition(dict(stream.config.params), target, dict(changes),
                                       seconds, kinds, curve, blend)
        stream.moved = {}

    def _move(self, plan: StepPlan) -> list[CommandResult]:
        """Before a step: move the transitions and cue lists of the plan's streams."""
        now = time.monotonic()
        out: list[CommandResult] = []
        for item in plan.items:
            stream = self.streams.get(item.stream_id)
            if stream is not None and (stream.transition is not None or stream.cues):
                result = self._move_one(stream, now)
                if result is not None:
                    out.append(result)
        return out

    def _move_one(self, stream: WorkerStream, now: float) -> CommandResult | None:
        """One stream's transition (and cue list) brought to ``now``: the parameters of
        the moment handed to the engine.  Returns what the front should hear: a quiet
        params_ok when something ended or began, and 4 times a second while moving; an
        error (the transition or cue list is dropped) if the engine refuses."""
        sid = stream.config.stream_id
        changed_state = False
        try:
            cues = stream.cues
            if cues is not None:
                t = stream.transition
                index = cues.due(now, t is None or t.done(now))
                if index is not None:
                    cue = cues.cues[index]
                    self._begin(stream, cue.changes, (cue.transition, cue.curve, cue.blend),
                                now)
                    cues.started(index)
                    changed_state = True
                elif cues.state == "done":
                    changed_state = True
            t = stream.transition
            if t is not None:
                if t.began is None and t.paused_at is None and \
                        stream.engine.prepare(sid, t.target):
                    t.began = now
                    changed_state = True
                if t.began is not None:
                    changes = t.at(now)
                    if changes and changes != stream.moved:
                        stream.config.params = dict(stream.engine.update_params(sid, changes))
                        stream.moved = changes
                    if t.done(now):
                        stream.transition = None
                        changed_state = True
            if cues is not None and cues.state == "done" and stream.transition is None:
                stream.cues = None
        except Exception as exc:  # noqa: BLE001 - the stream goes on where it is
            stream.transition = stream.cues = None
            message = f"transition stopped: {exc}"
            log.error("stream %d: %s", sid, message)
            return CommandResult("error", sid, None,
                                 {"code": getattr(exc, "code", ErrorCode.BAD_PARAMS),
                                  "message": message})
        if changed_state or now - stream.told >= 0.25:
            return self._where(stream, "params_ok", None, now, quiet=True)
        return None

    def _cues(self, command: CueCommand) -> list[CommandResult]:
        stream = self.streams.get(command.stream_id)
        if stream is None:
            return [self._not_open(command)]
        now = time.monotonic()
        op = command.op
        try:
            if op == "play":
                cues = parse_cues(command.cues)
                merged: dict[str, Any] = {}
                for i, cue in enumerate(cues):  # every cue checked before the first plays
                    merged.update(cue.changes)
                    try:
                        stream.engine.check_params(command.stream_id, merged)
                    except EngineError as exc:
                        raise EngineError(f"cue {i}: {exc}", exc.code) from None
                stream.cues = CueList(cues, loop=command.loop)
            elif stream.cues is None and op in ("pause", "resume", "next", "jump"):
                raise EngineError("no cue list is playing on this stream.", "bad_params")
            elif op == "pause":
                stream.cues.pause(now)
                if stream.transition is not None:
                    stream.transition.pause(now)
            elif op == "resume":
                stream.cues.resume(now)
                if stream.transition is not None:
                    stream.transition.resume(now)
            elif op in ("next", "jump"):
                cues = stream.cues
                index = cues.index + 1 if op == "next" else command.index
                if op == "next" and index >= len(cues.cues) and cues.loop:
                    index = 0
                if not 0 <= index < len(cues.cues):
                    raise EngineError(f"there is no cue {index}: the list has "
                                      f"{len(cues.cues)} (0 to {len(cues.cues) - 1}).",
                                      "bad_params")
                cue = cues.cues[index]
                cues.resume(now)
                self._begin(stream, cue.changes, (cue.transition, cue.curve, cue.blend), now)
                cues.started(index)
            elif op == "stop":
                stream.cues = None
            elif op != "status":
                raise EngineError(f"the cue op must be play, pause, resume, next, jump, stop "
                                  f"or status, not {op[:40]!r}.", "bad_message")
        except Exception as exc:  # noqa: BLE001 - a refusal answers the asker
            return [CommandResult("error", command.stream_id, command.request,
                                  {"code": getattr(exc, "code", ErrorCode.BAD_PARAMS),
                                   "message": str(exc)})]
        moved = self._move_one(stream, now)
        reply = self._where(stream, "cues", command.request, now)
        return ([moved] if moved is not None and moved.kind == "error" else []) + [reply]

    def _close(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        if stream.ring_in is not None:
            stream.ring_in.close()
        try:
            stream.engine.close_stream(sid)
        except Exception:  # noqa: BLE001 - the stream is gone either way
            log.exception("engine %s failed to close stream %d", stream.engine.name, sid)

    # --- frames ----------------------------------------------------------------------------

    def _read(self, stream: WorkerStream, ref: FrameRef, report: StreamReport
              ) -> InputFrame | None:
        spec = stream.config.input
        sid = stream.config.stream_id
        if ref.data is not None:
            row_stride = ref.stride or spec.row_bytes
            if len(ref.data) != row_stride * spec.height or row_stride < spec.row_bytes or \
                    row_stride % spec.np_dtype.itemsize:
                self._bad_frame(report, f"inline frame has {len(ref.data)} bytes; a "
                                f"{spec.width}x{spec.height} {spec.format} {spec.dtype} frame "
                                f"needs {row_stride * spec.height} (rows of {row_stride} bytes).")
                return None
            flat = np.frombuffer(ref.data, dtype=np.uint8)
            itemsize = spec.np_dtype.itemsize
            pixels = np.ndarray(spec.shape, spec.np_dtype, flat,
                                strides=(row_stride, spec.channels * itemsize, itemsize))
            return InputFrame(ref.seq, pixels, spec, ref.ts)
        if stream.ring_in is None or ref.slot is None:
            self._bad_frame(report, "frame notice without a ring slot.")
            return None
        try:
            hdr, pixels = stream.ring_in.view(ref.slot, ref.seq)
        except TornRead:
            report.torn += 1
            return None
        except RingError as exc:
            self._bad_frame(report, str(exc))
            return None
        got = hdr.spec
        if not got.same_picture(spec):
            self._bad_frame(report, f"frame is {got.width}x{got.height} {got.format} "
                            f"{got.dtype} origin {got.origin}; stream {sid} was opened for "
                            f"{spec.width}x{spec.height} {spec.format} {spec.dtype} origin "
                            f"{spec.origin}.")
            return None
        if not stream.engine.borrows_input:
            # The engine keeps working long after this call returns: take a copy now and
            # check it, instead of finding the slot overwritten after the step.
            try:
                stream.ring_in.check_size()
                pixels = pixels.copy()
                intact = stream.ring_in.is_intact(ref.slot, ref.seq)
            except RingError as exc:   # the client shrank its ring: this stream only
                self._bad_frame(report, str(exc))
                return None
            if not intact:
                report.torn += 1
                return None
        return InputFrame(ref.seq, pixels, got, hdr.ts)

    @staticmethod
    def _bad_frame(report: StreamReport, message: str) -> None:
        report.bad_frames += 1
        report.errors.append((ErrorCode.BAD_FRAME, message))

    def _step(self, plan: StepPlan) -> StepResult:
        started = time.monotonic()
        t0 = time.perf_counter()
        inputs: list[StreamInput] = []
        reports: dict[int, StreamReport] = {}
        used: dict[int, list[tuple[int, int]]] = {}  # sid -> [(slot, seq)] to re-check
        engine = self.engines[plan.engine]
        for item in plan.items:
            stream = self.streams.get(item.stream_id)
            if stream is None:
                continue
            report = reports[item.stream_id] = StreamReport(item.stream_id)
            frames = [f for f in (self._read(stream, r, report) for r in item.frames)
                      if f is not None]
            if len(frames) < len(item.frames):
                continue  # a chunk with a hole is dropped whole; newer frames follow
            for ref in item.frames:
                stream.arrivals[ref.seq] = ref.arrived
            report.frames_in = len(frames)
            inputs.append(StreamInput(item.stream_id, frames))
            if engine.borrows_input:  # its output may still be the input's pixels
                used[item.stream_id] = [(r.slot, r.seq) for r in item.frames
                                        if r.slot is not None]
        failed = False
        engine_ms = 0.0
        if inputs:
            t1 = time.perf_counter()
            try:
                outputs = engine.submit(inputs)
            except Exception as exc:  # noqa: BLE001 - one failed step must not kill the daemon
                failed = True
                outputs = []
                oom = is_oom(exc)
                code = ErrorCode.OUT_OF_MEMORY if oom else getattr(exc, "code",
                                                                   ErrorCode.ENGINE_ERROR)
                log.error("engine %s failed a step of %d stream(s): %s: %s", engine.name,
                          len(inputs), type(exc).__name__, exc)
                if oom:
                    _release_device_cache()
                for item in inputs:
                    reports[item.stream_id].errors.append(
                        (code, f"engine step failed: {exc}"))
            engine_ms = (time.perf_counter() - t1) * 1000.0
            for out in outputs:
                stream = self.streams.get(out.stream_id)
                report = reports.get(out.stream_id)
                if stream is None or report is None:
                    continue
                for frame in out.frames:
                    try:
                        report.frames.append(self._host_frame(
                            stream, frame.pixels, frame.in_seq, frame.ts,
                            used.get(out.stream_id, ())))
                    except TornRead:
                        report.torn += 1
                    except EngineError as exc:
                        log.error("stream %d: %s", out.stream_id, exc)
                        report.errors.append((exc.code, str(exc)))
        for sid, report in reports.items():
            stream = self.streams.get(sid)
            if stream is not None:
                report.frames_per_step = engine.frames_per_step(sid)
                if len(stream.arrivals) > 256:  # frames the engine will never return
                    for seq in sorted(stream.arrivals)[:-64]:
                        del stream.arrivals[seq]
        return StepResult(plan.step_id, plan.engine, plan.key, len(inputs),
                          list(reports.values()), started,
                          (time.perf_counter() - t0) * 1000.0, engine_ms, failed=failed)

    def _host_frame(self, stream: WorkerStream, pixels: Any, in_seq: int, ts: int,
                    inputs_used) -> OutFrame:
        spec: FrameSpec = stream.config.output
        if hasattr(pixels, "detach"):  # a torch tensor: bring it to the host
            on_host = pixels.device.type == "cpu"
            pixels = pixels.detach().cpu().numpy()
            if on_host:  # its storage may be the engine's: the frame waits for its time
                pixels = pixels.copy()
        elif stream.engine.borrows_input and (stream.paced or not inputs_used):
            pixels = np.array(pixels)  # it may be a view of the input: it waits for its time
        if pixels.shape != spec.shape or pixels.dtype != spec.np_dtype:
            raise EngineError(f"engine {stream.engine.name} produced {pixels.shape} "
                              f"{pixels.dtype}, not {spec.shape} {spec.dtype}.")
        if stream.ring_in is not None and not all(
                stream.ring_in.is_intact(slot, s) for slot, s in inputs_used):
            # The client overwrote the input while we used it: never publish a torn frame.
            raise TornRead("input overwritten during the step")
        arrived = stream.arrivals.pop(in_seq, None)
        if arrived is None:
            arrived = time.monotonic()
        borrowed = tuple(inputs_used) if stream.engine.borrows_input and not stream.paced \
            else ()
        return OutFrame(pixels, in_seq, ts, arrived, borrowed)


def _release_device_cache() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after an OOM
        pass


class InlineWorker:
    """A worker executed on the caller's (the front's) thread."""

    threaded = False

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.outbox: deque = deque()
        self.in_flight: int | None = None  # the front's bookkeeping: step id handed over

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(self.worker.engines)

    def start(self) -> WorkerReady:
        return self.worker.build()

    def submit(self, item) -> None:
        self.outbox.extend(self.worker.execute(item))

    def stop(self, timeout: float = 10.0) -> None:
        self.worker.shutdown()


class ThreadedWorker:
    """A worker on a thread of its own; ``wake`` is called (from that thread) whenever a
    result is ready, so the front can sleep in its poll until then."""

    threaded = True

    def __init__(self, worker: EngineWorker, wake: Callable[[], None]) -> None:
        self.worker = worker
        self.outbox: deque = deque()
        self.in_flight: int | None = None  # the front's bookkeeping: step id handed over
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = wake
        self._thread: threading.Thread | None = None
        self._ready: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(self.worker.engines)

    def start(self) -> WorkerReady:
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()
        ready = self._ready.get()
        if isinstance(ready, BaseException):
            raise ready
        return ready

    def submit(self, item) -> None:
        self._inbox.put(item)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine worker did not stop within %.0f s", timeout)

    def _run(self) -> None:
        try:
            ready = self.worker.build()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._ready.put(exc)
            return
        self._ready.put(ready)
        try:
            while True:
                try:  # while an open waits for its stream, look again every 10 ms
                    item = self._inbox.get(timeout=0.01 if self.worker.held else None)
                except queue.Empty:
                    results = self.worker.ready_opens()
                else:
                    if item is None:
                        break
                    try:
                        results = self.worker.execute(item)
                    except Exception as exc:  # noqa: BLE001 - a worker bug must not stop streams
                        log.exception("engine worker failed on %s", type(item).__name__)
                        results = [_failure(item, exc)]
                if results:
                    self.outbox.extend(results)
                    self._wake()
        finally:
            self.worker.shutdown()


def _failure(item, exc: BaseException) -> CommandResult | StepResult:
    """A result that tells the front what was lost when the worker itself failed."""
    message = f"internal engine worker error: {exc}"
    if isinstance(item, StepPlan):
        return StepResult(item.step_id, item.engine, item.key, 0,
                          [StreamReport(i.stream_id, errors=[(ErrorCode.INTERNAL, message)])
                           for i in item.items], time.monotonic(), 0.0, failed=True)
    return CommandResult("error", item.stream_id, item.request,
                         {"code": ErrorCode.INTERNAL, "message": message})
