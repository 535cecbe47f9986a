"""Bad input gets an ERROR reply (or is cleaned up), and every other stream keeps running."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest

from livediffusion.daemon.engines import REGISTRY
from livediffusion.daemon.engines.base import Engine, OutputFrame, StreamOutput
from livediffusion.daemon.engines.passthrough import PassthroughEngine
from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client
from livediffusion.shared import protocol as P
from livediffusion.shared.protocol import FrameSpec

from helpers import Raw, daemon_stat, rgb, round_trip, shm_names, wait_until


@pytest.fixture
def bystander(client):
    """A healthy stream that must keep working whatever the other clients do."""
    stream = client.open_stream("bystander", 64, 48)
    round_trip(stream, rgb())
    yield stream
    frame = rgb(seed=99)
    assert np.array_equal(round_trip(stream, frame).pixels, frame), "bystander stream broke"


def opened(raw: Raw, name: str = "raw", **spec) -> dict:
    raw.hello()
    raw.send({"type": "open", "id": 2, "name": name, "width": 64, "height": 48, **spec})
    return raw.recv_type("opened")


def test_malformed_msgpack_gets_bad_message(raw, bystander):
    r = raw()
    r.send_bytes(b"\xc1\xff\x00garbage")
    reply = r.recv()
    assert reply["type"] == "error" and reply["code"] == "bad_message"


def test_msgpack_that_is_not_a_map_gets_bad_message(raw, bystander):
    r = raw()
    r.send_bytes(msgpack.packb([1, 2, 3]))
    assert r.recv()["code"] == "bad_message"


def test_unknown_message_type(raw, bystander):
    r = raw()
    r.hello()
    r.send({"type": "teleport", "id": 5})
    reply = r.recv()
    assert reply["code"] == "unknown_type" and reply["re"] == 5


def test_wrong_protocol_version(raw, bystander):
    r = raw()
    r.send({"type": "hello", "v": 99, "id": 1})
    reply = r.recv()
    assert reply["code"] == "unsupported_version" and "version 1" in reply["message"]


def test_messages_before_hello_get_no_session(raw, bystander):
    r = raw()
    r.send({"type": "open", "id": 1, "name": "x", "width": 64, "height": 48})
    assert r.recv()["code"] == "no_session"


def test_too_many_message_parts(raw, bystander):
    r = raw()
    r.send_bytes(P.pack({"type": "heartbeat"}), b"a", b"b")
    assert r.recv()["code"] == "bad_message"


def test_impossible_stream_spec(raw, bystander):
    r = raw()
    r.hello()
    r.send({"type": "open", "id": 2, "name": "big", "width": 100000, "height": 48})
    assert r.recv_type("error")["code"] == "bad_spec"
    r.send({"type": "open", "id": 3, "name": "fmt", "width": 64, "height": 48, "format": "yuv"})
    assert r.recv_type("error")["code"] == "bad_spec"


def test_frame_for_unknown_stream_id(raw, bystander):
    r = raw()
    r.hello()
    r.send({"type": "frame", "stream": 4242, "seq": 1, "slot": 0})
    reply = r.recv()
    assert reply["code"] == "unknown_stream" and reply["stream"] == 4242


def test_another_clients_stream_id_is_unknown_to_me(raw, bystander):
    r = raw()
    r.hello()
    r.send({"type": "close", "stream": bystander.id, "id": 9})
    assert r.recv()["code"] == "unknown_stream"


def test_slot_outside_the_ring(raw, bystander):
    r = raw()
    sid = opened(r)["stream"]
    r.send({"type": "frame", "stream": sid, "seq": 1, "slot": 99})
    assert r.recv_type("error")["code"] == "bad_frame"


def test_frame_of_the_wrong_size_in_the_ring(client, bystander):
    stream = client.open_stream("wrong-size", 64, 48)
    small = FrameSpec(32, 24)  # fits the slot, but is not what the stream was opened for
    stream._ring_in.write(1, 1, rgb(24, 32), small)
    client._send({"type": "frame", "stream": stream.id, "seq": 1, "slot": 1})
    assert wait_until(lambda: (client.poll(0.05), stream.last_error)[1] is not None)
    assert stream.last_error.code == "bad_frame" and "32x24" in stream.last_error.message


def test_frame_of_the_wrong_dtype_in_the_ring(client, bystander):
    stream = client.open_stream("wrong-dtype", 16, 8)
    as_float = FrameSpec(16, 8, "rgb", "float32")
    ring = stream._ring_in
    assert as_float.nbytes > ring.capacity  # the client library cannot even write it...
    half = FrameSpec(8, 8, "rgb", "float16")  # ...but a same-size wrong dtype is caught too
    ring.write(1, 1, np.zeros((8, 8, 3), np.float16), half)
    client._send({"type": "frame", "stream": stream.id, "seq": 1, "slot": 1})
    assert wait_until(lambda: (client.poll(0.05), stream.last_error)[1] is not None)
    assert stream.last_error.code == "bad_frame" and "float16" in stream.last_error.message


def test_inline_frame_of_the_wrong_size(daemon, bystander):
    with Client(daemon.endpoint, transport="inline") as c:
        stream = c.open_stream("inline-bad", 64, 48)
        c._send({"type": "frame", "stream": stream.id, "seq": 1}, b"\x00" * 10)
        assert wait_until(lambda: (c.poll(0.05), stream.last_error)[1] is not None)
        assert stream.last_error.code == "bad_frame"
        frame = rgb(seed=8)
        assert np.array_equal(round_trip(stream, frame).pixels, frame)


def test_sending_the_wrong_shape_is_a_clear_client_side_error(client):
    stream = client.open_stream("shape", 64, 48)
    with pytest.raises(ValueError, match=r"\(48, 64, 3\) uint8"):
        stream.send(np.zeros((48, 64, 4), np.uint8))


def test_two_clients_cannot_open_the_same_stream_name(daemon, client, bystander):
    other = Client(daemon.endpoint, name="other").connect()
    try:
        with pytest.raises(Exception) as info:
            other.open_stream("bystander", 64, 48)
        assert info.value.code == "stream_exists" and "another client" in str(info.value)
    finally:
        other.close()


def test_torn_slot_is_never_published(client, daemon, bystander):
    stream = client.open_stream("torn", 64, 48)
    spec = stream.spec
    view = stream._ring_in.begin_write(1, 1, spec)  # writer "dies" before end_write
    view[:] = 7
    del view
    client._send({"type": "frame", "stream": stream.id, "seq": 1, "slot": 1})
    assert wait_until(lambda: daemon_stat(daemon, stream.id, 'torn') == 1)
    assert stream.latest() is None


VICTIM = textwrap.dedent("""
    import sys, time
    from livediffusion.shared import Client
    c = Client(sys.argv[1], name="victim").connect()
    s = c.open_stream("victim", 64, 48)
    view = s._ring_in.begin_write(1, 1, s.spec)   # holds a slot mid-write
    c._send({"type": "frame", "stream": s.id, "seq": 1, "slot": 1})
    print(s._ring_in.name, s._ring_out.name, flush=True)
    time.sleep(60)
