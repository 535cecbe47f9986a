"""``livediffusion bench transport``: client -> daemon (passthrough) -> client round trips.

Every case runs three ways in the same process and the same minute, because these
machines are noisy and only ratios inside one run mean something:
  * shared-memory rings plus small msgpack notices (the real path),
  * the same, reading the output as a zero-copy view (``open_stream(zero_copy=True)``),
  * the same frames inline in the ZeroMQ messages (remote mode),
  * a plain memcpy of the frame's bytes (the floor any transport pays at least once),
    from memory (``memcpy_ms``, the baseline of the targets) and from cache (``memcpy_hot_ms``).

``--c-client`` adds the OBS plugin's C client core (built with CMake and libzmq), BGRA u8
round trips beside the Python client's, over shared memory and inline.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from livediffusion.shared import Client

from ..spawn import spawned_daemon
from .common import percentile, print_table, provenance, write_json

CASES = [
    ("512x512 rgb u8", 512, 512, "rgb", "uint8"),
    ("1280x720 rgb u8", 1280, 720, "rgb", "uint8"),
    ("1280x720 rgba f32", 1280, 720, "rgba", "float32"),
]


#: the OBS plugin's C client against the Python client (--c-client): BGRA u8, as OBS sends
C_CASES = [("512x512 bgra u8", 512, 512), ("1280x720 bgra u8", 1280, 720),
           ("1920x1080 bgra u8", 1920, 1080)]


def _frame(width: int, height: int, fmt: str, dtype: str) -> np.ndarray:
    channels = {"rgb": 3, "rgba": 4, "bgra": 4}[fmt]
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return rng.random((height, width, channels), dtype=np.float32)


def memcpy_ms(frame: np.ndarray, repeats: int = 60, *, cold: bool = True) -> float:
    """Median time of one np.copyto of the frame's bytes.

    ``cold`` rotates over enough source/destination pairs (64 MiB or more in all) that each
    copy reads and writes memory rather than cache, as a fresh frame does; ``cold=False``
    copies the same two buffers again and again (cache-hot, the optimistic floor).
    """
    pairs = max(2, -(-(64 << 20) // frame.nbytes)) if cold else 1
    srcs = [frame.copy() for _ in range(pairs)]
    dsts = [np.ones_like(frame) for _ in range(pairs)]
    times = []
    for i in range(repeats):
        src, dst = srcs[i % pairs], dsts[i % pairs]
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50)


def round_trips(client: Client, name: str, frame: np.ndarray, fmt: str, dtype: str,
                iterations: int, warmup: int = 20, zero_copy: bool = False
                ) -> tuple[list[float], float]:
    h, w = frame.shape[:2]
    stream = client.open_stream(name, w, h, format=fmt, dtype=dtype, zero_copy=zero_copy)
    times = []
    try:
        for i in range(warmup + iterations):
            if i == warmup:
                started = time.perf_counter()
            t0 = time.perf_counter()
            stream.send(frame)
            if stream.wait(5.0) is None:
                raise TimeoutError(f"case {name}: no frame came back within 5 s.")
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - started
    finally:
        stream.close()
    return times, iterations / elapsed


def run_transport_bench(args: argparse.Namespace) -> int:
    meta = {**provenance(), "bench": "transport", "iterations": args.iterations}
    print(f"transport round trips, passthrough engine, {args.iterations} per case "
          f"({meta['date']}, {meta['machine']}, commit {meta['commit']})")
    records = []
    with spawned_daemon("passthrough") as endpoint:
        for case, w, h, fmt, dtype in CASES:
            frame = _frame(w, h, fmt, dtype)
            # a client per transport and case: an idle one would miss its heartbeats while
            # the other measures, and the daemon would drop its session
            with Client(endpoint, name="bench-shm", transport="shm") as shm:
                t_shm, fps = round_trips(shm, f"shm {case}", frame, fmt, dtype, args.iterations)
                t_zc, _ = round_trips(shm, f"zero-copy {case}", frame, fmt, dtype,
                                      args.iterations, zero_copy=True)
            with Client(endpoint, name="bench-inline", transport="inline") as inline:
                t_inl, fps_inl = round_trips(inline, f"inline {case}", frame, fmt, dtype,
                                             args.iterations)
            copy = memcpy_ms(frame)
            copy_hot = memcpy_ms(frame, cold=False)
            p50 = percentile(t_shm, 50)
            records.append({
                "case": case, "p50_ms": round(p50, 4), "p99_ms": round(percentile(t_shm, 99), 4),
                "fps": round(fps, 1), "memcpy_ms": round(copy, 4),
                "memcpy_hot_ms": round(copy_hot, 4),
                "inline_p50_ms": round(percentile(t_inl, 50), 4),
                "inline_p99_ms": round(percentile(t_inl, 99), 4),
                "inline_fps": round(fps_inl, 1), "frame_bytes": int(frame.nbytes),
                "zero_copy_p50_ms": round(percentile(t_zc, 50), 4),
                "shm_over_memcpy": round(p50 / copy, 2) if copy else 0.0,
                "shm_over_inline": round(p50 / max(percentile(t_inl, 50), 1e-9), 3),
            })
    print_table(records, [("case", "case", ""), ("p50_ms", "shm p50 ms", ".3f"),
                          ("p99_ms", "shm p99 ms", ".3f"), ("fps", "shm FPS", ".0f"),
                          ("memcpy_ms", "memcpy ms", ".3f"),
                          ("shm_over_memcpy", "shm/memcpy", ".2f"),
                          ("memcpy_hot_ms", "hot memcpy ms", ".3f"),
                          ("zero_copy_p50_ms", "zero-copy p50 ms", ".3f"),
                          ("inline_p50_ms", "inline p50 ms", ".3f"),
                          ("shm_over_inline", "shm/inline", ".2f")])
    if getattr(args, "c_client", False):
        c_records = c_client_rows(args.iterations)
        print("\nthe OBS plugin's C client (plugins/obs/src/ld_client.c) beside the Python "
              "client, same daemon, same run")
        print_table(c_records, [("case", "case", ""), ("py_shm_p50_ms", "Python shm p50", ".3f"),
                                ("c_shm_p50_ms", "C shm p50", ".3f"),
                                ("c_shm_p99_ms", "C shm p99", ".3f"),
                                ("c_over_py_shm", "C/Python", ".2f"),
                                ("py_inline_p50_ms", "Python inline p50", ".3f"),
                                ("c_inline_p50_ms", "C inline p50", ".3f"),
                                ("c_over_py_inline", "C/Python inline", ".2f")])
        records += c_records
    write_json(args.json, records, meta)
    return 0


def c_client_rows(iterations: int) -> list[dict]:
    """Round trips of the C client core (built with CMake into the user cache) and of the
    Python client, interleaved per case against one passthrough daemon."""
    import os
    import subprocess
    from pathlib import Path

    from livediffusion.plugins.obs import build

    build_dir = Path.home() / ".cache" / "livediffusion" / "obs-core-build"
    selftest = build.selftest_path(build.build(build_dir, plugin=False, tests=True))

    def c_trips(endpoint: str, w: int, h: int, transport: str) -> dict[str, float]:
        out = subprocess.run([str(selftest), "bench", endpoint, str(w), str(h), str(iterations)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "LD_SELFTEST_TRANSPORT": transport})
        if out.returncode != 0:
            raise RuntimeError(f"the C client bench failed: {out.stderr.strip()[-300:]}")
        words = out.stdout.split()
        return {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}

    def py_trips(endpoint: str, frame: np.ndarray, transport: str) -> float:
        # a client per measurement: an idle one would miss heartbeats while C runs
        with Client(endpoint, name=f"bench-py-{transport}", transport=transport) as client:
            return percentile(round_trips(client, f"py {transport}", frame, "bgra", "uint8",
                                          iterations)[0], 50)

    rows = []
    with spawned_daemon("passthrough") as endpoint:
        for case, w, h in C_CASES:
            frame = _frame(w, h, "bgra", "uint8")
            py_shm = py_trips(endpoint, frame, "shm")
            c_shm = c_trips(endpoint, w, h, "shm")
            py_inl = py_trips(endpoint, frame, "inline")
            c_inl = c_trips(endpoint, w, h, "inline")
            rows.append({"case": f"C client {case}", "py_shm_p50_ms": round(py_shm, 4),
                         "c_shm_p50_ms": c_shm["p50_ms"], "c_shm_p99_ms": c_shm["p99_ms"],
                         "c_shm_fps": c_shm["fps"],
                         "c_over_py_shm": round(c_shm["p50_ms"] / py_shm, 3),
                         "py_inline_p50_ms": round(py_inl, 4),
                         "c_inline_p50_ms": c_inl["p50_ms"],
                         "c_over_py_inline": round(c_inl["p50_ms"] / py_inl, 3)})
    return rows
