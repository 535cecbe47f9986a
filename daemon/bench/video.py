"""``livediffusion bench video``: the video engine at real sizes with RANDOM weights.

Per resolution and step count: steady-state output FPS, time to first frame of a new stream
fed at 30 FPS, per-chunk latency p50/p99 and jitter, peak GPU memory, and a breakdown (frame
upload and conversion, VAE encode, DiT per forward, decode) with the DiT's
achieved TFLOP/s beside the bf16 matmul rate measured in the same run; with the Wan VAE
decoder and with the tiny TAEHV-layout decoder (random weights at the real widths).

By default the umT5 text encoder is replaced by a one-layer random umT5 of the real output
width: it runs once per prompt change, never per chunk.  ``--text umt5`` builds the real-size
umT5-XXL (random weights) where ``--text-placement`` says, so that the peak memory includes
it; every case changes the prompt once mid-stream and reports how long the new prompt took
to apply and the slowest chunk meanwhile.  ``--precision bf16,fp8`` runs every case again with
the DiT's linear layers in FP8 and reports, per chunk of one stream, the relative L2 error of
the flow and of the decoded frames against bf16 (and the bf16 run against itself, the noise
floor).  Weights are random: speed and memory are real, the pictures are not.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..engines.base import InputFrame, StreamConfig, StreamInput
from ..engines.video.engine import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, VideoEngine
from ..models import wan as W
from ..models.causal_wan import flops_per_chunk
from ..models.fp8 import is_quantized, quantize_blocks, relative_l2
from .common import percentile, print_table, provenance, moving_pattern, write_json
from livediffusion.shared.protocol import FrameSpec

INPUT_FPS = 30.0


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The chip's dense matmul rate measured now (bf16 on GPUs)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e12


def build_bench_engine(model: str, device: torch.device,
                       channels_last: bool | None = None,
                       compile: bool | None = None,
                       cuda_graphs: bool | None = None,
                       attention: str | None = None, text: str = "stand-in",
                       text_placement: str | None = None) -> VideoEngine:
    from ..engines.video.factory import build_video_parts
    parts = build_video_parts(model, device=str(device),
                              text="stand-in" if text == "stand-in" else "real")
    return VideoEngine(f"video-{model}", parts.transformer, parts.vae, parts.text,
                       device=str(device), min_side=parts.min_side,
                       description=f"Wan 2.1 {model}, RANDOM weights",
                       tiny_decoder=parts.tiny_decoder, tiny_encoder=parts.tiny_encoder,
                       channels_last=channels_last,
                       compile=compile, cuda_graphs=cuda_graphs, attention=attention,
                       text_placement=text_placement)


def _clip(height: int, width: int, period: int = 48):
    """The moving test pattern, cycled for ever."""
    frames = moving_pattern(height, width, period)
    i = 0
    while True:
        yield frames[i % period]
        i += 1


def _run_chunk(engine: VideoEngine, sid: int, clip, spec: FrameSpec, seq: int, n: int):
    frames = []
    for _ in range(n):
        seq += 1
        frames.append(InputFrame(seq, next(clip), spec, seq))
    out = engine.submit([StreamInput(sid, frames)])[0].frames
    with engine._stage("download"):
        pixels = [f.pixels.cpu() if hasattr(f.pixels, "cpu") else f.pixels for f in out]
    return seq, pixels


def bench_case(engine: VideoEngine, height: int, width: int, steps: int, chunks: int,
               matmul: float, decoder: str = "vae", encoder: str = "vae") -> dict:
    device = engine.device
    cuda = device.type == "cuda"
    spec = FrameSpec(width, height)
    sid = 1000 + 10 * steps
    clip = _clip(height, width)
    # warm-up on a throwaway stream: kernels, cuDNN plans and allocator pools for this shape
    params = {"steps": steps, "decoder": decoder, "encoder": encoder}
    # (with compilation: kernels for this frame size and batch are generated here)
    warm_started = time.perf_counter()
    engine.open_stream(StreamConfig(sid + 1, spec, spec, INPUT_FPS, params))
    engine.settle()  # the prompt is encoded beside the stream: not part of these figures
    try:
        seq, _ = _run_chunk(engine, sid + 1, clip, spec, 0, FIRST_CHUNK_FRAMES)
        for _ in range(steps + 3):
            seq, _ = _run_chunk(engine, sid + 1, clip, spec, seq, CHUNK_FRAMES)
    finally:
        engine.close_stream(sid + 1)
    warm_up = time.perf_counter() - warm_started
    live_at_open = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    engine.open_stream(StreamConfig(sid, spec, spec, INPUT_FPS, params))
    engine.settle()
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        seq, _ = _run_chunk(engine, sid, clip, spec, 0, FIRST_CHUNK_FRAMES)
        first_chunk = time.perf_counter() - started
        ttff = (FIRST_CHUNK_FRAMES - 1) / INPUT_FPS + first_chunk
        # fill the Stream Batch pipeline and the KV cache (on GPUs the stream's CUDA graph
        # is recorded when its cache is full: a one-time cost, reported on its own)
        fill = []
        for _ in range(engine.streams[sid].cache.policy.frames + steps + 1):
            t0 = time.perf_counter()
            seq, _ = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            fill.append(time.perf_counter() - t0)
        times = []
        for _ in range(chunks):
            t0 = time.perf_counter()
            seq, _ = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            times.append(time.perf_counter() - t0)
        # a prompt change mid-stream: encoded beside the stream (with --text umt5 the real
        # encoder, visiting from host memory where it is offloaded)
        changed = time.perf_counter()
        precision = "fp8" if is_quantized(engine.wan.model) else "bf16"
        engine.update_params(sid, {"prompt": f"a new prompt for {height}x{width} {steps} "
                                             f"{decoder} {encoder} {precision}"})
        during = []
        while engine.streams[sid].pending_prompt is not None and len(during) < 1000:
            t0 = time.perf_counter()
            seq, _ = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            during.append(time.perf_counter() - t0)
        prompt_s = time.perf_counter() - changed
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
        engine.stage_times = {}
        for _ in range(max(3, chunks // 4)):
            t0 = time.perf_counter()
            seq, _ = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            engine.stage_times.setdefault("total", []).append(time.perf_counter() - t0)
        stages = {k: 1000 * float(np.median(v)) for k, v in engine.stage_times.items()}
        engine.stage_times = None
        cache = engine.streams[sid].cache
        tokens = cache.tokens
        dit_flops = flops_per_chunk(engine.wan.model, tokens, cache.policy.frames * tokens)
        dit_ms = stages.get("dit", 0.0)
        slots = steps  # one Stream Batch forward carries every step
        minor = ("motion", "noise", "prepare", "step", "output", "download")
        known = sum(stages.get(k, 0.0) for k in ("upload", "encode", "dit", "decode", *minor))
        mean = float(np.mean(times))
        return {
            "resolution": f"{height}x{width}", "steps": steps, "decoder": decoder,
            "encoder": encoder,
            "fps": round(CHUNK_FRAMES / mean, 2), "ttff_s": round(ttff, 3),
            "chunk_p50_ms": round(1000 * percentile(times, 50), 2),
            "chunk_p99_ms": round(1000 * percentile(times, 99), 2),
            "jitter_ms": round(1000 * float(np.std(times)), 2),
            "p99_over_p50": round(percentile(times, 99) / max(percentile(times, 50), 1e-9), 2),
            "peak_gib": round(peak, 2), "reserved_gib": round(reserved, 2),
            "prompt_apply_s": round(prompt_s, 3),
            "prompt_max_chunk_ms": round(1000 * max(during), 1) if during else 0.0,
            "precision": precision,
            "upload_ms": round(stages.get("upload", 0.0), 2),
            "encode_ms": round(stages.get("encode", 0.0), 2),
            "dit_ms": round(dit_ms, 2),
            "decode_ms": round(stages.get("decode", 0.0), 2),
            "other_ms": round(stages.get("total", 0.0) - known, 2),
            **{f"{k}_ms": round(stages.get(k, 0.0), 2) for k in minor},
            "fill_max_ms": round(1000 * max(fill), 1),
            "live_gib_before_stream": round(live_at_open, 2),
            "dit_tflops": round(dit_flops * slots / (dit_ms / 1000) / 1e12, 1) if dit_ms else 0.0,
            "matmul_tflops": round(matmul, 1),
            "warm_up_s": round(warm_up, 1),
        }
    finally:
        engine.close_stream(sid)


def probe(engine: VideoEngine, height: int, width: int, steps: int, decoder: str,
          encoder: str = "vae", chunks: int = 10
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One stream's flows (every DiT forward) and decoded frames (every chunk) over the
    first ``chunks`` chunks of the test pattern: the same inputs and noise each call, so two
    calls differ only by what changed in the engine (its precision)."""
    spec = FrameSpec(width, height)
    sid = 7000 + 10 * steps
    clip = _clip(height, width)
    flows: list[torch.Tensor] = []
    forward = engine.wan.forward

    def tapped(*args, **kwargs):
        flow, chosen = forward(*args, **kwargs)
        flows.append(flow.float().cpu())
        return flow, chosen

    engine.wan.forward = tapped
    frames = []
    engine.open_stream(StreamConfig(sid, spec, spec, INPUT_FPS,
                                    {"steps": steps, "decoder": decoder, "encoder": encoder}))
    engine.settle()
    try:
        seq, out = _run_chunk(engine, sid, clip, spec, 0, FIRST_CHUNK_FRAMES)
        frames += out
        for _ in range(chunks):
            seq, out = _run_chunk(engine, sid, clip, spec, seq, CHUNK_FRAMES)
            frames += out
    finally:
        engine.close_stream(sid)
        del engine.wan.forward  # back to the class's method
    return flows, [torch.as_tensor(np.asarray(f)).float() for f in frames]


