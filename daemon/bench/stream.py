"""``livediffusion bench stream``: what a host sees through a real daemon and real clients.

For each scheduler policy a real daemon is started (``livediffusion daemon``, its own
process); for each case (decoder, steps) and each number of streams N, N real clients, each
a process of its own as a host would be, open a stream and send frames at F FPS from a
moving test pattern while reading ``latest()`` at the host's own rate.  Measured as the host
reads them:

* distinct FPS per stream (frames with a new seq seen through ``latest()``), their sum
  (aggregate) and their spread (fairness: min / max);
* glass-to-glass latency p50 / p99 (input sent -> output readable, the client's own clock);
* time to first frame (first frame sent -> first output readable);
* drops (frames the daemon never processed: replaced in the mailbox or skipped to keep a
  fair rate) and deadline misses (frames ready after their paced time);
* events, after the steady window: another stream opens, stream 0 changes its prompt (a new
  text each time, so it is really encoded), the other stream closes, and stream 0 moves to
  yet another prompt, seed and noise scale over a 2 s timed transition (its prompt encoded
  first, then blended chunk by chunk); the longest gap between two distinct frames of every
  running stream around each event, beside one chunk period, and the distinct FPS of stream
  0 while it moves.

Beside it, in the same run: the previous policy ("rr": round robin, no pacing, no rates) and
the engine's own throughput (``bench video``'s measurement of one stream, no daemon).
Weights are random: speed is real, pictures are not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..server import free_port
from .common import percentile, print_table, provenance, moving_pattern, write_json

#: seconds a fresh case runs before its steady window starts (first chunks, rates settle)
SETTLE_S = 3.0


# --- the host: one client process per stream ----------------------------------------------

def host(conn, endpoint: str, name: str, width: int, height: int, fps: float, engine: str,
         params: dict, start_at: float, stop_at: float, poll_hz: float,
         prompts: list[tuple[float, str, float]]) -> None:
    """A host: from ``start_at`` open a stream, send at ``fps``, read ``latest()`` at
    ``poll_hz``; at each (time, text, seconds) of ``prompts`` change the prompt (over a timed
    transition of that many seconds when > 0, with a new seed and noise scale); until
    ``stop_at``.
    Sends back what it saw (monotonic times are one clock across processes here)."""
    from livediffusion.shared import Client, DaemonError

    frames = moving_pattern(height, width)
    out: dict[str, Any] = {"name": name, "seen": [], "sent": 0, "first_sent": None,
                           "refused": None, "prompt_times": []}
    try:
        with Client(endpoint, name=name) as client:
            client.connect(timeout=60)
            while time.monotonic() < start_at:
                client.poll(min(0.05, max(0.0, start_at - time.monotonic())))
            out["open_at"] = time.monotonic()
            try:
                stream = client.open_stream(name, width, height, engine=engine, fps=fps,
                                            params=params, timeout=300)
            except DaemonError as exc:
                out["refused"] = {"code": exc.code, "message": exc.message,
                                  "sustainable_fps": exc.sustainable_fps}
                conn.send(out)
                return
            out["opened_at"] = time.monotonic()
            out["serve_fps"] = stream.serve_fps
            period, poll = 1.0 / fps, 1.0 / poll_hz
            next_send = time.monotonic()
            last_seq, i = 0, 0
            pending = sorted(prompts)
            while True:
                now = time.monotonic()
                if now >= stop_at:
                    break
                if now >= next_send:
                    if stream.send(frames[i % len(frames)]):
                        out["sent"] += 1
                        if out["first_sent"] is None:
                            out["first_sent"] = now
                    i += 1
                    next_send += period
                    if next_send < now - period:   # fell behind (a busy machine): skip
                        next_send = now + period
                if pending and now >= pending[0][0]:
                    _, text, over = pending.pop(0)
                    if over > 0:
                        stream.update(prompt=text, seed=7, noise_scale=0.6, transition=over)
                    else:
                        stream.update(prompt=text)
                    out["prompt_times"].append(now)
                frame = stream.latest()
                if frame is not None and frame.seq != last_seq:
                    last_seq = frame.seq
                    out["seen"].append((time.monotonic(), frame.seq, frame.in_seq,
                                        frame.latency_ms))
                time.sleep(max(0.0, min(next_send, now + poll) - time.monotonic()))
            out["daemon"] = client.stats().get(name, {}).get("daemon", {})
            stream.close()
    except Exception as exc:  # noqa: BLE001 - reported in the table, not a traceback
        out["error"] = f"{type(exc).__name__}: {exc}"
    conn.send(out)


# --- the daemon under test ---------------------------------------------------------------

class DaemonProcess:
    """``livediffusion daemon`` in a process of its own, its log in a file."""

    def __init__(self, engine: str, device: str, policy: str, warm_up: str | None,
                 warm_up_params: str | None = None, gpus: str | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="ld-bench-")) / f"daemon-{policy}.log"
        cmd = [sys.executable, "-m", "livediffusion.daemon", "--log-level",
               os.environ.get("LIVEDIFFUSION_BENCH_LOG", "info"), "daemon", "--port", str(self.port),
               "--engines", engine, "--device", device, "--policy", policy]
        if policy == "rr":
            cmd.append("--no-pacing")  # the previous daemon published chunks at once
        if warm_up:
            cmd += ["--warm-up", warm_up]
        if warm_up_params:
            cmd += ["--warm-up-params", warm_up_params]
        if gpus is not None:
            cmd += ["--gpus", gpus]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}); its log:\n"
                                   f"{self.log.read_text()[-3000:]}")
            if "listening on" in self.log.read_text():
                return
            time.sleep(0.2)
        raise RuntimeError(f"the daemon did not start within {timeout:.0f} s; its log:\n"
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- one case ----------------------------------------------------------------------------

def _gaps(times: list[float], start: float, end: float) -> float:
    """Longest gap between consecutive distinct frames inside [start, end] (seconds), with
    the window's edges counting as frames' neighbours only where frames exist."""
    inside = [t for t in times if start <= t <= end]
    before = [t for t in times if t < start]
    points = ([before[-1]] if before else []) + inside
    if len(points) < 2:
        return end - start
    return max(b - a for a, b in zip(points, points[1:]))


def run_case(endpoint: str, engine: str, n: int, width: int, height: int, fps: float,
             params: dict, seconds: float, poll_hz: float, events: bool, tag: str
             ) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    t0 = time.monotonic() + 3.0   # the clients' interpreters start meanwhile
    steady0 = t0 + SETTLE_S
    steady1 = steady0 + seconds
    open_at, prompt_at, close_at = steady1 + 0.5, steady1 + 3.5, steady1 + 6.5
    move_at, move_s = steady1 + 9.0, 2.0
    end = move_at + move_s + 3.0 if events else steady1
    jobs = []
    for k in range(n):
        prompts = [(prompt_at, f"a new prompt {tag} {time.time_ns()}", 0.0),
                   (move_at, f"a moving prompt {tag} {time.time_ns()}", move_s)] \
            if events and k == 0 else []
        jobs.append((f"s{k}", t0 + 0.05 * k, end, prompts))
    if events:
        jobs.append(("joiner", open_at, close_at, []))
    procs = []
    for name, start, stop, prompts in jobs:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=host, args=(child, endpoint, name, width, height, fps,
                                              engine, params, start, stop, poll_hz, prompts))
        proc.start()
        procs.append((name, proc, parent))
    results = {}
    for name, proc, parent in procs:
        if parent.poll(end - time.monotonic() + 120):
            results[name] = parent.recv()
        else:
            results[name] = {"name": name, "error": "no report", "seen": []}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    streams = [results[f"s{k}"] for k in range(n)]
    errors = [r["error"] for r in results.values() if r.get("error")]
    refused = [r for r in streams if r.get("refused")]
    chunk = 4.0 / fps   # the video engine's chunk period
    per_fps, lat, ttff, drops, late = [], [], [], 0, 0
    for r in streams:
        seen = r["seen"]
        window = [s for s in seen if steady0 <= s[0] <= steady1]
        per_fps.append(len(window) / seconds)
        lat += [s[3] for s in window]
        if seen and r.get("first_sent"):
            ttff.append(seen[0][0] - r["first_sent"])
        d = r.get("daemon", {})
        drops += int(d.get("dropped", 0)) + int(d.get("decimated", 0))
        late += int(d.get("late", 0))
    record: dict[str, Any] = {
        "streams": n, "fps_in": fps,
        "fps_mean": round(float(np.mean(per_fps)), 2) if per_fps else 0.0,
        "fps_min": round(min(per_fps), 2) if per_fps else 0.0,
        "fps_max": round(max(per_fps), 2) if per_fps else 0.0,
        "aggregate_fps": round(sum(per_fps), 2),
        "latency_p50_ms": round(percentile(lat, 50), 1),
        "latency_p99_ms": round(percentile(lat, 99), 1),
        "ttff_s": round(max(ttff), 3) if ttff else float("nan"),
        "steady_gap_ms": round(1000 * max((_gaps([s[0] for s in r["seen"]], steady0, steady1)
                                           for r in streams), default=0.0), 1),
        "drops": drops, "late": late, "chunk_ms": round(1000 * chunk, 1),
        "refused": len(refused), "errors": errors,
        # what each host saw (ms after the case began: distinct frame, its input seq, its
        # latency) and each stream's daemon stats at the end: for reading a case afterwards
        "timeline": {r["name"]: [[round(1000 * (s[0] - t0)), s[2], round(s[3], 1)]
                                 for s in r.get("seen", [])] for r in results.values()},
        "events_ms": {"steady": [round(1000 * (steady0 - t0)), round(1000 * (steady1 - t0))],
                      "open": round(1000 * (open_at - t0)),
                      "prompt": round(1000 * (prompt_at - t0)),
                      "close": round(1000 * (close_at - t0)),
                      "transition": round(1000 * (move_at - t0))} if events else {},
        "daemon_stats": {r["name"]: r.get("daemon", {}) for r in results.values()},
    }
    if events:
        joiner = results.get("joiner", {})
        times = {r["name"]: [s[0] for s in r["seen"]] for r in streams}
        record["open_gap_ms"] = round(1000 * max(_gaps(t, open_at, open_at + 2.5)
                                                 for t in times.values()), 1)
        record["close_gap_ms"] = round(1000 * max(_gaps(t, close_at, close_at + 2.0)
                                                  for t in times.values()), 1)
        record["prompt_self_gap_ms"] = round(1000 * _gaps(times["s0"], prompt_at,
                                                          prompt_at + 2.5), 1)
        others = [t for name, t in times.items() if name != "s0"]
        record["prompt_others_gap_ms"] = round(1000 * max(
            (_gaps(t, prompt_at, prompt_at + 2.5) for t in others), default=0.0), 1)
        # the timed transition: its prompt is encoded first (a gap like a prompt change's at
        # most), then every chunk applies a blend: no gap beyond the steady ones, full rate
        record["transition_gap_ms"] = round(1000 * _gaps(times["s0"], move_at,
                                                         move_at + move_s + 2.0), 1)
        moving = [t for t in times["s0"] if move_at + 0.5 <= t <= move_at + move_s + 0.5]
        record["transition_fps"] = round(len(moving) / move_s, 2)
        jseen = joiner.get("seen", [])
        record["joiner_ttff_s"] = round(jseen[0][0] - joiner["first_sent"], 3) \
            if jseen and joiner.get("first_sent") else float("nan")
        record["joiner_refused"] = bool(joiner.get("refused"))
        if joiner.get("refused"):
            record["joiner_sustainable_fps"] = joiner["refused"].get("sustainable_fps")
    return record


# --- the command ---------------------------------------------------------------------------

def _cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    if getattr(args, "cases", None):
        out = []
        for part in args.cases.split(","):
            decoder, steps = part.split(":")
            out.append((decoder.strip(), int(steps)))
        return out
    decoders = [d.strip() for d in (args.decoders or "vae").split(",") if d.strip()]
    steps = [int(s) for s in (args.steps or "2").split(",")]
    return [(d, s) for d in decoders for s in steps]


def engine_throughput(model: str, device: str, width: int, height: int, steps: int,
                      decoder: str) -> float:
    """The engine alone (``bench video``'s measurement), FPS of one stream."""
    import torch

    from .video import build_bench_engine, bench_case
    engine = build_bench_engine(model, torch.device(device))
    chunks = 30 if device.startswith("cuda") else 5
    try:
        return bench_case(engine, height, width, steps, chunks, 0.0, decoder)["fps"]
    finally:
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def run_stream_bench(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    model = args.model or ("1.3b" if cuda else "tiny")
    engine = "video-tiny" if model == "tiny" else f"video-{model}-random"
    width, height = args.size or ((832, 480) if model != "tiny" else (64, 64))
    seconds = args.seconds or (10.0 if cuda else 6.0)
    poll_hz = args.poll_hz or (250.0 if cuda else 120.0)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    cases = _cases(args)
    meta = {**provenance(), "bench": "stream", "model": model, "engine": engine,
            "device": device, "size": f"{width}x{height}", "fps_in": args.fps,
            "seconds": seconds, "poll_hz": poll_hz, "weights": "random",
            "gpus": args.gpus}
    if cuda:
        import torch
        meta["gpu"] = torch.cuda.get_device_name(0)
    print(f"stream benchmark: {engine}"
          f"{f' split over pipeline ranks --gpus {args.gpus}' if args.gpus else ''} at "
          f"{width}x{height}, clients at {args.fps:g} FPS, "
          f"{seconds:g} s steady per case, hosts read latest() at {poll_hz:g} Hz "
          f"({meta['date']}, commit {meta['commit']}; RANDOM weights)", flush=True)
    records = []
    for policy in policies:
        # every case's shapes compiled before serving, as a user would with --warm-up
        daemon = DaemonProcess(engine, device, policy, f"{width}x{height}",
                               ";".join(f"steps={s},decoder={d}" for d, s in cases),
                               gpus=args.gpus)
        try:
            daemon.wait_ready(1200 if cuda else 300)
            print(f"  daemon ({policy}) ready; log {daemon.log}", flush=True)
            for decoder, steps in cases:
                params = {"steps": steps, "decoder": decoder}
                for n in clients:
                    # an unmeasured pass: every batch shape of this case compiled, costs known
                    run_case(daemon.endpoint, engine, n, width, height, args.fps, params,
                             2.0, poll_hz, False, "prime")
                    rec = run_case(daemon.endpoint, engine, n, width, height, args.fps,
                                   params, seconds, poll_hz, not args.no_events,
                                   f"{policy}-{decoder}-{steps}-{n}")
                    rec.update(policy=policy, decoder=decoder, steps=steps)
                    records.append(rec)
                    print(f"  {policy} {decoder} {steps} steps, {n} stream(s): "
                          f"{rec['fps_mean']:.1f} distinct FPS each, aggregate "
                          f"{rec['aggregate_fps']:.1f}" +
                          (f"; errors: {rec['errors']}" if rec["errors"] else ""), flush=True)
        finally:
            daemon.stop()
            # the daemon's own words (first-step compiles, warnings) beside the figures
            meta.setdefault("daemon_log", {})[policy] = [
                line for line in daemon.log.read_text(errors="replace").splitlines()
                if " WARNING " in line or " ERROR " in line or "first step" in line
                or "prompt" in line][-40:]
    engine_fps = {}
    if not args.no_engine_bench:
        for decoder, steps in cases:
            try:
                engine_fps[(decoder, steps)] = engine_throughput(model, device, width, height,
                                                                 steps, decoder)
            except Exception as exc:  # noqa: BLE001 - the daemon's figures still stand
                print(f"  the engine's own throughput ({decoder}, {steps} steps) could not "
                      f"be measured: {type(exc).__name__}: {exc}", flush=True)
    for rec in records:
        fps = engine_fps.get((rec["decoder"], rec["steps"]))
        rec["engine_fps"] = fps if fps is not None else float("nan")
        rec["aggregate_over_engine"] = round(rec["aggregate_fps"] / fps, 2) if fps else \
            float("nan")
        rec["p99_over_p50"] = round(rec["latency_p99_ms"] / rec["latency_p50_ms"], 2) \
            if rec["latency_p50_ms"] else float("nan")
    columns = [("policy", "policy", ""), ("decoder", "decoder", ""), ("steps", "steps", ""),
               ("streams", "N", ""), ("fps_mean", "FPS each", ".1f"),
               ("fps_min", "min", ".1f"), ("fps_max", "max", ".1f"),
               ("aggregate_fps", "aggregate", ".1f"), ("engine_fps", "engine alone", ".1f"),
               ("aggregate_over_engine", "agg/engine", ".2f"),
               ("latency_p50_ms", "lat p50 ms", ".0f"), ("latency_p99_ms", "p99 ms", ".0f"),
               ("p99_over_p50", "p99/p50", ".2f"), ("ttff_s", "TTFF s", ".2f"),
               ("drops", "drops", ""), ("late", "late", "")]
    print()
    print_table(records, columns)
    if not args.no_events:
        print("\nlongest gap between two distinct frames (ms) around events, beside the steady "
              "window's and one chunk period:")
        print_table(records, [("policy", "policy", ""), ("decoder", "decoder", ""),
                              ("steps", "steps", ""), ("streams", "N", ""),
                              ("chunk_ms", "chunk", ".0f"), ("steady_gap_ms", "steady", ".0f"),
                              ("open_gap_ms", "open", ".0f"), ("close_gap_ms", "close", ".0f"),
                              ("prompt_self_gap_ms", "prompt (self)", ".0f"),
                              ("prompt_others_gap_ms", "prompt (others)", ".0f"),
                              ("transition_gap_ms", "transition", ".0f"),
                              ("transition_fps", "FPS moving", ".1f"),
                              ("joiner_ttff_s", "joiner TTFF s", ".2f"),
                              ("joiner_refused", "joiner refused", "")])
    write_json(args.json, records, meta)
    return 0
