"""Causal, chunk-by-chunk forward of diffusers' WanTransformer3DModel against a KV cache.

diffusers' modules and weights are used as they are (norms, modulation, FFN, projections); the
block's forward is ours, in three dense regions around the two attention calls: self-attention
rotates this chunk's queries/keys at its frame position, writes keys/values into the K/V
storage it is handed and attends to those rows in place; cross-attention uses keys/values
computed once per prompt.  The dense regions hold no Python state, so ``CausalWan.compile()``
can hand them to torch.compile (one graph reused by every block).  The forward can run over a
contiguous range of blocks (a *stage*) so pipeline parallelism can split blocks over ranks.

One call processes a batch of latent frames (B, 16, 1, h, w): each batch element is one chunk
at one denoising step.  What each element does in the self-attention of every block comes in
an ``AttentionPlan`` (one per stream, made by the caller's cache policy before the forward):
the storage, the row, the frame slot to write, the RoPE position, the prefix to attend to.
A slot may be a ``RefreshRule`` instead of a number: the model evaluates it on the device
(``refresh_choice``) and returns what it chose, for the policy to book afterwards.  The model
knows nothing of streams, sinks bookkeeping or position wraps.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import env, env_flag



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


@dataclass(frozen=True)
class RefreshRule:
    """A frame slot left to the device (adaptive sink refresh), as plain data.

    The new chunk's keys and values at this block are compared with each sink, frame slots
    ``0 .. sinks - 1`` of row ``row``: cosine of the mean key and of the mean value, averaged.
    The least similar sink is replaced if that similarity is below ``threshold``; otherwise
    the chunk takes the ``ring`` slot.
    """

    sinks: int
    ring: int
    threshold: float
    row: int = 0


#: the frame slot one element writes in one block: known, or decided on the device
Slot = int | RefreshRule


@dataclass(eq=False)
class AttentionPlan:
    """One K/V storage's part of a forward (a stream's, in the engine), decided by the
    owner's cache policy before the forward.

    Per block ``b`` and batch element ``e`` (the stream's elements, in batch order): element
    ``e`` writes its new keys/values into frame slot ``slots[b][e]`` (token range
    ``[slot * tokens, (slot + 1) * tokens)``) of row ``rows[e]`` of ``k[b]``/``v[b]``, then
    attends to the first ``lengths[b][e]`` frames of that row.  The model only executes this.
    """

    k: list[torch.Tensor]       # per block: (rows, heads, frames * tokens, head_dim), in place
    v: list[torch.Tensor]
    frames: int                 # frame slots per row
    rows: list[int]             # per element
    positions: list[int]        # per element: RoPE frame position
    slots: list[list[Slot]]     # [block][element]; a RefreshRule at most once per block
    lengths: list[list[int]]    # [block][element]: frames attended to (a prefix of the row)
    #: rows are 0..B-1 and every slot of them is filled, rules only at element 0 of every
    #: block (or none): the whole forward has fixed shapes (``CausalWan._forward_fixed``)
    fixed: bool = False
    #: keep refresh decisions on the device until the end of the forward (one synchronisation)
    #: instead of reading each back where it is taken
    defer: bool = True
    #: per element: the chunk id, for the policy's booking (the model does not read it)
    chunks: list[int] = field(default_factory=list)


#: per plan: block -> the slot its refresh rule chose (a 0-d device tensor until read back)
Chosen = list[dict[int, int | torch.Tensor]]


@dataclass
class ChunkCall:
    """One forward's batch: consecutive elements of one stream share a plan and a prompt.

    The linear layers run batched over every element; attention runs once per plan, reading
    that plan's storage in place, and cross-attention once per plan with its prompt's K/V.
    """

    plans: list[AttentionPlan]
    cross_kv: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per plan: per block (1,h,L,d)
    #: where the fixed-shape forwards of this set of plans' storages are kept (the caller
    #: owns it and drops it whenever a storage is replaced); None: no fixed-shape forward
    graphs: dict | None = None

    @property
    def positions(self) -> list[int]:
        return [p for plan in self.plans for p in plan.positions]

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each plan's elements in the batch."""
        out, start = [], 0
        for plan in self.plans:
            out.append((start, start + len(plan.rows)))
            start += len(plan.rows)
        return out


def refresh_choice(k: torch.Tensor, v: torch.Tensor, tokens: int, k_new: torch.Tensor,
                   v_new: torch.Tensor, rule: RefreshRule,
                   ring: torch.Tensor | None = None) -> torch.Tensor:
    """The frame slot ``rule`` picks for a new chunk, as a 0-d long tensor on the storage's
    device (no host synchronisation).

    ``k``/``v``: one block's storage (rows, heads, frames * tokens, dim); ``k_new``/``v_new``:
    the chunk's keys/values (tokens, heads, dim); ``ring``: the ring slot as a device tensor
    (a fixed-shape forward, whose ring slot changes between replays), else ``rule.ring``.
    """
    k_sinks = k[rule.row, :, :rule.sinks * tokens].unflatten(1, (-1, tokens))
    v_sinks = v[rule.row, :, :rule.sinks * tokens].unflatten(1, (-1, tokens))
    f32 = torch.float32  # accumulate in float32 without a float32 copy of the sinks
    km = k_sinks.mean(2, dtype=f32).transpose(0, 1).flatten(1)   # sinks, heads*dim
    vm = v_sinks.mean(2, dtype=f32).transpose(0, 1).flatten(1)
    kn = k_new.mean(0, dtype=f32).flatten()
    vn = v_new.mean(0, dtype=f32).flatten()
    sim = 0.5 * (torch.cosine_similarity(km, kn[None], dim=-1) +
                 torch.cosine_similarity(vm, vn[None], dim=-1))
    low, worst = sim.min(0)
    if ring is None:
        ring = torch.full_like(worst, rule.ring)
    return torch.where(low < rule.threshold, worst, ring)


def write_block(plan: AttentionPlan, block: int, k: torch.Tensor, v: torch.Tensor
                ) -> int | torch.Tensor | None:
    """Write the plan's elements' new keys/values (elements, tokens, heads, dim) into their
    frame slots of ``block``'s storage.

    A refresh rule is evaluated here, from its element's keys/values, before that element's
    write; returns its decision (a 0-d device tensor with ``plan.defer``, else an int), or
    None when the block has no rule.
    """
    store_k, store_v = plan.k[block], plan.v[block]
    tokens = store_k.shape[2] // plan.frames
    decided = None
    for e, slot in enumerate(plan.slots[block]):
        if isinstance(slot, RefreshRule):
            if decided is not None:
                raise ValueError("a plan has at most one refresh rule per block.")
            slot = decided = refresh_choice(store_k, store_v, tokens, k[e], v[e], slot)
            if not plan.defer:
                slot = decided = int(decided)
        row = plan.rows[e]
        if isinstance(slot, torch.Tensor):  # undecided on the host: index on the device
            index = slot.view(1)
            for store, new in ((store_k, k[e]), (store_v, v[e])):
                frames = store[row].unflatten(1, (plan.frames, tokens))
                frames.index_copy_(1, index, new.transpose(0, 1).unsqueeze(1))
        else:
            store_k[row, :, slot * tokens:(slot + 1) * tokens].copy_(k[e].transpose(0, 1))
            store_v[row, :, slot * tokens:(slot + 1) * tokens].copy_(v[e].transpose(0, 1))
    return decided


def read_back(chosen: Chosen) -> list[dict[int, int]]:
    """Every decision left on the device, as ints, in one synchronisation."""
    waiting = [(j, block, slot) for j, part in enumerate(chosen)
               for block, slot in part.items() if isinstance(slot, torch.Tensor)]
    out = [dict(part) for part in chosen]
    if waiting:
        values = torch.stack([slot for _, _, slot in waiting]).tolist()
        for (j, block, _), value in zip(waiting, values):
            out[j][block] = value
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


def _attend(plan: AttentionPlan, block: int, q: torch.Tensor, tokens: int) -> torch.Tensor:
    """Attend the plan's elements over the filled prefix of their rows, in place (a mask
    where rows differ in length)."""
    lengths = [n * tokens for n in plan.lengths[block]]
    rows = plan.rows
    longest = max(lengths)
    store_k, store_v = plan.k[block], plan.v[block]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        keys = store_k[rows[0]:rows[0] + len(rows), :, :longest]
        values = store_v[rows[0]:rows[0] + len(rows), :, :longest]
    else:  # rows out of order (not produced by the engine's schedules, kept for safety)
        keys = store_k[rows, :, :longest]
        values = store_v[rows, :, :longest]
    mask = None
    if min(lengths) < longest:
        idx = torch.arange(longest, device=q.device)
        mask = (idx[None, :] < torch.tensor(lengths, device=q.device)[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                          attn_mask=mask)


def _cat(outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)



def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
                      ) -> torch.Tensor:
    """Wan's sinusoidal timestep embedding, computed in float64 as Wan computes it (cos then
    sin of t * max_period^(-i/half)); diffusers' Timesteps computes the same in float32,
    3.8e-5 away, which moves the flow by about 1e-5.  The caller casts it."""
    half = dim // 2
    t = timesteps.to(torch.float64).reshape(-1)
    # a Python number as the base: nothing crosses from the host (CUDA graph capture)
    freqs = torch.pow(float(max_period),
                      -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = torch.outer(t, freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1)

class CausalWan:
    """Wraps a WanTransformer3DModel for streaming (its modules and weights, our forward)."""

    def __init__(self, transformer) -> None:
        self.model = transformer
        cfg = transformer.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.patch = tuple(cfg.patch_size)
        # Wan's RoPE splits a head's channels into time, height and width parts with
        # h = w = 2 * (head_dim // 6); computed here from the config (diffusers only stores
        # them on the module since 0.36)
        self.h_dim = self.w_dim = 2 * (self.head_dim // 6)
        self.t_dim = self.head_dim - self.h_dim - self.w_dim
        self.inv_freq = [rope_inv_freq(d) for d in (self.t_dim, self.h_dim, self.w_dim)]
        self._regions = (_self_qkv, _self_out_cross_q, _cross_out_ffn)
        self.compiled = False
        #: use the fixed-shape forward once a stream's cache is full (default: on CUDA, as
        #: CUDA graphs); LIVEDIFFUSION_CUDA_GRAPHS=0 turns both off
        cuda = self.device.type == "cuda" and env_flag("LIVEDIFFUSION_CUDA_GRAPHS")
        fixed = env("LIVEDIFFUSION_FIXED_SHAPE").strip().lower()
        self.fixed_shape = cuda if fixed == "auto" else env_flag("LIVEDIFFUSION_FIXED_SHAPE")
        self.use_graphs = cuda and self.fixed_shape
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
    def cross_kv(self, prompt_embeds: torch.Tensor, blocks: range | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block cross-attention K/V for umT5 embeddings (1, L, text_dim); with
        ``blocks`` (a pipeline stage) only for those, None for the others."""
        context = self.model.condition_embedder.text_embedder(
            prompt_embeds.to(self.device, self.dtype))
        out = []
        for i, block in enumerate(self.model.blocks):
            if blocks is not None and i not in blocks:
                out.append(None)
                continue
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
        temb = timestep_sinusoid(timesteps.to(self.device), cond.timesteps_proj.num_channels)
        temb = cond.time_embedder(temb.to(next(cond.time_embedder.parameters()).dtype))
        temb = temb.type_as(x)
        proj = cond.time_proj(cond.act_fn(temb)).unflatten(1, (6, -1))
        return x, temb, proj

    def blocks(self, x: torch.Tensor, proj: torch.Tensor, rope, call: ChunkCall,
               start: int = 0, end: int | None = None) -> tuple[torch.Tensor, Chosen]:
        """Run blocks[start:end] (a pipeline stage) on tokens (B, T, dim).  Returns the tokens
        and, per plan, the slots its refresh rules chose in these blocks (still on the device:
        ``read_back`` them once the last stage has run)."""
        with self._attention_kernels():
            return self._blocks(x, proj, rope, call, start, end)

    def _blocks(self, x, proj, rope, call, start, end):
        qkv, mid, post = self._regions
        cos, sin = rope
        t = x.shape[1]
        spans = call.spans()
        chosen: Chosen = [{} for _ in call.plans]
        end = self.num_blocks if end is None else end
        for i in range(start, end):
            block = self.model.blocks[i]
            q, k, v = qkv(block, x, proj, cos, sin)
            outs = []
            for plan, decided, (lo, hi) in zip(call.plans, chosen, spans):
                slot = write_block(plan, i, k[lo:hi], v[lo:hi])
                if slot is not None:
                    decided[i] = slot
                outs.append(_attend(plan, i, q[lo:hi], t))
            x, q = mid(block, x, _cat(outs), proj)
            outs = []
            for kv, (lo, hi) in zip(call.cross_kv, spans):
                ck, cv = kv[i]
                n = hi - lo
                outs.append(F.scaled_dot_product_attention(
                    q[lo:hi], ck.expand(n, -1, -1, -1).to(q.dtype),
                    cv.expand(n, -1, -1, -1).to(q.dtype)))
            x = post(block, x, _cat(outs), proj)
        return x, chosen

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
                ) -> tuple[torch.Tensor, list[dict[int, int]]]:
        """Flow prediction for a batch of single latent frames (B, 16, 1, h, w), and per plan
        the slots its refresh rules chose (block -> slot), read back in one synchronisation at
        the end (the caller's policy books them)."""
        if latents.shape[2] != 1:
            raise ValueError("the causal forward takes one latent frame per batch element.")
        return self.forward_stage(latents, timesteps, call, 0, self.num_blocks)

    @torch.no_grad()
    def forward_stage(self, latents: torch.Tensor, timesteps: torch.Tensor | None,
                      call: ChunkCall, start: int, end: int,
                      carried: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """One pipeline stage: blocks[start:end], embedding first when ``start`` is 0 (else
        ``carried`` = (tokens, temb, proj) from the stage before), the head last when ``end``
        is the last block.  Returns (flow, or (tokens, temb, proj) for the next stage) and
        per plan the slots its refresh rules chose in these blocks.  A stage of full caches
        runs as a fixed-shape forward (a CUDA graph on GPUs) like the whole one."""
        h, w = latents.shape[-2:]
        if self.fixed_shape:
            out = self._forward_fixed(latents, timesteps, call, h, w, start, end, carried)
            if out is not None:
                return out
        if carried is None:
            x, temb, proj = self.embed(latents, timesteps)
        else:
            x, temb, proj = carried
        rope = self.rope(call.positions, h // self.patch[1], w // self.patch[2])
        x, chosen = self.blocks(x, proj, rope, call, start, end)
        if end == self.num_blocks:
            return self.head(x, temb, h, w), read_back(chosen)
        return (x, temb, proj), read_back(chosen)

    # --- the fixed-shape forward: one CUDA graph per set of storages and batch shape --------

    def _forward_fixed(self, latents: torch.Tensor, timesteps: torch.Tensor | None,
                       call: ChunkCall, h: int, w: int, start: int = 0, end: int | None = None,
                       carried: tuple | None = None):
        """The forward of plans that are all ``fixed`` (their caches are full): every slot
        index is a device tensor, refresh rules are evaluated on the device, attention reads
        whole rows, so the whole forward (embedding, every block, head) is one fixed sequence
        of kernels, however many plans (streams) it batches: each plan's elements write and
        read only that plan's storage and attend to its own prompt.  On CUDA it is recorded
        once per set of plans' shapes as a graph (kept in ``call.graphs``) and replayed;
        elsewhere it runs directly (the tests compare it with the general path).  None when
        the call is not of that kind.  ``start``/``end``/``carried``: a pipeline stage (see
        ``forward_stage``), recorded the same way."""
        end = self.num_blocks if end is None else end
        blocks = range(start, end)
        last = end == self.num_blocks
        if call.graphs is None or not all(plan.fixed for plan in call.plans):
            return None
        layouts = [_fixed_layout(plan, blocks) for plan in call.plans]
        if any(layout is None for layout in layouts):
            return None
        dev = self.device
        cos, sin = self.rope(call.positions, h // self.patch[1], w // self.patch[2])
        # (blocks, B) slot of every element (a rule's element: its ring slot), (blocks, plans)
        slots = torch.tensor([[s for layout in layouts for s in layout[0][b]]
                              for b in range(len(blocks))], device=dev)
        ring = torch.tensor([[layout[1][b] for layout in layouts]
                             for b in range(len(blocks))], device=dev)
        key = (h, w, start, end) + tuple((len(plan.rows), plan.frames, layout[2])
                                         for plan, layout in zip(call.plans, layouts))
        st = call.graphs.get(key)
        if st is None:
            parts = [_FixedPart(lo, hi, plan.frames, rule,
                                rows=torch.arange(hi - lo, device=dev),
                                cross=[(kv[b][0].clone(), kv[b][1].clone()) if b in blocks
                                       else None for b in range(len(kv))], cross_src=kv)
                     for plan, (_, _, rule), (lo, hi), kv in
                     zip(call.plans, layouts, call.spans(), call.cross_kv)]
            refreshing = sum(part.rule is not None for part in parts)
            st = call.graphs[key] = _Fixed(
                latents=latents.to(dev, self.dtype).clone(),
                t=timesteps.to(dev).clone() if carried is None else None,
                cos=cos.clone(), sin=sin.clone(), slots=slots,
                ring=ring, parts=parts,
                out=torch.empty((len(call.positions), latents.shape[1], 1, h, w), device=dev,
                                dtype=self.dtype) if last else None,
                chosen=torch.zeros((len(blocks), refreshing), dtype=torch.long, device=dev),
                blocks=blocks,
                carried=tuple(c.clone() for c in carried) if carried is not None else None)
        else:
            st.latents.copy_(latents)
            if carried is None:
                st.t.copy_(timesteps)
            else:
                for dst, src in zip(st.carried, carried):
                    dst.copy_(src)
            st.cos.copy_(cos)
            st.sin.copy_(sin)
            st.slots.copy_(slots)
            st.ring.copy_(ring)
            for part, kv in zip(st.parts, call.cross_kv):
                if part.cross_src is not kv:  # a new prompt
                    for b in blocks:
                        part.cross[b][0].copy_(kv[b][0])
                        part.cross[b][1].copy_(kv[b][1])
                    part.cross_src = kv
        if not self.use_graphs:
            self._fixed_body(st, call.plans, h, w)
        elif st.graph is None:
            # the first run is real work and the warm-up the capture needs; the capture
            # records the same kernels without running them
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._fixed_body(st, call.plans, h, w)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a prompt being encoded on the text thread meanwhile is not an
            # error for this capture (its work is on its own stream and is not recorded)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._fixed_body(st, call.plans, h, w)
            st.graph = graph
        else:
            st.graph.replay()
        chosen: list[dict[int, int]] = [{} for _ in call.plans]
        if st.chosen.shape[1]:
            picked = st.chosen.tolist()  # the forward's one synchronisation
            refreshing = [j for j, part in enumerate(st.parts) if part.rule is not None]
            for index, row in enumerate(picked):
                for j, slot in zip(refreshing, row):
                    chosen[j][start + index] = slot
        if last:
            return st.out.clone(), chosen
        return tuple(t.clone() for t in st.carry_out), chosen

    def _fixed_body(self, st: _Fixed, plans: list[AttentionPlan], h: int, w: int) -> None:
        with self._attention_kernels():
            self._fixed_body_inner(st, plans, h, w)

    def _fixed_body_inner(self, st: _Fixed, plans: list[AttentionPlan], h: int, w: int
                          ) -> None:
        if st.carried is None:
            x, temb, proj = self.embed(st.latents, st.t)
        else:
            x, temb, proj = st.carried
        t = x.shape[1]
        qkv, mid, post = self._regions
        chosen = []
        for index, i in enumerate(st.blocks):
            block = self.model.blocks[i]
            q, k, v = qkv(block, x, proj, st.cos, st.sin)
            outs, picks = [], []
            for j, (part, plan) in enumerate(zip(st.parts, plans)):
                lo, hi = part.lo, part.hi
                slots = st.slots[index, lo:hi]
                if part.rule is not None:  # element lo is a new chunk: a sink or the ring
                    first = refresh_choice(plan.k[i], plan.v[i], t, k[lo], v[lo], part.rule,
                                           st.ring[index, j])
                    slots = torch.cat([first.view(1), slots[1:]])
                    picks.append(first)
                for store, new in ((plan.k[i], k), (plan.v[i], v)):
                    store.unflatten(2, (part.frames, t))[part.rows, :, slots] = \
                        new[lo:hi].transpose(1, 2)
                # each element reads its own stream's rows only
                outs.append(F.scaled_dot_product_attention(q[lo:hi], plan.k[i][:hi - lo],
                                                           plan.v[i][:hi - lo]))
            x, q = mid(block, x, _cat(outs), proj)
            outs = []
            for part in st.parts:
                ck, cv = part.cross[i]
                n = part.hi - part.lo
                outs.append(F.scaled_dot_product_attention(
                    q[part.lo:part.hi], ck.expand(n, -1, -1, -1), cv.expand(n, -1, -1, -1)))
            x = post(block, x, _cat(outs), proj)
            if picks:
                chosen.append(torch.stack(picks))
        if st.out is not None:
            st.out.copy_(self.head(x, temb, h, w))
        elif st.carry_out is None:  # the first run (before any recording) allocates them
            st.carry_out = (x.clone(), temb.clone(), proj.clone())
        else:
            for dst, src in zip(st.carry_out, (x, temb, proj)):
                dst.copy_(src)
        if chosen:
            st.chosen.copy_(torch.stack(chosen))


def _fixed_layout(plan: AttentionPlan, blocks: range
                  ) -> tuple[list[list[int]], list[int], RefreshRule | None] | None:
    """A fixed plan as the fixed-shape forward of ``blocks`` takes it (indexed from
    ``blocks.start``): every slot an int (a rule's element: its ring slot), each block's ring
    slot, and the refresh rule's shape (its ring left out: that one is an input of the
    graph).  None if the plan does not have that form."""
    if plan.rows != list(range(len(plan.rows))):
        return None
    first = [plan.slots[b][0] for b in blocks]
    rules = [s for s in first if isinstance(s, RefreshRule)]
    if any(isinstance(s, RefreshRule) for b in blocks for s in plan.slots[b][1:]):
        return None
    if not rules:
        return [list(plan.slots[b]) for b in blocks], first, None
    shape = RefreshRule(rules[0].sinks, -1, rules[0].threshold, rules[0].row)
    if len(rules) != len(blocks) or any((r.sinks, r.threshold, r.row) !=
                                        (shape.sinks, shape.threshold, shape.row)
                                        for r in rules):
        return None
    ring = [r.ring for r in rules]
    return [[r] + list(plan.slots[b][1:]) for r, b in zip(ring, blocks)], ring, shape


@dataclass(eq=False)
class _FixedPart:
    """One plan's (stream's) share of a fixed-shape forward: elements lo..hi of the batch."""

    lo: int
    hi: int
    frames: int
    rule: RefreshRule | None   # element lo's refresh rule (ring from _Fixed.ring), or none
    rows: torch.Tensor         # (hi - lo,) = 0 .. hi - lo - 1
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # static copies of the prompt's K/V
    cross_src: object          # the prompt K/V they were copied from


@dataclass(eq=False)
class _Fixed:
    """The static buffers of one fixed-shape forward (a CUDA graph reads and writes them).
    Kept where the caller says (``ChunkCall.graphs``: a stream's own cache, or the engine for
    several streams) and holding no reference to the K/V storage (the graph addresses it,
    the plans hand it in at every run), so dropping it and closing a stream free everything
    at once, without waiting for the cyclic garbage collector."""

    latents: torch.Tensor
    t: torch.Tensor | None  # the timesteps (a stage after the first: None)
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor    # (blocks, B) frame slot of each element
    ring: torch.Tensor     # (blocks, plans) the ring slot a new chunk takes unless it refreshes
    parts: list[_FixedPart]
    out: torch.Tensor | None   # the flow (the last stage), else None
    chosen: torch.Tensor   # (blocks, plans with a rule) slot chosen for their first element
    blocks: range = range(0)
    #: a stage after the first: its inputs (tokens, temb, proj) from the stage before
    carried: tuple | None = None
    #: a stage before the last: its outputs for the next (allocated by the first run)
    carry_out: tuple | None = None
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
