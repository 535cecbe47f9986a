"""One pipeline rank's share of the video engine: a contiguous range of DiT blocks, the KV
cache rows of those blocks for every stream, and the parts only the ends need.

Every rank runs the same ``Stage`` code:
  * the first also embeds the latents (the engine beside it encodes them with the VAE);
  * the last also runs the head, the sampler's step (x0, re-noising) and the VAE or tiny
    decoder, and its output goes back to the first rank: decoded frames for chunks that
    became clean, re-noised latents for the others;
  * a stage with every block (one rank) runs the engine's whole forward, CUDA graphs
    included.

What changes a stream's state arrives as *ops*, plain data applied in order: open, a new
cache, a prompt embedding (each rank derives the cross-attention K/V of its own blocks),
admit a chunk (its RoPE position), rows, policy, reset, decoder, close.  Each rank's cache
policy plans, executes and books its own blocks, so a sink refresh decided in block b is
decided where block b lives, with the same inputs as in one process: the pipelined output
equals the single-process output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from livediffusion.shared.protocol import FrameSpec

from ..engines.video.engine import decode_latent, switch_decoder, to_rgb
from ..engines.video.kv_cache import BlockState, CachePolicy, KVCache, SharedGraphs
from ..engines.video.noise import renoise
from ..frames import from_canonical
from ..models.causal_wan import CausalWan, ChunkCall


@dataclass
class StageStream:
    """A stream's state on one rank."""

    latent_h: int
    latent_w: int
    output: FrameSpec
    decoder: str = "vae"
    cache: KVCache | None = None
    prompt: torch.Tensor | None = None          # the umT5 embedding
    cross_kv: list | None = None                # this rank's blocks' cross-attention K/V
    vae: Any = None                             # the last rank's VAE decoder state
    tiny: Any = None
    last_latent: torch.Tensor | None = None


@dataclass
class Timer:
    """Stage times without synchronising a GPU: CUDA events, read once they are done."""

    device: torch.device
    pending: list = field(default_factory=list)
    #: the latest finished measurement: name -> ms
    last: dict[str, float] = field(default_factory=dict)

    def mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        if self.device.type != "cuda":
            self.last[name] = (end - start) * 1000.0
            return
        self.pending.append((name, start, end))
        while self.pending and self.pending[0][2].query():
            name, a, b = self.pending.pop(0)
            self.last[name] = a.elapsed_time(b)
        del self.pending[:-32]


def block_keys(block: torch.nn.Module) -> list[str]:
    return list(block.state_dict().keys())


