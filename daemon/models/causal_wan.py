"""Causal, chunk-by-chunk forward of diffusers' WanTransformer3DModel against a KV cache.

diffusers' modules and weights are used as they are (norms, modulation, FFN, projections); the
block's forward is ours, in three dense regions around the two attention calls: self-attention
rotates this chunk's queries/keys at its frame position, stores keys/values in the stream's
cache and attends to the cache rows in place; cross-attention uses keys/values computed once
per prompt.  The dense regions hold no Python state, so ``CausalWan.compile()`` can hand them
to torch.compile (one graph reused by every block); the cache bookkeeping stays eager.  The forward can run over a
contiguous range of blocks (a *stage*) so pipeline parallelism can split blocks over ranks.

One call processes a batch of latent frames (B, 16, 1, h, w): each batch element is one chunk
at one denoising step, tagged with its cache row (= step), chunk id and frame position.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F



def rope_inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies of one RoPE axis (pairs interleaved), as diffusers' Wan uses."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for integer (possibly negative) positions, each frequency repeated twice."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    return (angles.cos().repeat_interleave(2, -1).float(),
            angles.sin().repeat_interleave(2, -1).float())


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the given angles (same layout as Wan)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).to(x.dtype)


class FrameCache(Protocol):
    """What the causal forward needs from a stream's KV cache (the engine owns the policy)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    def slot_for(self, block: int, chunk: int, k_new: torch.Tensor,
                 v_new: torch.Tensor) -> int: ...

    def store(self, block: int, row: int, slot: int, position: int, k: torch.Tensor,
              v: torch.Tensor) -> None: ...

    def filled_slots(self, block: int, row: int) -> int: ...

    def resolve(self) -> None:
        """Book the slot decisions left on the device during a forward (one sync)."""


@dataclass
class ChunkCall:
    """What the attention processors need to know about the current call.

    Batch elements may belong to different streams (each with its own cache and prompt): the
    linear layers run batched, attention runs once per group of consecutive elements sharing
    a cache (or a prompt), reading that stream's cache rows in place.
    """

    caches: list[FrameCache]   # per batch element: its stream's cache
    rows: list[int]            # cache row (denoising step) of each batch element
    chunks: list[int]          # chunk id of each batch element
    positions: list[int]       # frame position of each batch element
    cross_kv: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per element: per block (1,h,L,d)

    @classmethod
    def single(cls, cache: FrameCache, rows: list[int], chunks: list[int],
               positions: list[int], cross_kv) -> ChunkCall:
        """All elements from one stream."""
        n = len(rows)
        return cls([cache] * n, rows, chunks, positions, [cross_kv] * n)


def _groups(items: list) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive elements that are the same object."""
    out, start = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] is not items[start]:
            out.append((start, i))
            start = i
    return out


def _modulation(block, proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """shift, scale, gate (self-attention) and shift, scale, gate (FFN), each (B, 1, dim)."""
    return (block.scale_shift_table + proj.float()).chunk(6, dim=1)


def _self_qkv(block, x: torch.Tensor, proj: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region 1 of a block: modulated norm, q/k/v with RMS norms, RoPE.  Returns q (B, heads,
    T, d) and k, v (B, T, heads, d)."""
    shift, scale = _modulation(block, proj)[:2]
    h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    attn = block.attn1
    q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(h)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(h).unflatten(2, (attn.heads, -1))
    return rotate_pairs(q, cos, sin).transpose(1, 2), rotate_pairs(k, cos, sin), v


