"""OSC control (daemon/osc.py) with a real python-osc client against a real daemon process:
typed changes, every stream at once, the query, feedback and telemetry, bad input and a
flood while a stream keeps running."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import ThreadingOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient

from livediffusion.shared import Client


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """What a TouchOSC or TouchDesigner OSC In would receive."""

    def __init__(self) -> None:
        self.got: list[tuple[str, tuple]] = []
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(lambda address, *args: self.got.append((address, args)))
        self.server = ThreadingOSCUDPServer(("127.0.0.1", 0), dispatcher)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def values(self, address: str) -> list[tuple]:
        return [args for a, args in self.got if a == address]

    def wait_for(self, address: str, timeout: float = 10.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.values(address):
                return self.values(address)
            time.sleep(0.02)
        raise AssertionError(f"nothing came to {address}; got {self.got[-5:]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def daemon():
    port, osc = free_tcp_port(), free_udp_port()
    feedback = Listener()
    proc = subprocess.Popen(
        [sys.executable, "-m", "livediffusion.daemon", "daemon", "--port", str(port),
         "--engines", "passthrough,video-tiny", "--osc", str(osc),
         "--osc-feedback", f"127.0.0.1:{feedback.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                     daemon=True).start()
    endpoint = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not any("OSC on udp://" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    yield endpoint, osc, feedback, lines
    proc.terminate()
    proc.wait(30)
    feedback.close()


def params_of(endpoint: str, name: str) -> dict:
    with Client(endpoint, name="check") as c:
        return next(s["params"] for s in c.streams() if s["name"] == name)


def eventually(check, host: Client | None = None, timeout: float = 10.0):
    """``check()`` until it passes; ``host`` keeps its heartbeats going meanwhile (a silent
    client is dropped after 3 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            if host is not None:
                host.poll(0.05)
            else:
                time.sleep(0.05)


def test_typed_changes_every_stream_query_and_feedback(daemon):
    endpoint, port, feedback, _ = daemon
    osc = SimpleUDPClient("127.0.0.1", port)
    with Client(endpoint, name="host") as host:
        streams = [host.open_stream("cam", 64, 64, engine="passthrough"),  # noqa: F841
                   host.open_stream("vid", 64, 64, engine="video-tiny", timeout=60)]
        osc.send_message("/livediffusion/cam/mode", 1)             # a menu's index
        osc.send_message("/livediffusion/vid/steps", 1.0)          # an integral float
        osc.send_message("/livediffusion/vid/stream_batch", 0)     # a toggle's 0/1
        osc.send_message("/livediffusion/vid/prompts", ["a forest", 0.7, "fire", 0.3])
        osc.send_message("/livediffusion/*/seed", 7)               # every stream that has it

        def changed():
            cam, vid = params_of(endpoint, "cam"), params_of(endpoint, "vid")
            assert cam["mode"] == "invert"
            assert vid["steps"] == 1 and vid["stream_batch"] is False and vid["seed"] == 7
            # OSC floats are 32-bit
            assert vid["prompts"] == [["a forest", pytest.approx(0.7)],
                                      ["fire", pytest.approx(0.3)]]
        eventually(changed, host)
        # the effective values are echoed to the feedback target (a fader follows)
        assert ("invert",) in feedback.wait_for("/livediffusion/cam/mode")
        assert (7,) in feedback.wait_for("/livediffusion/vid/seed")
        # telemetry, twice a second
        fps = feedback.wait_for("/livediffusion/vid/telemetry/input_fps")
        assert all(isinstance(v[0], float) for v in fps)
        # the query: stream names, each engine's schema, every current value
        osc.send_message("/livediffusion/query", [])
        names = feedback.wait_for("/livediffusion/streams")[-1]
        assert set(names) == {"cam", "vid"}
        schemas = {args[0]: json.loads(args[1])
                   for args in feedback.wait_for("/livediffusion/schema")}
        steps = next(p for p in schemas["video-tiny"] if p["name"] == "steps")
        assert (steps["lo"], steps["hi"]) == (1, 4)
        assert feedback.wait_for("/livediffusion/vid/steps")[-1] == (1,)


def test_bad_osc_is_one_line_each_and_a_flood_costs_no_frames(daemon):
    endpoint, port, feedback, lines = daemon
    osc = SimpleUDPClient("127.0.0.1", port)
    replies = Listener()   # refusals go back to the sender: send from the listener's socket
    sender = replies.server.socket
    from pythonosc.osc_message_builder import OscMessageBuilder

    def send(address, *args):
        msg = OscMessageBuilder(address)
        for a in args:
            msg.add_arg(a)
        sender.sendto(msg.build().dgram, ("127.0.0.1", port))

    with Client(endpoint, name="host2") as host:
        stream = host.open_stream("live", 64, 64, engine="passthrough")
        before = len(lines)
        send("/somewhere/else", 1)
        send("/livediffusion/nobody/mode", "invert")
        send("/livediffusion/live/no_such_param", 1)
        send("/livediffusion/live/mode", "sideways")

        def errors(n):
            def check():
                got = replies.values("/livediffusion/error")
                assert len(got) >= n, got
                return got
            return eventually(check, host)
        errors(4)
        # (changes of one parameter within 1/60 s are coalesced, the newest wins: a second
        # bad value for mode goes on its own)
        send("/livediffusion/live/mode", 2.5)
        errors = errors(5)
        text = " | ".join(e[0] for e in errors)
        for part in ("unknown OSC address", "no open stream is named 'nobody'",
                     "no parameter 'no_such_param'", "must be one of", "or its index"):
            assert part in text, text
        # a flood: 1000 messages a second for a second, while the host streams frames
        frame = np.zeros((64, 64, 3), np.uint8)
        seen, t0 = set(), time.monotonic()
        for i in range(1000):
            osc.send_message("/livediffusion/live/mode", ["identity", "invert"][i % 2])
            if i % 33 == 0:
                stream.send(frame)
            out = stream.latest()
            if out is not None:
                seen.add(out.seq)
            time.sleep(max(0.0, t0 + 0.001 * (i + 1) - time.monotonic()))
        osc.send_message("/livediffusion/live/mode", "invert")   # the last word
        eventually(lambda: _assert(params_of(endpoint, "live")["mode"] == "invert"), host)
        for _ in range(10):
            stream.send(frame)
            time.sleep(0.05)
            out = stream.latest()
            if out is not None:
                seen.add(out.seq)
        assert len(seen) >= 20, seen   # frames kept coming through the flood
        osc_lines = [line for line in lines[before:] if "OSC:" in line]
        # one line per kind of refusal at most (five kinds sent), not one per message
        assert 1 <= len(osc_lines) <= 5, osc_lines
    replies.close()


def _assert(ok: bool) -> None:
    assert ok


def test_osc_beyond_loopback_needs_keys():
    out = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "daemon", "--port",
                          str(free_tcp_port()), "--engines", "passthrough", "--osc", "0",
                          "--osc-host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "needs --keys" in out.stderr


def test_a_preset_is_recalled_over_osc(daemon):
    endpoint, port, feedback, _ = daemon
    with Client(endpoint, name="host3") as host:
        stream = host.open_stream("deck", 64, 64, engine="passthrough")  # noqa: F841
        host.presets("save", "negative", params={"mode": "invert"})
        SimpleUDPClient("127.0.0.1", port).send_message("/livediffusion/deck/preset",
                                                        "negative")
        eventually(lambda: _assert(params_of(endpoint, "deck")["mode"] == "invert"), host)
        assert ("invert",) in feedback.wait_for("/livediffusion/deck/mode")


def test_transitions_and_cue_lists_over_osc(daemon):
    endpoint, port, feedback, lines = daemon
    osc = SimpleUDPClient("127.0.0.1", port)
    with Client(endpoint, name="host4") as host:
        stream = host.open_stream("fader", 32, 16, engine="passthrough")
        frame = np.full((16, 32, 3), 200, np.uint8)

        def level() -> float:
            stream.send(frame)
            out = stream.wait(2.0)
            assert out is not None
            return float(out.pixels.mean())
        assert level() == 200.0
        osc.send_message("/livediffusion/fader/transition", [1.0, "smooth"])
        osc.send_message("/livediffusion/fader/gain", 0.0)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not seen or seen[-1] > 0):
            seen.append(level())
            time.sleep(0.02)
        assert seen[-1] == 0.0 and len({v for v in seen if 0 < v < 200}) >= 3, seen
        # at once again, then a cue list of a preset and a value back
        osc.send_message("/livediffusion/fader/transition", 0)
        host.presets("save", "half", params={"gain": 0.5})
        osc.send_message("/livediffusion/fader/cue", ["play", "half", 0.0, 0.3])
        eventually(lambda: _assert(level() == 100.0), host)
        replies = Listener()   # refusals go back to the sender: send from its socket
        from pythonosc.osc_message_builder import OscMessageBuilder
        for address, args in (("/livediffusion/fader/cue", ["dance"]),
                              ("/livediffusion/fader/transition", ["soon"])):
            msg = OscMessageBuilder(address)
            for a in args:
                msg.add_arg(a)
            replies.server.socket.sendto(msg.build().dgram, ("127.0.0.1", port))
            time.sleep(0.05)   # not coalesced with the next

        def refused():
            text = " | ".join(e[0] for e in replies.values("/livediffusion/error"))
            assert "cue takes play" in text and "transition takes SECONDS" in text, text
        eventually(refused, host)
        replies.close()
        assert level() == 100.0
