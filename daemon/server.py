"""The daemon's front: the ZeroMQ ROUTER socket, sessions, heartbeats, frame rings.

It parses and answers control messages, owns every shared-memory segment (creates them on
OPEN, unlinks them once the worker has let go), and forwards frame notices to the
scheduler.  It does no tensor math; engines live behind the worker, which the loop drives
between rounds of messages (see worker.py for why on the same thread).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from livediffusion.shared import protocol as P
from livediffusion.shared.protocol import ErrorCode, FrameSpec, ProtocolError
from livediffusion.shared.ring import FrameRing, RingError, stale_segments

from . import __version__
from .config import ServeConfig
from .engines import INLINE, REGISTRY
from .playout import Playout
from .scheduler import Refused, Scheduler
from .engines.base import ParamError, check_size, clip, shown
from .presets import PresetError, PresetStore, for_engine
from .telemetry import THUMB_MAX, Busy, Window, gpu_stats, thumbnail
from .step import (CloseStream, CommandResult, CueCommand, FrameRef, OpenStream, StepResult,
                   UpdateParams, WorkerReady, batch_key)
from .transitions import MAX_CUES
from .transitions import parse_spec as parse_transition
from .worker import EngineWorker, InlineWorker, ThreadedWorker

log = logging.getLogger("livediffusion.daemon")

DEFAULT_SLOTS = 3
MAX_STREAMS = 32
#: parameter changes of one stream waiting while one is applied; they are coalesced (the
#: newest value of each key wins) into the next one, so a flood costs one change per step
MAX_WAITING_CHANGES = 1024
#: shared memory (frame rings) one client, and all clients together, may hold
SHM_PER_CLIENT = 2 << 30
SHM_TOTAL = 8 << 30


@dataclass
class ChangeBatch:
    """The requests one coalesced parameter change answers (each gets the reply)."""

    requests: list[tuple[bytes, Any]]
    #: the changes one by one, kept in case the merged change is refused: they are then
    #: applied singly, so one bad value costs only its own request
    parts: list[tuple[tuple[bytes, Any], dict[str, Any], Any]]


@dataclass
class Session:
    number: int
    identity: bytes
    client: str
    token: str | None
    last_seen: float
    streams: set[int] = field(default_factory=set)


@dataclass
class ServerStream:
    id: int
    name: str
    session: Session
    engine: str
    input: FrameSpec
    output: FrameSpec
    fps: float
    transport: str
    ring_in: FrameRing | None
    ring_out: FrameRing | None
    state: str = "opening"  # opening -> open -> closing
    notices_in: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    playout: Playout = field(default_factory=Playout)
    worker: Any = None
    # counters from the worker's step results (the front never reads worker state)
    frames_in: int = 0
    frames_out: int = 0
    torn: int = 0
    bad_frames: int = 0
    engine_ms: float = 0.0
    out_seq: int = 0
    #: the scheduler's counters, kept when the stream starts closing (it forgets the stream)
    final: dict[str, Any] = field(default_factory=dict)
    #: the effective parameters the engine last answered (opened, params_ok)
    params: dict[str, Any] = field(default_factory=dict)
    #: a parameter change is being applied; those that came meanwhile wait to be merged
    changing: bool = False
    waiting: list[tuple[tuple[bytes, Any], dict[str, Any], Any]] = field(default_factory=list)
    singles: list[tuple[tuple[bytes, Any], dict[str, Any], Any]] = field(default_factory=list)
    #: the worker's last word on the stream's transition and cue list (None: none)
    transition: dict[str, Any] | None = None
    cues: dict[str, Any] | None = None
    #: ms from an input frame's arrival to its output's publication; streams per step
    latency: Window = field(default_factory=Window)
    batches: Window = field(default_factory=lambda: Window(64))
    #: a small RGB copy of the newest output (width, height, bytes), kept while someone
    #: looks (the control page) and at most 5 times a second
    thumb: tuple[int, int, bytes] | None = None
    thumb_at: float = 0.0
    thumb_wanted: float = 0.0
    thumb_width: int = 160


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    """One daemon: ``serve_forever()`` in the foreground, or ``start()``/``stop()`` a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = P.DEFAULT_PORT, *,
                 engines: tuple[str, ...] | None = None, device: str = "cpu",
                 ipc_path: str | None = None, heartbeat_timeout: float = P.HEARTBEAT_TIMEOUT_S,
                 max_streams: int = MAX_STREAMS, keys_dir: str | Path | None = None,
                 warm_up: tuple[tuple[int, int], ...] = (),
                 warm_up_params: tuple[dict[str, Any], ...] = (),
                 serve: ServeConfig | None = None, gpus: tuple[str, ...] = (),
                 presets_path: str | Path | None = None) -> None:
        if not is_loopback(host) and keys_dir is None:
            raise ValueError(f"binding to {host} exposes the daemon beyond this machine; "
                             f"pass a keys directory (livediffusion keys init DIR) to require "
                             f"CURVE authentication.")
        self.host, self.port = host, port
        self.device = gpus[0] if gpus else device
        #: pipeline ranks' devices for the video engines (``--gpus``); empty: one device
        self.gpus = tuple(gpus)
        self.heartbeat_timeout = heartbeat_timeout
        self.max_streams = max_streams
        self.keys_dir = Path(keys_dir) if keys_dir else None
        self.ipc_path = ipc_path
        from .engines import available_engines
        self._explicit_engines = bool(engines)
        names = engines or available_engines()
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown engine {unknown[0]!r}; available: {', '.join(REGISTRY)}.")
        self._engine_names = names
        self._warm_up = tuple(warm_up)
        self._warm_up_params = tuple(warm_up_params)
        self.serve = serve or ServeConfig.from_env()
        #: each engine's capabilities, as its worker reported them
        self.capabilities: dict[str, dict[str, Any]] = {}
        self.workers: list[InlineWorker | ThreadedWorker] = []
        self._worker_of: dict[str, InlineWorker | ThreadedWorker] = {}
        self._cold_logged: set[tuple] = set()
        self.sessions: dict[bytes, Session] = {}
        self.streams: dict[int, ServerStream] = {}
        self._names: dict[str, int] = {}
        self._session_numbers = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error_log: dict[tuple[Any, str], list[float | int]] = {}
        self._startup_error: BaseException | None = None
        self._busy: dict[int, Busy] = {}   # id(worker) -> its steps of the last seconds
        #: when each peer last said hello (its hello lines are rate-limited)
        self._hellos: dict[bytes, float] = {}
        #: identities whose connection closed, being probed (-> since when)
        self._suspects: dict[bytes, float] = {}
        self._next_probe = 0.0
        #: each connection's file descriptor -> the identity last heard on it
        self._fd_identity: dict[int, bytes] = {}
        self.endpoint = ""
        self.started_at = time.monotonic()
        #: named presets (daemon/presets.py), read on first use
        self.presets_path = presets_path
        self._presets: PresetStore | None = None
        #: (start, stop) pairs run beside the daemon as clients of it (the OSC bridge):
        #: start(daemon) on a thread of its own once the daemon listens, stop(its result)
        #: before the daemon shuts down
        self._companions: list[tuple[Callable[[Daemon], Any], Callable[[Any], None]]] = []
        self._companion_objects: list[tuple[Callable[[Any], None], Any]] = []

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Daemon:
        """Serve on a background thread (tests, demo); returns once bound."""
        self._thread = threading.Thread(target=self._serve_guarded, name="daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("daemon did not start in time.")
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def add_companion(self, start: Callable[[Daemon], Any], stop: Callable[[Any], None]
                      ) -> None:
        """Run ``start(daemon)`` beside the daemon once it listens (on a thread: it may
        connect as a client and wait for the welcome) and ``stop`` on what it returned when
        the daemon stops.  A companion that fails to start logs one line; the daemon serves
        on."""
        self._companions.append((start, stop))

    def _start_companions(self) -> None:
        def run(start, stop) -> None:
            try:
                self._companion_objects.append((stop, start(self)))
            except Exception as exc:  # noqa: BLE001 - reported; the daemon serves on
                log.error("%s could not start: %s", getattr(start, "__name__", "a companion"),
                          exc)
        for start, stop in self._companions:
            threading.Thread(target=run, args=(start, stop), daemon=True,
                             name="companion").start()

    def _stop_companions(self) -> None:
        while self._companion_objects:
            stop, obj = self._companion_objects.pop()
            try:
                stop(obj)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.warning("a companion did not stop cleanly: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve_forever(self, install_signals: bool = True) -> None:
        if install_signals:
            sigs = [signal.SIGINT, signal.SIGTERM]
            if hasattr(signal, "SIGBREAK"):  # Windows: what CTRL_BREAK_EVENT delivers
                sigs.append(signal.SIGBREAK)
            for sig in sigs:
                signal.signal(sig, lambda signum, frame: self._stop.set())
        self._serve()

    def _serve_guarded(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._ready.set()
            raise

    def _start_workers(self, ctx: zmq.Context) -> None:
        """Engines are built by their workers: cheap ones (passthrough) run on this thread,
        the rest on one engine thread that owns the device."""
        inline = tuple(n for n in self._engine_names if n in INLINE)
        threaded = tuple(n for n in self._engine_names if n not in INLINE)
        self._wake_pull = ctx.socket(zmq.PULL)
        self._wake_pull.setsockopt(zmq.LINGER, 0)
        wake_addr = f"inproc://wake-{id(self)}"
        self._wake_pull.bind(wake_addr)
        self._wake_push = ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.setsockopt(zmq.SNDHWM, 4)
        self._wake_push.connect(wake_addr)
        push = self._wake_push  # used by the engine thread only, once it runs

        def wake() -> None:
            try:
                push.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already queued

        if inline:
            self.workers.append(InlineWorker(EngineWorker(
                inline, self.device, explicit=self._explicit_engines, warm_up=self._warm_up)))
        if threaded:
            self.workers.append(ThreadedWorker(EngineWorker(
                threaded, self.device, explicit=self._explicit_engines,
                warm_up=self._warm_up, warm_up_params=self._warm_up_params,
                gpus=self.gpus), wake))
        for worker in self.workers:
            ready: WorkerReady = worker.start()
            self.capabilities.update(ready.capabilities)
            for name in ready.capabilities:
                self._worker_of[name] = worker
            for key, n, ms in ready.costs:
                self.scheduler.costs.observe(key, n, ms)
        if not self.capabilities:
            raise RuntimeError("no engine could be loaded.")

    def _serve(self) -> None:
        for name in stale_segments():
            try:
                os.unlink(os.path.join("/dev/shm", name))
                log.info("removed frame ring %s left behind by a daemon that died", name)
            except OSError:
                pass
        ctx = zmq.Context()
        self.scheduler = Scheduler(
            lambda engine: int(self.capabilities[engine].get("max_batch", 16)),
            policy=self.serve.policy, utilisation=self.serve.utilisation,
            batch_sizes=lambda engine: self.capabilities[engine].get("batch_sizes"),
            resource=lambda engine: "front" if engine in INLINE else "device")
        try:
            self._start_workers(ctx)
        except BaseException:
            self._stop_workers()
            self._close_wake()
            ctx.destroy(linger=0)
            raise
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # a send to a peer with no connection fails instead of vanishing: how a closed
        # connection's session is told apart from a live one (``_probe_suspects``)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 1000)
        authenticator = None
        try:
            if self.keys_dir is not None:
                from .auth import start_curve_server
                authenticator = start_curve_server(ctx, router, self.keys_dir)
            host = self.host
            if ":" in host:  # IPv6 literal
                router.ipv6 = True
                host = f"[{host}]"
            try:
                if self.port == 0:
                    self.port = router.bind_to_random_port(f"tcp://{host}")
                else:
                    router.bind(f"tcp://{host}:{self.port}")
            except zmq.ZMQError as exc:
                raise OSError(f"cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror}") from None
            self.endpoint = f"tcp://{host}:{self.port}"
            if self.ipc_path:
                router.bind(f"ipc://{self.ipc_path}")
        except BaseException:
            router.close(0)
            if authenticator is not None:
                authenticator.stop()
            self._stop_workers()
            self._close_wake()
            ctx.destroy(linger=0)
            raise
        self._router = router
        log.info("livediffusion daemon %s listening on %s (engines: %s, device: %s, "
                 "scheduler %s, pacing %s)", __version__, self.endpoint,
                 ", ".join(self.capabilities), self.device, self.serve.policy,
                 "on" if self.serve.pacing else "off")
        self._ready.set()
        self._start_companions()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        # ZeroMQ tells the moment a peer's connection closes (a killed client): its
        # session is released at once instead of after the heartbeat timeout
        monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        next_reap = time.monotonic() + 0.25
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._poll_timeout_ms()))
                started = time.monotonic()
                if monitor in events:
                    self._on_disconnects(monitor)
                self._probe_suspects(time.monotonic())
                if router in events:
                    for _ in range(256):  # drain what arrived, newest frames win below
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(parts)
                if self._wake_pull in events:
                    while True:
                        try:
                            self._wake_pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                try:
                    self._pump()
                except Exception:  # noqa: BLE001 - a bug here must not stop every stream
                    log.exception("scheduling failed; continuing with the next round")
                now = time.monotonic()
                if now - started > 0.5:  # an inline engine took long: not client silence
                    self._forgive_stall(now - started)
                if now >= next_reap:
                    self._reap(now)
                    next_reap = now + 0.25
        finally:
            self._stop_companions()
            router.disable_monitor()
            monitor.close(0)
            self._shutdown(router, ctx, authenticator)

    def _on_disconnects(self, monitor: zmq.Socket) -> None:
        """Sessions whose connection closed (the peer died or closed its socket): released
        now; a peer that only went silent is still dropped by the heartbeat rule."""
        from zmq.utils.monitor import recv_monitor_message
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = self._fd_identity.pop(int(event.get("value", -1)), None)
            if identity in self.sessions:
                # a closed descriptor may already serve a new peer: the session is only
                # released once a send to it finds no connection (``_probe_suspects``)
                self._suspects.setdefault(identity, time.monotonic())

    def _probe_suspects(self, now: float) -> None:
        """Peers whose connection closed: a send to an identity with no connection fails
        at once (ROUTER_MANDATORY), which releases its session; one that answers is kept."""
        if not self._suspects or now < self._next_probe:
            return
        self._next_probe = now + 0.02
        for identity, since in list(self._suspects.items()):
            session = self.sessions.get(identity)
            if session is None:
                del self._suspects[identity]
                continue
            try:
                self._router.send_multipart([identity, P.pack({"type": "heartbeat"})],
                                            zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    del self._suspects[identity]
                    log.info("client %s (session %d) disconnected: releasing its %d "
                             "stream(s)", session.client, session.number,
                             len(session.streams))
                    self._end_session(session)
                continue
            if now - since > 1.0:   # still reachable: it was another peer's descriptor
                del self._suspects[identity]

    def _poll_timeout_ms(self) -> int:
        """Sleep until a message, a worker's result, or the next paced frame's time."""
        if any(w.in_flight is None and not w.threaded and
               self.scheduler.has_work(w.engines) for w in self.workers):
            return 0
        wait = 0.02 if self._suspects else 0.1
        now = time.monotonic()
        for stream in self.streams.values():
            due = stream.playout.next_due()
            if due is not None:
                wait = min(wait, due - now)
        return max(0, int(wait * 1000))

    def _pump(self) -> None:
        """Results in, plans out, due frames delivered; repeated while an inline worker
        has more (a passthrough frame goes round in one pass)."""
        for _ in range(64):
            self._collect()
            dispatched = self._dispatch()
            self._deliver(time.monotonic())
            if not dispatched or not any(w.outbox for w in self.workers):
                break

    def _collect(self) -> None:
        for worker in self.workers:
            box = worker.outbox
            while box:
                result = box.popleft()
                try:
                    if isinstance(result, StepResult):
                        worker.in_flight = None
                        self._on_step(result)
                    else:
                        self._on_result(result)
                except Exception:  # noqa: BLE001 - one bad result must not stop the daemon
                    log.exception("could not deliver a result of stream(s) %s",
                                  getattr(result, "stream_id", "?"))

    def _dispatch(self) -> bool:
        """Give every idle worker its next plan; True if any got one."""
        any_plan = False
        for worker in self.workers:
            if worker.in_flight is not None:
                continue
            plan = self.scheduler.next_plan(worker.engines)
            if plan is None:
                continue
            worker.in_flight = plan.step_id
            any_plan = True
            if worker.threaded and not plan.predicted_ms and len(plan.key) >= 3 and \
                    (plan.key, plan.batch_size) not in self._cold_logged:
                self._cold_logged.add((plan.key, plan.batch_size))
                _, width, height = plan.key[:3]
                log.info("first step of %s at %dx%d for %d stream(s): no warm-up covered "
                         "this shape, so on a GPU it compiles kernels now and may take tens "
                         "of seconds (--warm-up %dx%d avoids that)", plan.engine, width,
                         height, plan.batch_size, width, height)
            worker.submit(plan)
        return any_plan

    def _stop_workers(self) -> None:
        for worker in self.workers:
            try:
                worker.stop()
            except Exception:  # noqa: BLE001 - stopping regardless
                log.exception("an engine worker failed to stop cleanly")

    def _close_wake(self) -> None:
        for name in ("_wake_push", "_wake_pull"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)

    def _shutdown(self, router, ctx, authenticator) -> None:
        log.info("shutting down: closing %d stream(s)", len(self.streams))
        try:
            self._stop_workers()  # each closes its streams and releases its device
        finally:
            for stream in list(self.streams.values()):
                self._release(stream)
        router.close(0)
        self._close_wake()
        if authenticator is not None:
            authenticator.stop()
        ctx.term()
        log.info("daemon stopped; all frame rings unlinked")

    # --- sending ------------------------------------------------------------------------

    def _send(self, identity: bytes, msg: dict[str, Any], payload: bytes | None = None) -> None:
        if "re" in msg and msg["re"] is None:
            msg = {k: v for k, v in msg.items() if k != "re"}
        parts = [identity, P.pack(msg)]
        if payload is not None:
            parts.append(payload)
        try:
            self._router.send_multipart(parts, zmq.NOBLOCK, copy=payload is None)
        except zmq.ZMQError:
            pass  # peer gone or its queue full: frames are disposable, errors best effort

    def _reply_error(self, identity: bytes, exc: ProtocolError, rid: Any = None,
                     session: Session | None = None) -> None:
        # keyed by the peer, not the session: a client that says hello again and again
        # gets one line per kind of error every 5 s, not one per session
        self._log_error(identity, exc.code, exc.message,
                        session.client if session else "unknown client")
        # never larger than what it answers: a message that quotes the client is cut short
        reply = P.error(exc.code, clip(exc.message, 1000), re=rid, stream=exc.stream)
        if isinstance(exc, Overloaded):
            reply["sustainable_fps"] = exc.sustainable_fps
        self._send(identity, reply)

    def _log_error(self, key: Any, code: str, message: str, who: str) -> None:
        """One clear line per client and error code, at most every 5 s (then a count); the
        message on one line and cut short (it may quote what the client sent)."""
        message = clip(message.replace("\n", "\\n").replace("\r", "\\r"), 300)
        now = time.monotonic()
        if len(self._error_log) > 4096:   # many peers come and go: forget the oldest
            for old in list(self._error_log)[:1024]:
                del self._error_log[old]
        entry = self._error_log.get((key, code))
        if entry is None or now - entry[0] >= 5.0:
            suppressed = int(entry[1]) if entry else 0
            more = f" ({suppressed} more like it suppressed)" if suppressed else ""
            log.warning("%s: %s: %s%s", who, code, message, more)
            self._error_log[(key, code)] = [now, 0]
        else:
            entry[1] += 1

    # --- receiving ------------------------------------------------------------------------

    def _on_message(self, parts: list[zmq.Frame]) -> None:
        identity = parts[0].bytes
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = time.monotonic()
        try:   # which connection it came on, so that its closing can be told (monitor)
            self._fd_identity[parts[0].get(zmq.SRCFD)] = identity
        except (zmq.ZMQError, AttributeError, TypeError):
            pass
        rid = None
        try:
            if len(parts) not in (2, 3):
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"expected 1 or 2 message parts, got {len(parts) - 1}.")
            if len(parts[1].buffer) > P.MAX_CONTROL_BYTES:   # refused, but answered
                rid = P.request_id(parts[1].bytes)
            msg = P.unpack(parts[1].buffer)
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool):
                rid = None
            mtype = P.validate_client_message(msg)
            payload = parts[2].buffer if len(parts) == 3 else None
            if payload is not None and mtype != "frame":
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    "only frame messages may carry a second (pixel) part.")
            if mtype == "hello":
                self._on_hello(identity, msg, rid)
                return
            if session is None:
                raise ProtocolError(ErrorCode.NO_SESSION,
                                    f"no session: send hello first (the daemon may have restarted "
                                    f"or dropped this client after {self.heartbeat_timeout:g} s "
                                    f"of silence).")
            handler = getattr(self, f"_on_{mtype}")
            handler(session, msg, rid, payload)
        except ProtocolError as exc:
            self._reply_error(identity, exc, rid, session)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the daemon down
            log.exception("internal error handling a message")
            self._send(identity, P.error(ErrorCode.INTERNAL, f"internal daemon error: {exc}",
                                         re=rid))

    def _owned_stream(self, session: Session, msg: dict[str, Any]) -> ServerStream:
        sid = msg["stream"]
        stream = self.streams.get(sid)
        if stream is None or stream.session is not session or stream.state == "closing":
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM,
                                f"stream {sid} is not open in this session.", stream=sid)
        return stream

    def _on_hello(self, identity: bytes, msg: dict[str, Any], rid: Any) -> None:
        token = msg.get("token")
        stale = [s for s in self.sessions.values()
                 if s.identity == identity or (token and s.token == token)]
        for old in stale:
            log.info("client %s reconnected; closing its previous session %d", old.client,
                     old.number)
            self._end_session(old)
        # the client's own name, printable and short (it goes into log lines and errors)
        client = clip(str(msg.get("client", "?")).encode("unicode_escape").decode("ascii"), 64)
        session = Session(next(self._session_numbers), identity, client, token,
                          time.monotonic())
        self.sessions[identity] = session
        last = self._hellos.get(identity, -1e9)
        self._hellos[identity] = time.monotonic()
        if len(self._hellos) > 4096:
            self._hellos.pop(next(iter(self._hellos)))
        # one line per peer every 5 s at most (a client reconnecting in a loop)
        (log.info if time.monotonic() - last >= 5.0 else log.debug)(
            "session %d: hello from %s", session.number, session.client)
        self._send(identity, {
            "type": "welcome", "re": rid, "session": session.number,
            "daemon": __version__, "protocol": P.PROTOCOL_VERSION,
            "heartbeat_interval": min(P.HEARTBEAT_INTERVAL_S, self.heartbeat_timeout / 3),
            "heartbeat_timeout": self.heartbeat_timeout,
            "capabilities": {
                "engines": self.capabilities,
                "formats": list(P.FORMATS), "dtypes": list(P.DTYPES),
                "origins": list(P.ORIGINS),
                "transports": ["shm", "inline"],
                "max_streams": self.max_streams, "max_slots": P.MAX_SLOTS,
                "device": self.device,
            },
        })

    def _on_open(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        name = msg["name"]
        if not name or len(name) > 128:
            raise ProtocolError(ErrorCode.BAD_SPEC, "stream name must be 1 to 128 characters.")
        if name in self._names:
            owner = self.streams[self._names[name]].session
            whose = "this session" if owner is session else f"another client ({owner.client})"
            raise ProtocolError(ErrorCode.STREAM_EXISTS,
                                f"stream {name!r} is already open by {whose}.")
        engine_name = msg.get("engine", "passthrough")
        if engine_name not in self.capabilities:
            raise ProtocolError(ErrorCode.UNKNOWN_ENGINE,
                                f"engine {shown(engine_name, 60)} is not loaded; this daemon "
                                f"has {', '.join(self.capabilities)}.")
        if len(self._names) >= self.max_streams:
            raise ProtocolError(ErrorCode.LIMIT,
                                f"the daemon already serves {self.max_streams} streams.")
        transport = msg.get("transport", "shm")
        if transport not in ("shm", "inline"):
            raise ProtocolError(ErrorCode.BAD_SPEC, "transport must be 'shm' or 'inline'.")
        in_spec = FrameSpec.from_msg(msg)
        out_msg = msg.get("output") or {}
        out_spec = FrameSpec.from_msg(out_msg, default=in_spec)
        if transport == "inline":
            out_spec = dataclasses.replace(out_spec, stride=0)  # inline pixels are tight rows
        fps = float(msg.get("fps", 30.0))
        if not 0 < fps <= 1000:
            raise ProtocolError(ErrorCode.BAD_SPEC, f"fps {fps} is outside (0, 1000].")
        caps = self.capabilities[engine_name]
        self._check_size_for(engine_name, caps, in_spec)   # before anything is allocated
        per_step = int(caps.get("frames_per_step", 1))
        most = max(per_step, int(caps.get("first_step_frames", per_step)))
        slots = msg.get("slots", DEFAULT_SLOTS)
        if not 1 <= slots <= P.MAX_SLOTS:
            raise ProtocolError(ErrorCode.BAD_SPEC, f"slots must be 1..{P.MAX_SLOTS}.")
        if transport == "shm":
            self._check_shared_memory(session, engine_name, in_spec, out_spec,
                                      min(P.MAX_SLOTS, max(slots, most + 3)),
                                      min(P.MAX_SLOTS, max(slots, most + 2)))
        min_fps = msg.get("min_fps")
        explicit_min = min_fps is not None
        if min_fps is None:
            min_fps = fps * self.serve.min_fps_share
        elif not 0 <= min_fps <= fps:
            raise ProtocolError(ErrorCode.BAD_SPEC,
                                f"min_fps {min_fps} must be from 0 to the stream's fps ({fps:g}).")
        # pacing by default only where an engine's step emits several frames (the video
        # engine's chunks): for one-frame engines it only turns step jitter into delay
        # (measured: a paced passthrough round trip took the worst recent lag, 0.8-15 ms
        # instead of 0.3-3 ms)
        paced = msg.get("paced", per_step > 1)  # a non-bool was refused by the schema
        key = batch_key(engine_name, in_spec.width, in_spec.height, caps,
                        dict(msg.get("params") or {}))
        try:
            serve_fps = self.scheduler.admit(engine_name, key, fps, float(min_fps),
                                             steady_frames=per_step, explicit=explicit_min)
        except Refused as exc:
            raise Overloaded(str(exc), exc.sustainable_fps) from None
        # The engine may hold a whole chunk of input slots while the client keeps writing.
        slots_in = min(P.MAX_SLOTS, max(slots, most + 3))
        sid = next(self._stream_ids)
        ring_in = ring_out = None
        if transport == "shm":
            try:
                ring_in = FrameRing.create(slots_in, in_spec.nbytes, tag="i")
                # a chunked engine's frames are paced out one by one; unpaced, a whole
                # chunk is published at once: room for it and 2 more
                ring_out = FrameRing.create(min(P.MAX_SLOTS, max(slots, most + 2)),
                                            out_spec.nbytes, tag="o")
            except OSError as exc:
                if ring_in is not None:
                    ring_in.close()
                raise ProtocolError(ErrorCode.OUT_OF_MEMORY,
                                    f"cannot create shared memory for the stream: {exc}") from None
        stream = ServerStream(sid, name, session, engine_name, in_spec, out_spec, fps, transport,
                              ring_in, ring_out, worker=self._worker_of[engine_name])
        stream.playout.paced = paced and self.serve.pacing
        self.streams[sid] = stream
        self._names[name] = sid
        session.streams.add(sid)
        self.scheduler.add_stream(sid, engine_name, most, key=key, fps=fps,
                                  min_fps=float(min_fps), steady_frames=per_step)
        if serve_fps < fps * 0.999:
            log.info("stream %r accepted at %.1f of its %g FPS (the device is shared)", name,
                     serve_fps, fps)
        stream.worker.submit(OpenStream((session.identity, rid), sid, engine_name, in_spec,
                                        out_spec, fps, dict(msg.get("params") or {}),
                                        ring_in.name if ring_in is not None else None,
                                        paced=stream.playout.paced))

    @staticmethod
    def _check_size_for(engine: str, caps: dict[str, Any], spec: FrameSpec) -> None:
        """The frame sizes the engine declares (``capabilities.sizes``), checked with the
        engines' own rule before its rings are made: a refused open costs no shared
        memory."""
        sizes = caps.get("sizes")
        if not sizes:
            return
        try:
            check_size(engine, spec, int(sizes["min"]), int(sizes["max"]),
                       int(sizes["multiple"]))
        except ParamError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc)) from None

    def _check_shared_memory(self, session: Session, engine: str, in_spec: FrameSpec,
                             out_spec: FrameSpec, slots_in: int, slots_out: int) -> None:
        """Caps on the shared memory one open may add: per client and in all."""
        want = slots_in * in_spec.nbytes + slots_out * out_spec.nbytes
        mine = sum(self._ring_bytes(self.streams[sid]) for sid in session.streams
                   if sid in self.streams)
        every = sum(self._ring_bytes(s) for s in self.streams.values())
        for used, cap, whose in ((mine, SHM_PER_CLIENT, "this client's"),
                                 (every, SHM_TOTAL, "the daemon's")):
            if used + want > cap:
                raise ProtocolError(ErrorCode.LIMIT,
                                    f"this stream's frame rings need {want / 2**20:.0f} MiB of "
                                    f"shared memory, and {whose} streams already hold "
                                    f"{used / 2**20:.0f} MiB of the {cap / 2**30:g} GiB allowed; "
                                    f"use smaller frames, fewer slots or the inline transport.")

    @staticmethod
    def _ring_bytes(stream: ServerStream) -> int:
        return sum(r.slots * r.capacity for r in (stream.ring_in, stream.ring_out)
                   if r is not None)

    def _on_params(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        stream = self._owned_stream(session, msg)
        self._change(stream, (session.identity, rid), self._changes(stream, msg),
                     self._transition(stream, msg))

    def _change(self, stream: ServerStream, request: tuple[bytes, Any],
                changes: dict[str, Any], transition: Any) -> None:
        """Apply a parameter change now, or, while one is being applied, keep it to merge
        into the next (bounded: a flood never queues without end)."""
        if stream.changing:
            if len(stream.waiting) >= MAX_WAITING_CHANGES:
                raise ProtocolError(ErrorCode.LIMIT, f"{MAX_WAITING_CHANGES} parameter "
                                    f"changes of this stream are already waiting; send "
                                    f"fewer (they are merged, the newest value wins).",
                                    stream=stream.id)
            stream.waiting.append((request, changes, transition))
            return
        self._submit_changes(stream, [(request, changes, transition)])

    def _submit_changes(self, stream: ServerStream, parts) -> None:
        merged: dict[str, Any] = {}
        for _, changes, _ in parts:
            merged.update(changes)
        stream.changing = True
        stream.worker.submit(UpdateParams(ChangeBatch([r for r, _, _ in parts], parts),
                                          stream.id, merged, parts[-1][2]))

    def _changed(self, stream: ServerStream, result: CommandResult) -> None:
        """A coalesced change's answer: to each request it carried; then the next change
        (those refused together are retried one by one)."""
        batch: ChangeBatch = result.request
        if result.kind == "error" and len(batch.parts) > 1:
            stream.singles = batch.parts + stream.singles
        else:
            for request in batch.requests:
                self._answer_change(stream, result, request)
        stream.changing = False
        if stream.state != "open":   # closing: the changes still waiting are answered
            for request, _, _ in stream.singles + stream.waiting:
                self._reply_error(request[0], ProtocolError(
                    ErrorCode.UNKNOWN_STREAM, f"stream {stream.id} closed before this "
                    f"change was applied.", stream=stream.id), request[1])
            stream.singles, stream.waiting = [], []
            return
        if stream.singles:
            self._submit_changes(stream, [stream.singles.pop(0)])
        elif stream.waiting:
            parts, stream.waiting = stream.waiting, []
            self._submit_changes(stream, parts)

    @staticmethod
    def _transition(stream: ServerStream, msg: dict[str, Any]) -> tuple[float, str, str] | None:
        """A params/control message's ``transition`` (None: none, or 0 seconds)."""
        if "transition" not in msg:
            return None
        try:
            spec = parse_transition(msg["transition"])
        except ParamError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc), stream=stream.id) from None
        return spec if spec[0] > 0 else None

    def _changes(self, stream: ServerStream, msg: dict[str, Any]) -> dict[str, Any]:
        """A params/control message's changes: its ``params`` over the named preset's
        parameters that the stream's engine declares."""
        params = dict(msg.get("params") or {})
        if "preset" not in msg:
            if "params" not in msg:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "give params, a preset, or both.")
            return params
        try:
            saved = self.presets.get(msg["preset"])
        except PresetError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc), stream=stream.id) from None
        kept, _ = for_engine(saved, self.capabilities.get(stream.engine, {}).get("schema"))
        if not kept and not params:
            raise ProtocolError(ErrorCode.BAD_PARAMS,
                                f"preset {msg['preset']!r:.70} sets none of the parameters "
                                f"{stream.engine} has.", stream=stream.id)
        return {**kept, **params}

    @property
    def presets(self) -> PresetStore:
        if self._presets is None:
            self._presets = PresetStore(self.presets_path)
        return self._presets

    def _on_presets(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        op = msg["op"]
        try:
            if op == "save":
                params = msg.get("params")
                engine = ""
                if "from" in msg:
                    source = self._named_stream(msg["from"])
                    params = {**source.params, **(params or {})}
                    engine = source.engine
                self.presets.save(msg.get("name"), params, engine=engine)
            elif op == "delete":
                self.presets.delete(msg.get("name"))
            elif op != "list":
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"presets op must be list, save or delete, not {op!r:.40}.")
        except PresetError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc)) from None
        except OSError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, f"presets could not be saved: {exc}") \
                from None
        self._send(session.identity, {"type": "presets", "re": rid,
                                      "presets": self.presets.list()})

    def _on_control(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        """Parameters for a stream named by any session (a controller beside the tool that
        owns the stream); the answer goes to the asker."""
        stream = self._named_stream(msg["name"])
        self._change(stream, (session.identity, rid), self._changes(stream, msg),
                     self._transition(stream, msg))

    def _on_cues(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        """A stream's cue list: the session's own (``stream``) or any by ``name``.  Each
        cue's preset is resolved here, its params winning, as in ``control``."""
        if "stream" in msg:
            stream = self._owned_stream(session, msg)
        elif "name" in msg:
            stream = self._named_stream(msg["name"])
        else:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "cues needs a stream or a name.")
        cues = msg.get("cues")
        if msg["op"] == "play":
            if not isinstance(cues, list) or not cues:
                raise ProtocolError(ErrorCode.BAD_PARAMS, "play needs a list of cues.",
                                    stream=stream.id)
            if len(cues) > MAX_CUES:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"a cue list holds at most "
                                    f"{MAX_CUES} cues, not {len(cues)}.", stream=stream.id)
            resolved = []
            for i, cue in enumerate(cues):
                if isinstance(cue, dict) and "preset" in cue:
                    cue = {**cue, "params": self._changes(stream, cue)}
                elif isinstance(cue, dict) and not isinstance(cue.get("params", {}), dict):
                    raise ProtocolError(ErrorCode.BAD_PARAMS, f"cue {i}'s params must be a "
                                        f"map.", stream=stream.id)
                resolved.append(cue)
            cues = resolved
        stream.worker.submit(CueCommand((session.identity, rid), stream.id, msg["op"], cues,
                                        bool(msg.get("loop", False)),
                                        int(msg.get("index", 0))))

    def _named_stream(self, name: str) -> ServerStream:
        sid = self._names.get(name)
        stream = self.streams.get(sid) if sid is not None else None
        if stream is None or stream.state != "open":
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM,
                                f"no open stream is named {shown(name, 70)}.")
        return stream

    def _on_frame(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        stream = self._owned_stream(session, msg)
        if stream.state != "open":
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM,
                                f"stream {stream.id} is still opening.", stream=stream.id)
        seq = msg["seq"]
        if seq <= 0:
            raise ProtocolError(ErrorCode.BAD_FRAME, "frame seq must be positive.",
                                stream=stream.id)
        ts = msg.get("ts", 0)
        if stream.transport == "inline":
            if payload is None:
                raise ProtocolError(ErrorCode.BAD_FRAME,
                                    "inline stream: the frame message needs a pixel part.",
                                    stream=stream.id)
            ref = FrameRef(seq, ts, data=payload,
                           stride=msg.get("stride", stream.input.row_stride))
        else:
            slot = msg.get("slot")
            assert stream.ring_in is not None
            if slot is None or not 0 <= slot < stream.ring_in.slots:
                raise ProtocolError(ErrorCode.BAD_FRAME,
                                    f"slot {slot} is outside 0..{stream.ring_in.slots - 1}.",
                                    stream=stream.id)
            if payload is not None:
                raise ProtocolError(ErrorCode.BAD_FRAME,
                                    "shared-memory stream: pixels go in the ring, not the message.",
                                    stream=stream.id)
            ref = FrameRef(seq, ts, slot=slot)
        stream.notices_in += 1
        self.scheduler.offer(stream.id, ref)
        if ref.slot is not None:  # frames queued before the rate fell are copied too
            for held in self.scheduler.held_long(stream.id):
                if held.slot is not None:
                    self._copy_out(stream, held)

    def _copy_out(self, stream: ServerStream, ref: FrameRef) -> None:
        """Take a queued frame out of its input slot (a copy, about 0.1 ms at 832x480): a
        stream served at a fraction of its rate keeps frames longer than the ring keeps them.
        A torn or odd slot is left for the worker, which counts and reports it."""
        assert stream.ring_in is not None and ref.slot is not None
        try:
            hdr, pixels = stream.ring_in.read(ref.slot, ref.seq)
        except RingError:
            return
        spec = stream.input
        if not hdr.spec.same_picture(spec):
            return
        ref.data = pixels.reshape(-1).view(np.uint8).data
        ref.stride = spec.row_bytes
        ref.ts = hdr.ts
        ref.slot = None

    def _on_stats(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        ids = [self._owned_stream(session, msg).id] if "stream" in msg else sorted(session.streams)
        self._send(session.identity, {"type": "stats", "re": rid,
                                      "streams": {str(i): self.stream_stats(i) for i in ids
                                                  if i in self.streams},
                                      "uptime_s": round(time.monotonic() - self.started_at, 1),
                                      **self.device_stats()})

    def _on_streams(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        """Every open stream, whoever opened it (controllers address them by name)."""
        self._send(session.identity, {
            "type": "streams", "re": rid,
            "streams": [{"name": s.name, "engine": s.engine, "params": s.params,
                         "stats": self.stream_stats(s.id)}
                        for s in self.streams.values() if s.state == "open"],
            **self.device_stats()})

    def _on_thumbnail(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        """The newest output of a stream (by name) as a small RGB picture, for a control
        page; asking keeps thumbnails coming for 5 s."""
        stream = self._named_stream(msg["name"])
        width = msg.get("width", 160)
        if not 8 <= width <= THUMB_MAX:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"a thumbnail is 8 to {THUMB_MAX} "
                                f"pixels wide, not {width}.", stream=stream.id)
        stream.thumb_wanted = time.monotonic() + 5.0
        stream.thumb_width = width
        reply: dict[str, Any] = {"type": "thumbnail", "re": rid, "name": stream.name,
                                 "out_seq": stream.out_seq}
        if stream.thumb is not None:
            w, h, data = stream.thumb
            reply.update(width=w, height=h, format="rgb", pixels=data)
        self._send(session.identity, reply)

    def _on_heartbeat(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        self._send(session.identity, {"type": "heartbeat", "re": rid})

    def _on_close(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        self._begin_close(self._owned_stream(session, msg), (session.identity, rid))

    def _on_bye(self, session: Session, msg: dict[str, Any], rid: Any, payload) -> None:
        log.info("session %d (%s) said goodbye", session.number, session.client)
        self._end_session(session)

    # --- streams and sessions -------------------------------------------------------------

    def stream_stats(self, sid: int) -> dict[str, Any]:
        stream = self.streams[sid]
        age = max(time.monotonic() - stream.opened_at, 1e-6)
        sched = self.scheduler.info(sid) or stream.final
        return {
            "name": stream.name, "engine": stream.engine, "state": stream.state,
            "frames_in": stream.frames_in, "frames_out": stream.frames_out,
            "notices_in": stream.notices_in, "dropped": sched.get("dropped", 0),
            "torn": stream.torn, "bad_frames": stream.bad_frames,
            "engine_ms": round(stream.engine_ms, 3),
            "fps_out": round(stream.frames_out / age, 2),
            # serving: the rate the scheduler gives the stream, frames skipped to keep it,
            # frames that were ready after their paced time, the playout delay
            "serve_fps": sched.get("serve_fps", 0.0), "input_fps": sched.get("input_fps", 0.0),
            "decimated": sched.get("decimated", 0), "late": stream.playout.late,
            "delay_ms": round(stream.playout.delay * 1000.0, 1),
            "paced": stream.playout.paced,
            "transition": stream.transition, "cues": stream.cues,
            # in the daemon, from an input frame's arrival to its output's publication
            "latency_p50_ms": round(stream.latency.percentile(50), 1),
            "latency_p99_ms": round(stream.latency.percentile(99), 1),
            "batch": round(stream.batches.mean(), 2),
        }

    def device_stats(self) -> dict[str, Any]:
        """Per worker: its engines, device and busy share of the last 5 s; per GPU: memory
        and utilisation."""
        now = time.monotonic()
        workers = []
        for worker in self.workers:
            busy = self._busy.get(id(worker))
            workers.append({"engines": list(worker.engines),
                            "device": "cpu" if not worker.threaded else str(self.device),
                            "busy": busy.share(now) if busy else 0.0})
        return {"workers": workers, "gpus": gpu_stats()}

    def _begin_close(self, stream: ServerStream, request: Any) -> None:
        stream.state = "closing"
        self._names.pop(stream.name, None)
        stream.final = self.scheduler.info(stream.id)
        self.scheduler.remove_stream(stream.id)
        stream.playout.clear()
        stream.worker.submit(CloseStream(request, stream.id))

    def _release(self, stream: ServerStream) -> None:
        for ring in (stream.ring_in, stream.ring_out):
            if ring is not None:
                ring.close()
        self.streams.pop(stream.id, None)
        stream.session.streams.discard(stream.id)

    def _end_session(self, session: Session) -> None:
        # (its error-log entries stay: a client that comes back at once is still limited)
        for sid in list(session.streams):
            stream = self.streams.get(sid)
            if stream is not None and stream.state != "closing":
                self._begin_close(stream, None)
        self.sessions.pop(session.identity, None)

    def _forgive_stall(self, seconds: float) -> None:
        """Nobody could be heard while the engine worked: do not count that as silence."""
        for session in self.sessions.values():
            session.last_seen += seconds

    def _reap(self, now: float) -> None:
        for session in list(self.sessions.values()):
            silent = now - session.last_seen
            if silent > self.heartbeat_timeout:
                log.warning("client %s (session %d) silent for %.1f s: dropping it and its %d "
                            "stream(s)", session.client, session.number, silent,
                            len(session.streams))
                self._end_session(session)

    def _on_step(self, result: StepResult) -> None:
        self.scheduler.update_from_result(result)
        now = time.monotonic()
        worker = self._worker_of.get(result.engine)
        if worker is not None and result.batch_size:
            self._busy.setdefault(id(worker), Busy()).add(result.started, result.elapsed_ms)
        for report in result.reports:
            stream = self.streams.get(report.stream_id)
            if stream is None or stream.state == "closing":
                continue
            stream.frames_in += report.frames_in
            stream.torn += report.torn
            stream.bad_frames += report.bad_frames
            if report.frames_in:
                stream.batches.add(result.batch_size)
                ms = result.elapsed_ms
                stream.engine_ms = ms if stream.engine_ms == 0 else \
                    0.9 * stream.engine_ms + 0.1 * ms
            for frame in report.frames:
                stream.playout.push(frame, now)
            for code, message in report.errors:
                self._stream_error(stream, code, message, None)

    def _deliver(self, now: float) -> None:
        """Write every frame whose paced time has come to its ring and announce it."""
        for stream in list(self.streams.values()):
            if stream.playout.next_due() is None:
                continue
            frames = stream.playout.due(now)
            if not frames or stream.state != "open":
                continue
            alive = self.sessions.get(stream.session.identity) is stream.session
            for frame in frames:
                self._publish(stream, frame, alive)

    def _publish(self, stream: ServerStream, frame, alive: bool) -> None:
        stream.out_seq += 1
        seq = stream.out_seq
        body = {"type": "frame", "stream": stream.id, "seq": seq, "in_seq": frame.in_seq,
                "ts": frame.ts}
        if frame.borrowed and stream.ring_in is not None:
            try:   # the pixels are still a view of the input ring: it must be whole
                stream.ring_in.check_size()
            except RingError as exc:
                self._stream_error(stream, ErrorCode.BAD_FRAME, str(exc), None)
                self._begin_close(stream, None)
                return
        if stream.ring_out is None:
            payload = np.ascontiguousarray(frame.pixels).tobytes()
            if not self._intact(stream, frame):
                return
            stream.frames_out += 1
            self._published(stream, frame)
            if alive:
                self._send(stream.session.identity, body, payload)
            return
        ring = stream.ring_out
        slot = seq % ring.slots
        try:
            view = ring.begin_write(slot, seq, stream.output, ts=frame.ts,
                                    ref_seq=frame.in_seq, t_write_ns=time.monotonic_ns())
            np.copyto(view, frame.pixels)
            del view
            if not self._intact(stream, frame):
                ring.abandon_write(slot)
                return
            ring.end_write(slot, seq)
        except RingError as exc:   # the client shrank its output ring: its stream ends here
            self._stream_error(stream, ErrorCode.BAD_FRAME, str(exc), None)
            self._begin_close(stream, None)
            return
        stream.frames_out += 1
        self._published(stream, frame)
        if alive:
            self._send(stream.session.identity, {**body, "slot": slot})

    def _published(self, stream: ServerStream, frame) -> None:
        """Telemetry of a frame out: its latency in the daemon, and a thumbnail while the
        control page looks."""
        now = time.monotonic()
        stream.latency.add((now - frame.arrived) * 1000.0)
        if now < stream.thumb_wanted and now - stream.thumb_at >= 0.2:
            stream.thumb_at = now
            try:
                stream.thumb = thumbnail(frame.pixels, stream.output, stream.thumb_width)
            except Exception as exc:  # noqa: BLE001 - a thumbnail never costs a frame
                log.warning("stream %d: no thumbnail: %s", stream.id, exc)
                stream.thumb_wanted = 0.0

    @staticmethod
    def _intact(stream: ServerStream, frame) -> bool:
        """A frame that is still a view of its input slots must not have been overwritten
        while it was copied out; if it was, it is withdrawn (``torn``) and its seq reused."""
        if not frame.borrowed or stream.ring_in is None:
            return True
        try:
            if all(stream.ring_in.is_intact(slot, seq) for slot, seq in frame.borrowed):
                return True
        except RingError:
            pass   # shrunk under us: the frame is withdrawn like a torn one
        stream.torn += 1
        stream.out_seq -= 1
        return False

    def _stream_error(self, stream: ServerStream, code: str, message: str, request) -> None:
        identity, rid = request if request else (stream.session.identity, None)
        alive = self.sessions.get(stream.session.identity) is stream.session
        refused = stream.state == "opening"
        if refused:
            # The engine refused the stream: release it as if it had never existed.
            self._begin_close(stream, None)
        self._log_error(stream.session.identity, code, f"stream {stream.name!r}: {message}",
                        stream.session.client)
        if alive:
            self._send(identity, P.error(code, clip(message, 1000), re=rid,
                                         stream=None if refused else stream.id))

    def _on_result(self, result: CommandResult) -> None:
        stream = self.streams.get(result.stream_id)
        if stream is None:
            return
        if isinstance(result.request, ChangeBatch):
            self._changed(stream, result)
            return
        self._answer_change(stream, result, result.request)

    def _answer_change(self, stream: ServerStream, result: CommandResult, request) -> None:
        """Book a worker's answer and send it to ``request`` (None: the stream's owner)."""
        identity, rid = request if request else (stream.session.identity, None)
        if result.kind == "opened":
            if stream.state == "closing":
                return
            stream.state = "open"
            stream.params = dict(result.body.get("params", {}))
            per_step = int(result.body.get("frames_per_step", 1))
            self.scheduler.set_frames_per_step(stream.id, per_step)
            serve = self.scheduler.info(stream.id).get("serve_fps", stream.fps)
            reply = {"type": "opened", "re": rid, "stream": stream.id, "name": stream.name,
                     "engine": stream.engine, "transport": stream.transport,
                     "input": stream.input.to_msg(), "output": stream.output.to_msg(),
                     "params": result.body.get("params", {}),
                     "frames_per_step": per_step,
                     "serve_fps": serve, "paced": stream.playout.paced}
            if stream.ring_in is not None and stream.ring_out is not None:
                reply["ring_in"] = {"name": stream.ring_in.name, "slots": stream.ring_in.slots,
                                    "capacity": stream.ring_in.capacity}
                reply["ring_out"] = {"name": stream.ring_out.name,
                                     "slots": stream.ring_out.slots,
                                     "capacity": stream.ring_out.capacity}
            log.info("stream %d %r opened: %dx%d %s %s -> %dx%d %s %s, engine %s, %s",
                     stream.id, stream.name, stream.input.width, stream.input.height,
                     stream.input.format, stream.input.dtype, stream.output.width,
                     stream.output.height, stream.output.format, stream.output.dtype,
                     stream.engine, stream.transport)
            self._send(identity, reply)
        elif result.kind in ("params_ok", "cues"):
            stream.params = dict(result.body.get("params", stream.params))
            stream.transition = result.body.get("transition")
            stream.cues = result.body.get("cues")
            if "frames_per_step" in result.body:
                self.scheduler.set_frames_per_step(stream.id, result.body["frames_per_step"])
            # a change of steps or decoder changes what the stream's steps cost
            self.scheduler.set_key(stream.id, batch_key(
                stream.engine, stream.input.width, stream.input.height,
                self.capabilities[stream.engine], result.body.get("params")))
            if result.body.get("quiet"):
                return  # a transition moving: booked, nobody asked
            reply = {"type": result.kind, "re": rid, "stream": stream.id,
                     "params": result.body.get("params", {})}
            for key in ("transition", "target", "cues"):
                if result.body.get(key) is not None:
                    reply[key] = result.body[key]
            self._send(identity, reply)
        elif result.kind == "closed":
            self._release(stream)
            log.info("stream %d %r closed; memory released", stream.id, stream.name)
            if request:
                self._send(identity, {"type": "closed", "re": rid, "stream": stream.id})
        elif result.kind == "error":
            self._stream_error(stream, result.body["code"], result.body["message"], request)


class Overloaded(ProtocolError):
    """Admission refused; the reply carries the rate the stream could have."""

    def __init__(self, message: str, sustainable_fps: float) -> None:
        super().__init__(ErrorCode.OVERLOADED, message)
        self.sustainable_fps = sustainable_fps


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