class Stage:
    """Blocks ``blocks`` of the DiT on one rank of ``world`` (see the module docstring)."""

    def __init__(self, wan: CausalWan, blocks: range, rank: int, world: int, *, vae=None,
                 tiny_decoder=None) -> None:
        self.wan = wan
        self.blocks = blocks
        self.rank, self.world = rank, world
        self.vae = vae                  # StreamingVAE (the last rank decodes with it)
        self.tiny_decoder = tiny_decoder
        self.streams: dict[int, StageStream] = {}
        self.device = wan.device
        self.timer = Timer(self.device)
        #: fixed-shape forwards of several streams (one rank holding every block)
        self._shared_graphs = SharedGraphs()
        #: benchmarks on one device: run the blocks as this many stages one after the other
        #: (0 or 1: one stage, the whole forward when it holds every block)
        self.split = 0

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def _pieces(self) -> list[range]:
        """The stage forwards this rank runs per tick: its range, or with ``split`` = n
        (one rank, benchmarks) n consecutive pieces of it, as n ranks would run them."""
        if self.split <= 1:
            return [self.blocks]
        from .partition import partition
        return [range(self.blocks.start + r.start, self.blocks.start + r.stop)
                for r in partition([1.0] * len(self.blocks), self.split)]

    def drop_foreign_blocks(self) -> None:
        """Free the weights of the blocks other ranks run (they become meta tensors)."""
        for i, block in enumerate(self.wan.model.blocks):
            if i not in self.blocks:
                block.to("meta")

    # --- ops ----------------------------------------------------------------------------------

    def apply(self, ops: list, tensors: list[torch.Tensor]) -> None:
        for op in ops:
            name, sid = op[0], op[1]
            if name == "open":
                info = op[2]
                self.streams[sid] = StageStream(info["lh"], info["lw"],
                                                FrameSpec(**info["output"]), info["decoder"])
                if self.last:
                    self._fresh_decoders(self.streams[sid])
                continue
            stream = self.streams.get(sid)
            if stream is None:
                continue  # closed meanwhile
            if name == "cache":
                stream.cache = self._new_cache(stream, op[2]["rows"], op[2]["policy"])
            elif name == "prompt":
                stream.prompt = tensors[op[2]]
                stream.cross_kv = self.wan.cross_kv(stream.prompt, self.blocks)
            elif name == "admit":
                stream.cache.admit(op[2])
            elif name == "rows":
                stream.cache.set_rows(op[2])
            elif name == "policy":
                stream.cache.policy = CachePolicy(**op[2])
            elif name == "reset":
                stream.cache.reset()
                if self.last:
                    self._fresh_decoders(stream)
            elif name == "decoder":
                if self.last:
                    switch_decoder(stream, op[2], self.vae, self.tiny_decoder)
                stream.decoder = op[2]
            elif name == "close":
                del self.streams[sid]
                self._drop_stale_graphs()
            else:
                raise ValueError(f"unknown pipeline op {name!r}")

    def _new_cache(self, stream: StageStream, rows: int, policy: dict) -> KVCache:
        return KVCache.for_model(self.wan, rows, stream.latent_h, stream.latent_w,
                                 CachePolicy(**policy), owned=self.blocks)

    def _fresh_decoders(self, stream: StageStream) -> None:
        stream.vae = self.vae.new_state() if self.vae is not None else None
        stream.tiny = self.tiny_decoder.new_state() if stream.decoder == "tiny" else None
        stream.last_latent = None

    # --- a tick: one forward's share --------------------------------------------------------

    @torch.no_grad()
    def run(self, tick: dict, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """Run this rank's part of a tick.  In: the first rank gets (latents, t); the others
        (latents, tokens, temb, proj) from the rank before.  Out: the same for the next
        rank, or from the last rank the result for the first (header, tensors)."""
        elements = tick["elements"]
        h, w = tick["latent"]
        groups: list[tuple[int, list[dict]]] = []
        for e in elements:  # consecutive elements of one stream share a plan
            if groups and groups[-1][0] == e["sid"]:
                groups[-1][1].append(e)
            else:
                groups.append((e["sid"], [e]))
        plans, cross, caches = [], [], []
        for sid, els in groups:
            cache = self.streams[sid].cache
            rows, ids = [e["step"] for e in els], [e["cid"] for e in els]
            cache.prepare(rows, ids)
            plans.append(cache.plan(rows, ids))
            cross.append(self.streams[sid].cross_kv)
            caches.append(cache)
        wan = self.wan
        started = self.timer.mark()
        call = ChunkCall(plans, cross, graphs=self._graphs_for([sid for sid, _ in groups]))
        if self.first:
            (latents, t), carried = tensors, None
        else:
            latents, t, carried = tensors[0], None, tuple(tensors[1:])
        chosen = [{} for _ in plans]
        for piece in self._pieces():
            out, decided = wan.forward_stage(latents, t if piece.start == 0 else None, call,
                                             piece.start, piece.stop, carried)
            for mine, more in zip(chosen, decided):
                mine.update(more)
            carried = out
        if self.last:
            flow = out
        else:
            x, temb, proj = out
        for (sid, els), plan, cache, decided in zip(groups, plans, caches, chosen):
            cache.commit(plan, decided)
            for e in els:
                if e["last"]:
                    cache.forget(e["cid"])
        blocks_done = self.timer.mark()
        self.timer.add("blocks", started, blocks_done)
        stage = dict(tick.get("stage", {}))
        if not self.last:
            stage[str(self.rank)] = self._times()
            return {**tick, "stage": stage}, [latents, x, temb, proj]
        out_header, out = self._finish(elements, latents, flow.to(latents.dtype))
        self.timer.add("extra", blocks_done, self.timer.mark())
        stage[str(self.rank)] = self._times()
        return {"kind": "result", "tick": tick["tick"], "elements": out_header,
                "stage": stage}, out

    def _times(self) -> dict[str, float]:
        return dict(self.timer.last)

    def _finish(self, elements: list[dict], latents: torch.Tensor, flow: torch.Tensor
                ) -> tuple[list[dict], list[torch.Tensor]]:
        """The sampler's step for every element (as the engine's ``_step``), then decode
        the clean ones."""
        header, out = [], []
        for i, e in enumerate(elements):
            x0 = latents[i:i + 1] - e["sigma"] * flow[i:i + 1]
            if e["last"]:
                stream = self.streams[e["sid"]]
                frames = self._decode(stream, x0)
                header.append({"sid": e["sid"], "gen": e["gen"], "cid": e["cid"], "clean": True})
                out.append(frames)
            else:
                header.append({"sid": e["sid"], "gen": e["gen"], "cid": e["cid"],
                               "clean": False})
                out.append(renoise(x0, e["sigma_next"], e["seed"], e["cid"], e["step"] + 1))
        return header, out

    def _decode(self, stream: StageStream, x: torch.Tensor) -> torch.Tensor:
        rgb = to_rgb(decode_latent(stream, stream.decoder, x, self.vae, self.tiny_decoder))
        return torch.stack([from_canonical(rgb[i], stream.output) for i in range(rgb.shape[0])])

    def _graphs_for(self, sids: list[int]) -> dict:
        """Where the fixed-shape forwards of this set of streams are kept (``SharedGraphs``)."""
        self._drop_stale_graphs()
        return self._shared_graphs.for_caches([(sid, self.streams[sid].cache) for sid in sids])

    def _drop_stale_graphs(self) -> None:
        self._shared_graphs.drop_stale(
            lambda sid: self.streams[sid].cache if sid in self.streams else None)

    # --- moving blocks ---------------------------------------------------------------------

    def give(self, block: int) -> tuple[dict, list[torch.Tensor]]:
        """Everything of ``block`` that leaves this rank, as a message: its weights and every
        stream's cache share (keys, values, positions, books).  Nothing is dropped until
        ``release`` (after this rank has taken what comes to it)."""
        module = self.wan.model.blocks[block]
        header: dict[str, Any] = {"block": block, "streams": []}
        tensors = [t.detach() for t in module.state_dict().values()]
        for sid in sorted(self.streams):
            cache = self.streams[sid].cache
            if cache is None:
                continue
            state = cache.block_state(block)
            header["streams"].append({"sid": sid, "chunk": state.chunk,
                                      "next_ring": state.next_ring,
                                      "targets": [[c, s] for c, s in state.targets.items()]})
            tensors += [state.k, state.v, state.positions]
        return header, tensors

    def release(self, block: int) -> None:
        for stream in self.streams.values():
            if stream.cache is not None:
                stream.cache.drop_block(block)
            if stream.cross_kv is not None:
                stream.cross_kv[block] = None
        self.wan.model.blocks[block].to("meta")

    def take(self, header: dict, tensors: list[torch.Tensor]) -> None:
        """Install a block given by another rank (``give``'s message)."""
        block = header["block"]
        module = self.wan.model.blocks[block]
        keys = block_keys(module)
        module.to_empty(device=self.device)
        module.load_state_dict(dict(zip(keys, tensors[:len(keys)])))
        rest = tensors[len(keys):]
        for i, info in enumerate(header["streams"]):
            stream = self.streams[info["sid"]]
            k, v, positions = rest[3 * i:3 * i + 3]
            stream.cache.put_block(BlockState(block, k, v, positions.cpu(), info["chunk"],
                                              info["next_ring"],
                                              {c: s for c, s in info["targets"]}))
            if stream.prompt is not None:
                stream.cross_kv[block] = self.wan.cross_kv(stream.prompt, range(block, block + 1)
                                                           )[block]

    def set_blocks(self, blocks: range) -> None:
        self.blocks = blocks
        self._shared_graphs.clear()