""")


def test_client_killed_while_holding_a_slot_is_cleaned_up(daemon, client, bystander):
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, daemon.endpoint],
                            stdout=subprocess.PIPE, text=True)
    try:
        names = set(proc.stdout.readline().split())
        assert len(names) == 2 and names <= shm_names()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        started = time.monotonic()
        while names & shm_names() and time.monotonic() - started < 8:
            round_trip(bystander, rgb(seed=1))  # keeps our own session alive meanwhile
            time.sleep(0.1)
        assert not (names & shm_names()), "the dead client's memory was not released"
        # its connection closed: released at once (ZeroMQ's monitor), not after the 3 s
        # heartbeat timeout (issue 18)
        assert time.monotonic() - started <= 0.5
        assert "victim" not in daemon._names
    finally:
        if proc.poll() is None:
            proc.kill()


class FailingEngine(PassthroughEngine):
    """Fails the step for frames whose first pixel is 13 (as a real engine might)."""

    name = "failing"

    def __init__(self, device: str, exc: type[BaseException]) -> None:
        super().__init__(device)
        self.exc = exc

    def submit(self, batch):
        if any(item.frames[-1].pixels[0, 0, 0] == 13 for item in batch):
            raise self.exc("simulated failure")
        return super().submit(batch)


@pytest.mark.parametrize("exc,code", [(RuntimeError, "engine_error"),
                                      (__import__("torch").OutOfMemoryError, "out_of_memory")])
def test_engine_failure_is_reported_and_the_daemon_keeps_serving(monkeypatch, exc, code):
    monkeypatch.setitem(REGISTRY, "failing", (lambda device: FailingEngine(device, exc), "test"))
    daemon = Daemon(port=0, engines=("passthrough", "failing")).start()
    try:
        with Client(daemon.endpoint) as c:
            bad = c.open_stream("bad", 64, 48, engine="failing")
            good = c.open_stream("good", 64, 48)
            poison = np.full((48, 64, 3), 13, np.uint8)
            bad.send(poison)
            assert wait_until(lambda: (c.poll(0.05), bad.last_error)[1] is not None)
            assert bad.last_error.code == code
            frame = rgb(seed=2)
            assert np.array_equal(round_trip(good, frame).pixels, frame)
            assert np.array_equal(round_trip(bad, frame).pixels, frame)  # recovers too
    finally:
        daemon.stop()


def _random_value(rng: random.Random, depth: int = 0):
    choices = [None, True, False, 0, 1, -1, 7, 64, 2**31, 2**64 - 1, -2**63, 0.5, float("nan"),
               "", "x" * rng.randint(0, 300), "rgb", "float32", "passthrough", b"\x00\x01",
               "\u00e9\u4e2d"]
    if depth < 2:
        choices += [[_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    {str(rng.randint(0, 5)): _random_value(rng, depth + 1)}]
    return rng.choice(choices)


FIELDS = sorted({f for schema in P.CLIENT_MESSAGES.values() for f in schema} | {"v", "id"})


def _random_message(rng: random.Random) -> list[bytes]:
    kind = rng.random()
    if kind < 0.3:
        return [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))]
    msg = {rng.choice(FIELDS): _random_value(rng) for _ in range(rng.randint(0, 6))}
    if kind < 0.9:
        msg["v"] = 1 if rng.random() < 0.8 else _random_value(rng)
        msg["type"] = rng.choice(list(P.CLIENT_MESSAGES) + ["frame", "open", "zap"])
        if msg["type"] == "open":
            msg.update(name=f"fuzz{rng.randint(0, 5)}", width=rng.choice([64, 8, 0, 99999]),
                       height=48)
    parts = [msgpack.packb(msg, use_bin_type=True)]
    if rng.random() < 0.1:
        parts.append(bytes(rng.randint(0, 100)))
    return parts


def test_fuzzed_control_socket_leaves_the_daemon_serving(daemon, raw, bystander):
    rng = random.Random(20261122)
    sockets = [raw() for _ in range(3)]
    sockets[0].hello()
    for i in range(3000):
        sock = rng.choice(sockets)
        sock.send_bytes(*_random_message(rng))
        if i % 200 == 0:
            round_trip(bystander, rgb(seed=i))  # stays healthy during the storm
    assert daemon._thread.is_alive()
    with Client(daemon.endpoint, name="after-fuzz") as c:
        frame = rgb(seed=77)
        assert np.array_equal(round_trip(c.open_stream("after", 64, 48), frame).pixels, frame)


def test_ill_typed_output_spec_is_bad_spec_not_internal(raw, bystander):
    r = raw()
    r.hello()
    r.send({"type": "open", "id": 2, "name": "o", "width": 64, "height": 48,
            "output": {"format": ["rgb"]}})
    assert r.recv_type("error")["code"] == "bad_spec"


class SlowEngine(PassthroughEngine):
    """Takes longer than the heartbeat timeout for frames whose first pixel is 13."""

    name = "slow"

    def submit(self, batch):
        if any(item.frames[-1].pixels[0, 0, 0] == 13 for item in batch):
            time.sleep(3.5)
        return super().submit(batch)


def test_a_long_engine_step_never_silences_the_daemon(monkeypatch):
    """An engine step longer than the heartbeat timeout (kernel compilation for a new size
    takes tens of seconds on a GPU) runs on the engine thread: the front keeps answering, the
    client never even sees the daemon busy, and a passthrough stream keeps flowing meanwhile."""
    monkeypatch.setitem(REGISTRY, "slow", (lambda device: SlowEngine(device), "test"))
    daemon = Daemon(port=0, engines=("slow", "passthrough")).start()
    try:
        with Client(daemon.endpoint) as c:
            stream = c.open_stream("slow", 64, 48, engine="slow")
            quick = c.open_stream("quick", 64, 48)
            session = c.session
            stream.send(np.full((48, 64, 3), 13, np.uint8))
            busy_seen = False
            worst = 0.0
            deadline = time.monotonic() + 10
            while stream.latest() is None and time.monotonic() < deadline:
                started = time.monotonic()
                round_trip(quick, rgb(seed=int(started * 1000) % 1000))
                worst = max(worst, time.monotonic() - started)
                busy_seen |= c.daemon_busy
            assert stream.latest() is not None, "the frame of the long step never came back"
            assert not busy_seen and c.reconnects == 0 and c.session == session
            assert worst < 0.5, f"a passthrough frame waited {worst:.2f} s behind the step"
    finally:
        daemon.stop()
