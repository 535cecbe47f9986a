"""The video engine with its DiT split over pipeline ranks (``livediffusion daemon --gpus``).

The same engine as ``VideoEngine`` to everything above it (the worker, the scheduler, Stream
Batch over many streams): same interface, same parameters, the same pictures.  What differs
is where the work runs:

  * rank 0 (this process) converts, measures motion, encodes with the VAE, noises, and runs
    the first block range; it is also where prompts are encoded (umT5 lives only here);
  * ranks 1..N-1 run their block ranges; the last runs the head, the sampler step and the
    decoder (VAE or tiny), and sends decoded frames, or re-noised latents for chunks with
    steps left, back to rank 0.

A step (``submit``) is a *tick*: the new chunk of each stream plus the chunks that came back
from the last rank, at most one per denoising step and stream (each cache row sees its
chunks in order, so every chunk attends to exactly what it attends to in one process).  Rank
0 sends the tick on and goes on with the next without waiting for it: with N ranks up to N
ticks are in flight and every rank is busy.  A stream's first chunk (and every chunk of a
stream with ``stream_batch`` off) goes round until it is clean within its step, as in one
process.  Frames come back one or more steps later; each carries its input's sequence number.

Everything a rank keeps per stream changes only through *ops* (see ``parallel/stage.py``),
sent ahead of the ticks that need them.  Blocks move between ranks (``rebalance``) from the
stage times the ranks report, between ticks, with their weights and KV-cache rows.  A rank
that dies or fails is one clear error: the engine restarts its streams on a single GPU (this
one) and goes on serving.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any, Mapping

import torch

from ...models.causal_wan import CausalWan
from ...parallel.channel import RankFailed
from ...parallel.partition import rebalance
from ...parallel.pipeline import Ranks, move_blocks
from ...parallel.stage import Stage
from ..base import EngineError, OutputFrame, StreamConfig, StreamInput, StreamOutput
from . import params as P
from .engine import Chunk, VideoEngine, VideoStream
from .kv_cache import CachePolicy
from .noise import sigma
from .vae_stream import StreamingVAE

log = logging.getLogger("livediffusion.pipeline")


class CacheLog:
    """Rank 0's stand-in for a stream's KV cache: each call the engine makes becomes an op
    that every rank applies to its own blocks' cache, in order."""

    def __init__(self, engine: PipelineVideoEngine, stream_id: int, policy: CachePolicy,
                 rows: int) -> None:
        self._engine, self.stream_id, self._policy, self.rows = engine, stream_id, policy, rows
        engine._op("cache", stream_id, {"rows": rows, "policy": dataclasses.asdict(policy)})

    @property
    def policy(self) -> CachePolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: CachePolicy) -> None:
        if policy != self._policy:
            self._policy = policy
            self._engine._op("policy", self.stream_id, dataclasses.asdict(policy))

    def admit(self, chunk: int) -> None:
        self._engine._op("admit", self.stream_id, chunk)

    def set_rows(self, rows: int) -> None:
        if rows != self.rows:
            self.rows = rows
            self._engine._op("rows", self.stream_id, rows)

    def reset(self) -> None:
        self._engine._op("reset", self.stream_id)

    def forget(self, chunk: int) -> None:
        """Ranks forget a chunk after its last step themselves."""

    def nbytes(self) -> int:
        return 0  # held by the ranks


