"""OSC control of every stream: ``livediffusion daemon --osc PORT``.

VJ tools (TouchOSC, TouchDesigner's OSC Out, Resolume, a MIDI-to-OSC bridge) speak OSC over
UDP.  The bridge listens on loopback (wider only with ``--keys``, and OSC itself carries no
authentication) and talks to the daemon as one more client, so every change goes through the
same validation as any client's:

- ``/livediffusion/<stream>/<param> value...`` sets a declared parameter of the stream named
  ``<stream>`` (whichever tool opened it); ``/livediffusion/*/<param>`` sets it on every open
  stream whose engine declares it.  Arguments are typed by the engine's schema
  (``engines/schema.py``): numbers for float and int (an integral float is an int), 0/1 or
  OSC true/false for bool, a string or an index for a choice, a string for text,
  alternating text and weight for prompts, seed and weight for seeds, name and scale for
  loras, integers for indices;
  ``/livediffusion/<stream>/reset`` restarts the stream's history.
- ``/livediffusion/<stream>/preset NAME`` recalls a saved preset onto the stream
  (``daemon/presets.py``; ``*`` for every stream).
- ``/livediffusion/<stream>/transition SECONDS [curve] [blend]`` sets the time the bridge's
  later changes and recalls of that stream (``*``: of every stream) take to arrive
  (``daemon/transitions.py``: numbers glide, the prompt and seed blend; 0: at once).
- ``/livediffusion/<stream>/cue OP [ARGS]``: the stream's cue list; ``play`` with triples
  ``PRESET TRANSITION HOLD`` (seconds), ``loop`` likewise but starting over at the end,
  ``pause``, ``resume``, ``next``, ``jump N``, ``stop``.
- ``/livediffusion/query [stream]`` answers with ``/livediffusion/streams name...``, per engine
  ``/livediffusion/schema <engine> <json>`` and every parameter's current value at its
  address, to the feedback target if one is set, else to the sender.
- With ``--osc-feedback HOST:PORT``, a change is echoed there (the effective value, so a
  fader follows what the daemon took), and each stream's telemetry goes there twice a second:
  ``/livediffusion/<stream>/telemetry/<name>`` for fps_out, input_fps, serve_fps, dropped,
  late, delay_ms, engine_ms, latency_p50_ms, latency_p99_ms, batch, and
  ``/livediffusion/gpu/<index>/<name>`` for memory_used_gib, memory_total_gib, utilization.
- Refused input (an unknown address, stream or parameter, a wrong type, a value out of range)
  is one log line (at most one per five seconds per kind) and ``/livediffusion/error <text>``
  to the sender; nothing else changes.

Floods are coalesced: a controller sending 1000 messages a second (a fader moving) costs
one ``control`` request per stream per 1/60 s, each carrying the newest value of every
parameter that moved.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient

from .engines.base import shown

log = logging.getLogger("livediffusion.osc")


def _shown(value: Any) -> str:
    return shown(value, 60)

PREFIX = "/livediffusion"
TELEMETRY = ("fps_out", "input_fps", "serve_fps", "dropped", "late", "delay_ms", "engine_ms",
             "latency_p50_ms", "latency_p99_ms", "batch")


class OscError(ValueError):
    pass


def osc_value(spec: dict[str, Any] | None, args: list[Any]) -> Any:
    """OSC arguments as the parameter ``spec`` (a schema entry) takes them; OscError if
    they cannot be (the daemon then checks ranges as for any client)."""
    if spec is None:  # reset
        return bool(args[0]) if args else True
    kind, name = spec["kind"], spec["name"]
    if not args:
        raise OscError(f"{name} needs a value.")
    first = args[0]
    number = isinstance(first, (int, float)) and not isinstance(first, bool)
    if kind in ("float", "int"):
        if not number:
            raise OscError(f"{name} takes a number, not {_shown(first)}.")
        return float(first) if kind == "float" else \
            (int(first) if float(first).is_integer() else first)
    if kind == "bool":
        if isinstance(first, bool):
            return first
        if number:
            return first != 0
        raise OscError(f"{name} takes 0/1 or true/false, not {_shown(first)}.")
    if kind == "choice":
        if isinstance(first, str):
            return first
        if number and float(first).is_integer() and 0 <= int(first) < len(spec["choices"]):
            return spec["choices"][int(first)]
        raise OscError(f"{name} takes one of {', '.join(spec['choices'])} or its index "
                       f"0..{len(spec['choices']) - 1}, not {_shown(first)}.")
    if kind == "text":
        if not isinstance(first, str):
            raise OscError(f"{name} takes a string, not {_shown(first)}.")
        return first
    if kind in ("prompts", "seeds", "loras"):
        if len(args) % 2:
            first_name = {"prompts": "text", "seeds": "seed", "loras": "name"}[kind]
            raise OscError(f"{name} takes pairs: {first_name}, "
                           f"{'scale' if kind == 'loras' else 'weight'}, ...")
        return [[args[i], args[i + 1]] for i in range(0, len(args), 2)]
    if kind == "indices":
        return [int(a) if isinstance(a, float) and a.is_integer() else a for a in args]
    raise OscError(f"{name}: parameters of kind {kind} cannot be set over OSC.")


def osc_args(value: Any) -> list[Any]:
    """A parameter's value as OSC arguments (lists flattened)."""
    if isinstance(value, (list, tuple)):
        return [x for item in value
                for x in (item if isinstance(item, (list, tuple)) else [item])]
    return [value]


