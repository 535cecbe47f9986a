"""The client library: talk to a livediffusion daemon from any Python host.

Imports only the standard library, pyzmq, msgpack and numpy, so it installs into
TouchDesigner's and OBS's Python.  Everything is driven from the caller's thread:
``Stream.send`` and ``Stream.latest`` never block (they poll the socket with timeout 0),
so they are safe to call from TouchDesigner's main thread every frame.  Heartbeats and
automatic reconnection (the daemon restarted, or dropped this client) happen inside
those calls.

    with Client() as client:
        stream = client.open_stream("cam", 512, 512)
        stream.send(frame)            # never blocks
        out = stream.latest()         # newest processed frame or None
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import zmq

from . import protocol as P
from .protocol import ErrorCode, FrameSpec
from .ring import FrameRing, RingError, TornRead

log = logging.getLogger("livediffusion.client")

_POOL = 3  # output buffers per stream: a returned frame stays valid until 2 newer arrive


class DaemonError(Exception):
    """The daemon answered a request with an ERROR message."""

    def __init__(self, code: str, message: str, sustainable_fps: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: with code "overloaded": the rate the daemon could serve the stream at now
        self.sustainable_fps = sustainable_fps


@dataclass
class Frame:
    """One processed frame received from the daemon.

    With a zero-copy stream, ``pixels`` is a read-only view into the daemon's output ring:
    use (or copy) it right away and check ``intact()`` afterwards; the daemon reuses the slot
    once it has written ``slots - 1`` newer frames.
    """

    pixels: np.ndarray
    seq: int
    in_seq: int
    latency_ms: float
    received: float = field(default_factory=time.monotonic)
    _ring: FrameRing | None = field(default=None, repr=False)
    _slot: int = field(default=-1, repr=False)

    def intact(self) -> bool:
        """False if the daemon has overwritten a zero-copy frame's slot since it arrived."""
        if self._ring is None:
            return True
        return not self._ring.closed and self._ring.is_intact(self._slot, self.seq)


