"""``livediffusion bench video --gpus N``: the video engine split over N pipeline ranks.

Per case (resolution, steps, decoder): steady output FPS, time to first frame, per-step
p50/p99, and each rank's stage time (its blocks, plus the VAE encode on the first and head,
sampler step and decode on the last) with its busy share of a step.  With one device it
also runs, in the same process and alternating case by case:
  * the plain engine (no pipeline code), for the pipeline code's own cost;
  * the one-rank pipeline on the *stage path*: its blocks run as two stages one after the
    other (each a fixed-shape forward of its own, tokens handed from one to the next, one
    refresh read-back each), what two ranks of a multi-GPU pipeline run; with
    the whole forward's, the per-block time comes from it;
and prints the scaling model's prediction for 2 and 4 GPUs (``partition.pipeline_fps``: the
best split of the measured per-block times with the VAE at the ends, each stage paying one
activation transfer at an assumed NVLink rate).  Weights are random; speed is real.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from livediffusion.shared.protocol import FrameSpec

from ..engines.base import StreamConfig
from ..engines.video.engine import CHUNK_FRAMES, FIRST_CHUNK_FRAMES
from ..parallel.partition import partition, pipeline_fps, stage_times
from ..parallel.pipeline import parse_gpus
from .common import percentile, print_table, provenance, write_json
from .video import INPUT_FPS, _clip, _run_chunk, build_bench_engine

#: activation transfer between neighbouring GPUs assumed by the model: NVLink 4 as NCCL
#: point-to-point reaches it on H100/H200 boards (a fraction of the 450 GB/s per direction),
#: plus a fixed cost per message
LINK_GBPS = 300.0
LINK_FIXED_MS = 0.05


def run_case(engine, height: int, width: int, steps: int, chunks: int, decoder: str) -> dict:
    spec = FrameSpec(width, height)
    clip = _clip(height, width)
    params = {"steps": steps, "decoder": decoder}
    sid = 2000 + steps
    for warm in (True, False):
        engine.open_stream(StreamConfig(sid, spec, spec, INPUT_FPS, params))
        engine.settle()
        try:
            started = time.perf_counter()
            seq, first = _run_chunk(engine, sid, clip, spec, 0, FIRST_CHUNK_FRAMES)
            ttff = time.perf_counter() - started
            n = (10 if warm else 0) + 6 + steps
            for _ in range(n):  # fill the cache and the pipeline
                seq, _ = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            if warm:
                continue
            times, frames = [], 0
            for _ in range(chunks):
                t0 = time.perf_counter()
                seq, out = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
                times.append(time.perf_counter() - t0)
                frames += len(out)
        finally:
            engine.close_stream(sid)
    mean = float(np.mean(times))
    record = {"resolution": f"{height}x{width}", "steps": steps, "decoder": decoder,
              "fps": round(CHUNK_FRAMES / mean, 2),
              "frames_out_fps": round(frames / float(np.sum(times)), 2),
              "ttff_s": round(ttff + (FIRST_CHUNK_FRAMES - 1) / INPUT_FPS, 3),
              "first_frames": len(first),
              "p50_ms": round(1000 * percentile(times, 50), 2),
              "p99_ms": round(1000 * percentile(times, 99), 2)}
    ranks = getattr(engine, "ranks", None)
    if ranks is not None:
        step_ms = 1000 * mean
        record["ranks"] = [
            {"rank": r, "blocks": [rng.start, rng.stop],
             "blocks_ms": round(t.get("blocks", 0.0), 2),
             "encode_ms": round(t.get("encode", 0.0), 2),
             "extra_ms": round(t.get("extra", 0.0), 2),
             "busy": round(min(1.0, (t.get("blocks", 0.0) + t.get("encode", 0.0) +
                                    t.get("extra", 0.0)) / step_ms), 3)}
            for r, (rng, t) in enumerate(zip(ranks.ranges, ranks.stage_ms))]
    return record


def activation_bytes(engine, height: int, width: int, steps: int) -> int:
    """What one tick sends from rank to rank: tokens, latents, time embeddings."""
    wan = engine.wan
    dim = wan.heads * wan.head_dim
    tokens = wan.tokens_per_frame(height // 8, width // 8)
    elem = torch.finfo(wan.dtype).bits // 8
    per_element = tokens * dim * elem + 16 * (height // 8) * (width // 8) * elem + 7 * dim * 4
    return steps * per_element


def predict(block_ms: list[float], encode_ms: float, end_ms: float, transfer_ms: float,
            ranks: int) -> dict:
    extra = [0.0] * ranks
    extra[0] += encode_ms
    extra[-1] += end_ms
    split = partition(block_ms, ranks, extra)
    stages = stage_times(block_ms, split, extra)
    return {"gpus": ranks, "fps": round(pipeline_fps(block_ms, ranks, extra, transfer_ms), 1),
            "split": [[r.start, r.stop] for r in split],
            "stage_ms": [round(s, 2) for s in stages]}


def run_pipeline_bench(args: argparse.Namespace) -> int:
    from ..engines.video.pipelined import build_pipeline_engine
    devices = parse_gpus(args.gpus)
    cuda = devices[0].startswith("cuda")
    model = args.model or ("1.3b" if cuda else "tiny6")
    heights = args.height or ([480, 512] if cuda else [64])
    widths = args.width or ([832, 512] if cuda else [64])
    steps = [int(s) for s in (args.steps or "1,2").split(",")]
    decoders = [d.strip() for d in (args.decoders or "vae,tiny").split(",") if d.strip()]
    chunks = args.iterations if args.iterations != 200 else (40 if cuda else 6)
    meta = {**provenance(), "bench": "video-pipeline", "model": model, "devices": devices,
            "weights": "random", "chunks": chunks,
            "gpu": torch.cuda.get_device_name(devices[0]) if cuda else "cpu",
            "torch": torch.__version__}
    print(f"video engine over {len(devices)} pipeline rank(s) {devices}, Wan 2.1 {model} with "
          f"RANDOM weights on {meta['gpu']} ({meta['date']}, commit {meta['commit']})")
    engines = {}
    if len(devices) == 1:
        engines["plain"] = build_bench_engine(model, torch.device(devices[0]))
    pipe = build_pipeline_engine(f"bench:{model}", devices, name=f"video-{model}",
                                 rebalance_every=64)
    engines["pipeline"] = pipe
    if len(devices) == 1:
        engines["stage path"] = pipe
    records, predictions = [], []
    try:
        for decoder in decoders:
            for h, w in zip(heights, widths):
                for n in steps:
                    case = {}
                    for label, engine in engines.items():
                        if engine is pipe:
                            pipe.stage.split = 2 if label == "stage path" else 0
                        rec = run_case(engine, h, w, n, chunks, decoder)
                        rec["engine"] = label
                        case[label] = rec
                        records.append(rec)
                    if "plain" in case:
                        case["pipeline"]["vs_plain"] = round(
                            case["pipeline"]["fps"] / case["plain"]["fps"], 3)
                        case["stage path"]["vs_plain"] = round(
                            case["stage path"]["fps"] / case["plain"]["fps"], 3)
                        predictions += _predictions(pipe, case["stage path"], h, w, n,
                                                    decoder, "stage path")
                        predictions += _predictions(pipe, case["pipeline"], h, w, n,
                                                    decoder, "whole forward")
                    print(f"  done {h}x{w} steps {n} decoder {decoder}", flush=True)
    finally:
        pipe.shutdown()
    print_table(records, [("engine", "engine", ""), ("resolution", "HxW", ""),
                          ("steps", "steps", ""), ("decoder", "decoder", ""),
                          ("fps", "FPS", ".1f"), ("frames_out_fps", "out FPS", ".1f"),
                          ("ttff_s", "TTFF s", ".3f"), ("p50_ms", "p50 ms", ".1f"),
                          ("p99_ms", "p99 ms", ".1f"), ("vs_plain", "vs plain", ".3f")])
    rank_rows = [{"engine": r["engine"], "resolution": r["resolution"], "steps": r["steps"],
                  "decoder": r["decoder"], **rk} for r in records for rk in r.get("ranks", [])]
    if rank_rows:
        print("\nper rank, latest stage times (ms per step) and busy share of a step:")
        print_table(rank_rows, [("engine", "engine", ""), ("resolution", "HxW", ""),
                                ("steps", "steps", ""), ("decoder", "decoder", ""),
                                ("rank", "rank", ""), ("blocks", "blocks", ""),
                                ("blocks_ms", "blocks", ".2f"), ("encode_ms", "encode", ".2f"),
                                ("extra_ms", "head+decode", ".2f"), ("busy", "busy", ".2f")])
    if predictions:
        print(f"\nscaling model (per-block time from the stage path or the whole forward, VAE "
              f"encode on the first "
              f"rank, head+decode on the last, transfers at {LINK_GBPS:.0f} GB/s + "
              f"{LINK_FIXED_MS} ms; a prediction, not a measurement):")
        print_table(predictions, [("resolution", "HxW", ""), ("steps", "steps", ""),
                                  ("decoder", "decoder", ""), ("basis", "per-block basis", ""),
                                  ("gpus", "GPUs", ""),
                                  ("fps", "predicted FPS", ".1f"),
                                  ("transfer_ms", "transfer ms", ".3f"), ("split", "split", ""),
                                  ("stage_ms", "stage ms", "")])
    meta["predictions"] = predictions
    write_json(args.json, records, meta)
    return 0


def _predictions(pipe, rec: dict, h: int, w: int, steps: int, decoder: str, basis: str
                 ) -> list[dict]:
    """Predicted FPS on 1, 2 and 4 GPUs from one measured one-rank case: per-block time from
    the stage path (two stage forwards: what ranks of several run) or from the whole forward
    (one graph: the floor)."""
    times = rec["ranks"][0]
    blocks = pipe.wan.num_blocks
    block_ms = [times["blocks_ms"] / blocks] * blocks
    transfer_ms = activation_bytes(pipe, h, w, steps) / (LINK_GBPS * 1e9) * 1000 + \
        LINK_FIXED_MS
    one = {"resolution": f"{h}x{w}", "steps": steps, "decoder": decoder, "basis": basis,
           "transfer_ms": round(transfer_ms, 3)}
    out = []
    for n in (1, 2, 4):
        if n <= blocks:
            out.append({**one, **predict(block_ms, times["encode_ms"], times["extra_ms"],
                                         transfer_ms, n)})
    return out
