"""The streaming video engine: StreamDiffusionV2-style video-to-video on a causal Wan DiT.

Per chunk of 4 input frames (the first chunk of a stream is its first frame alone, so the
first output leaves as soon as one frame has arrived):
1. encode with the streaming causal VAE (one latent frame per 4 frames, or per first frame);
2. noise it: x = s * eps + (1 - s) * z, s from the noise scale and the motion controller;
3. denoise with 1-4 steps of the distilled flow model, attending to the stream's KV cache;
   in Stream Batch mode one forward advances every chunk in flight by one step (throughput
   one chunk per forward, output lag steps - 1 chunks); sequential mode denoises each chunk
   completely at once (lowest latency); a stream's first chunk is always sequential;
4. decode the clean latent with the streaming VAE: 4 output frames (1 for the first chunk).

Several streams of the same size in one ``submit`` share ONE DiT forward: the linear layers
run batched over every stream's chunks, attention reads each stream's own cache in place.

Everything a stream owns (KV cache, VAE caches, chunks in flight, controller, prompt K/V)
lives in one ``VideoStream``; closing the stream drops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ...frames import as_tensor, from_canonical, to_canonical
from ...models.causal_wan import CausalWan, ChunkCall
from ...models.fp8 import is_quantized
from ...models.offload import Offloaded
from ...models.video_lora import (LoraBank, LoraFileError, LoraSlots, capacity_from_env,
                                  default_folder)
from ..base import (Engine, EngineError, OutputFrame, ParamError, StreamConfig, StreamInput,
                    StreamOutput, check_size, prompt_texts)
from ..beside import Beside
from ..blend import blend
from . import params as P
from .kv_cache import CachePolicy, KVCache, SharedGraphs
from .noise import (SHIFT, STEP_LISTS, MotionController, chunk_noise, renoise, sigma,
                    timesteps)
from .vae_stream import StreamingVAE, VAEStreamState
from ...config import env_flag

log = logging.getLogger("livediffusion.video")

FIRST_CHUNK_FRAMES = 1
CHUNK_FRAMES = 4


@dataclass(eq=False)  # compared by identity: it holds tensors
class Chunk:
    """One latent frame on its way through the denoising steps."""

    id: int
    x: torch.Tensor            # (1, 16, 1, h, w) at its current step
    schedule: list[float]      # timesteps told to the model, fixed at admission
    #: the seed, or [seed, weight] pairs, its noise is drawn from
    seeds: Any
    in_seqs: list[int]         # the input frames it came from
    ts: list[int]
    step: int = 0


class _Done:
    """Chunks that became clean in a forward, per stream."""

    def __init__(self) -> None:
        self._by_stream: dict[int, list[Chunk]] = {}

    def add(self, stream: VideoStream, chunk: Chunk) -> None:
        self._by_stream.setdefault(id(stream), []).append(chunk)

    def get_for(self, stream: VideoStream) -> list[Chunk]:
        return self._by_stream.get(id(stream), [])

    def __bool__(self) -> bool:
        return bool(self._by_stream)


@dataclass
class VideoStream:
    config: StreamConfig
    params: P.VideoParams
    latent_h: int
    latent_w: int
    vae: VAEStreamState
    cache: KVCache
    #: per block cross-attention K/V of the current prompt (None until the first is encoded)
    cross_kv: list | None = None
    #: the weighted prompts asked for last, and their embedding while it is being encoded
    prompt_key: tuple = ()
    pending_prompt: Future | None = None
    prompt_asked: float = 0.0
    motion: MotionController = field(default_factory=MotionController)
    in_flight: list[Chunk] = field(default_factory=list)
    flushed: list[Chunk] = field(default_factory=list)  # finished early by a steps change
    tiny: Any = None        # the fast decoder's state while params.decoder == "tiny"
    tiny_enc: Any = None    # the fast encoder's state while params.encoder == "tiny"
    last_latent: torch.Tensor | None = None  # primes a decoder switched in mid-stream
    next_chunk: int = 0
    started: bool = False
    #: the prompt embedding in use (its cross-attention K/V are recomputed when the stream's
    #: LoRA scales change: the slots adapt the cross-attention keys and values too)
    prompt_emb: torch.Tensor | None = None
    #: the scale of each LoRA slot this stream's forwards use (set at the start of a step)
    lora_scales: tuple[float, ...] = ()

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.vae.nbytes()


def decode_latent(stream, decoder: str, latent: torch.Tensor, vae: StreamingVAE,
                  tiny_decoder) -> torch.Tensor:
    """One clean latent frame of a stream (anything with ``tiny``, ``vae`` and
    ``last_latent``, here or on a pipeline's last rank) -> frames (3, N, H, W) in [-1, 1]
    with its decoder's streaming state."""
    if decoder == "tiny":
        if stream.tiny is None:
            stream.tiny = tiny_decoder.new_state()
        frames = tiny_decoder.decode(latent, stream.tiny)[0]
    else:
        frames = vae.decode(latent, stream.vae)[0]
    stream.last_latent = latent
    return frames


def to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames (3, N, H, W) in [-1, 1] -> (N, H, W, 3) float in [0, 1]."""
    return ((frames + 1.0) * 0.5).permute(1, 2, 3, 0).float()


def switch_decoder(stream, decoder: str, vae: StreamingVAE, tiny_decoder) -> None:
    """Change a stream's decoder mid-stream (``stream``: anything with ``tiny``, ``vae`` and
    ``last_latent``, here or on a pipeline's last rank): the new one starts from fresh state
    primed with the last decoded latent (output discarded), so it yields 4 frames per chunk
    at once and continues the picture instead of starting a new clip."""
    last = stream.last_latent
    if decoder == "tiny":
        stream.tiny = tiny_decoder.new_state()
        if last is not None:
            stream.tiny.to_trim = 0
            tiny_decoder.decode(last, stream.tiny)
    else:
        stream.tiny = None
        fresh = vae.new_state()
        stream.vae.dec, stream.vae.decoded = fresh.dec, 0
        if last is not None:
            vae.decode(last, stream.vae)


def _room_for(module: torch.nn.Module, device: torch.device,
              headroom: float = 16 * 2**30) -> bool:
    """True if ``module`` can live on ``device`` and still leave ``headroom`` bytes free (or
    a quarter of the card, whichever is more) for streams' caches."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    on_device = sum(p.numel() * p.element_size() for p in module.parameters()
                    if p.device.type == device.type)
    free, total = torch.cuda.mem_get_info(device)
    return free - (size - on_device) >= max(headroom, total / 4)


