"""The client library: non-blocking use, reconnection, and what it may import."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon, free_port
from livediffusion.shared import Client

from helpers import daemon_stat, rgb, round_trip, send_until_back, wait_until


def test_shared_imports_only_stdlib_pyzmq_msgpack_numpy():
    code = ("import sys; before = set(sys.modules); "
            "import livediffusion.shared, livediffusion.shared.client; "
            "print('\\n'.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "zmq" in out and "msgpack" in out  # the probe really saw the imports
    allowed = set(sys.stdlib_module_names) | {"zmq", "msgpack", "numpy", "livediffusion",
                                              "cython_runtime"}  # pyzmq's compiled core
    foreign = [m for m in out if m not in allowed and not m.startswith("_")]
    assert foreign == []


def test_calls_never_block_without_a_daemon():
    c = Client(f"tcp://127.0.0.1:{free_port()}", name="lonely")
    c.connect(timeout=0)
    stream = c.open_stream("s", 64, 48, timeout=0)
    started = time.perf_counter()
    for _ in range(50):
        assert stream.send(rgb()) is False
        assert stream.latest() is None
    assert (time.perf_counter() - started) / 50 < 0.005
    assert stream.counters["not_sent"] == 50 and c.state == "connecting"
    c.close()


def test_connect_with_timeout_names_the_missing_daemon():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match="livediffusion daemon"):
        Client(endpoint).connect(timeout=0.3)


def test_non_blocking_open_becomes_ready_while_polling(daemon):
    c = Client(daemon.endpoint)
    c.connect(timeout=0)
    stream = c.open_stream("lazy", 64, 48, timeout=0)
    assert not stream.ready
    assert wait_until(lambda: (c.poll(0.02), stream.ready)[1])
    assert np.array_equal(round_trip(stream, rgb()).pixels, rgb())
    c.close()


def test_new_frame_returns_each_frame_once(client):
    stream = client.open_stream("once", 64, 48)
    assert stream.latest() is None
    round_trip(stream, rgb())
    assert stream.new_frame() is None  # wait() already delivered it
    assert stream.latest() is not None  # latest() keeps showing the newest


def test_context_manager_closes_streams_and_session(daemon):
    with Client(daemon.endpoint) as c:
        c.open_stream("cm", 64, 48)
    assert wait_until(lambda: not daemon.sessions and not daemon.streams)


def test_client_reconnects_and_reopens_after_the_daemon_restarts():
    port = free_port()
    first = Daemon(port=port).start()
    c = Client(f"tcp://127.0.0.1:{port}").connect()
    stream = c.open_stream("survivor", 64, 48)
    round_trip(stream, rgb())
    first.stop()
    second = Daemon(port=port).start()
    try:
        frame = rgb(seed=5)
        got = send_until_back(stream, frame)
        assert got is not None and np.array_equal(got.pixels, frame)
        assert c.reconnects >= 1 and stream.counters["reopened"] >= 1
        assert "survivor" in second._names
    finally:
        c.close()
        second.stop()


def test_silent_client_is_dropped_after_3_s_then_recovers_by_itself(daemon):
    c = Client(daemon.endpoint).connect()
    stream = c.open_stream("sleepy", 64, 48)
    round_trip(stream, rgb())
    time.sleep(3.6)  # the host froze: no heartbeats
    assert wait_until(lambda: "sleepy" not in daemon._names)
    frame = rgb(seed=6)
    got = send_until_back(stream, frame)
    assert got is not None and np.array_equal(got.pixels, frame)
    c.close()


def test_heartbeats_keep_an_idle_client_alive(daemon):
    c = Client(daemon.endpoint).connect()
    c.open_stream("idle", 64, 48)
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        c.poll(0.1)  # what a host does every frame, without sending any frame
    assert "idle" in daemon._names and c.reconnects == 0
    c.close()


def test_zero_copy_frames_are_read_only_views_that_know_when_they_are_stale(client):
    stream = client.open_stream("zc", 64, 48, zero_copy=True, slots=2)
    first = round_trip(stream, rgb(seed=1))
    assert np.array_equal(first.pixels, rgb(seed=1)) and first.intact()
    assert not first.pixels.flags.writeable
    with pytest.raises(ValueError):
        first.pixels[0, 0, 0] = 1
    slots = stream._ring_out.slots
    for i in range(slots - 1):
        round_trip(stream, rgb(seed=2 + i))
        assert first.intact()  # not reused while younger slots are free
    round_trip(stream, rgb(seed=9))  # the daemon has reused first's slot by now
    assert not first.intact()


def test_kept_frames_each_keep_their_own_pixels(client, daemon):
    stream = client.open_stream("keep", 16, 8, keep=6)
    for value in range(1, 7):  # one at a time, so the daemon drops none
        stream.send(np.full((8, 16, 3), value, np.uint8))
        assert wait_until(lambda: daemon_stat(daemon, stream.id, 'frames_out') == value)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 6 and time.monotonic() < deadline:
        client.poll(0.05)
        got += stream.frames()
    assert [int(f.pixels[0, 0, 0]) for f in got] == [1, 2, 3, 4, 5, 6]


def test_an_open_that_timed_out_does_not_keep_the_name(daemon):
    c = Client(daemon.endpoint).connect()
    try:
        with pytest.raises(TimeoutError):
            c.open_stream("slow-open", 64, 48, timeout=1e-6)
        assert wait_until(lambda: (c.poll(0.02), not c._opening)[1])  # the late OPENED came
        assert wait_until(lambda: (c.poll(0.02), "slow-open" not in daemon._names)[1])
        assert c.open_stream("slow-open", 64, 48).ready
    finally:
        c.close()


def test_every_package_folder_is_in_the_distribution():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"livediffusion." + ".".join(p.parent.relative_to(root).parts)
             for top in ("daemon", "shared", "plugins")
             for p in (root / top).rglob("__init__.py")}
    assert found == listed
