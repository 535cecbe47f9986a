"""The image engine: StreamDiffusion-style img2img on SD-family UNets.

Per frame of a stream with n stages (``lcm.py`` has the formulas):
1. the stochastic similarity filter may skip the frame (the previous output goes out again,
   at the usual cadence);
2. the frame is encoded (TAESD-layout tiny VAE or the full VAE) to z and noised to stage 0;
3. ONE UNet call advances every stage of every stream of the same size: the newest frame at
   stage 0, older frames at later stages (Stream Batch), with the guidance mode's extra rows;
4. the frame leaving the last stage is decoded; the others move one stage on, re-noised with
   the stage's seeded noise, their residual noise carried with them.

A stream's buffers start from its first frame (noised to every stage), so the first output
is already a picture of the input, not a warm-up frame.  Every parameter is live; a change
re-derives only what depends on it (``update_params``).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ...frames import as_tensor, from_canonical, to_canonical
from ..base import (Engine, EngineError, OutputFrame, StreamConfig, StreamInput, StreamOutput,
                    check_size, prompt_texts)
from ..beside import Beside
from ..graphs import GraphedCall
from . import lcm
from . import params as P
from ...config import env_flag

log = logging.getLogger("livediffusion.image")


@dataclass
class ImageStream:
    config: StreamConfig
    params: P.ImageParams
    latent_h: int
    latent_w: int
    sched: lcm.Schedule
    noise: torch.Tensor                 # (n, 4, h, w) seeded stage noise
    #: prompt conditioning (embeddings [, pooled, time ids]); None until the first is encoded
    cond: dict[str, torch.Tensor] | None
    uncond: dict[str, torch.Tensor] | None  # negative prompt conditioning
    buf_x: torch.Tensor | None = None   # (n-1, 4, h, w) latents at stages 1..n-1
    buf_r: torch.Tensor | None = None   # their residual noise
    last_z: torch.Tensor | None = None  # the newest input latent (re-derives buffers)
    prev_input: torch.Tensor | None = None  # the last processed input (similarity filter)
    last_out: torch.Tensor | None = None    # the last output frame (output spec)
    skips: int = 0
    rng: random.Random = field(default_factory=random.Random)
    fresh: torch.Generator | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"processed": 0, "skipped": 0})
    pending: Future | None = None       # conditioning being encoded beside the stream


class ImageEngine(Engine):
    def __init__(self, name: str, models, *, device: str = "cpu", min_side: int = 256,
                 max_side: int = 1024, description: str = "",
                 text_thread: bool | None = None) -> None:
        self.name = name
        self.device = torch.device(device)
        self.models = models
        self.unet, self.vae = models.unet, models.vae
        self.dtype = next(self.unet.parameters()).dtype
        self.tiny_vae = type(self.vae).__name__ == "AutoencoderTiny"
        self.min_side, self.max_side = min_side, max_side
        self.description = description
        self.streams: dict[int, ImageStream] = {}
        self._text_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._text_lock = threading.Lock()  # the cache is shared with the text thread
        #: new prompts are encoded beside the streams (default on GPUs, where the CLIP
        #: encode would hold up every stream's step; a toy CPU encoder takes a millisecond)
        self.text_thread = self.device.type == "cuda" if text_thread is None else text_thread
        self._beside = Beside(self.device)
        #: the UNet call replayed as a CUDA graph per batch shape on GPUs
        #: (LIVEDIFFUSION_CUDA_GRAPHS=0 turns it off)
        cuda = self.device.type == "cuda" and \
            env_flag("LIVEDIFFUSION_CUDA_GRAPHS")
        self.unet_call = GraphedCall(self._unet_raw, enabled=cuda, name="the UNet")
        #: the VAE's encode and decode likewise (TAESD at 512x512 is ~100 small kernels
        #: each way: launch-bound like the UNet)
        self.encode_call = GraphedCall(self._encode, enabled=cuda, name="the VAE encoder")
        self.decode_call = GraphedCall(self._decode, enabled=cuda, name="the VAE decoder")

    # --- interface ---------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"frames_per_step": 1,
                "sizes": {"min": self.min_side, "max": self.max_side, "multiple": 8},
                "params": P.ImageParams().to_dict(), "device": str(self.device),
                "schema": P.SCHEMA.to_list(),
                "description": self.description}

    def max_batch(self) -> int:
        return 8

    def open_stream(self, config: StreamConfig) -> dict[str, Any]:
        w, h = config.input.width, config.input.height
        check_size(self.name, config.input, self.min_side, self.max_side, 8)
        params, _ = P.apply(P.ImageParams(), config.params)
        stream = ImageStream(config, params, h // 8, w // 8, self._schedule(params),
                             torch.empty(0), None, None)
        self._want_conditioning(stream, params)
        self._renoise(stream)
        self.streams[config.stream_id] = stream
        return params.to_dict()

    def update_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        stream = self.streams[stream_id]
        old = stream.params
        new, reset = P.apply(old, changes)
        changed = {k for k in P.ImageParams.__dataclass_fields__
                   if getattr(old, k) != getattr(new, k)}
        stream.params = new
        if changed & P.PROMPT_FIELDS:
            self._want_conditioning(stream, new)
        if new.indices() != old.indices():
            stream.sched = self._schedule(new)
            self._renoise(stream)
            self._restart_buffers(stream)  # from the newest input, at the new stages
        elif changed & P.NOISE_FIELDS:
            self._renoise(stream)
        if reset:
            self.reset_stream(stream_id)
        return new.to_dict()

    def check_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        return P.apply(self.streams[stream_id].params, changes)[0].to_dict()

    def prepare(self, stream_id: int, params: Mapping[str, Any]) -> bool:
        texts = prompt_texts(params) + [params.get("negative_prompt", "")]

        def cached(text: str) -> bool:
            with self._text_lock:
                return text in self._text_cache
        return self._beside.ready(stream_id, texts, cached, self._text,
                                  inline=not self.text_thread)

    def reset_stream(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        stream.buf_x = stream.buf_r = stream.last_z = None
        stream.prev_input = stream.last_out = None
        stream.skips = 0
        self._renoise(stream)

    def close_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._beside.forget(stream_id)

    def shutdown(self) -> None:
        self._beside.shutdown()

    def stream_ready(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is None or self._take_conditioning(stream)

    def settle(self, timeout: float | None = 30.0) -> None:
        for stream in self.streams.values():
            if stream.pending is not None:
                stream.pending.exception(timeout)
                self._take_conditioning(stream)

    @torch.no_grad()
    def submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        outputs: dict[int, list[OutputFrame]] = {item.stream_id: [] for item in batch}
        todo: list[tuple[ImageStream, Any, torch.Tensor]] = []
        for item in batch:
            stream = self.streams[item.stream_id]
            if not self._take_conditioning(stream):
                continue  # its first prompt is still being encoded: the frame is let go
            if len(item.frames) != 1:
                raise EngineError(f"expected 1 frame per step, got {len(item.frames)}.")
            frame = item.frames[0]
            rgb = to_canonical(as_tensor(frame.pixels, self.device), frame.spec)  # H, W, 3
            if self._skip(stream, rgb):
                outputs[item.stream_id].append(OutputFrame(stream.last_out, frame.seq,
                                                           frame.ts))
                continue
            todo.append((stream, frame, rgb))
        groups: dict[tuple[int, int], list] = {}
        for entry in todo:
            groups.setdefault((entry[0].latent_h, entry[0].latent_w), []).append(entry)
        for group in groups.values():
            for (stream, frame, _), pixels in zip(group, self._step(group)):
                stream.last_out = pixels
                outputs[stream.config.stream_id].append(OutputFrame(pixels, frame.seq,
                                                                    frame.ts))
        return [StreamOutput(item.stream_id, outputs[item.stream_id]) for item in batch]

    # --- one step over streams of the same size ------------------------------------------------

    def _step(self, group: list) -> list[torch.Tensor]:
        streams = [s for s, _, _ in group]
        x = torch.stack([rgb.permute(2, 0, 1) for _, _, rgb in group]) * 2.0 - 1.0
        z = self.encode_call(x.to(self.dtype))
        lat, ts, conds, pending = [], [], [], []
        for i, stream in enumerate(streams):
            zi = z[i:i + 1]
            stream.last_z = zi
            if stream.buf_x is None and stream.sched.stages > 1:
                self._restart_buffers(stream)
            noise = self._frame_noise(stream)
            sch = stream.sched
            x0 = sch.a[:1] * zi + sch.b[:1] * noise[:1]
            xs = x0 if sch.stages == 1 else torch.cat([x0, stream.buf_x], 0)
            rs = noise[:1] if sch.stages == 1 else torch.cat([noise[:1], stream.buf_r], 0)
            mode = stream.params.cfg if stream.params.guidance != 1.0 else "none"
            rows = [(xs, sch.timesteps, stream.cond)]
            if mode == "full":
                rows.append((xs, sch.timesteps, stream.uncond))
            elif mode == "initialize":
                rows.append((xs[:1], sch.timesteps[:1], stream.uncond))
            spans = []
            for xr, tr, cond in rows:
                spans.append((sum(t.shape[0] for t in lat), xr.shape[0]))
                lat.append(xr)
                ts.append(tr)
                conds.append((cond, xr.shape[0]))
            pending.append((stream, xs, rs, noise, mode, spans))
        eps_all = self._unet(torch.cat(lat, 0), torch.cat(ts, 0), conds)
        finals = []
        for stream, xs, rs, noise, mode, spans in pending:
            p, sch = stream.params, stream.sched
            start, n = spans[0]
            eps_c = eps_all[start:start + n]
            eps_u = None
            if mode == "full":
                eps_u = eps_all[spans[1][0]:spans[1][0] + n]
            elif mode in ("self", "initialize"):
                eps_u = p.delta * rs
                if mode == "initialize":
                    first = eps_all[spans[1][0]:spans[1][0] + 1]
                    rs = torch.cat([first, rs[1:]], 0)
                    eps_u = torch.cat([first, eps_u[1:]], 0)
            eps = lcm.guide(eps_c, eps_u, p.guidance)
            x0_hat = lcm.denoise(xs, eps.to(xs.dtype), sch, slice(None))
            finals.append(x0_hat[-1:])
            if sch.stages > 1:
                nxt = noise[1:]
                stream.buf_x = sch.a[1:] * x0_hat[:-1] + sch.b[1:] * nxt
                stream.buf_r = lcm.carry_residual(x0_hat[:-1], xs[:-1], rs[:-1], nxt, sch)
            stream.counters["processed"] += 1
        images = self.decode_call(torch.cat(finals, 0))        # B, 3, H, W in [-1, 1]
        rgb = ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        return [from_canonical(rgb[i], s.config.output) for i, s in enumerate(streams)]

    def _unet(self, x: torch.Tensor, t: torch.Tensor, conds: list) -> torch.Tensor:
        emb = torch.cat([c["emb"].expand(n, -1, -1) for c, n in conds], 0).to(self.dtype)
        inputs = [x.to(self.dtype), t, emb]
        if self.models.xl:
            inputs += [torch.cat([c["pooled"].expand(n, -1) for c, n in conds], 0),
                       torch.cat([c["time_ids"].expand(n, -1) for c, n in conds], 0)]
        return self.unet_call(*inputs)

    def _unet_raw(self, x, t, emb, pooled=None, time_ids=None) -> torch.Tensor:
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=emb, **extra).sample

    # --- pieces ------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiny_vae:
            return self.vae.encode(x).latents
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.tiny_vae:
            return self.vae.decode(z).sample
        return self.vae.decode(z / self.vae.config.scaling_factor).sample

    def _skip(self, stream: ImageStream, rgb: torch.Tensor) -> bool:
        """Stochastic similarity filter: skip with probability
        max(0, 1 - (1 - cos) / (1 - threshold)), at most ``max_skip`` times in a row."""
        p = stream.params
        if not p.similarity_filter or stream.prev_input is None or stream.last_out is None:
            stream.prev_input = rgb
            stream.skips = 0
            return False
        cos = float(torch.nn.functional.cosine_similarity(
            rgb.flatten().float(), stream.prev_input.flatten().float(), dim=0))
        chance = skip_probability(cos, p.similarity_threshold)
        if stream.skips < p.max_skip and stream.rng.random() < chance:
            stream.skips += 1
            stream.counters["skipped"] += 1
            return True
        stream.prev_input = rgb
        stream.skips = 0
        return False

    def _schedule(self, p: P.ImageParams) -> lcm.Schedule:
        return lcm.make_schedule(self.models.scheduler_config, p.indices(), self.device,
                                 self.dtype)

    def _renoise(self, stream: ImageStream) -> None:
        """The seeded noise of every stage (stage s of seed k: seed k + s * 1000003)."""
        p = stream.params
        shape = (1, 4, stream.latent_h, stream.latent_w)
        stream.noise = torch.cat([
            lcm.seeded_noise(tuple(((seed + s * 1_000_003) % 2**63, w)
                                   for seed, w in p.weighted_seeds()), shape, self.device,
                             self.dtype)
            for s in range(stream.sched.stages)], 0)
        stream.rng.seed(p.weighted_seeds()[0][0])
        stream.fresh = torch.Generator().manual_seed(p.weighted_seeds()[0][0])

    def _frame_noise(self, stream: ImageStream) -> torch.Tensor:
        if stream.params.noise == "fixed":
            return stream.noise
        return torch.randn(tuple(stream.noise.shape), generator=stream.fresh).to(
            self.device, self.dtype)

    def _restart_buffers(self, stream: ImageStream) -> None:
        """Stages 1..n-1 from the newest input noised to each stage (their residual noise is
        then exactly the stage noise): no warm-up frames after a start or a schedule change."""
        sch = stream.sched
        if stream.last_z is None or sch.stages == 1:
            stream.buf_x = stream.buf_r = None
            return
        noise = stream.noise[1:]
        stream.buf_x = sch.a[1:] * stream.last_z + sch.b[1:] * noise
        stream.buf_r = noise.clone()

    def _conditioning(self, p: P.ImageParams, height: int, width: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        items = [(self._text(text), w) for text, w in p.weighted_prompts() if w > 0]
        cond = {k: lcm.blend([(c[k], w) for c, w in items], p.prompt_blend)
                for k in items[0][0]}
        uncond = dict(self._text(p.negative_prompt))
        if self.models.xl:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype,
                               device=self.device)
            cond["time_ids"] = uncond["time_ids"] = ids
        return cond, uncond

    def _want_conditioning(self, stream: ImageStream, p: P.ImageParams) -> None:
        """Ask for the stream's conditioning: at once when every text is cached (or without
        a text thread), else encoded beside the streams; the stream keeps its old prompt
        until the new one is ready."""
        cfg = stream.config.input
        with self._text_lock:
            cached = all(text in self._text_cache for text, w in p.weighted_prompts()
                         if w > 0) and p.negative_prompt in self._text_cache
        if cached or not self.text_thread:
            stream.pending = None
            stream.cond, stream.uncond = self._conditioning(p, cfg.height, cfg.width)
        else:
            stream.pending = self._beside.submit(self._conditioning, p, cfg.height, cfg.width)

    def _take_conditioning(self, stream: ImageStream) -> bool:
        """Apply encoded conditioning that is ready; False while the stream has none yet."""
        future = stream.pending
        if future is not None and future.done():
            stream.pending = None
            try:
                stream.cond, stream.uncond = future.result()
            except Exception as exc:  # noqa: BLE001 - the stream keeps its old prompt
                log.error("could not encode the prompt of stream %d: %s: %s",
                          stream.config.stream_id, type(exc).__name__, exc)
                if stream.cond is None:  # nothing to keep: once more, here, or fail
                    cfg = stream.config.input
                    stream.cond, stream.uncond = self._conditioning(stream.params, cfg.height,
                                                                    cfg.width)
        return stream.cond is not None

    def _text(self, prompt: str) -> dict[str, torch.Tensor]:
        with self._text_lock:
            hit = self._text_cache.get(prompt)
            if hit is not None:
                self._text_cache.move_to_end(prompt)
                return hit
        out = encode_prompt(self.models, prompt, self.device)
        with self._text_lock:
            self._text_cache[prompt] = out
            while len(self._text_cache) > 64:
                self._text_cache.popitem(last=False)
        return out


def skip_probability(cos: float, threshold: float) -> float:
    return max(0.0, 1.0 - (1.0 - cos) / (1.0 - threshold))


@torch.no_grad()
def encode_prompt(models, prompt: str, device) -> dict[str, torch.Tensor]:
    """{"emb": (1, 77, D)} for SD 1.5/2.1; SDXL adds "pooled" (1, 1280) and uses both
    encoders' penultimate layers concatenated (1, 77, 2048)."""
    embs, pooled = [], None
    for tokenizer, encoder in models.text:
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=models.xl)
        if models.xl:
            embs.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        else:
            embs.append(out.last_hidden_state)
    result = {"emb": torch.cat(embs, -1)}
    if models.xl:
        result["pooled"] = pooled
    return result