def _family_defaults(p: P.VideoParams, schedule, most_steps: int) -> P.VideoParams:
    """A family member's own settings as a stream's defaults: its KV window and sinks (how
    its sinks behave: StreamDiffusionV2's adaptive refresh keeps its threshold, fixed sinks
    never refresh), at most as many steps as it has, and its noise scale (a member released
    for text-to-video only starts from 1.0: mostly noise, the input a faint start)."""
    frames = min(max(schedule.window, 2), 64)
    sinks = min(schedule.sinks, frames - 1)
    refresh = schedule.sink_param if schedule.sink_mode == "adaptive" else 0.0
    scale = schedule.noise_scale if schedule.noise_scale is not None else 1.0
    return dataclasses.replace(p, cache_frames=frames, sinks=sinks, sink_refresh=refresh,
                               noise_scale=scale, steps=min(p.steps, most_steps),
                               rope_max=max(p.rope_max, frames))


class VideoEngine(Engine):
    """Serves many streams with one set of weights (see the module docstring)."""

    def __init__(self, name: str, transformer, vae, text_encoder, *, device: str = "cpu",
                 min_side: int = 256, max_side: int = 1280, description: str = "",
                 tiny_decoder=None, tiny_encoder=None, channels_last: bool | None = None,
                 compile: bool | None = None, cuda_graphs: bool | None = None,
                 attention: str | None = None, text_placement: str | None = None,
                 text_thread: bool = True, profile=None, lora_slots: int | None = None,
                 lora_rank: int | None = None, lora_folder=None, model=None) -> None:
        self.name = name
        self.device = torch.device(device)
        #: the causal Wan family member served (models/family.py FamilyEntry; None:
        #: StreamDiffusionV2's generator or random weights): its timesteps, shift and cache
        self.model = model
        schedule = model.schedule if model is not None else None
        self.step_table: tuple[float, ...] = schedule.sampling_timesteps() \
            if schedule is not None else STEP_LISTS[4]
        self.shift = schedule.shift if schedule is not None else SHIFT
        #: the memory profile this engine was built for (daemon/profiles.py), or None
        self.profile = profile
        #: parameters a stream gets unless it says otherwise (a profile sets steps, decoder)
        self.defaults = P.VideoParams()
        if schedule is not None:
            self.defaults = _family_defaults(self.defaults, schedule, len(self.step_table))
        if profile is not None:
            max_side = min(max_side, profile.max_side)
            decoder = profile.decoder if tiny_decoder is not None else "vae"
            self.defaults = dataclasses.replace(self.defaults, steps=profile.steps,
                                                decoder=decoder)
        self.wan = CausalWan(transformer)
        #: LoRA slots (models/video_lora.py): the low-rank branches are in every block's
        #: linear layers from here on, so compiled regions and CUDA graphs include them
        self._loras: LoraSlots | None = None
        self._lora_absent = ""
        slots, rank = capacity_from_env()
        slots = slots if lora_slots is None else lora_slots
        rank = rank if lora_rank is None else lora_rank
        if slots and type(self)._submit is not VideoEngine._submit:
            # a pipelined engine's blocks live on other ranks: the branch is not there
            self._lora_absent = ("LoRAs are not available on a pipelined video engine "
                                 "(--gpus); run it on one GPU to use loras.")
        elif slots:
            self._loras = LoraSlots(LoraBank(transformer, slots, rank),
                                    lora_folder if lora_folder is not None else
                                    default_folder())
        self.vae = StreamingVAE(vae, channels_last=channels_last)
        if compile is None:  # on GPUs unless LIVEDIFFUSION_COMPILE=0
            compile = self.device.type == "cuda" and \
                env_flag("LIVEDIFFUSION_COMPILE")
        if compile:
            # torch.compile of the DiT's dense block regions and the VAE's steady-state
            # chunk: kernels are generated for each new frame size / batch on first use
            self.wan.compile()
            self.vae.compile()
            # a stream's convolution shapes never change, so cuDNN's per-shape algorithm
            # search pays off (measured on an H200 at 480x832: VAE encode 29.5 -> 23.4 ms,
            # decode 43.8 -> 38.8 ms, compiled, channels-last)
            torch.backends.cudnn.benchmark = True
        if attention is not None:  # default: cuDNN first on CUDA (see CausalWan)
            self.wan.attention = attention
        if cuda_graphs is not None:  # default: on CUDA (see CausalWan)
            self.wan.fixed_shape = self.wan.use_graphs = cuda_graphs and \
                self.device.type == "cuda"
        self.tokenizer, self.text_encoder = text_encoder
        #: where umT5 lives: "resident" on the device, "offloaded" (host memory, visiting
        #: whole per new prompt) or "streamed" (host memory, visiting layer by layer); by
        #: default the profile's choice, else resident where it leaves room.  On an H200
        #: (11 GB of 141) resident makes a new prompt a ~10 ms encode beside the stream; on
        #: smaller cards the visits share the copy engines with the frames' uploads
        if text_placement is None and profile is not None:
            text_placement = profile.text
        if self.device.type != "cuda":
            text_placement = "resident"
        elif text_placement is None:
            text_placement = "resident" if _room_for(self.text_encoder, self.device) \
                else "offloaded"
        if text_placement not in ("resident", "offloaded", "streamed"):
            raise ValueError(f"unknown text encoder placement {text_placement!r}.")
        self.text_placement = text_placement
        self.text_home = None if text_placement == "resident" else \
            Offloaded(self.text_encoder, self.device, streamed=text_placement == "streamed")
        if text_placement == "resident" and self.device.type == "cuda":
            self.text_encoder.to(self.device)
        self.tiny_decoder = tiny_decoder  # TAEHV-layout fast decoder, if its weights exist
        self.tiny_encoder = tiny_encoder  # and its encoder (the same checkpoint)
        self.min_side, self.max_side = min_side, max_side
        self.description = description
        self.streams: dict[int, VideoStream] = {}
        #: fixed-shape forwards of several streams, keyed by their sorted stream ids
        self._shared_graphs = SharedGraphs()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_lock = threading.Lock()   # the cache is shared with the text thread
        self._text_lock = threading.Lock()     # one encode at a time (the offloaded weights)
        #: new prompts are encoded on a thread of their own (and on CUDA a stream of their
        #: own) while the stream keeps running on its old prompt; the new one applies at
        #: the first chunk after it is ready (measured: a synchronous umT5-XXL encode froze
        #: the output 0.38-0.44 s per prompt change)
        self.text_thread = text_thread
        self._beside = Beside(self.device)
        if self._loras is not None and text_thread:
            self._loras.submit = self._beside.submit  # a LoRA is read and converted beside
        #: benchmarks set this to a dict to collect per-stage times (seconds, synchronised)
        self.stage_times: dict[str, list[float]] | None = None

    @contextlib.contextmanager
    def _stage(self, name: str):
        if self.stage_times is None:
            yield
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        yield
        sync()
        self.stage_times.setdefault(name, []).append(time.perf_counter() - started)

    # --- interface ---------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        return {"frames_per_step": CHUNK_FRAMES, "first_step_frames": FIRST_CHUNK_FRAMES,
                "max_batch": self.max_batch(),
                # every batch shape is compiled (or recorded) at warm-up, never mid-stream
                "batch_sizes": list(range(1, self.max_batch() + 1)),
                "sizes": {"min": self.min_side, "max": self.max_side, "multiple": 16},
                "params": self.defaults.to_dict(), "device": str(self.device),
                "schema": P.SCHEMA.to_list(self.defaults),
                "precision": "fp8" if is_quantized(self.wan.model) else str(self.wan.dtype)
                .removeprefix("torch."),
                "profile": None if self.profile is None else self.profile.to_dict(),
                # what changes a step's cost: streams differing in these get keys of their own
                "cost_params": ["steps", "decoder", "encoder", "stream_batch"],
                "loras": None if self._loras is None else
                {"slots": self._loras.slots, "rank": self._loras.bank.rank,
                 "available": self._loras.available()},
                "description": self.description,
                "model": self._model_caps()}

    def _model_caps(self) -> dict[str, Any]:
        """Which causal Wan generator this is and how it is run here (informational)."""
        m = self.model
        out: dict[str, Any] = {"timesteps": [round(t, 3) for t in self.step_table],
                               "shift": self.shift, "chunk_latent_frames": 1}
        if m is None:
            return {"family": "streamdiffusionv2", **out, "prompt_switch": "none"}
        sch = m.schedule
        out.update(family=m.name, display=m.display, licence=m.licence.spdx,
                   trained_chunk_latent_frames=sch.chunk_frames,
                   prompt_switch=sch.prompt_switch)
        notes = []
        if sch.chunk_frames != 1:
            notes.append(f"trained with chunks of {sch.chunk_frames} latent frames; served "
                         f"one latent frame (4 video frames) per chunk")
        if sch.prompt_switch == "recache":
            notes.append("the authors re-cache the KV on a prompt switch; here only the "
                         "cross-attention K/V switch")
        if sch.sink_mode == "ema":
            notes.append("its sinks are a moving average of evicted frames; here they are "
                         "fixed")
        if sch.first_chunk_timesteps:
            notes.append("its first chunk takes more steps; here every chunk the same")
        if notes:
            out["differences"] = notes
        return out

    def frames_per_step(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        return CHUNK_FRAMES if stream is not None and stream.started else FIRST_CHUNK_FRAMES

    def max_batch(self) -> int:
        return 4

    def warm_up_steps(self, params: Mapping[str, Any]) -> int:
        p, _ = P.apply(self.defaults, params)
        return 1 + p.cache_frames + p.steps + 2  # first frame, fill the cache, steady chunks

    def open_stream(self, config: StreamConfig) -> dict[str, Any]:
        w, h = config.input.width, config.input.height
        self._check_size(config)
        params, _ = P.apply(self.defaults, config.params)
        self._check_decoder(params)
        self._check_loras(params)
        stream = VideoStream(config, params, h // 8, w // 8, self.vae.new_state(),
                             self._new_cache(params, params.steps, h // 8, w // 8,
                                             config.stream_id))
        if self._loras is not None:
            stream.lora_scales = (0.0,) * self._loras.slots
            self._loras.swap((), [name for name, _ in params.loras])
        self._want_prompt(stream, params)
        self._configure_motion(stream)
        self.streams[config.stream_id] = stream
        return params.to_dict()

    def _check_size(self, config: StreamConfig) -> None:
        try:
            check_size(self.name, config.input, self.min_side, self.max_side, 16)
        except ParamError as exc:
            if self.profile is None or max(config.input.width, config.input.height) <= \
                    self.max_side:
                raise
            raise ParamError(f"{exc} (memory profile {self.profile.name}: "
                             f"{self.profile.why}; --profile chooses another)") from None

    def update_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        stream = self.streams[stream_id]
        old = stream.params
        new, reset = P.apply(old, changes)
        self._check_decoder(new)
        self._check_loras(new, old)
        if new.decoder != old.decoder:
            self._switch_decoder(stream, new.decoder)
        self._want_prompt(stream, new)
        reshaped = (new.steps, new.cache_frames, new.stream_batch) != \
            (old.steps, old.cache_frames, old.stream_batch)
        if reshaped and self._pending(stream):
            self._flush(stream)  # finish what is in flight under the old schedule and cache
        stream.params = new
        if new.cache_frames != old.cache_frames or reset:
            stream.cache = self._new_cache(new, new.steps, stream.latent_h, stream.latent_w,
                                           stream_id)
        else:
            stream.cache.policy = self._policy(new)
            stream.cache.set_rows(new.steps)
        if reset:
            self.reset_stream(stream_id)
        self._configure_motion(stream)
        if self._loras is not None:  # in use from the start of the next step
            self._loras.swap([n for n, _ in old.loras], [n for n, _ in new.loras])
        return new.to_dict()

    def check_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        old = self.streams[stream_id].params
        new, _ = P.apply(old, changes)
        self._check_decoder(new)
        self._check_loras(new, old)
        return new.to_dict()

    def prepare(self, stream_id: int, params: Mapping[str, Any]) -> bool:
        texts = prompt_texts(params)

        def cached(text: str) -> bool:
            with self._prompt_lock:
                return text in self._prompt_cache
        return self._beside.ready(stream_id, texts, cached, self._prompt_embedding,
                                  inline=not self.text_thread)

    def _pending(self, stream: VideoStream) -> bool:
        """Chunks of the stream not yet clean."""
        return bool(stream.in_flight)

    def _check_steps(self, p: P.VideoParams) -> None:
        if p.steps > len(self.step_table):
            raise ParamError(f"{self.name} runs at most {len(self.step_table)} denoising "
                             f"step(s) (its timesteps are "
                             f"{', '.join(f'{t:g}' for t in self.step_table)}), not "
                             f"{p.steps}.")

    def _check_decoder(self, p: P.VideoParams) -> None:
        self._check_steps(p)
        for part, model in (("decoder", self.tiny_decoder), ("encoder", self.tiny_encoder)):
            if getattr(p, part) == "tiny" and model is None:
                raise ParamError(f"the tiny {part}'s weights are not downloaded; fetch them "
                                 f"with: livediffusion models pull taew2_1")

    def _switch_decoder(self, stream: VideoStream, decoder: str) -> None:
        switch_decoder(stream, decoder, self.vae, self.tiny_decoder)

    def reset_stream(self, stream_id: int) -> None:
        """Forget the stream's history (KV cache, VAE caches, chunks in flight, controller)."""
        stream = self.streams[stream_id]
        stream.cache.reset()
        stream.vae = self.vae.new_state()
        stream.tiny = self.tiny_decoder.new_state() if stream.params.decoder == "tiny" else None
        stream.tiny_enc = None
        stream.last_latent = None
        stream.in_flight.clear()
        stream.flushed.clear()
        stream.motion.reset()
        stream.next_chunk = 0
        stream.started = False

    def close_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and self._loras is not None:
            self._loras.swap([n for n, _ in stream.params.loras], [])
        self._beside.forget(stream_id)
        self._drop_stale_graphs()  # its several-stream graphs and their buffers go now

    def shutdown(self) -> None:
        self._beside.shutdown()

    def submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        """Encode every stream's chunk, run ONE DiT forward over all Stream Batch streams of
        the same size (first chunks and sequential streams run on their own), decode.

        A failed step (out of memory, a bug) leaves no stream half-advanced: every stream of
        the batch restarts from its next chunk (a new first chunk), then the error goes up."""
        try:
            return self._submit(batch)
        except BaseException:
            for item in batch:
                if item.stream_id in self.streams:
                    self.reset_stream(item.stream_id)
            raise

    def _submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        finished: dict[int, list[Chunk]] = {}
        batched: list[VideoStream] = []
        if self._loras is not None:
            self._take_loras([self.streams[item.stream_id] for item in batch])
        waiting = [item for item in batch if not self._take_prompt(self.streams[item.stream_id])]
        for item in waiting:  # first prompt still being encoded: these frames are let go
            finished[item.stream_id] = []
        for item in batch:
            if item in waiting:
                continue
            stream = self.streams[item.stream_id]
            chunk = self._encode(stream, item)
            finished[item.stream_id] = []
            if not stream.started or not stream.params.stream_batch:
                finished[item.stream_id].extend(self._sequential(stream, chunk))
            else:
                stream.in_flight.append(chunk)
                batched.append(stream)
            stream.started = True
        groups: dict[tuple[int, int], list[VideoStream]] = {}
        for stream in batched:
            groups.setdefault((stream.latent_h, stream.latent_w), []).append(stream)
        for streams in groups.values():
            done = self._forward([(s, s.in_flight) for s in streams])
            for stream in streams:
                ready = done.get_for(stream)
                stream.in_flight = [c for c in stream.in_flight if c not in ready]
                finished[stream.config.stream_id].extend(ready)
        return [StreamOutput(item.stream_id, self._decode(self.streams[item.stream_id],
                                                          finished[item.stream_id]))
                for item in batch]

    def _encode(self, stream: VideoStream, item: StreamInput) -> Chunk:
        """Convert, encode and admit one stream's input frames as one chunk."""
        expected = CHUNK_FRAMES if stream.started else FIRST_CHUNK_FRAMES
        if len(item.frames) != expected:
            raise EngineError(f"expected {expected} frames for this chunk, got "
                              f"{len(item.frames)}.")
        with self._stage("upload"):
            pixels = torch.stack([to_canonical(as_tensor(f.pixels, self.device), f.spec)
                                  for f in item.frames])          # N, H, W, 3 in [0, 1]
            x = pixels.permute(0, 3, 1, 2) * 2.0 - 1.0              # N, 3, H, W in [-1, 1]
        p = stream.params
        with self._stage("motion"):
            scale = stream.motion.update(x, p.noise_scale) if p.motion_control else \
                p.noise_scale
        with self._stage("encode"):
            if p.encoder == "tiny":
                if stream.tiny_enc is None:
                    stream.tiny_enc = self.tiny_encoder.new_state()
                latents = self.tiny_encoder.encode(x.permute(1, 0, 2, 3)[None],
                                                   stream.tiny_enc).to(self.wan.dtype)
            else:
                latents = self.vae.encode(x.permute(1, 0, 2, 3)[None], stream.vae)  # 1,16,n,h,w
        with self._stage("noise"):
            return self._admit(stream, latents, scale, [f.seq for f in item.frames],
                               [f.ts for f in item.frames])

    def _admit(self, stream: VideoStream, z: torch.Tensor, scale: float, in_seqs: list[int],
               ts: list[int]) -> Chunk:
        cid = stream.next_chunk
        stream.next_chunk += 1
        stream.cache.admit(cid)
        schedule = timesteps(stream.params.steps, scale, self.step_table)
        eps = chunk_noise(stream.params.noise_seeds(), cid, 0, tuple(z.shape), z.device,
                          z.dtype)
        x = scale * eps + (1.0 - scale) * z
        return Chunk(cid, x, schedule, stream.params.noise_seeds(), in_seqs, ts)

    def _forward(self, work: list[tuple[VideoStream, list[Chunk]]]) -> _Done:
        """One DiT forward over chunks of one or more streams (each stream's chunks at
        distinct steps); advances each by one step and returns those that became clean.

        Each stream's cache policy plans its part of the forward; the model executes the
        plans and returns what it decided on the device (sink refreshes), which the policies
        then book."""
        # one order per set of streams, so that a set has one fixed-shape forward per shape
        work = sorted(work, key=lambda item: item[0].config.stream_id)
        streams, chunks, plans = [], [], []
        with self._stage("prepare"):
            for stream, items in work:
                ordered = sorted(items, key=lambda c: c.step)
                rows, ids = [c.step for c in ordered], [c.id for c in ordered]
                stream.cache.prepare(rows, ids)
                plans.append(stream.cache.plan(rows, ids))
                streams += [stream] * len(ordered)
                chunks += ordered
        x = torch.cat([c.x for c in chunks], 0)
        if self._loras is not None:  # each element's slot scales: its stream's
            self._loras.bank.write_rows([s.lora_scales for s in streams])
        t = torch.tensor([c.schedule[c.step] for c in chunks], device=x.device)
        call = ChunkCall(plans, [s.cross_kv for s, _ in work],
                         graphs=self._graphs_for([s for s, _ in work]))
        with self._stage("dit"):
            flow, chosen = self.wan.forward(x, t, call)
            flow = flow.to(x.dtype)
            for (stream, _), plan, decided in zip(work, plans, chosen):
                stream.cache.commit(plan, decided)
        with self._stage("step"):
            return self._step(streams, chunks, flow, self.shift)

    def _graphs_for(self, streams: list[VideoStream]) -> dict:
        """Where the fixed-shape forwards (CUDA graphs) of this set of streams are kept (see
        ``SharedGraphs``)."""
        self._drop_stale_graphs()
        return self._shared_graphs.for_caches([(s.config.stream_id, s.cache) for s in streams])

    def _drop_stale_graphs(self) -> None:
        """Drop the several-stream graphs of any stream that closed or replaced its storage
        (every forward checks; close_stream calling this frees them at once)."""
        self._shared_graphs.drop_stale(
            lambda sid: self.streams[sid].cache if sid in self.streams else None)

    @staticmethod
    def _step(streams: list[VideoStream], chunks: list[Chunk], flow: torch.Tensor,
              shift: float = SHIFT) -> _Done:
        done = _Done()
        for i, (stream, c) in enumerate(zip(streams, chunks)):
            x0 = c.x - sigma(c.schedule[c.step], shift) * flow[i:i + 1]
            if c.step + 1 >= len(c.schedule):
                c.x = x0
                done.add(stream, c)
                stream.cache.forget(c.id)
            else:
                c.x = renoise(x0, sigma(c.schedule[c.step + 1], shift), c.seeds, c.id,
                              c.step + 1)
                c.step += 1
        return done

    def _sequential(self, stream: VideoStream, chunk: Chunk) -> list[Chunk]:
        while True:
            done = self._forward([(stream, [chunk])])
            if done:
                return done.get_for(stream)

    def _flush(self, stream: VideoStream) -> None:
        """Finish the chunks in flight with their own schedules (before the step count
        changes), so no frame is lost; their frames come out with the next output."""
        pending = stream.in_flight
        stream.in_flight = []
        while pending:
            done = self._forward([(stream, pending)]).get_for(stream)
            pending = [c for c in pending if c not in done]
            stream.flushed.extend(done)

    def _decode(self, stream: VideoStream, finished: list[Chunk]) -> list[OutputFrame]:
        finished = stream.flushed + finished
        stream.flushed = []
        out: list[OutputFrame] = []
        spec = stream.config.output
        if finished and not bool(torch.stack([torch.isfinite(c.x).all()
                                              for c in finished]).all()):
            # the state blew up (it cannot come from the input or the parameters, which are
            # checked): restart the stream's history instead of sending NaN from now on
            log.warning("stream %d: its state turned non-finite (NaN or Inf); restarting "
                        "its history", stream.config.stream_id)
            self.reset_stream(stream.config.stream_id)
            return out
        for chunk in sorted(finished, key=lambda c: c.id):
            with self._stage("decode"):
                frames = decode_latent(stream, stream.params.decoder, chunk.x, self.vae,
                                       self.tiny_decoder)
            if frames.shape[1] != len(chunk.in_seqs):
                raise EngineError(f"decoded {frames.shape[1]} frames for a chunk of "
                                  f"{len(chunk.in_seqs)}.")
            with self._stage("output"):
                rgb = to_rgb(frames)
                for i, seq in enumerate(chunk.in_seqs):
                    out.append(OutputFrame(from_canonical(rgb[i], spec), seq, chunk.ts[i]))
        return out

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _policy(p: P.VideoParams) -> CachePolicy:
        return CachePolicy(frames=p.cache_frames, sinks=p.sinks,
                           refresh_threshold=p.sink_refresh, rope_max=p.rope_max)

    def _new_cache(self, p: P.VideoParams, rows: int, latent_h: int, latent_w: int,
                   stream_id: int) -> KVCache:
        return KVCache.for_model(self.wan, rows, latent_h, latent_w, self._policy(p))

    @staticmethod
    def _configure_motion(stream: VideoStream) -> None:
        p = stream.params
        stream.motion.motion_scale = p.motion_scale
        stream.motion.reduce = p.motion_reduce
        stream.motion.gain = p.motion_gain

    # --- LoRAs -------------------------------------------------------------------------------

    def _check_loras(self, new: P.VideoParams, old: P.VideoParams | None = None) -> None:
        """ParamError if the stream cannot have ``new.loras`` (no slots, too many, a missing
        or unusable file); changes nothing."""
        if not new.loras or (old is not None and new.loras == old.loras):
            return
        if self._loras is None:
            raise ParamError(self._lora_absent or
                             "this video engine has no LoRA slots: start the daemon with "
                             "--lora-slots N (LIVEDIFFUSION_LORA_SLOTS) to use loras.")
        try:
            self._loras.check([n for n, _ in new.loras],
                              [n for n, _ in old.loras] if old is not None else ())
        except LoraFileError as exc:
            raise ParamError(str(exc)) from None

    def _take_loras(self, streams: list[VideoStream]) -> None:
        """At the start of a step: fill the slots whose files are ready, then bring these
        streams' slot scales up to date (and their cross-attention K/V where a change
        touches it).  Nothing here changes a shape: no graph is recorded again."""
        slots = self._loras
        slots.take_ready()
        for stream in streams:
            scales = slots.slot_scales(stream.params.loras)
            if scales == stream.lora_scales:
                continue
            changed = {j for j, (a, b) in enumerate(zip(scales, stream.lora_scales)) if a != b}
            stream.lora_scales = scales
            if stream.prompt_emb is not None and slots.touches_prompt(changed):
                self._use_prompt(stream, stream.prompt_emb)

    # --- prompts -------------------------------------------------------------------------------

    def _want_prompt(self, stream: VideoStream, p: P.VideoParams) -> None:
        """Ask for the stream's prompt: at once when every text is cached (a switch back to
        an earlier prompt costs nothing), else encoded on the text thread."""
        key = (p.weighted_prompts(), p.prompt_blend)
        if key == stream.prompt_key:
            return
        stream.prompt_key = key
        emb = self._cached_blend(p)
        if emb is not None or not self.text_thread:
            stream.pending_prompt = None
            self._use_prompt(stream, emb if emb is not None else self._embed_prompts(p))
            return
        stream.pending_prompt = self._beside.submit(self._embed_prompts, p)
        stream.prompt_asked = time.perf_counter()

    def _take_prompt(self, stream: VideoStream) -> bool:
        """Apply an encoded prompt that is ready (called at the start of each step); False
        while the stream has no prompt at all yet."""
        future = stream.pending_prompt
        if future is not None and future.done():
            stream.pending_prompt = None
            try:
                emb = future.result()
            except Exception as exc:  # noqa: BLE001 - the stream keeps its old prompt
                log.error("could not encode the prompt of stream %d: %s: %s",
                          stream.config.stream_id, type(exc).__name__, exc)
                if stream.cross_kv is None:  # nothing to keep: once more, here, or fail
                    emb = self._embed_prompts(stream.params)
                else:
                    return True
            t0 = time.perf_counter()
            self._use_prompt(stream, emb)
            log.debug("stream %d: new prompt in use %.0f ms after it was asked for (its K/V "
                      "%.1f ms)", stream.config.stream_id,
                      (t0 - stream.prompt_asked) * 1000.0, (time.perf_counter() - t0) * 1e3)
        return stream.cross_kv is not None

    def _use_prompt(self, stream: VideoStream, emb: torch.Tensor) -> None:
        """Switch the stream to an encoded prompt (at the start of a step)."""
        if self._loras is not None:  # the cross-attention K/V with this stream's LoRAs
            stream.prompt_emb = emb
            self._loras.bank.write_rows([stream.lora_scales])
        stream.cross_kv = self.wan.cross_kv(emb)

    def stream_ready(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is None or self._take_prompt(stream)

    def settle(self, timeout: float | None = 30.0) -> None:
        """Wait for every prompt being encoded and LoRA being loaded, and apply them (tests,
        warm-up)."""
        if self._loras is not None:
            self._loras.settle(timeout)
            self._take_loras(list(self.streams.values()))
        for stream in self.streams.values():
            if stream.pending_prompt is not None:
                stream.pending_prompt.exception(timeout)
                self._take_prompt(stream)

    def _cached_blend(self, p: P.VideoParams) -> torch.Tensor | None:
        with self._prompt_lock:
            if all(text in self._prompt_cache for text, w in p.weighted_prompts() if w > 0):
                return self._blend(p, self._prompt_cache.get)
        return None

    def _embed_prompts(self, p: P.VideoParams) -> torch.Tensor:
        """Blend the umT5 embeddings of the weighted prompts (linearly, weights normalised)."""
        return self._blend(p, self._prompt_embedding)

    @staticmethod
    def _blend(p: P.VideoParams, embedding) -> torch.Tensor:
        """The weighted prompts' embeddings blended as ``prompt_blend`` says (linear with the
        weights normalised, or slerp)."""
        return blend([(embedding(text), w) for text, w in p.weighted_prompts() if w > 0],
                     p.prompt_blend)

    def _encode_text(self, text: str) -> torch.Tensor:
        from ...models.wan import encode_prompt
        if self.text_home is None:
            return encode_prompt(self.tokenizer, self.text_encoder, text,
                                 next(self.text_encoder.parameters()).device)
        with self.text_home.visit() as device:
            try:
                return encode_prompt(self.tokenizer, self.text_encoder, text, device)
            except torch.OutOfMemoryError:
                if device.type == "cpu":
                    raise
        # the weights fitted but the activations did not: once more on the CPU
        log.warning("no GPU memory to encode the prompt; encoding it on the CPU (slow)")
        return encode_prompt(self.tokenizer, self.text_encoder, text, "cpu")

    def _prompt_embedding(self, text: str) -> torch.Tensor:
        with self._prompt_lock:
            cached = self._prompt_cache.get(text)
            if cached is not None:
                self._prompt_cache.move_to_end(text)
                return cached
        with self._text_lock:
            emb = self._encode_text(text).cpu()  # cached in host memory
        with self._prompt_lock:
            self._prompt_cache[text] = emb
            while len(self._prompt_cache) > 64:
                self._prompt_cache.popitem(last=False)
        return emb
