"""The per-stream self-attention KV cache: sink frames, a rolling ring, adaptive sink refresh,
and RoPE position wrap for endless streams.

Storage: for every transformer block, keys and values of shape
``(rows, heads, frames * tokens, head_dim)``, preallocated.  A *row* is one denoising step:
the chunk at step ``s`` attends to (and leaves its step-``s`` keys in) row ``s``, so Stream
Batch (one forward over all steps) and the sequential schedule compute the same thing.  A
*frame slot* ``f`` is the token range ``[f * tokens, (f + 1) * tokens)``; attention reads the
filled prefix of a row in place, with no concatenation.

Policy, per block, decided once per chunk (at its first step) and reused at its later steps:
  * slots fill in order; the first ``sinks`` chunks are the sinks (global anchors);
  * once full, a new chunk replaces the oldest non-sink frame (FIFO ring), unless adaptive
    refresh is on and the chunk is less similar than ``refresh_threshold`` (cosine of mean K
    and mean V) to some sink: then it replaces the least similar sink.  Empty sinks are never
    "least similar" (they cannot be: the ring is used only after the sinks are filled);
  * keys are stored after RoPE at their frame position; positions grow by one per chunk.  When
    the next position would pass ``rope_max``, every cached key is re-rotated in place: ring
    frames shift down keeping their exact offsets to the new chunk, sinks are re-anchored at
    positions ``0 .. sinks - 1``, and the new chunk lands at ``frames - 1``.  Offsets therefore
    stay inside the range the model was trained on, and no cached key keeps a stale phase.
    (Known approximation: a chunk still in flight at a wrap keeps its shifted position in the
    rows it has not reached yet, even where it refreshes a sink; the next wrap re-anchors it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...models.causal_wan import rope_cos_sin, rotate_pairs


@dataclass
class CachePolicy:
    frames: int = 6             # frame slots per row (sinks + ring); "fast" profile: 5
    sinks: int = 3              # "fast" profile: 2
    refresh_threshold: float = 0.2   # 0 turns adaptive sink refresh off
    rope_max: int = 50          # largest frame position before re-anchoring

    def validate(self) -> None:
        if not 2 <= self.frames <= 64:
            raise ValueError("cache_frames must be 2..64.")
        if not 0 <= self.sinks < self.frames:
            raise ValueError("sinks must be at least 0 and below cache_frames.")
        if not 0.0 <= self.refresh_threshold <= 1.0:
            raise ValueError("sink_refresh must be 0 (off) .. 1.")
        if self.rope_max < self.frames:
            raise ValueError("rope_max must be at least cache_frames.")


@dataclass
class _BlockBook:
    """Which chunk sits in each frame slot (row 0's view), and the ring's next victim."""

    chunk: list[int]
    next_ring: int


@dataclass
class KVCache:
    """Keys/values of every block for one stream (see module docstring)."""

    blocks: int
    rows: int
    heads: int
    head_dim: int
    tokens: int
    policy: CachePolicy
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    #: positions of the keys stored in each (row, block, slot); -10**9 means empty
    positions: torch.Tensor | None = None
    books: list[_BlockBook] = field(default_factory=list)
    #: chunk id -> per-block slot chosen at its first step
    targets: dict[int, list[int]] = field(default_factory=dict)
    #: chunk id -> frame position (after any wrap)
    chunk_position: dict[int, int] = field(default_factory=dict)
    next_position: int = 0
    filled: int = 0  # chunks admitted so far (row 0), capped at policy.frames
    t_dim: int = 0
    inv_freq_t: torch.Tensor | None = None

    EMPTY = -10**9

    def __post_init__(self) -> None:
        self.policy.validate()
        self.allocate()

    # --- storage ---------------------------------------------------------------------

    def allocate(self) -> None:
        shape = (self.rows, self.heads, self.policy.frames * self.tokens, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(self.blocks)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(self.blocks)]
        self.positions = torch.full((self.rows, self.blocks, self.policy.frames), self.EMPTY,
                                    dtype=torch.long)
        self.books = [_BlockBook([-1] * self.policy.frames, self.policy.sinks)
                      for _ in range(self.blocks)]
        self.targets.clear()
        self.chunk_position.clear()
        self.next_position = 0
        self.filled = 0

    def reset(self) -> None:
        """Forget every frame (explicit stream reset); storage is kept and zeroed."""
        for t in (*self.k, *self.v):
            t.zero_()
        self.positions.fill_(self.EMPTY)
        self.books = [_BlockBook([-1] * self.policy.frames, self.policy.sinks)
                      for _ in range(self.blocks)]
        self.targets.clear()
        self.chunk_position.clear()
        self.next_position = 0
        self.filled = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def set_rows(self, rows: int) -> None:
        """Change the number of denoising steps: new rows start as copies of the last row
        (the nearest history there is), removed rows are dropped."""
        if rows == self.rows:
            return
        for i in range(self.blocks):
            self.k[i] = _resize_rows(self.k[i], rows)
            self.v[i] = _resize_rows(self.v[i], rows)
        self.positions = _resize_rows(self.positions, rows)
        self.rows = rows

    # --- admission of a new chunk (called once per chunk, before its first step) -----------

    def admit(self, chunk: int) -> int:
        """Give the chunk its frame position, re-anchoring positions first when they would
        pass rope_max; returns the position."""
        if self.next_position > self.policy.rope_max:
            self._wrap()
        position = self.next_position
        self.chunk_position[chunk] = position
        self.next_position += 1
        return position

    def _wrap(self) -> None:
        """Re-rotate cached keys so that the next chunk gets position ``frames - 1``."""
        p = self.policy
        shift = self.next_position - (p.frames - 1)
        new = self.positions.clone()
        filled = new != self.EMPTY
        ring = torch.zeros_like(filled)
        ring[:, :, p.sinks:] = True
        new[filled & ring] -= shift
        for j in range(p.sinks):
            new[:, :, j][filled[:, :, j]] = j
        delta = new - self.positions
        delta[~filled] = 0
        for block in range(self.blocks):
            for row in range(self.rows):
                d = delta[row, block]
                if not d.any():
                    continue
                cos, sin = rope_cos_sin(d, self.inv_freq_t)  # (frames, t_dim)
                k = self.k[block][row].unflatten(1, (p.frames, self.tokens))  # h, f, t, d
                td = self.t_dim
                k[..., :td] = rotate_pairs(k[..., :td], cos[None, :, None, :].to(k.device),
                                           sin[None, :, None, :].to(k.device))
        self.positions = new
        self.chunk_position = {c: pos - shift for c, pos in self.chunk_position.items()}
        self.next_position -= shift

    def slot_for(self, block: int, chunk: int, k_new: torch.Tensor, v_new: torch.Tensor) -> int:
        """The frame slot this chunk occupies in ``block`` (decided at its first call).

        ``k_new``/``v_new``: this chunk's keys/values at its first step, (tokens, heads, dim).
        """
        targets = self.targets.get(chunk)
        if targets is not None and targets[block] >= 0:
            return targets[block]
        if targets is None:
            targets = self.targets[chunk] = [-1] * self.blocks
        p, book = self.policy, self.books[block]
        if -1 in book.chunk:
            slot = book.chunk.index(-1)
        else:
            slot = self._refresh_sink(block, k_new, v_new) if p.refresh_threshold > 0 and \
                p.sinks > 0 else -1
            if slot < 0:
                slot = book.next_ring
                ring = p.frames - p.sinks
                book.next_ring = p.sinks + (book.next_ring - p.sinks + 1) % ring if ring else \
                    p.sinks
        book.chunk[slot] = chunk
        targets[block] = slot
        if block == self.blocks - 1:
            self.filled = min(self.filled + 1, p.frames)
        return slot

    def _refresh_sink(self, block: int, k_new: torch.Tensor, v_new: torch.Tensor) -> int:
        """The least similar sink if its similarity is below the threshold, else -1."""
        t = self.tokens
        k_sinks = self.k[block][0, :, :self.policy.sinks * t].unflatten(1, (-1, t))
        v_sinks = self.v[block][0, :, :self.policy.sinks * t].unflatten(1, (-1, t))
        km = k_sinks.float().mean(2).transpose(0, 1).flatten(1)   # sinks, heads*dim
        vm = v_sinks.float().mean(2).transpose(0, 1).flatten(1)
        kn = k_new.float().mean(0).flatten()
        vn = v_new.float().mean(0).flatten()
        sim = 0.5 * (torch.cosine_similarity(km, kn[None], dim=-1) +
                     torch.cosine_similarity(vm, vn[None], dim=-1))
        worst = int(sim.argmin())
        return worst if float(sim[worst]) < self.policy.refresh_threshold else -1

    def store(self, block: int, row: int, slot: int, position: int, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write one chunk's keys/values (tokens, heads, dim) into a row's frame slot."""
        t = self.tokens
        self.k[block][row, :, slot * t:(slot + 1) * t].copy_(k.transpose(0, 1))
        self.v[block][row, :, slot * t:(slot + 1) * t].copy_(v.transpose(0, 1))
        self.positions[row, block, slot] = position

    def filled_slots(self, block: int, row: int) -> int:
        """Frame slots of a row holding keys (always a prefix)."""
        return int((self.positions[row, block] != self.EMPTY).sum())

    def forget(self, chunk: int) -> None:
        """Drop the bookkeeping of a chunk that has passed its last step."""
        self.targets.pop(chunk, None)
        self.chunk_position.pop(chunk, None)


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < t.shape[0]:
        return t[:rows].clone()
    extra = t[-1:].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra.clone()], 0)