class OscBridge:
    """The OSC server (one thread) and its daemon client (another thread, which alone talks
    to the daemon)."""

    def __init__(self, endpoint: str, port: int, *, host: str = "127.0.0.1",
                 feedback: tuple[str, int] | None = None, keys: dict | None = None,
                 rate_hz: float = 60.0, telemetry_hz: float = 2.0) -> None:
        from livediffusion.shared import Client
        self.client = Client(endpoint, name="osc", **({"keys": keys} if keys else {}))
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._on_message, needs_reply_address=True)
        self.server = BlockingOSCUDPServer((host, port), dispatcher)
        try:  # room for a burst (a fader's messages arrive faster than they are parsed)
            self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        self.port = self.server.server_address[1]
        self.feedback_to = feedback
        self.feedback = SimpleUDPClient(*feedback) if feedback else None
        self.period = 1.0 / rate_hz
        self.telemetry_period = 1.0 / telemetry_hz if telemetry_hz > 0 else 0.0
        self._lock = threading.Lock()
        #: stream name ("*" for all) -> param -> (raw OSC args, reply address), newest wins
        self._pending: dict[str, dict[str, tuple[list, tuple]]] = {}
        self._queries: list[tuple[str | None, tuple]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_log: dict[str, float] = {}
        self._streams: dict[str, dict] = {}   # name -> {"engine", "params", "stats"}
        self._schemas: dict[str, dict[str, dict]] = {}   # engine -> param -> spec
        #: stream name ("*": every stream) -> the transition the bridge's changes take
        self._transitions: dict[str, dict[str, Any]] = {}
        self.received = 0
        self.refused = 0
        self._threads: list[threading.Thread] = []

    # --- lifetime ------------------------------------------------------------------------------

    def start(self) -> OscBridge:
        self.client.connect(timeout=10)
        self._schemas = {name: {p["name"]: p for p in caps.get("schema", [])}
                         for name, caps in self.client.capabilities.get("engines", {}).items()}
        for target, name in ((self.server.serve_forever, "osc-server"),
                             (self._run, "osc-client")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("OSC on udp://%s:%d (%s/<stream>/<param>)%s", *self.server.server_address,
                 PREFIX, f", feedback to {self.feedback_to[0]}:{self.feedback_to[1]}"
                 if self.feedback_to else "")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self.client.close()

    # --- the server thread: parse and queue, never wait -----------------------------------------

    def _on_message(self, client_address: tuple, address: str, *args: Any) -> None:
        self.received += 1
        parts = address.split("/")
        if len(parts) < 3 or "/".join(parts[:2]) != PREFIX:
            self._refuse(client_address, "address", f"unknown OSC address {_shown(address)} "
                         f"(use {PREFIX}/<stream>/<param>)")
            return
        if parts[2] == "query" and len(parts) == 3:
            with self._lock:
                self._queries.append((str(args[0]) if args else None, client_address))
            self._wake.set()
            return
        if len(parts) != 4 or not parts[2] or not parts[3]:
            self._refuse(client_address, "address", f"unknown OSC address {_shown(address)} "
                         f"(use {PREFIX}/<stream>/<param>)")
            return
        stream, name = parts[2], parts[3]
        with self._lock:
            self._pending.setdefault(stream, {})[name] = (list(args), client_address)
        self._wake.set()

    def _refuse(self, reply_to: tuple | None, kind: str, message: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 5.0:
            self._last_log[kind] = now
            log.warning("OSC: %s", message)
        if reply_to is not None:
            try:
                SimpleUDPClient(*reply_to[:2]).send_message(f"{PREFIX}/error", message)
            except OSError:
                pass

    # --- the client thread: coalesced requests to the daemon --------------------------------

    def _run(self) -> None:
        next_telemetry = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(self.period)
            self._wake.clear()
            try:
                self.client.poll(0)   # heartbeats: an idle bridge stays connected
                self._apply_pending()
                self._answer_queries()
                if self.feedback is not None and self.telemetry_period and \
                        time.monotonic() >= next_telemetry:
                    next_telemetry = time.monotonic() + self.telemetry_period
                    self._telemetry()
            except Exception as exc:  # noqa: BLE001 - the bridge must outlive any one error
                self._refuse(None, "internal", f"OSC bridge: {type(exc).__name__}: {exc}")
            time.sleep(self.period)   # at most one round of requests per period

    def _refresh(self) -> list[dict]:
        """The daemon's streams (kept) and GPUs (returned)."""
        overview = self.client.overview(timeout=2.0)
        self._streams = {s["name"]: s for s in overview.get("streams", [])}
        return list(overview.get("gpus", []))

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        self._refresh()
        for target, changes in pending.items():
            if target == "*" and "transition" in changes:  # streams opened later too
                self._set_transition("*", *changes.pop("transition"))
                for name in self._streams:
                    self._transitions.pop(name, None)
                if not changes:
                    continue
            names = list(self._streams) if target == "*" else [target]
            if target != "*" and target not in self._streams:
                reply = next(iter(changes.values()))[1]
                self._refuse(reply, "stream", f"no open stream is named {_shown(target)}")
                continue
            for stream in names:
                self._control(stream, changes, quiet_unknown=target == "*")

    def _control(self, stream: str, changes: dict[str, tuple[list, tuple]],
                 quiet_unknown: bool) -> None:
        from livediffusion.shared.client import DaemonError
        schema = self._schemas.get(self._streams[stream]["engine"], {})
        params, reply = {}, None
        preset = None
        if "transition" in changes:   # first: it applies to what came with it
            self._set_transition(stream, *changes["transition"])
        for name, (args, reply) in changes.items():
            if name == "transition":
                continue
            if name == "cue":
                self._cue(stream, args, reply)
                continue
            if name == "preset":
                if not args or not isinstance(args[0], str):
                    self._refuse(reply, "type", f"{stream}: preset takes a preset's name.")
                else:
                    preset = args[0]
                continue
            if name != "reset" and name not in schema:
                if not quiet_unknown:
                    self._refuse(reply, "param", f"stream {_shown(stream)} "
                                 f"({self._streams[stream]['engine']}) has no parameter "
                                 f"{_shown(name)}")
                continue
            try:
                params[name] = osc_value(schema.get(name), args)
            except OscError as exc:
                self._refuse(reply, "type", f"{stream}: {exc}")
        moving = self._transitions.get(stream, self._transitions.get("*"))
        if preset is not None:
            try:
                effective = self.client.control(stream, preset=preset, timeout=2.0,
                                                transition=moving)
            except (DaemonError, TimeoutError) as exc:
                self._refuse(changes["preset"][1], "value", f"{stream}: {exc}")
            else:
                if moving is None:  # moving, the answer is where it starts: no echo
                    self._echo(stream, effective, effective)
        if not params:
            return
        if moving is not None:
            try:
                self.client.control(stream, params, timeout=2.0, transition=moving)
            except (DaemonError, TimeoutError) as exc:
                self._refuse(reply, "value", f"{stream}: {exc}")
            return
        try:
            effective = self.client.control(stream, params, timeout=2.0)
        except DaemonError as exc:
            if len(params) == 1:
                self._refuse(reply, "value", f"{stream}: {exc}")
                return
            # one bad value must not cost the others that arrived in the same period
            effective = {}
            for name, value in params.items():
                try:
                    effective.update(self.client.control(stream, {name: value}, timeout=2.0))
                except DaemonError as one:
                    self._refuse(changes[name][1], "value", f"{stream}: {one}")
        except TimeoutError as exc:
            self._refuse(reply, "value", f"{stream}: {exc}")
            return
        self._echo(stream, effective, params)

    def _set_transition(self, stream: str, args: list, reply: tuple) -> None:
        """``/<stream>/transition SECONDS [curve] [blend]``: what the bridge's later changes
        of ``stream`` take (0: at once)."""
        from .transitions import parse_spec
        from .engines.base import ParamError
        keys = ("seconds", "curve", "blend")
        try:
            spec = dict(zip(keys, parse_spec(dict(zip(keys, args)))))
        except (ParamError, TypeError) as exc:
            self._refuse(reply, "type", f"{stream}: transition takes SECONDS [linear|smooth] "
                         f"[linear|slerp]: {exc}")
            return
        if spec["seconds"] > 0:
            self._transitions[stream] = spec
        else:
            self._transitions.pop(stream, None)

    def _cue(self, stream: str, args: list, reply: tuple) -> None:
        """``/<stream>/cue OP [ARGS]`` (see the module docstring)."""
        from livediffusion.shared.client import DaemonError
        op = args[0] if args and isinstance(args[0], str) else None
        rest = list(args[1:])
        cues, index = None, None
        if op in ("play", "loop"):
            if not rest or len(rest) % 3:
                self._refuse(reply, "type", f"{stream}: cue {op} takes PRESET TRANSITION HOLD "
                             f"triples.")
                return
            cues = [{"preset": str(rest[i]), "transition": rest[i + 1], "hold": rest[i + 2]}
                    for i in range(0, len(rest), 3)]
        elif op == "jump":
            if len(rest) != 1 or not isinstance(rest[0], (int, float)):
                self._refuse(reply, "type", f"{stream}: cue jump takes the cue's index.")
                return
            index = int(rest[0])
        elif op not in ("pause", "resume", "next", "stop"):
            self._refuse(reply, "type", f"{stream}: cue takes play, loop, pause, resume, "
                         f"next, jump or stop, not {_shown(op)}.")
            return
        try:
            self.client.cues(stream, "play" if op == "loop" else op, cues, loop=op == "loop",
                             index=index, timeout=2.0)
        except (DaemonError, TimeoutError) as exc:
            self._refuse(reply, "value", f"{stream}: {exc}")

    def _echo(self, stream: str, effective: dict[str, Any], names) -> None:
        """The effective values of ``names`` to the feedback target (a fader follows what
        the daemon took)."""
        if self.feedback is not None:
            for name in names:
                if name in effective:
                    self._send(self.feedback, f"{PREFIX}/{stream}/{name}",
                               osc_args(effective[name]))

    def _answer_queries(self) -> None:
        with self._lock:
            queries, self._queries = self._queries, []
        if not queries:
            return
        self._refresh()
        for only, reply_to in queries:
            target = self.feedback or SimpleUDPClient(*reply_to[:2])
            names = [only] if only else sorted(self._streams)
            if only and only not in self._streams:
                self._refuse(reply_to, "stream", f"no open stream is named {_shown(only)}")
                continue
            self._send(target, f"{PREFIX}/streams", names)
            for engine in sorted({self._streams[n]["engine"] for n in names}):
                self._send(target, f"{PREFIX}/schema", [
                    engine, json.dumps(list(self._schemas.get(engine, {}).values()))])
            for name in names:
                for key, value in self._streams[name]["params"].items():
                    self._send(target, f"{PREFIX}/{name}/{key}", osc_args(value))

    def _telemetry(self) -> None:
        gpus = self._refresh()
        for name, stream in self._streams.items():
            stats = stream.get("stats", {})
            for key in TELEMETRY:
                if key in stats:
                    self._send(self.feedback, f"{PREFIX}/{name}/telemetry/{key}",
                               [float(stats[key])])
        for gpu in gpus:
            for key in ("memory_used_gib", "memory_total_gib", "utilization"):
                if gpu.get(key) is not None:
                    self._send(self.feedback, f"{PREFIX}/gpu/{gpu['index']}/{key}",
                               [float(gpu[key])])

    @staticmethod
    def _send(target: SimpleUDPClient, address: str, args: list[Any]) -> None:
        try:
            target.send_message(address, args)
        except OSError as exc:
            log.debug("OSC send to %s failed: %s", address, exc)
