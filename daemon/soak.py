"""``livediffusion soak``: the faults a hostile or unlucky local client brings, bounded, against
a real daemon process, with a bystander stream measured throughout.

Each phase runs while a well-behaved host streams passthrough frames and measures its round
trip; the table compares what was seen with the limits the daemon promises:

* fuzz: random bytes and random msgpack maps as control messages;
* flood: a prompt change storm on a video stream (coalesced by the daemon);
* non-finite: NaN and Inf in float frames and in parameters;
* oversized: a 1 MiB prompt and a huge bad value (answered with their request id);
* truncation: a client shrinks its own input ring, then announces a frame;
* killed: a client process killed mid-stream (its stream released within 0.5 s);
* restart: the daemon restarted under clients of every engine (streaming again <= 2 s).

Limits: zero crashes, bystander p99 within 1.5x of its own quiet p99, cleanup <= 0.5 s
after a disconnect, clients streaming again <= 2 s after the daemon is back, zero leaked
shared-memory segments.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import numpy as np


class DaemonProc:
    def __init__(self, port: int, engines: str) -> None:
        self.port, self.engines = port, engines
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livediffusion.daemon", "daemon", "--port", str(self.port),
             "--engines", self.engines], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:   # type: ignore[union-attr]
            if "listening on" in line:
                threading.Thread(target=lambda: [None for _ in self.proc.stdout],
                                 daemon=True).start()   # keep draining its log
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError("the daemon did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


BYSTANDER = """
import sys, time
import numpy as np
from livediffusion.shared import Client
c = Client(sys.argv[1], name="bystander")
c.connect(timeout=30)
s = c.open_stream("bystander", 64, 48)
frame = np.full((48, 64, 3), 77, np.uint8)
print("ready", flush=True)
while True:
    t0 = time.perf_counter()
    s.send(frame)
    got = s.wait(1.0)
    print(f"{time.monotonic()} {(time.perf_counter() - t0) * 1000 if got is not None else -1}",
          flush=True)
    time.sleep(0.02)