def _is_local(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class _Latency:
    """Recent round-trip latencies (ms) for p50/p99 readouts."""

    def __init__(self, size: int = 240) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self.values.append(ms)

    def percentile(self, q: float) -> float:
        if not self.values:
            return 0.0
        return float(np.percentile(np.fromiter(self.values, float), q))


class Stream:
    """One stream of frames in and processed frames out.  Create with ``Client.open_stream``."""

    def __init__(self, client: Client, name: str, spec: FrameSpec, *, fps: float, engine: str,
                 params: dict[str, Any], output: dict[str, Any] | None, slots: int,
                 zero_copy: bool = False) -> None:
        self.client = client
        self.name = name
        self.spec = spec
        self.fps = fps
        self.engine = engine
        self.params = dict(params)
        self.output_request = dict(output or {})
        self.slots = slots
        self.zero_copy = zero_copy
        self.paced: bool | None = None   # None: the daemon's default (paced)
        self.min_fps: float | None = None
        self.serve_fps: float | None = None  # the rate the daemon serves it at (OPENED)
        self.frames_per_step = 1  # input frames the engine consumes per step (from OPENED)
        self.id: int | None = None
        self.state = "opening"  # opening -> open -> closed | failed
        self.output_spec: FrameSpec | None = None
        self.last_error: DaemonError | None = None
        self._ring_in: FrameRing | None = None
        self._ring_out: FrameRing | None = None
        self._seq = 0
        self._pending: deque[tuple[dict[str, Any], Any]] = deque()
        self.keep = 0
        self._kept: deque[Frame] = deque()
        self._latest: Frame | None = None
        self._delivered_seq = 0
        self._pool: list[np.ndarray] = []
        self._pool_i = 0
        self._fps_marks: deque[float] = deque(maxlen=60)
        self.latency = _Latency()
        self.counters = {"sent": 0, "not_sent": 0, "received": 0, "skipped": 0, "torn": 0,
                         "errors": 0, "reopened": 0}

    # --- public ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "open"

    def send(self, frame: np.ndarray) -> bool:
        """Hand the daemon a frame without blocking; False if it was not sent (not open yet,
        reconnecting, or the daemon's queue is full).  The frame must match the stream's
        width, height, channels and dtype."""
        self.client.poll(0)
        spec = self.spec
        if frame.shape != spec.shape or frame.dtype != spec.np_dtype:
            raise ValueError(f"stream {self.name!r} takes {spec.shape} {spec.dtype} frames, "
                             f"got {frame.shape} {frame.dtype}.")
        if self.state != "open" or self.id is None:
            self.counters["not_sent"] += 1
            return False
        seq = self._seq + 1
        ts = time.perf_counter_ns()
        msg = {"type": "frame", "stream": self.id, "seq": seq, "ts": ts}
        if self._ring_in is not None:
            slot = seq % self._ring_in.slots
            try:
                self._ring_in.write(slot, seq, frame, spec, ts=ts,
                                    t_write_ns=time.monotonic_ns())
            except (RingError, ValueError) as exc:  # the ring vanished under us
                self.counters["not_sent"] += 1
                self.client._lost(f"frame ring unusable: {exc}")
                return False
            msg["slot"] = slot
            sent = self.client._send(msg)
        else:
            sent = self.client._send(msg, np.ascontiguousarray(frame).tobytes())
        if sent:
            self._seq = seq
            self.counters["sent"] += 1
        else:
            self.counters["not_sent"] += 1
        return sent

    def latest(self) -> Frame | None:
        """The newest processed frame received so far (None before the first), without
        blocking.  Its pixels stay valid until two newer frames have arrived."""
        self.client.poll(0)
        return self._latest

    def new_frame(self) -> Frame | None:
        """Like ``latest`` but only a frame that ``new_frame``/``wait`` did not return yet."""
        frame = self.latest()
        if frame is None or frame.seq == self._delivered_seq:
            return None
        self._delivered_seq = frame.seq
        return frame

    def frames(self) -> list[Frame]:
        """With ``keep`` > 0: every frame received since the last call (at most ``keep``),
        oldest first; for recording or encoding every output frame rather than showing
        the newest.  Pixels follow the same validity rule as ``latest``."""
        self.client.poll(0)
        out = list(self._kept)
        self._kept.clear()
        if out:
            self._delivered_seq = out[-1].seq
        return out

    def wait(self, timeout: float = 5.0) -> Frame | None:
        """Block up to ``timeout`` seconds for a frame that ``new_frame``/``wait`` did not
        return yet (it may have arrived before the call)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.new_frame()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.client.poll(min(left, 0.05))

    def wait_open(self, timeout: float = 10.0) -> Stream:
        """Block until the daemon has opened the stream; raises DaemonError on refusal."""
        deadline = time.monotonic() + timeout
        while self.state == "opening":
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"stream {self.name!r} was not opened within {timeout} s.")
            self.client.poll(min(left, 0.05))
        if self.state == "failed" and self.last_error is not None:
            raise self.last_error
        return self

    def update(self, params: dict[str, Any] | None = None, *, wait: float = 0.0,
               preset: str | None = None, transition: float | dict[str, Any] | None = None,
               **kwargs: Any) -> dict[str, Any] | None:
        """Change parameters live; ``preset``: recall a preset saved in the daemon too (the
        explicit parameters win); ``transition``: move there over that many seconds (or a
        map {"seconds", "curve": "linear"|"smooth", "blend": "linear"|"slerp"}) instead of
        at once.  With ``wait`` > 0, block for the daemon's answer and return the effective
        parameters (raises DaemonError if refused)."""
        change = {**(params or {}), **kwargs}
        self.params.update(change)
        if self.state != "open" or self.id is None:
            return None  # applied when the stream (re)opens
        msg: dict[str, Any] = {"type": "params", "stream": self.id, "params": change}
        if preset is not None:
            msg["preset"] = preset
        if transition is not None:
            msg["transition"] = transition
        if wait <= 0:
            self.client._send(msg)
            return None
        effective = self.client._request(msg, wait).get("params")
        if preset is not None and effective:   # what the preset set, kept for a reopen
            self.params.update(effective)
        return effective

    @property
    def ring_name(self) -> str | None:
        """The shared-memory segment this stream's input frames go through (None: inline,
        or not open)."""
        return self._ring_in.name if self._ring_in is not None else None

    def stats(self) -> dict[str, Any]:
        """Client-side counters, output FPS and round-trip latency."""
        marks = self._fps_marks
        fps = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 and \
            marks[-1] > marks[0] else 0.0
        return {"state": self.state, **self.counters, "fps_out": round(fps, 2),
                "latency_p50_ms": round(self.latency.percentile(50), 3),
                "latency_p99_ms": round(self.latency.percentile(99), 3)}

    def close(self, timeout: float = 2.0) -> None:
        if self.state in ("closed", "failed"):
            return
        if self.state == "open" and self.id is not None and self.client.connected:
            try:
                self.client._request({"type": "close", "stream": self.id}, timeout)
            except (DaemonError, TimeoutError):
                pass
        self.state = "closed"
        self._detach()
        self.client._streams.pop(self.name, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- driven by the client ----------------------------------------------------------------

    def _open_message(self) -> dict[str, Any]:
        msg = {"type": "open", "name": self.name, **self.spec.to_msg(), "fps": self.fps,
               "engine": self.engine, "params": self.params, "slots": self.slots,
               "transport": self.client.transport}
        if self.output_request:
            msg["output"] = self.output_request
        if self.paced is not None:
            msg["paced"] = self.paced
        if self.min_fps is not None:
            msg["min_fps"] = self.min_fps
        return msg

    def _on_opened(self, msg: dict[str, Any]) -> None:
        self._detach()
        if self.state == "closed":  # closed by the user while the daemon was opening it
            self.client._send({"type": "close", "stream": msg["stream"]})
            return
        try:
            self.output_spec = FrameSpec.from_msg(msg["output"])
            if msg.get("transport") == "shm":
                self._ring_in = FrameRing.attach(msg["ring_in"]["name"])
                self._ring_out = FrameRing.attach(msg["ring_out"]["name"])
        except (KeyError, RingError, P.ProtocolError) as exc:
            self._detach()
            self.state = "failed"
            self.last_error = DaemonError(ErrorCode.INTERNAL, f"cannot attach frame rings: {exc}")
            return
        self.id = msg["stream"]
        self.params = dict(msg.get("params") or self.params)
        self.frames_per_step = int(msg.get("frames_per_step", 1))
        self.serve_fps = msg.get("serve_fps")
        self.state = "open"

    def _on_notice(self, msg: dict[str, Any], payload: Any) -> None:
        self._pending.append((msg, payload))
        while len(self._pending) > max(1, self.keep):
            self._pending.popleft()
            self.counters["skipped"] += 1  # newest frames win

    def _take_pending(self) -> None:
        """Read the newest announced output(s) (after a whole batch of notices was drained):
        the newest one, or with ``keep`` up to that many, oldest first."""
        while self._pending and self.output_spec is not None:
            self._read_output(*self._pending.popleft())

    def _read_output(self, msg: dict[str, Any], payload: Any) -> None:
        spec = self.output_spec
        ring, slot = None, -1
        try:
            if payload is not None:
                data = np.frombuffer(payload, dtype=spec.np_dtype)
                if data.size != int(np.prod(spec.shape)):
                    raise RingError("inline frame has the wrong size.")
                pixels = self._next_buffer(spec)
                np.copyto(pixels, data.reshape(spec.shape))
            elif self._ring_out is not None:
                slot = msg["slot"]
                if self.zero_copy:
                    ring = self._ring_out
                    hdr, pixels = ring.view(slot, msg["seq"])
                    pixels.flags.writeable = False
                else:
                    hdr, pixels = self._ring_out.read(slot, msg["seq"],
                                                      out=self._next_buffer(spec))
                if (hdr.width, hdr.height, hdr.format, hdr.dtype) != \
                        (spec.width, spec.height, spec.format, spec.dtype):
                    raise RingError(f"output slot holds a {hdr.width}x{hdr.height} {hdr.format} "
                                    f"{hdr.dtype} frame, not the announced output.")
            else:
                return
        except TornRead:
            self.counters["torn"] += 1
            return
        except (RingError, KeyError) as exc:
            self.counters["errors"] += 1
            log.warning("stream %s: unreadable output frame: %s", self.name, exc)
            return
        now = time.perf_counter_ns()
        latency = (now - msg["ts"]) / 1e6 if msg.get("ts") else 0.0
        self.latency.add(latency)
        self._fps_marks.append(time.monotonic())
        self.counters["received"] += 1
        self._latest = Frame(pixels, msg["seq"], msg.get("in_seq", 0), latency, _ring=ring,
                             _slot=slot)
        if self.keep:
            self._kept.append(self._latest)
            while len(self._kept) > self.keep:
                self._kept.popleft()

    def _next_buffer(self, spec: FrameSpec) -> np.ndarray:
        size = max(_POOL, self.keep + 2)  # every kept frame needs a buffer of its own
        if len(self._pool) != size or self._pool[0].shape != spec.shape or \
                self._pool[0].dtype != spec.np_dtype:
            self._pool = [np.empty(spec.shape, spec.np_dtype) for _ in range(size)]
        self._pool_i = (self._pool_i + 1) % size
        return self._pool[self._pool_i]

    def _detach(self) -> None:
        for ring in (self._ring_in, self._ring_out):
            if ring is not None:
                ring.close()
        self._ring_in = self._ring_out = None
        self._pending.clear()


#: engines a tool picks when asked for "auto", best first (real weights before toy ones)
PREFERRED_ENGINES = ("video", "image", "video-14b", "image-sdxl-turbo", "image-sd15-lcm",
                     "video-tiny", "image-tiny", "passthrough")


class Client:
    """A connection to one daemon.  Use from one thread; see the module docstring."""

    def __init__(self, endpoint: str = P.DEFAULT_ENDPOINT, *, name: str = "python",
                 transport: str = "auto", keys: dict[str, bytes] | None = None,
                 reconnect: bool = True, busy_timeout: float = 120.0) -> None:
        if transport not in ("auto", "shm", "inline"):
            raise ValueError("transport must be 'auto', 'shm' or 'inline'.")
        self.endpoint = endpoint
        self.name = name
        self.transport = ("shm" if _is_local(endpoint) else "inline") if transport == "auto" \
            else transport
        self.keys = keys
        self.reconnect = reconnect
        self.token = uuid.uuid4().hex
        self.state = "disconnected"  # -> connecting -> connected
        self.session: int | None = None
        self.capabilities: dict[str, Any] = {}
        self.heartbeat_interval = P.HEARTBEAT_INTERVAL_S
        self.heartbeat_timeout = P.HEARTBEAT_TIMEOUT_S
        #: how long a daemon whose connection is still up may stay silent before it counts
        #: as hung.  Today's daemon answers while its engines work (they run on a thread of
        #: their own), so this only tolerates a daemon of protocol version 1 that ran engine
        #: steps on its loop, or a host machine that stalled; a daemon that exits closes
        #: the connection and is noticed at once
        self.busy_timeout = busy_timeout
        self.last_error: DaemonError | None = None
        self.reconnects = 0
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._link_up = False
        self._ids = itertools.count(1)
        self._hello_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._opening: dict[int, Stream] = {}
        self._streams: dict[str, Stream] = {}
        self._last_heard = 0.0
        self._last_sent_hb = 0.0
        self._hello_sent = 0.0

    # --- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def connect(self, timeout: float = 5.0) -> Client:
        """Say hello.  With ``timeout`` > 0 block until welcomed (raises ConnectionError);
        with 0 return at once and let later calls finish the handshake."""
        self._new_socket()
        if timeout > 0:
            deadline = time.monotonic() + timeout
            while self.state != "connected":
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise ConnectionError(f"no livediffusion daemon answered at {self.endpoint} "
                                          f"within {timeout:g} s; start one with "
                                          f"'livediffusion daemon'.")
                self.poll(min(left, 0.05))
        return self

    def _new_socket(self) -> None:
        self._close_socket(0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if "://[" in self.endpoint:  # IPv6 literal
            sock.ipv6 = True
        if self.keys:
            sock.curve_serverkey = self.keys["server_public"]
            sock.curve_publickey = self.keys["public"]
            sock.curve_secretkey = self.keys["secret"]
        # connection events: a daemon that exits is noticed at once, a busy one is waited for
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._link_up = False
        sock.connect(self.endpoint)
        self._sock = sock
        self.state = "connecting"
        self._last_heard = time.monotonic()
        self._send_hello()

    def _send_hello(self) -> None:
        self._hello_id = next(self._ids)
        self._hello_sent = time.monotonic()
        self._send({"type": "hello", "id": self._hello_id, "client": self.name,
                    "token": self.token, "transport": self.transport})

    def _lost(self, why: str) -> None:
        """The daemon is gone or forgot us: reconnect (if allowed) and reopen every stream."""
        if self.state == "disconnected":
            return
        log.info("connection to %s lost (%s); %s", self.endpoint, why,
                 "reconnecting" if self.reconnect else "giving up")
        for stream in self._streams.values():
            stream._detach()
            if stream.state == "open":
                stream.state = "opening"
        self._opening.clear()
        self.session = None
        if self.reconnect:
            self.reconnects += 1
            self._new_socket()
        else:
            self.state = "disconnected"

    # --- sending and polling --------------------------------------------------------------------

    def _send(self, msg: dict[str, Any], payload: bytes | None = None) -> bool:
        if self._sock is None:
            return False
        try:
            data = P.pack(msg)
            if payload is None:
                self._sock.send(data, zmq.NOBLOCK)
            else:
                self._sock.send_multipart([data, payload], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def poll(self, timeout: float = 0.0) -> int:
        """Process what the daemon sent, send heartbeats, reconnect when needed.
        Waits at most ``timeout`` seconds for the first message; returns messages handled."""
        if self._sock is None:
            return 0
        handled = 0
        if self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            while True:
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                handled += 1
                self._last_heard = time.monotonic()
                self._dispatch(parts)
                if self._sock is None:
                    break
            for stream in list(self._streams.values()):
                stream._take_pending()
        if self._link_events():
            return handled
        now = time.monotonic()
        if self.state == "connected" and now - self._last_sent_hb >= self.heartbeat_interval:
            self._last_sent_hb = now
            self._send({"type": "heartbeat"})
        limit = self.busy_timeout if self._link_up and self.state == "connected" else \
            self.heartbeat_timeout
        if self.state != "disconnected" and now - self._last_heard > max(limit,
                                                                         self.heartbeat_timeout):
            self._lost(f"no answer for {now - self._last_heard:.1f} s")
        elif self.state == "connecting" and now - self._hello_sent > 1.0:
            self._send_hello()
        return handled

    @property
    def daemon_busy(self) -> bool:
        """Connected, the connection up, but the daemon silent for longer than a heartbeat
        timeout (an older daemon inside a long engine step, or a stalled machine)."""
        return self.state == "connected" and self._link_up and \
            time.monotonic() - self._last_heard > self.heartbeat_timeout

    def _link_events(self) -> bool:
        """Read connection events; True when the connection dropped and we reconnected."""
        from zmq.utils.monitor import recv_monitor_message
        while self._monitor is not None and self._monitor.poll(0):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_CONNECTED:
                self._link_up = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._link_up = False
                if self.state == "connected":
                    self._lost("the daemon closed the connection")
                    return True
        return False

    def _close_socket(self, linger: int) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(0)
                self._monitor = None
            self._sock.close(linger)
            self._sock = None
        self._link_up = False

    def _dispatch(self, parts: list[zmq.Frame]) -> None:
        try:
            msg = P.unpack(parts[0].buffer)
        except P.ProtocolError as exc:
            log.warning("ignoring a malformed message from the daemon: %s", exc.message)
            return
        mtype = msg.get("type")
        rid = msg.get("re")
        if mtype == "welcome":
            if rid != self._hello_id:
                return  # answer to an older hello
            self.state = "connected"
            self.session = msg.get("session")
            self.capabilities = msg.get("capabilities", {})
            self.heartbeat_interval = float(msg.get("heartbeat_interval",
                                                    P.HEARTBEAT_INTERVAL_S))
            self.heartbeat_timeout = float(msg.get("heartbeat_timeout", P.HEARTBEAT_TIMEOUT_S))
            for stream in self._streams.values():
                if stream.state == "opening":
                    self._send_open(stream)
        elif mtype == "frame":
            stream = self._stream_by_id(msg.get("stream"))
            if stream is not None:
                stream._on_notice(msg, parts[1].buffer if len(parts) > 1 else None)
        elif mtype == "opened":
            stream = self._opening.pop(rid, None)
            if stream is not None:
                stream._on_opened(msg)
        elif mtype == "error":
            self._on_error(msg)
        elif mtype in ("params_ok", "closed", "stats", "streams", "presets", "cues",
                       "thumbnail"):
            if rid is not None:
                self._replies[rid] = msg
        # heartbeat replies need nothing beyond _last_heard

    def _on_error(self, msg: dict[str, Any]) -> None:
        fps = msg.get("sustainable_fps")
        err = DaemonError(str(msg.get("code", "?")), str(msg.get("message", "")),
                          float(fps) if isinstance(fps, (int, float)) else None)
        self.last_error = err
        rid = msg.get("re")
        if err.code == ErrorCode.NO_SESSION and self.state != "disconnected":
            self._lost("the daemon does not know this session")
            return
        stream = self._opening.pop(rid, None) if rid is not None else None
        if stream is not None:
            stream.state = "failed"
            stream.last_error = err
            return
        if rid is not None:
            self._replies[rid] = msg
        stream = self._stream_by_id(msg.get("stream"))
        if stream is not None:
            stream.last_error = err
            stream.counters["errors"] += 1
        log.debug("daemon error %s: %s", err.code, err.message)

    def _stream_by_id(self, sid: Any) -> Stream | None:
        for stream in self._streams.values():
            if stream.id == sid and stream.state == "open":
                return stream
        return None

    def ask(self, msg: dict[str, Any]) -> int | None:
        """Send a request without waiting (a host that must not block its frame, like
        TouchDesigner's cook); returns its id for ``answer``, or None if the daemon's queue
        was full."""
        rid = next(self._ids)
        return rid if self._send({**msg, "id": rid}) else None

    def answer(self, rid: int) -> dict[str, Any] | None:
        """The reply to ``ask``'s request ``rid`` once it arrived (an ``error`` message is
        returned as it is, not raised), else None; handed out once.  Call ``poll`` between
        looks."""
        return self._replies.pop(rid, None)

    def _request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        rid = next(self._ids)
        if not self._send({**msg, "id": rid}):
            raise TimeoutError("the daemon's queue is full.")
        deadline = time.monotonic() + timeout
        while rid not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {msg['type']} within {timeout:g} s.")
            self.poll(min(left, 0.05))
        reply = self._replies.pop(rid)
        if reply.get("type") == "error":
            raise DaemonError(reply.get("code", "?"), reply.get("message", ""))
        return reply

    # --- streams -------------------------------------------------------------------------

    def open_stream(self, name: str, width: int, height: int, *, format: str = "rgb",
                    dtype: str = "uint8", origin: str = "top", fps: float = 30.0,
                    engine: str = "passthrough", params: dict[str, Any] | None = None,
                    output: dict[str, Any] | None = None, slots: int = 3,
                    zero_copy: bool = False, keep: int = 0, timeout: float = 10.0,
                    paced: bool | None = None, min_fps: float | None = None) -> Stream:
        """Open a stream.  ``output`` may set width/height/format/dtype/origin of the frames
        coming back (default: same as input).  With ``timeout`` > 0 block until open (raises
        DaemonError when refused); with 0 return at once (``stream.ready`` tells).
        ``zero_copy`` hands out output frames as read-only views into shared memory (see
        ``Frame``): one copy less for hosts that copy the frame into a texture at once.
        ``keep`` > 0 keeps up to that many received frames for ``frames()`` (and reads every
        announced frame, not only the newest), for recording; such a client may ask for
        ``paced=False``: every frame as soon as it is ready, instead of at the input's
        cadence.  ``min_fps``: the lowest rate this stream accepts when the GPU is shared
        (default a quarter of ``fps``); a daemon that cannot give it refuses the stream
        with code ``overloaded`` and the rate it could give."""
        if name in self._streams and self._streams[name].state not in ("closed", "failed"):
            raise ValueError(f"this client already has a stream named {name!r}.")
        try:
            spec = FrameSpec.from_msg({"width": width, "height": height, "format": format,
                                       "dtype": dtype, "origin": origin})
        except P.ProtocolError as exc:
            raise ValueError(exc.message) from None
        stream = Stream(self, name, spec, fps=fps, engine=engine, params=params or {},
                        output=output, slots=max(slots, keep + 2), zero_copy=zero_copy)
        stream.keep = keep  # the output ring above holds every kept frame until it is read
        stream.paced, stream.min_fps = paced, min_fps
        self._streams[name] = stream
        if self.state == "disconnected":
            self.connect(timeout)
        if self.state == "connected":
            self._send_open(stream)
        if timeout > 0:
            try:
                stream.wait_open(timeout)
            except (DaemonError, TimeoutError):
                stream.state = "closed"  # a late OPENED is answered with CLOSE
                self._streams.pop(name, None)
                raise
        return stream

    def _send_open(self, stream: Stream) -> None:
        rid = next(self._ids)
        self._opening[rid] = stream
        if stream.id is not None:
            stream.counters["reopened"] += 1
        self._send({**stream._open_message(), "id": rid})

    def stream(self, name: str) -> Stream | None:
        return self._streams.get(name)

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """Daemon-side statistics of this session's streams, merged with client-side ones."""
        reply = self._request({"type": "stats"}, timeout)
        out = {}
        for stream in self._streams.values():
            entry = {"client": stream.stats()}
            if stream.id is not None and str(stream.id) in reply.get("streams", {}):
                entry["daemon"] = reply["streams"][str(stream.id)]
            out[stream.name] = entry
        return out

    def streams(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Every open stream of the daemon, whichever client opened it: ``name``,
        ``engine``, ``params`` (effective) and ``stats`` (the daemon's counters), for
        controllers."""
        return list(self.overview(timeout).get("streams", []))

    def overview(self, timeout: float = 2.0) -> dict[str, Any]:
        """The ``streams`` answer whole: ``streams`` (as ``streams()``), ``workers`` (each
        engine worker's engines, device and busy share of the last 5 s) and ``gpus`` (each
        CUDA device's memory in use and in total, GiB, and utilisation %)."""
        if self.state == "disconnected":
            self.connect(timeout)
        return dict(self._request({"type": "streams"}, timeout))

    def choose_engine(self, wanted: str = "auto") -> str:
        """``wanted`` itself, or for "auto" the best engine the daemon offers
        (``PREFERRED_ENGINES`` first, else its first one; "" when it offers none)."""
        if wanted != "auto":
            return wanted
        engines = self.capabilities.get("engines", {})
        return next((e for e in PREFERRED_ENGINES if e in engines), next(iter(engines), ""))

    def control(self, name: str, params: dict[str, Any] | None = None, *,
                timeout: float = 2.0, preset: str | None = None,
                transition: float | dict[str, Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
        """Change the parameters of the stream called ``name``, whichever client opened it
        (a prompt box beside a webcam bridge, say); ``preset``: recall a saved preset too
        (the explicit parameters win); ``transition``: over that many seconds (see
        ``Stream.update``).  Blocks for the daemon's answer and returns the effective
        parameters; raises DaemonError if refused."""
        if self.state == "disconnected":
            self.connect(timeout)
        msg: dict[str, Any] = {"type": "control", "name": name,
                               "params": {**(params or {}), **kwargs}}
        if preset is not None:
            msg["preset"] = preset
        if transition is not None:
            msg["transition"] = transition
        reply = self._request(msg, timeout)
        return reply.get("params", {})

    def cues(self, name: str, op: str = "status", cues: list[dict[str, Any]] | None = None,
             *, loop: bool = False, index: int | None = None,
             timeout: float = 2.0) -> dict[str, Any]:
        """The cue list of the stream called ``name``: op "play" with ``cues`` (maps of
        ``params`` and/or ``preset``, ``transition`` seconds, ``hold`` seconds, ``label``)
        and ``loop``; "pause", "resume", "next", "jump" (``index``), "stop", "status".
        Returns the daemon's answer: ``cues`` (state, index, count...), ``transition`` and
        ``params``."""
        if self.state == "disconnected":
            self.connect(timeout)
        msg: dict[str, Any] = {"type": "cues", "name": name, "op": op}
        if cues is not None:
            msg["cues"] = cues
        if loop:
            msg["loop"] = True
        if index is not None:
            msg["index"] = index
        return dict(self._request(msg, timeout))

    def presets(self, op: str = "list", name: str | None = None,
                params: dict[str, Any] | None = None, source: str | None = None,
                timeout: float = 2.0) -> dict[str, dict[str, Any]]:
        """The daemon's named presets (after ``op``): "list"; "save" ``name`` with
        ``params``, or the current parameters of the stream named ``source`` (``params``
        then adds or overrides some); "delete" ``name``.  Returns name -> {"params",
        "engine", "saved"}."""
        if self.state == "disconnected":
            self.connect(timeout)
        msg: dict[str, Any] = {"type": "presets", "op": op}
        for key, value in (("name", name), ("params", params), ("from", source)):
            if value is not None:
                msg[key] = value
        return dict(self._request(msg, timeout).get("presets", {}))

    def thumbnail(self, name: str, width: int = 160, timeout: float = 2.0
                  ) -> dict[str, Any]:
        """The newest output of the stream called ``name`` as a small top-down RGB uint8
        picture: ``width``, ``height``, ``pixels`` (bytes) and ``out_seq``; without
        ``pixels`` until one was taken (asking starts them, for 5 s)."""
        if self.state == "disconnected":
            self.connect(timeout)
        return dict(self._request({"type": "thumbnail", "name": name, "width": width},
                                  timeout))

    def close(self) -> None:
        """Close every stream, say goodbye, release the socket."""
        for stream in list(self._streams.values()):
            stream.close(timeout=0.5)
        if self._sock is not None and self.state == "connected":
            self._send({"type": "bye"})
        self._close_socket(100)
        self.state = "disconnected"

    def __enter__(self) -> Client:
        if self.state == "disconnected":
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