def _self_out_cross_q(block, x: torch.Tensor, attn_out: torch.Tensor, proj: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Region 2: self-attention output projection and gated residual, then the cross-attention
    queries.  Returns x and q (B, heads, T, d)."""
    gate = _modulation(block, proj)[2]
    attn = block.attn1
    out = attn.to_out[1](attn.to_out[0](attn_out.transpose(1, 2).flatten(2, 3).type_as(x)))
    x = (x.float() + out * gate).type_as(x)
    h = block.norm2(x.float()).type_as(x)
    cross = block.attn2
    q = cross.norm_q(cross.to_q(h)).unflatten(2, (cross.heads, -1)).transpose(1, 2)
    return x, q


def _cross_out_ffn(block, x: torch.Tensor, cross_out: torch.Tensor, proj: torch.Tensor
                   ) -> torch.Tensor:
    """Region 3: cross-attention output projection and residual, modulated norm, gated FFN."""
    c_shift, c_scale, c_gate = _modulation(block, proj)[3:]
    cross = block.attn2
    x = x + cross.to_out[1](cross.to_out[0](cross_out.transpose(1, 2).flatten(2, 3)
                                            .type_as(x)))
    h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    return (x.float() + block.ffn(h).float() * c_gate).type_as(x)


def _attend_cache(block: int, call: ChunkCall, lo: int, hi: int, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    """Store elements lo..hi's keys/values in their stream's cache and attend over its rows
    in place (the filled prefix of each row; a mask where rows differ in length)."""
    cache = call.caches[lo]
    lengths = []
    for i in range(lo, hi):
        slot = cache.slot_for(block, call.chunks[i], k[i], v[i])
        cache.store(block, call.rows[i], slot, call.positions[i], k[i], v[i])
        lengths.append(cache.filled_slots(block, call.rows[i]) * t)
    rows = call.rows[lo:hi]
    longest = max(lengths)
    if rows == list(range(rows[0], rows[0] + len(rows))):
        keys = cache.k[block][rows[0]:rows[0] + len(rows), :, :longest]
        values = cache.v[block][rows[0]:rows[0] + len(rows), :, :longest]
    else:  # rows out of order (not produced by the engine's schedules, kept for safety)
        keys = cache.k[block][rows, :, :longest]
        values = cache.v[block][rows, :, :longest]
    mask = None
    if min(lengths) < longest:
        idx = torch.arange(longest, device=q.device)
        mask = (idx[None, :] < torch.tensor(lengths, device=q.device)[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                          attn_mask=mask)


def _cat(outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class CausalWan:
    """Wraps a WanTransformer3DModel for streaming (its modules and weights, our forward)."""

    def __init__(self, transformer) -> None:
        self.model = transformer
        cfg = transformer.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.patch = tuple(cfg.patch_size)
        rope = transformer.rope
        self.t_dim, self.h_dim, self.w_dim = rope.t_dim, rope.h_dim, rope.w_dim
        self.inv_freq = [rope_inv_freq(d) for d in (self.t_dim, self.h_dim, self.w_dim)]
        self._regions = (_self_qkv, _self_out_cross_q, _cross_out_ffn)
        self.compiled = False
        #: use the fixed-shape forward once a stream's cache is full (default: on CUDA, as
        #: CUDA graphs); LIVEDIFFUSION_CUDA_GRAPHS=0 turns both off
        cuda = self.device.type == "cuda" and os.environ.get("LIVEDIFFUSION_CUDA_GRAPHS",
                                                             "1") != "0"
        self.fixed_shape = cuda
        self.use_graphs = cuda
        #: attention kernels, best first: "cudnn" (measured 1.7x faster than flash for these
        #: shapes on an H200) or "default" (PyTorch's own order)
        self.attention = "cudnn" if self.device.type == "cuda" else "default"
        self._rope_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = \
            OrderedDict()

    def _attention_kernels(self):
        """A context choosing the SDPA backends in our order (PyTorch falls back down the
        list when a backend cannot take the call)."""
        if self.attention == "default":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the three dense regions of a block (everything but the cache
        bookkeeping and the attention calls).  They are compiled once and reused by every
        block (the blocks differ only in their weights); one graph per batch/token shape."""
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._regions = tuple(torch.compile(f, fullgraph=True, dynamic=False, mode=mode)
                              for f in (_self_qkv, _self_out_cross_q, _cross_out_ffn))
        self.compiled = True

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch[1]) * (latent_w // self.patch[2])

    # --- pieces of the forward -------------------------------------------------------------

    def rope(self, positions: list[int], pph: int, ppw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, 1, head_dim) for one latent frame per batch element.  The spatial
        part is memoised per frame size; only the temporal angles are computed per call."""
        dev = self.device
        spatial = self._rope_cache.get((pph, ppw))
        if spatial is None:
            ch, sh = rope_cos_sin(torch.arange(pph, device=dev), self.inv_freq[1])   # H, hd
            cw, sw = rope_cos_sin(torch.arange(ppw, device=dev), self.inv_freq[2])   # W, wd

            def grid(h, w):
                return torch.cat([h[:, None, :].expand(pph, ppw, -1),
                                  w[None, :, :].expand(pph, ppw, -1)], -1).reshape(pph * ppw, -1)

            spatial = self._rope_cache[(pph, ppw)] = (grid(ch, cw), grid(sh, sw))
            while len(self._rope_cache) > 8:
                self._rope_cache.popitem(last=False)
        ct, st = rope_cos_sin(torch.tensor(positions), self.inv_freq[0])  # B, td (on the CPU)
        b, tokens = len(positions), pph * ppw

        def full(t, hw):
            t = t.to(dev, non_blocking=True)
            return torch.cat([t[:, None, :].expand(b, tokens, -1),
                              hw[None].expand(b, -1, -1)], -1).unsqueeze(2)

        return full(ct, spatial[0]), full(st, spatial[1])

    @torch.no_grad()
    def cross_kv(self, prompt_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block cross-attention K/V for umT5 embeddings (1, L, text_dim)."""
        context = self.model.condition_embedder.text_embedder(
            prompt_embeds.to(self.device, self.dtype))
        out = []
        for block in self.model.blocks:
            attn = block.attn2
            k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            v = attn.to_v(context).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            out.append((k.contiguous(), v.contiguous()))
        return out

    def embed(self, latents: torch.Tensor, timesteps: torch.Tensor):
        """Patchify (B, C, 1, h, w) and embed per-element timesteps."""
        model = self.model
        x = model.patch_embedding(latents.to(self.dtype))
        x = x.flatten(2).transpose(1, 2).contiguous()
        cond = model.condition_embedder
        temb = cond.timesteps_proj(timesteps.to(self.device))
        temb = cond.time_embedder(temb.to(next(cond.time_embedder.parameters()).dtype))
        temb = temb.type_as(x)
        proj = cond.time_proj(cond.act_fn(temb)).unflatten(1, (6, -1))
        return x, temb, proj

    def blocks(self, x: torch.Tensor, proj: torch.Tensor, rope, call: ChunkCall,
               start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks[start:end] (a pipeline stage) on tokens (B, T, dim)."""
        with self._attention_kernels():
            return self._blocks(x, proj, rope, call, start, end)

    def _blocks(self, x, proj, rope, call, start, end):
        qkv, mid, post = self._regions
        cos, sin = rope
        t = x.shape[1]
        cache_groups = _groups(call.caches)
        prompt_groups = _groups(call.cross_kv)
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            block = self.model.blocks[i]
            q, k, v = qkv(block, x, proj, cos, sin)
            attn = _cat([_attend_cache(i, call, lo, hi, q[lo:hi], k, v, t)
                         for lo, hi in cache_groups])
            x, q = mid(block, x, attn, proj)
            outs = []
            for lo, hi in prompt_groups:
                ck, cv = call.cross_kv[lo][i]
                n = hi - lo
                outs.append(F.scaled_dot_product_attention(
                    q[lo:hi], ck.expand(n, -1, -1, -1).to(q.dtype),
                    cv.expand(n, -1, -1, -1).to(q.dtype)))
            x = post(block, x, _cat(outs), proj)
        for cache in {id(c): c for c in call.caches}.values():
            cache.resolve()
        return x

    def head(self, x: torch.Tensor, temb: torch.Tensor, latent_h: int, latent_w: int
             ) -> torch.Tensor:
        model = self.model
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, 1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = model.proj_out(x)
        b = x.shape[0]
        pt, ph, pw = self.patch
        hh, ww = latent_h // ph, latent_w // pw
        x = x.reshape(b, 1, hh, ww, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, call: ChunkCall
                ) -> torch.Tensor:
        """Flow prediction for a batch of single latent frames (B, 16, 1, h, w)."""
        _, _, frames, h, w = latents.shape
        if frames != 1:
            raise ValueError("the causal forward takes one latent frame per batch element.")
        if self.fixed_shape:
            out = self._forward_fixed(latents, timesteps, call, h, w)
            if out is not None:
                return out
        x, temb, proj = self.embed(latents, timesteps)
        rope = self.rope(call.positions, h // self.patch[1], w // self.patch[2])
        x = self.blocks(x, proj, rope, call)
        return self.head(x, temb, h, w)


    # --- the fixed-shape forward: one CUDA graph per stream and batch shape --------------------

    def _forward_fixed(self, latents: torch.Tensor, timesteps: torch.Tensor, call: ChunkCall,
                       h: int, w: int) -> torch.Tensor | None:
        """The forward of a stream whose cache is full: every slot index is a device tensor,
        the sink-refresh decision is taken on the device, attention reads whole rows, so the
        whole forward (embedding, every block, head) is one fixed sequence of kernels.  On
        CUDA it is recorded once as a graph and replayed; elsewhere it runs directly (the
        tests compare it with the general path).  None when the call is not of that kind."""
        cache = call.caches[0]
        if any(c is not cache for c in call.caches) or \
                any(kv is not call.cross_kv[0] for kv in call.cross_kv) or \
                not hasattr(cache, "static_plan"):
            return None
        plan = cache.static_plan(call.rows, call.chunks)
        if plan is None:
            return None
        b, dev = len(call.rows), self.device
        cos, sin = self.rope(call.positions, h // self.patch[1], w // self.patch[2])
        key = (b, h, w, plan.refresh, plan.new, cache.policy.refresh_threshold)
        st = cache.graphs.get(key)
        slots = torch.tensor(plan.slots, device=dev)
        ring = torch.tensor(plan.ring, device=dev)
        if st is None:
            st = cache.graphs[key] = _Fixed(
                latents=latents.to(dev, self.dtype).clone(),
                t=timesteps.to(dev).clone(), cos=cos.clone(), sin=sin.clone(), slots=slots,
                ring=ring, rows=torch.arange(b, device=dev), refresh=plan.refresh,
                cross=[(k.clone(), v.clone()) for k, v in call.cross_kv[0]],
                cross_src=call.cross_kv[0],
                out=torch.empty((b, latents.shape[1], 1, h, w), device=dev, dtype=self.dtype),
                chosen=torch.zeros(self.num_blocks, dtype=torch.long, device=dev))
        else:
            st.latents.copy_(latents)
            st.t.copy_(timesteps)
            st.cos.copy_(cos)
            st.sin.copy_(sin)
            st.slots.copy_(slots)
            st.ring.copy_(ring)
            if st.cross_src is not call.cross_kv[0]:  # a new prompt
                for (dk, dv), (k, v) in zip(st.cross, call.cross_kv[0]):
                    dk.copy_(k)
                    dv.copy_(v)
                st.cross_src = call.cross_kv[0]
        if not self.use_graphs:
            self._fixed_body(st, cache, h, w)
        elif st.graph is None:
            # the first run is real work and the warm-up the capture needs; the capture
            # records the same kernels without running them
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._fixed_body(st, cache, h, w)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a prompt being encoded on the text thread meanwhile is not an
            # error for this capture (its work is on its own stream and is not recorded)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._fixed_body(st, cache, h, w)
            st.graph = graph
        else:
            st.graph.replay()
        chosen = st.chosen.tolist() if plan.refresh else None  # the forward's one sync
        cache.static_commit(plan, call.chunks, call.positions, chosen)
        return st.out.clone()

    def _fixed_body(self, st: _Fixed, cache: FrameCache, h: int, w: int) -> None:
        with self._attention_kernels():
            self._fixed_body_inner(st, cache, h, w)

    def _fixed_body_inner(self, st: _Fixed, cache: FrameCache, h: int, w: int) -> None:
        x, temb, proj = self.embed(st.latents, st.t)
        b, t = x.shape[:2]
        frames = cache.policy.frames
        qkv, mid, post = self._regions
        chosen = []
        for i, block in enumerate(self.model.blocks):
            q, k, v = qkv(block, x, proj, st.cos, st.sin)
            slots = st.slots[i]
            if st.refresh:  # element 0 is a new chunk: a sink or the ring slot, on the device
                first = cache._refresh_choice(i, k[0], v[0], st.ring[i])
                slots = torch.cat([first.view(1), slots[1:]])
                chosen.append(first)
            for store, new in ((cache.k[i], k), (cache.v[i], v)):
                store.unflatten(2, (frames, t))[st.rows, :, slots] = new.transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, cache.k[i][:b], cache.v[i][:b])
            x, q = mid(block, x, attn, proj)
            ck, cv = st.cross[i]
            x = post(block, x, F.scaled_dot_product_attention(
                q, ck.expand(b, -1, -1, -1), cv.expand(b, -1, -1, -1)), proj)
        st.out.copy_(self.head(x, temb, h, w))
        if chosen:
            st.chosen.copy_(torch.stack(chosen))


@dataclass(eq=False)
class _Fixed:
    """The static buffers of one fixed-shape forward (a CUDA graph reads and writes them).
    Kept in the stream's cache (``cache.graphs``) and holding no reference back to it, so
    closing a stream frees its graph and buffers at once, without waiting for the cyclic
    garbage collector."""

    latents: torch.Tensor
    t: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor    # (blocks, B) frame slot of each element
    ring: torch.Tensor     # (blocks,) the ring slot a new chunk takes unless it refreshes
    rows: torch.Tensor     # (B,) = 0..B-1
    refresh: bool
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    cross_src: object
    out: torch.Tensor
    chosen: torch.Tensor   # (blocks,) slot chosen for element 0
    graph: object = None


def flops_per_chunk(transformer, tokens: int, cached_tokens: int, text_len: int = 512) -> float:
    """Approximate matmul FLOPs of one causal forward of one latent frame (for benchmarks)."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_block = 2 * tokens * d * d * 4                 # q, k, v, o of self-attention
    per_block += 2 * tokens * d * d * 2                 # q, o of cross-attention
    per_block += 2 * tokens * d * cfg.ffn_dim * 2       # FFN
    per_block += 2 * 2 * tokens * cached_tokens * d     # QK^T and PV over the cache
    per_block += 2 * 2 * tokens * text_len * d          # cross-attention scores
    return float(per_block * cfg.num_layers + 2 * tokens * d * math.prod(cfg.patch_size) * 16)