"""


class Bystander:
    """A well-behaved host in a process of its own (so the soak's own load does not count
    against it): passthrough round trips, timed, all through the soak."""

    def __init__(self, endpoint: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BYSTANDER, endpoint],
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":   # type: ignore[union-attr]
            raise RuntimeError("the bystander could not open its stream")
        self.times: list[tuple[float, float]] = []   # (when, round trip ms)
        self.failures = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:   # type: ignore[union-attr]
            when, ms = (float(x) for x in line.split())
            if ms < 0:
                self.failures += 1
            else:
                self.times.append((when, ms))

    def p99(self, since: float, until: float) -> float:
        xs = [ms for t, ms in self.times if since <= t <= until]
        return float(np.percentile(xs, 99)) if len(xs) >= 5 else float("nan")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def _raw(endpoint: str):
    import zmq
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def phase_fuzz(endpoint: str, seconds: float) -> dict[str, Any]:
    sock, rng, sent = _raw(endpoint), random.Random(0), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if rng.random() < 0.5:
            sock.send(rng.randbytes(rng.randint(0, 300)))
        else:
            sock.send(msgpack.packb({"v": 1, "type": rng.choice(
                ["hello", "open", "params", "frame", "stats", "close", "x"]),
                "id": rng.randint(-5, 5), rng.choice("abc"): rng.random()}))
        sent += 1
        while sock.poll(0):
            sock.recv_multipart()
    sock.close(0)
    return {"messages": sent}


def phase_flood(endpoint: str, seconds: float) -> dict[str, Any]:
    from livediffusion.shared import Client
    with Client(endpoint, name="flooder") as c:
        s = c.open_stream("flood", 64, 48, engine="video-tiny", timeout=60)
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            s.update(prompt=f"flood {n}")   # as fast as the client's queue takes them
            n += 1
            c.poll(0)
        t0 = time.monotonic()
        while True:   # the client's own queue drains first
            try:
                s.update(prompt="settled", wait=30.0)
                break
            except TimeoutError:
                if time.monotonic() - t0 > 60:
                    raise
                c.poll(0.05)
        return {"changes": n, "last change applied after s": round(time.monotonic() - t0, 2)}


def phase_non_finite(endpoint: str) -> dict[str, Any]:
    from livediffusion.shared import Client
    from livediffusion.shared.client import DaemonError
    with Client(endpoint, name="nan") as c:
        s = c.open_stream("nan", 64, 48, dtype="float32", engine="video-tiny",
                          output={"dtype": "float32"}, timeout=60)
        bad = np.full((48, 64, 3), np.nan, np.float32)
        finite = seen = 0
        for i in range(16):
            s.send(bad if i == 2 else np.random.default_rng(i).random((48, 64, 3),
                                                                       dtype=np.float32))
            got = s.wait(5.0)
            if got is not None:
                seen += 1
                finite += bool(np.isfinite(got.pixels).all())
        refused = 0
        for change in ({"noise_scale": float("nan")}, {"prompts": [["a", float("inf")]]}):
            try:
                s.update(change, wait=5.0)
            except DaemonError:
                refused += 1
        return {"finite outputs": f"{finite}/{seen}",
                "non-finite params refused": f"{refused}/2"}


def phase_oversized(endpoint: str) -> dict[str, Any]:
    sock = _raw(endpoint)
    sock.send(msgpack.packb({"v": 1, "type": "hello", "id": 1, "client": "big"}))
    sock.recv_multipart()
    t0 = time.monotonic()
    sock.send(msgpack.packb({"v": 1, "type": "control", "name": "x", "id": 9,
                             "params": {"prompt": "x" * (1 << 20)}}))
    answered = sock.poll(5000)
    reply = msgpack.unpackb(sock.recv_multipart()[0]) if answered else {}
    sock.close(0)
    return {"answered with its id": reply.get("re") == 9,
            "after s": round(time.monotonic() - t0, 3)}


def phase_truncation(endpoint: str) -> dict[str, Any]:
    from livediffusion.shared import Client
    with Client(endpoint, name="truncator") as c:
        s = c.open_stream("trunc", 64, 48)
        s.send(np.zeros((48, 64, 3), np.uint8))
        s.wait(5.0)
        name = s.ring_name
        if name is None or not os.path.exists(f"/dev/shm/{name}"):
            return {"skipped": "no shared-memory ring here"}
        os.truncate(f"/dev/shm/{name}", 64)
        # a hostile client announces a frame in it anyway (this library would not write)
        c._send({"type": "frame", "stream": s.id, "seq": 99, "slot": 1})  # noqa: SLF001
        deadline = time.monotonic() + 5
        while s.last_error is None and time.monotonic() < deadline:
            c.poll(0.05)
        return {"error": (s.last_error.code if s.last_error else "none")}


def phase_killed(endpoint: str) -> dict[str, Any]:
    from livediffusion.shared import Client
    code = ("from livediffusion.shared import Client\n"
            f"c = Client({endpoint!r}, name='doomed').connect()\n"
            "c.open_stream('doomed', 32, 16)\nprint('ready', flush=True)\n"
            "while True: c.poll(0.1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()   # type: ignore[union-attr]
    with Client(endpoint, name="probe") as probe:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        while any(x["name"] == "doomed" for x in probe.streams(timeout=5.0)) and \
                time.monotonic() - t0 < 5:
            time.sleep(0.01)
        return {"released after s": round(time.monotonic() - t0, 3)}


def phase_restart(daemon: DaemonProc) -> dict[str, Any]:
    from livediffusion.shared import Client
    hosts = []
    for engine in ("passthrough", "image-tiny", "video-tiny"):
        c = Client(daemon.endpoint, name=f"r-{engine}")
        c.connect(timeout=30)
        hosts.append((c, c.open_stream(f"r-{engine}", 64, 64, engine=engine, timeout=60)))
    daemon.stop()
    daemon.start()
    back_at = time.monotonic()
    again = {}
    for c, s in hosts:
        deadline = back_at + 30
        while time.monotonic() < deadline:
            s.send(np.zeros((64, 64, 3), np.uint8))
            if s.wait(0.1) is not None:
                again[s.name] = round(time.monotonic() - back_at, 2)
                break
        c.close()
    return {"streaming again after s": again}


def run_soak(args: argparse.Namespace) -> int:
    from .bench.common import print_table
    from .server import free_port
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    daemon = DaemonProc(free_port(), "passthrough,image-tiny,video-tiny")
    daemon.start()
    rows: list[dict[str, Any]] = []
    by = Bystander(daemon.endpoint)
    time.sleep(args.quiet)
    quiet = by.p99(time.monotonic() - args.quiet, time.monotonic())
    for name, run in (("fuzz", lambda: phase_fuzz(daemon.endpoint, args.seconds)),
                      ("flood", lambda: phase_flood(daemon.endpoint, args.seconds)),
                      ("non-finite", lambda: phase_non_finite(daemon.endpoint)),
                      ("oversized", lambda: phase_oversized(daemon.endpoint)),
                      ("truncation", lambda: phase_truncation(daemon.endpoint)),
                      ("killed", lambda: phase_killed(daemon.endpoint))):
        t0 = time.monotonic()
        try:
            figures = run()
        except Exception as exc:  # noqa: BLE001 - a phase that breaks is a row, not a crash
            figures = {"failed": f"{type(exc).__name__}: {exc}"[:120]}
        p99 = by.p99(t0, time.monotonic())
        rows.append({"phase": name, "daemon alive": daemon.alive(),
                     "bystander p99 ms": round(p99, 1),
                     # (a phase too short for 5 round trips has no p99 of its own)
                     "within 1.5x quiet": bool(p99 != p99 or p99 <= 1.5 * quiet + 5.0),
                     "figures": ", ".join(f"{k} {v}" for k, v in figures.items())})
    by.close()
    figures = phase_restart(daemon)
    rows.append({"phase": "restart", "daemon alive": daemon.alive(), "bystander p99 ms": "",
                 "within 1.5x quiet": "", "figures": ", ".join(
                     f"{k} {v}" for k, v in figures.items())})
    daemon.stop()
    time.sleep(0.5)
    leaked = (set(os.listdir("/dev/shm")) - shm_before) if os.path.isdir("/dev/shm") else set()
    leaked = {n for n in leaked if n.startswith("ld")}
    print(f"soak against a daemon on {daemon.endpoint}; the bystander's quiet p99 "
          f"{quiet:.1f} ms")
    print_table(rows, [(k, k, "") for k in rows[0]])
    print(f"leaked shared-memory segments: {len(leaked)}")
    ok = all(r["daemon alive"] for r in rows) and not leaked and \
        all(r["within 1.5x quiet"] in (True, "") for r in rows)
    print("PASS" if ok else "FAIL")
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"quiet_p99_ms": quiet, "rows": rows, "leaked": sorted(leaked),
                       "pass": ok}, fh, indent=1, default=str)
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("soak", help="faults and bad input against a real daemon, bounded",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="length of the fuzz and flood")
    p.add_argument("--quiet", type=float, default=2.0,
                   help="seconds of the bystander alone first (its reference p99)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    p.set_defaults(func=run_soak)
