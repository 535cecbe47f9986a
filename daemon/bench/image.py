"""``livediffusion bench image``: the image engine at real sizes with RANDOM weights.

Per case (model, size, steps, guidance mode): img2img output FPS of one stream fed as fast as
it takes frames, per-frame latency p50/p99, peak GPU memory, and the UNet's share of a frame.
The similarity filter is off (it would skip work).  Weights are random: speed and memory are
real, the pictures are not.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..engines.base import InputFrame, StreamConfig, StreamInput
from ..engines.image.factory import build_image_engine
from .common import percentile, print_table, provenance, write_json
from livediffusion.shared.protocol import FrameSpec

MODELS = {"sd-turbo": "sd-turbo", "sd15-lcm": "sd15", "sdxl-turbo": "sdxl-turbo", "tiny": "tiny"}


def _frames(height: int, width: int, n: int = 16) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(n):
        t = 2 * np.pi * i / n
        img = np.stack([np.sin(xx / 30 + t), np.sin(yy / 40 + 2 * t), np.cos((xx - yy) / 50)], -1)
        out.append(((img * 0.5 + 0.5) * 255).astype(np.uint8))
    return out


def bench_case(engine, height: int, width: int, steps: int, cfg: str, iterations: int,
               streams: int) -> dict:
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spec = FrameSpec(width, height)
    frames = _frames(height, width)
    params = {"steps": steps, "cfg": cfg, "guidance": 1.0 if cfg == "none" else 1.2,
              "strength": 0.5}
    sids = list(range(1, streams + 1))
    for sid in sids:
        engine.open_stream(StreamConfig(sid, spec, spec, 30.0, params))
    # the prompt is encoded beside the streams; until it is, frames are let go (a benchmark
    # without this timed nothing: fixed 2026-12-01)
    engine.settle()
    try:
        seq = 0

        def step():
            nonlocal seq
            seq += 1
            batch = [StreamInput(sid, [InputFrame(seq, frames[seq % len(frames)], spec, seq)])
                     for sid in sids]
            out = engine.submit(batch)
            for o in out:
                for f in o.frames:
                    f.pixels.cpu() if hasattr(f.pixels, "cpu") else f.pixels
            return out

        warm = time.perf_counter()
        for _ in range(5):
            step()
        sync()
        warm = time.perf_counter() - warm
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        unet_times = []
        real_unet = engine._unet

        def timed_unet(*args):
            sync()
            t0 = time.perf_counter()
            out = real_unet(*args)
            sync()
            unet_times.append(time.perf_counter() - t0)
            return out

        for _ in range(iterations):
            t0 = time.perf_counter()
            out = step()
            sync()
            times.append(time.perf_counter() - t0)
            if sum(len(o.frames) for o in out) != streams:
                raise RuntimeError(f"a step gave {sum(len(o.frames) for o in out)} frames for "
                                   f"{streams} streams: nothing to time.")
        engine._unet = timed_unet
        try:
            for _ in range(max(3, iterations // 5)):
                step()
        finally:
            engine._unet = real_unet
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        mean = float(np.mean(times))
        return {"resolution": f"{height}x{width}", "steps": steps, "cfg": cfg,
                "streams": streams, "fps": round(streams / mean, 1),
                "latency_p50_ms": round(1000 * percentile(times, 50), 2),
                "latency_p99_ms": round(1000 * percentile(times, 99), 2),
                "unet_ms": round(1000 * float(np.median(unet_times)), 2),
                "peak_gib": round(peak, 2), "warm_up_s": round(warm, 1)}
    finally:
        for sid in sids:
            engine.close_stream(sid)


def run_image_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model = args.model or "sd-turbo"
    if model not in MODELS:
        raise ValueError(f"image models: {', '.join(MODELS)}; not {model!r}.")
    heights = args.height or ([512] if model != "tiny" else [64])
    widths = args.width or ([512] if model != "tiny" else [64])
    if len(heights) != len(widths):
        raise ValueError("give as many --width as --height.")
    steps = [int(s) for s in (args.steps or "1").split(",")]
    cfgs = [c.strip() for c in (args.cfg or "self").split(",") if c.strip()]
    iterations = args.iterations if args.iterations != 200 else \
        (100 if device.type == "cuda" else 10)
    meta = {**provenance(), "bench": "image", "model": model, "device": str(device),
            "weights": "random", "vae": args.vae, "iterations": iterations,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    print(f"image engine, {model} with RANDOM weights, {args.vae} VAE, on {meta['gpu']} "
          f"({meta['date']}, commit {meta['commit']}); one frame per stream per step, "
          f"similarity filter off")
    engine = build_image_engine(MODELS[model], device=str(device), vae=args.vae)
    records = []
    counts = [int(n) for n in str(args.streams).split(",")]
    graphs = [g.strip() for g in args.vae_graphs.split(",") if g.strip()]
    if not set(graphs) <= {"on", "off"}:
        raise ValueError(f"--vae-graphs takes on and off, not {args.vae_graphs!r}.")
    for h, w in zip(heights, widths):
        for n in steps:
            for cfg in cfgs:
                for streams in counts:
                    for vae_graphs in graphs:  # alternating, so drift hits both alike
                        on = vae_graphs == "on" and device.type == "cuda"
                        for call in (engine.encode_call, engine.decode_call):
                            call.enabled = call.static = on
                        try:
                            record = bench_case(engine, h, w, n, cfg, iterations, streams)
                            records.append({**record, "vae_graphs": vae_graphs})
                        except torch.OutOfMemoryError:
                            print(f"  {h}x{w} steps {n} cfg {cfg}: out of GPU memory")
                            torch.cuda.empty_cache()
    print_table(records, [("resolution", "HxW", ""), ("steps", "steps", ""), ("cfg", "cfg", ""),
                          ("streams", "streams", ""), ("vae_graphs", "VAE graphs", ""),
                          ("fps", "FPS", ".1f"),
                          ("latency_p50_ms", "p50 ms", ".1f"),
                          ("latency_p99_ms", "p99 ms", ".1f"), ("unet_ms", "UNet ms", ".1f"),
                          ("peak_gib", "peak GiB", ".2f"), ("warm_up_s", "warm-up s", ".1f")])
    write_json(args.json, records, meta)
    return 0