def probe_error(test, reference) -> dict:
    """Relative L2 per forward (flow) and per frame, mean and max, of ``test`` against
    ``reference`` (both from ``probe``)."""
    flow = [relative_l2(a, b) for a, b in zip(test[0], reference[0])]
    frame = [relative_l2(a, b) for a, b in zip(test[1], reference[1])]
    return {"flow_err_mean": round(float(np.mean(flow)), 5),
            "flow_err_max": round(float(np.max(flow)), 5),
            "frame_err_mean": round(float(np.mean(frame)), 5),
            "frame_err_max": round(float(np.max(frame)), 5),
            "frame_err_last": round(frame[-1], 5)}


def engine_attention(args: argparse.Namespace) -> str:
    return "cuDNN first on GPUs" if args.attention == "auto" else args.attention


def run_video_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    heights = args.height or ([480, 512] if args.model != "tiny" else [64])
    widths = args.width or ([832, 512] if args.model != "tiny" else [64])
    if len(heights) != len(widths):
        raise ValueError("give as many --width as --height.")
    steps = [int(s) for s in args.steps.split(",")]
    chunks = args.iterations if args.iterations != 200 else (30 if device.type == "cuda" else 5)
    meta = {**provenance(), "bench": "video", "model": args.model, "device": str(device),
            "weights": "random", "chunks": chunks,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    print(f"video engine, Wan 2.1 {args.model} with RANDOM weights on {meta['gpu']} "
          f"({meta['date']}, commit {meta['commit']}); text encoder: a one-layer stand-in, "
          f"not on the per-chunk path; VAE layout "
          f"{'NCDHW' if args.no_channels_last else 'auto'}; "
          f"torch.compile {'off' if args.no_compile else 'auto (on for GPUs)'}; "
          f"CUDA graphs {'off' if args.no_cuda_graphs else 'auto (on for GPUs)'}; "
          f"attention kernels {engine_attention(args)}")
    matmul = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    engine = build_bench_engine(args.model, device,
                                channels_last=False if args.no_channels_last else None,
                                compile=False if args.no_compile else None,
                                cuda_graphs=False if args.no_cuda_graphs else None,
                                attention=None if args.attention == "auto" else args.attention,
                                text=args.text, text_placement=args.text_placement
                                if args.text == "umt5" else None)
    meta["text"] = args.text if args.text == "stand-in" else \
        f"umt5-xxl (random), {engine.text_placement}"
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not set(precisions) <= {"bf16", "fp8"}:
        raise ValueError(f"precisions: bf16, fp8; not {args.precision!r}.")
    meta["attention"] = engine.wan.attention
    meta["compiled"] = engine.wan.compiled
    meta["cuda_graphs"] = engine.wan.use_graphs
    meta["vae_layout"] = "NCDHW" if engine.vae.memory_format == torch.contiguous_format \
        else "NDHWC"
    records = []
    decoders = [d.strip() for d in (args.decoders or "vae,tiny").split(",") if d.strip()]
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    cases = [(d, h, w, n, e) for e in encoders for d in decoders
             for h, w in zip(heights, widths) for n in steps]
    references: dict[tuple, tuple] = {}
    floors: dict[tuple, dict] = {}
    for precision in precisions:
        if precision == "fp8":
            if "bf16" not in precisions:
                references = {c: probe(engine, c[1], c[2], c[3], c[0], c[4]) for c in cases}
            replaced = quantize_blocks(engine.wan.model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  DiT: {replaced} linear layers now FP8", flush=True)
        for case in cases:
            decoder, h, w, n, encoder = case
            try:
                record = bench_case(engine, h, w, n, chunks, matmul, decoder, encoder)
                if precision == "bf16" and "fp8" in precisions:
                    references[case] = probe(engine, h, w, n, decoder, encoder)
                    floor = probe_error(probe(engine, h, w, n, decoder, encoder),
                                        references[case])
                    floors[case] = {f"floor_{k}": v for k, v in floor.items()}
                    record.update(floors[case])
                if precision == "fp8":
                    record.update(probe_error(probe(engine, h, w, n, decoder, encoder),
                                              references[case]))
                    record.update(floors.get(case, {}))
                records.append(record)
            except torch.OutOfMemoryError:
                print(f"  {h}x{w} steps {n} {decoder} {precision}: out of GPU memory")
                torch.cuda.empty_cache()
            print(f"  done {h}x{w} steps {n} decoder {decoder} encoder {encoder} {precision}",
                  flush=True)
    print_table(records, [("resolution", "HxW", ""), ("steps", "steps", ""),
                          ("decoder", "decoder", ""), ("encoder", "encoder", ""),
                          ("precision", "DiT", ""),
                          ("fps", "FPS", ".1f"), ("ttff_s", "TTFF s", ".3f"),
                          ("chunk_p50_ms", "p50 ms", ".1f"), ("chunk_p99_ms", "p99 ms", ".1f"),
                          ("jitter_ms", "jitter", ".1f"), ("peak_gib", "peak GiB", ".2f"),
                          ("upload_ms", "upload", ".1f"), ("encode_ms", "encode", ".1f"),
                          ("dit_ms", "DiT", ".1f"), ("decode_ms", "decode", ".1f"),
                          ("dit_tflops", "DiT TF/s", ".0f"), ("matmul_tflops", "mm TF/s", ".0f"),
                          ("warm_up_s", "warm-up s", ".0f")])
    print("\nsmaller stages, median ms per chunk (other = not inside any stage); fill max = "
          "slowest chunk while the cache filled (includes recording the CUDA graph):")
    print_table(records, [("resolution", "HxW", ""), ("steps", "steps", ""),
                          ("decoder", "decoder", ""), ("encoder", "encoder", ""),
                          ("motion_ms", "motion", ".1f"),
                          ("noise_ms", "noise", ".1f"), ("prepare_ms", "prepare", ".1f"),
                          ("step_ms", "step", ".1f"), ("output_ms", "output", ".1f"),
                          ("download_ms", "download", ".1f"), ("other_ms", "other", ".1f"),
                          ("fill_max_ms", "fill max", ".0f"),
                          ("live_gib_before_stream", "GiB live before", ".2f")])
    print("\nmemory (peak allocated / reserved by the allocator, GiB, one stream, a prompt "
          "change included) and the prompt change (seconds until the new prompt applied, "
          "slowest chunk meanwhile):")
    print_table(records, [("resolution", "HxW", ""), ("steps", "steps", ""),
                          ("decoder", "decoder", ""), ("encoder", "encoder", ""),
                          ("precision", "DiT", ""),
                          ("peak_gib", "peak GiB", ".2f"), ("reserved_gib", "reserved GiB", ".2f"),
                          ("prompt_apply_s", "prompt s", ".3f"),
                          ("prompt_max_chunk_ms", "max chunk ms", ".1f")])
    if "fp8" in precisions:
        print("\nFP8 against bf16, relative L2 per DiT forward (flow) and per decoded frame, "
              "one stream over its first chunks (floor: bf16 against itself):")
        print_table([r for r in records if r["precision"] == "fp8"],
                    [("resolution", "HxW", ""), ("steps", "steps", ""),
                     ("decoder", "decoder", ""), ("encoder", "encoder", ""),
                     ("flow_err_mean", "flow mean", ".4f"),
                     ("flow_err_max", "flow max", ".4f"), ("frame_err_mean", "frame mean", ".4f"),
                     ("frame_err_max", "frame max", ".4f"), ("frame_err_last", "frame last", ".4f"),
                     ("floor_flow_err_max", "floor flow", ".4f"),
                     ("floor_frame_err_max", "floor frame", ".4f")])
    write_json(args.json, records, meta)
    return 0