class PipelineVideoEngine(VideoEngine):
    """``VideoEngine`` over pipeline ranks (see the module docstring)."""

    def __init__(self, name: str, parts, ranks: Ranks, *, parts_spec: str,
                 rebalance_every: int = 64, **kwargs: Any) -> None:
        super().__init__(name, parts.transformer, parts.vae, parts.text,
                         device=ranks.devices[0], min_side=parts.min_side,
                         description=parts.description, tiny_decoder=parts.tiny_decoder,
                         tiny_encoder=parts.tiny_encoder, **kwargs)
        self.parts_spec = parts_spec
        self.ranks = ranks
        self.rebalance_every = rebalance_every
        self._ops: list = []
        self._op_tensors: list[torch.Tensor] = []
        self._tick = 0
        self._outstanding: deque[tuple[int, set[int]]] = deque()   # (tick, its stream ids)
        self._travelling: dict[tuple[int, int], Chunk] = {}
        self._generation: dict[int, int] = {}
        self._prompts: dict[int, torch.Tensor] = {}
        self._ready: dict[int, list[OutputFrame]] = {}
        self._urgent: set[tuple[int, int]] = set()
        self._ticks_since_balance = 0
        self.moves_done = 0
        self.fell_back: str | None = None
        last = ranks.world == 1
        self.stage = Stage(self.wan, ranks.ranges[0], 0, ranks.world,
                           vae=self.vae if last else None,
                           tiny_decoder=self.tiny_decoder if last else None)
        if not last:
            self.stage.drop_foreign_blocks()
            self.vae.keep_only("encoder")   # the last rank decodes

    # --- ops ----------------------------------------------------------------------------------

    def _op(self, name: str, stream_id: int, *args: Any) -> None:
        self._ops.append([name, stream_id, *args])

    def _flush_ops(self) -> None:
        """Apply the ops here (rank 0's stage) and send them on, ahead of any later tick."""
        if not self._ops:
            return
        ops, tensors = self._ops, self._op_tensors
        self._ops, self._op_tensors = [], []
        self.stage.apply(ops, tensors)
        if self.ranks.world > 1:
            self._guard(lambda: self.ranks.channel.send(
                1, {"kind": "ops", "ops": ops, "n_tensors": len(tensors)}, tensors))

    @staticmethod
    def _open_info(config: StreamConfig, decoder: str) -> dict:
        return {"lh": config.input.height // 8, "lw": config.input.width // 8,
                "output": dataclasses.asdict(config.output), "decoder": decoder}

    # --- interface ---------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        caps = super().capabilities()
        caps["pipeline"] = {"ranks": self.ranks.world, "devices": list(self.ranks.devices),
                            "blocks": [[r.start, r.stop] for r in self.ranks.ranges]}
        return caps

    def open_stream(self, config: StreamConfig) -> dict[str, Any]:
        self._check_size(config)
        params, _ = P.apply(self.defaults, config.params)
        self._check_decoder(params)
        sid = config.stream_id
        self._op("open", sid, self._open_info(config, params.decoder))
        self._generation[sid] = self._generation.get(sid, 0) + 1
        self._ready[sid] = []
        try:
            out = super().open_stream(config)
        except BaseException:
            self._op("close", sid)
            self._flush_ops()
            raise
        self._flush_ops()
        return out

    def update_params(self, stream_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return super().update_params(stream_id, changes)
        finally:
            self._flush_ops()

    def close_stream(self, stream_id: int) -> None:
        if stream_id in self.streams:
            self._op("close", stream_id)
        self._prompts.pop(stream_id, None)
        self._ready.pop(stream_id, None)
        self._generation[stream_id] = self._generation.get(stream_id, 0) + 1
        super().close_stream(stream_id)
        self._flush_ops()

    def reset_stream(self, stream_id: int) -> None:
        self._generation[stream_id] = self._generation.get(stream_id, 0) + 1
        for key in [k for k in self._travelling if k[0] == stream_id]:
            del self._travelling[key]
        self._urgent = {k for k in self._urgent if k[0] != stream_id}
        super().reset_stream(stream_id)

    def shutdown(self) -> None:
        super().shutdown()
        if self.ranks.world > 1:
            self.ranks.stop()

    def _new_cache(self, p: P.VideoParams, rows: int, latent_h: int, latent_w: int,
                   stream_id: int) -> CacheLog:
        return CacheLog(self, stream_id, self._policy(p), rows)

    def _use_prompt(self, stream: VideoStream, emb: torch.Tensor) -> None:
        sid = stream.config.stream_id
        self._prompts[sid] = emb
        self._op("prompt", sid, len(self._op_tensors))
        self._op_tensors.append(emb)
        stream.cross_kv = True  # held by the ranks (each derives its blocks' K/V)

    def _switch_decoder(self, stream: VideoStream, decoder: str) -> None:
        self._op("decoder", stream.config.stream_id, decoder)

    # --- a step ------------------------------------------------------------------------------

    def _submit(self, batch: list[StreamInput]) -> list[StreamOutput]:
        if self.fell_back is None and self.ranks.failed:
            self._fall_back(self.ranks.failed)
        started = self.stage.timer.mark()
        for item in batch:
            stream = self.streams[item.stream_id]
            if not self._take_prompt(stream):
                continue  # first prompt still being encoded: these frames are let go
            chunk = self._encode(stream, item)
            if not stream.started or not stream.params.stream_batch:
                self._urgent.add((item.stream_id, chunk.id))
            stream.in_flight.append(chunk)
            stream.started = True
        self.stage.timer.add("encode", started, self.stage.timer.mark())
        self._guard(self._run_ticks)
        return [StreamOutput(item.stream_id, self._ready_frames(item.stream_id))
                for item in batch]

    def _ready_frames(self, stream_id: int) -> list[OutputFrame]:
        frames = self._ready.get(stream_id, [])
        self._ready[stream_id] = []
        return frames

    def _run_ticks(self) -> None:
        self._dispatch()
        # up to one tick per later rank stays in flight: every rank has work
        self._collect(keep=self.ranks.world - 1)
        while self._urgent:  # first chunks go round until clean, as in one process
            self._collect(keep=0)
            if not self._dispatch():
                break
        self._maybe_rebalance()

    def _dispatch(self) -> bool:
        """Send every chunk waiting at rank 0 (one per denoising step and stream per tick,
        lowest chunk first, so each cache row sees its chunks in order); False if none."""
        self._flush_ops()
        sent = False
        # what waits now; chunks that come back meanwhile (one rank) wait for the next step,
        # which keeps Stream Batch's one forward per step
        waiting = {(id(c), c.step) for s in self.streams.values() for c in s.in_flight}
        while True:
            groups: dict[tuple[int, int], list[tuple[VideoStream, list[Chunk]]]] = {}
            for sid in sorted(self.streams):
                stream = self.streams[sid]
                taken, rows = [], set()
                for chunk in sorted(stream.in_flight, key=lambda c: c.id):
                    if (id(chunk), chunk.step) in waiting and chunk.step not in rows:
                        rows.add(chunk.step)
                        taken.append(chunk)
                if taken:
                    stream.in_flight = [c for c in stream.in_flight if c not in taken]
                    groups.setdefault((stream.latent_h, stream.latent_w), []).append(
                        (stream, sorted(taken, key=lambda c: c.step)))
            if not groups:
                return sent
            for (h, w), work in groups.items():
                self._send_tick(h, w, work)
            sent = True

    def _send_tick(self, h: int, w: int, work: list[tuple[VideoStream, list[Chunk]]]) -> None:
        self._tick += 1
        elements, chunks = [], []
        for stream, taken in work:
            sid = stream.config.stream_id
            for c in taken:
                last = c.step + 1 >= len(c.schedule)
                elements.append({
                    "sid": sid, "gen": self._generation[sid], "cid": c.id, "step": c.step,
                    "last": last, "seed": c.seeds,
                    "sigma": sigma(c.schedule[c.step], self.shift),
                    "sigma_next": None if last else sigma(c.schedule[c.step + 1],
                                                                     self.shift)})
                self._travelling[(sid, c.id)] = c
                chunks.append(c)
        latents = torch.cat([c.x for c in chunks], 0)
        t = torch.tensor([c.schedule[c.step] for c in chunks], device=latents.device)
        header = {"kind": "tick", "tick": self._tick, "latent": [h, w], "elements": elements}
        out_header, out = self.stage.run(header, [latents, t])
        self._ticks_since_balance += 1
        if self.ranks.world == 1:
            self._take_result(out_header, out)
            return
        self.ranks.channel.send(1, out_header, out)
        self._outstanding.append((self._tick, {e["sid"] for e in elements}))

    def _collect(self, keep: int) -> None:
        """Take the results that have come back; wait while more than ``keep`` ticks are
        out."""
        channel = self.ranks.channel
        while self._outstanding:
            if len(self._outstanding) <= keep and not channel.ready(self.ranks.last):
                return
            header, tensors = channel.recv(self.ranks.last)
            _, sids = self._outstanding.popleft()
            if header.get("kind") == "error":
                self._failed_tick(header, sids)   # raises
            self._take_result(header, tensors)

    def _failed_tick(self, header: dict, sids: set[int]) -> None:
        """A rank failed a tick (out of memory, a bug): its streams restart; others go on."""
        for sid in sids:
            if sid in self.streams:
                self.reset_stream(sid)
        self._flush_ops()
        kind = "out of memory" if header.get("oom") else "failed"
        raise EngineError(f"pipeline rank {header.get('rank')} {kind} on a step: "
                          f"{header.get('message')}",
                          "out_of_memory" if header.get("oom") else "engine_error")

    def _take_result(self, header: dict, tensors: list[torch.Tensor]) -> None:
        for rank, times in header.get("stage", {}).items():
            self.ranks.stage_ms[int(rank)] = times
        for e, t in zip(header["elements"], tensors):
            sid = e["sid"]
            chunk = self._travelling.pop((sid, e["cid"]), None)
            stream = self.streams.get(sid)
            if chunk is None or stream is None or e["gen"] != self._generation.get(sid):
                continue  # closed or reset meanwhile
            if e["clean"]:
                self._urgent.discard((sid, chunk.id))
                if t.shape[0] != len(chunk.in_seqs):
                    raise EngineError(f"decoded {t.shape[0]} frames for a chunk of "
                                      f"{len(chunk.in_seqs)}.")
                self._ready.setdefault(sid, []).extend(
                    OutputFrame(t[i], seq, chunk.ts[i]) for i, seq in enumerate(chunk.in_seqs))
            else:
                chunk.x = t
                chunk.step += 1
                stream.in_flight.append(chunk)

    def _pending(self, stream: VideoStream) -> bool:
        sid = stream.config.stream_id
        return bool(stream.in_flight) or any(k[0] == sid for k in self._travelling)

    def _flush(self, stream: VideoStream) -> None:
        """Before a steps or cache change: every chunk of the stream, in flight or waiting,
        finishes with its own schedule (its frames come out with the next output)."""
        def finish():
            self._collect(keep=0)
            while self._pending(stream):
                self._dispatch()
                self._collect(keep=0)
        self._guard(finish)

    # --- blocks between ranks ----------------------------------------------------------------

    def _maybe_rebalance(self) -> None:
        if self.ranks.world == 1 or not self.rebalance_every or \
                self._ticks_since_balance < self.rebalance_every:
            return
        self._ticks_since_balance = 0
        if not all(self.ranks.stage_ms):
            return
        total, extra = self._stage_ms()
        proposal = rebalance(self.ranks.ranges, total, extra)
        if proposal is not None:
            self.rebalance(proposal)

    def _stage_ms(self) -> tuple[list[float], list[float]]:
        """Each rank's latest stage time and the part of it that is not its blocks (the VAE
        encode on the first, head and decode on the last)."""
        extra = [t.get("encode", 0.0) + t.get("extra", 0.0) for t in self.ranks.stage_ms]
        total = [t.get("blocks", 0.0) + e for t, e in zip(self.ranks.stage_ms, extra)]
        return total, extra

    def rebalance(self, ranges: list[range]) -> bool:
        """Move blocks so the ranks hold ``ranges`` (the block scheduler calls it with a split
        from the measured stage times); between ticks, the pipeline drained first, so no
        frame is dropped or reordered.  Returns whether anything moved."""
        if self.ranks.world == 1:
            return False
        ranges = [range(r.start, r.stop) for r in ranges]
        old = list(self.ranks.ranges)
        if ranges == old:
            return False
        if sorted(b for r in ranges for b in r) != list(range(self.wan.num_blocks)) or \
                any(len(r) == 0 for r in ranges):
            raise ValueError(f"not a split of {self.wan.num_blocks} blocks over "
                             f"{self.ranks.world} ranks: {ranges}")

        def move():
            self._collect(keep=0)
            self._flush_ops()
            channel = self.ranks.channel
            channel.send(1, {"kind": "move", "old": [[r.start, r.stop] for r in old],
                             "new": [[r.start, r.stop] for r in ranges]})
            move_blocks(self.stage, channel, old, ranges)
        self._guard(move)
        self.ranks.ranges = ranges
        self.moves_done += 1
        log.info("pipeline blocks moved: %s -> %s (stage ms %s)",
                 [[r.start, r.stop] for r in old], [[r.start, r.stop] for r in ranges],
                 [round(ms, 1) for ms in self._stage_ms()[0]])
        return True

    # --- failure -----------------------------------------------------------------------------

    def _guard(self, action) -> Any:
        """Run something that talks to the ranks; a rank that failed becomes one clear error
        and the engine continues on this GPU alone."""
        try:
            return action()
        except RankFailed as exc:
            self._fall_back(str(exc))
            raise EngineError(f"{exc}; the video engine now runs on {self.ranks.devices[0]} "
                              f"alone and its streams restart") from None

    def _fall_back(self, why: str) -> None:
        if self.fell_back is not None:
            return
        self.fell_back = why
        log.error("pipeline failed (%s): continuing on %s alone", why, self.ranks.devices[0])
        self.ranks.failed = why
        self.ranks.kill()
        from .factory import build_parts
        device = self.ranks.devices[0]
        parts = build_parts(self.parts_spec, device, text=False)
        self.wan = CausalWan(parts.transformer)
        self.vae = StreamingVAE(parts.vae)
        if self.device.type == "cuda" and self.stage.wan.compiled:
            self.wan.compile()
            self.vae.compile()
        self.tiny_decoder = parts.tiny_decoder
        self.ranks = Ranks([device], [range(self.wan.num_blocks)], stage_ms=[{}])
        self.stage = Stage(self.wan, self.ranks.ranges[0], 0, 1, vae=self.vae,
                           tiny_decoder=self.tiny_decoder)
        self._outstanding.clear()
        self._travelling.clear()
        self._urgent.clear()
        self._ops, self._op_tensors = [], []
        for sid, stream in self.streams.items():  # the new stage learns every stream again
            self._op("open", sid, self._open_info(stream.config, stream.params.decoder))
            stream.cache = CacheLog(self, sid, self._policy(stream.params), stream.params.steps)
            if sid in self._prompts:
                self._op("prompt", sid, len(self._op_tensors))
                self._op_tensors.append(self._prompts[sid])
            self.reset_stream(sid)
        self._flush_ops()


def build_pipeline_engine(parts_spec: str, devices: list[str], *, name: str,
                          ranges: list[range] | None = None, timeout: float = 600.0,
                          launch: bool = True, **kwargs: Any) -> PipelineVideoEngine:
    """Start the ranks (they build their parts meanwhile), build rank 0's parts here and
    return the engine.  ``ranges``: the first split (default: even; the block scheduler
    moves blocks from the stage times measured while serving)."""
    from ...parallel.pipeline import first_split, under_torchrun
    from .factory import build_parts
    if ranges is None:
        ranges = first_split(parts_spec, len(devices))
    ranks = Ranks.start(parts_spec, devices, ranges, timeout=timeout,
                        launch=launch and not under_torchrun())
    try:
        parts = build_parts(parts_spec, devices[0], text=True)
        engine = PipelineVideoEngine(name, parts, ranks, parts_spec=parts_spec, **kwargs)
        if ranks.world > 1:
            ranks.wait_ready(timeout)
        return engine
    except BaseException:
        ranks.kill()
        raise
