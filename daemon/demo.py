"""``livediffusion demo``: a clip through a real daemon, written to a video, with numbers."""

from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from livediffusion.shared import Client

from .engines import REGISTRY, best_engine
from .spawn import spawned_daemon


def test_clip(width: int, height: int, frames: int) -> Iterator[np.ndarray]:
    """A procedurally generated clip: drifting colour field, a bouncing disc, a counter."""
    import cv2

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(frames):
        t = i / 30.0
        r = 0.5 + 0.5 * np.sin(xx / width * 6.28 + t)
        g = 0.5 + 0.5 * np.sin(yy / height * 6.28 + 1.3 * t)
        b = 0.5 + 0.5 * np.sin((xx + yy) / (width + height) * 6.28 - 0.7 * t)
        img = (np.stack([r, g, b], -1) * 200).astype(np.uint8)
        cx = int(width * (0.5 + 0.35 * math.sin(1.7 * t)))
        cy = int(height * (0.5 + 0.35 * abs(math.cos(2.3 * t))))
        cv2.circle(img, (cx, cy), max(4, min(width, height) // 8), (255, 240, 40), -1)
        cv2.putText(img, f"{i:04d}", (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.4, height / 400), (255, 255, 255), 1, cv2.LINE_AA)
        yield img


def capture_clip(source: str, width: int, height: int, frames: int) -> Iterator[np.ndarray]:
    """Frames from a video file or a webcam ('webcam:N'), resized, as RGB u8."""
    import cv2

    cap = cv2.VideoCapture(int(source.split(":", 1)[1]) if source.startswith("webcam:")
                           else source)
    if not cap.isOpened():
        raise OSError(f"cannot open video source {source!r}.")
    try:
        for _ in range(frames):
            ok, bgr = cap.read()
            if not ok:
                return
            bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--param takes KEY=VALUE, not {pair!r}.")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def run_demo(args: argparse.Namespace) -> int:
    import cv2

    engine = best_engine() if args.engine == "auto" else args.engine
    if engine not in REGISTRY:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(REGISTRY)}.")
    width, height = args.size
    params = _params(args.param)
    if engine == "video-tiny":
        params.setdefault("decoder", "tiny")  # the fast decoder keeps 2 CPU cores interactive
    print(f"livediffusion demo: engine {engine}, {width}x{height} at {args.fps:g} FPS, "
          f"{args.frames} frames")
    if engine == "passthrough":
        print("  (passthrough returns frames unchanged; it measures the transport itself)")
    elif engine == "video-tiny":
        print("  The tiny preset is the real Wan 2.1 architecture at toy size with RANDOM weights:\n"
              "  its output is abstract colour, not a restyled video. For the real model run\n"
              "  'livediffusion models pull wan-1.3b' and then 'livediffusion demo --engine video'\n"
              "  on a CUDA GPU.")
    clip = capture_clip(args.source, width, height, args.frames) if args.source \
        else test_clip(width, height, args.frames)
    writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), args.fps,
                             (2 * width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write video {args.output!r}.")
    sent_frames: OrderedDict[int, np.ndarray] = OrderedDict()
    written = 0
    out_times: list[float] = []

    def write(out) -> None:
        nonlocal written
        src = sent_frames.get(out.in_seq)
        if src is None:
            src = np.zeros_like(out.pixels)
        writer.write(cv2.cvtColor(np.concatenate([src, out.pixels], 1), cv2.COLOR_RGB2BGR))
        written += 1
        out_times.append(time.perf_counter())

    with spawned_daemon(engine, device="auto") as endpoint:
        with Client(endpoint, name="demo") as client:
            stream = client.open_stream("demo", width, height, engine=engine, params=params,
                                        fps=args.fps, keep=8, timeout=120)
            period = 1.0 / args.fps
            next_at = time.perf_counter()
            sent = 0
            caps = client.capabilities["engines"][engine]
            per_step = int(caps.get("frames_per_step", 1))
            step_end = int(caps.get("first_step_frames", per_step))

            def consumed(n: int, timeout: float = 60.0) -> None:
                """Without pacing: wait until the engine has taken the frames sent, so none
                is dropped (flow control on consumption, since output may lag)."""
                deadline = time.perf_counter() + timeout
                while time.perf_counter() < deadline:
                    if client.stats()["demo"].get("daemon", {}).get("frames_in", 0) >= n:
                        return
                    for done in stream.frames():
                        write(done)
                    client.poll(0.02)
            for frame in clip:
                if not args.no_realtime:
                    while (delay := next_at - time.perf_counter()) > 0:
                        client.poll(delay)
                    next_at += period
                if stream.send(frame):
                    sent += 1
                    sent_frames[sent] = frame
                    while len(sent_frames) > 64:
                        sent_frames.popitem(last=False)
                if args.no_realtime and sent == step_end:
                    consumed(sent)
                    step_end += per_step
                for out in stream.frames():
                    write(out)
            # let the last frames come back (until none arrives for half a second)
            while stream.stats()["received"] < sent:
                if stream.wait(2.0) is None:
                    break
                for out in stream.frames():
                    write(out)
            stats = client.stats()["demo"]
    writer.release()
    c, d = stats["client"], stats.get("daemon", {})
    print(f"  frames sent {sent}, received {c['received']}, written {written} -> {args.output}")
    span = out_times[-1] - out_times[0] if len(out_times) > 1 else 0.0
    fps = (len(out_times) - 1) / span if span > 0 else 0.0
    pacing = "as fast as possible" if args.no_realtime else f"input paced at {args.fps:g} FPS"
    print(f"  output FPS {fps:.1f} over {span:.1f} s ({pacing})")
    print(f"  latency p50 {c['latency_p50_ms']:.1f} ms, p99 {c['latency_p99_ms']:.1f} ms; "
          f"engine step {d.get('engine_ms', 0):.2f} ms")
    print(f"  dropped: daemon {d.get('dropped', 0)}, client-side skipped {c['skipped']}, "
          f"torn {c['torn'] + d.get('torn', 0)}")
    if c["received"] == 0:
        raise RuntimeError("no frame came back from the daemon.")
    return 0
