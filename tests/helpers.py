"""Helpers shared by the tests (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from livediffusion.shared import protocol as P


class Raw:
    """A bare DEALER socket: send anything, read replies as dicts."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send_bytes(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def send(self, msg: dict[str, Any], *extra: bytes) -> None:
        body = dict(msg)
        body.setdefault("v", P.PROTOCOL_VERSION)
        self.send_bytes(msgpack.packb(body, use_bin_type=True), *extra)

    def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        parts = self.sock.recv_multipart()
        return msgpack.unpackb(parts[0], raw=False)

    def recv_type(self, mtype: str, timeout: float = 3.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg.get("type") == mtype:
                return msg

    def hello(self) -> dict[str, Any]:
        self.send({"type": "hello", "id": 1, "client": "raw"})
        return self.recv_type("welcome")

    def close(self) -> None:
        self.sock.close(0)



def rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def round_trip(stream, frame: np.ndarray, timeout: float = 5.0):
    stream.send(frame)
    out = stream.wait(timeout)
    assert out is not None, "no frame came back"
    return out


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def send_until_back(stream, frame: np.ndarray, timeout: float = 10.0):
    """Keep sending ``frame`` until a processed frame comes back (across a reconnect)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stream.send(frame)
        got = stream.wait(0.1)
        if got is not None:
            return got
    return None


def engine_of(daemon, name: str):
    """The engine object behind a running daemon (tests look inside; the daemon's own front
    never does: it only has the capabilities its worker reported)."""
    for worker in daemon.workers:
        if name in worker.engines:
            return worker.worker.engines[name]
    raise KeyError(name)


def daemon_stat(daemon, stream_id: int, key: str):
    """One of a stream's counters as the daemon's stats report it (0 once it is gone)."""
    try:
        return daemon.stream_stats(stream_id)[key]
    except KeyError:
        return 0


def feed_chunks(engine, sid: int, spec, chunks: int, seed: int = 0) -> list:
    """Feed an engine's stream ``chunks`` steps of seeded random uint8 frames (as many per
    step as the engine asks for); returns every OutputFrame it gave back."""
    from livediffusion.daemon.engines.base import InputFrame, StreamInput
    rng = np.random.default_rng(seed)
    seq, out = 0, []
    for _ in range(chunks):
        frames = []
        for _ in range(engine.frames_per_step(sid)):
            seq += 1
            frames.append(InputFrame(seq, rng.integers(0, 256, spec.shape, dtype=np.uint8),
                                     spec, seq))
        out += engine.submit([StreamInput(sid, frames)])[0].frames
    return out
