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
    the next position would pass ``rope_max``, a wrap re-rotates cached keys in place: ring
    frames shift down keeping their exact offsets to the new chunk, sinks are re-anchored at
    positions ``0 .. sinks - 1``, and the new chunk lands at ``frames - 1``.  Offsets therefore
    stay inside the range the model was trained on, and no cached key keeps a stale phase.
    Each row is re-rotated when the first chunk admitted after the wrap reaches it (``prepare``),
    so Stream Batch and the sequential schedule stay identical across wraps.

On GPUs the refresh decision stays on the device (``defer``): the chosen slot is a 0-d tensor,
the store indexes with it, and ``resolve()`` reads every decision of a forward back in one
synchronisation at its end, instead of one per block.  The bookkeeping is the same either way.
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
class StaticPlan:
    """Slots of a fixed-shape forward: per block, per element (element 0's is the ring slot
    when it is a new chunk; with ``refresh`` the device may pick a sink instead)."""

    slots: list[list[int]]
    ring: list[int]
    refresh: bool
    new: bool


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
    #: wrap epochs: shifts[e] is the shift of the wrap that started epoch e + 1
    shifts: list[int] = field(default_factory=list)
    chunk_epoch: dict[int, int] = field(default_factory=dict)
    row_epoch: list[int] = field(default_factory=list)
    t_dim: int = 0
    inv_freq_t: torch.Tensor | None = None
    #: keep refresh decisions on the device until resolve() (None: on CUDA devices)
    defer: bool | None = None
    #: (block, chunk) -> [chosen slot (0-d device tensor), ring slot, row, position]
    pending: dict[tuple[int, int], list] = field(default_factory=dict)
    #: fixed-shape forwards (CUDA graphs) recorded against this cache's storage
    graphs: dict = field(default_factory=dict)

    EMPTY = -10**9

    def __post_init__(self) -> None:
        self.policy.validate()
        if self.defer is None:
            self.defer = torch.device(self.device).type == "cuda"
        self.allocate()

    # --- storage ---------------------------------------------------------------------

    def allocate(self) -> None:
        self.graphs.clear()  # they point at the storage being replaced
        shape = (self.rows, self.heads, self.policy.frames * self.tokens, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(self.blocks)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  for _ in range(self.blocks)]
        self.positions = torch.full((self.rows, self.blocks, self.policy.frames), self.EMPTY,
                                    dtype=torch.long)
        self._clear_books()

    def _clear_books(self) -> None:
        self.books = [_BlockBook([-1] * self.policy.frames, self.policy.sinks)
                      for _ in range(self.blocks)]
        self.targets.clear()
        self.chunk_position.clear()
        self.chunk_epoch.clear()
        self.shifts = []
        self.row_epoch = [0] * self.rows
        self.next_position = 0
        self.pending.clear()

    def reset(self) -> None:
        """Forget every frame (explicit stream reset); storage is kept and zeroed."""
        for t in (*self.k, *self.v):
            t.zero_()
        self.positions.fill_(self.EMPTY)
        self._clear_books()

    @property
    def filled(self) -> int:
        """Frame slots holding a chunk in every block (row 0's view), at most policy.frames."""
        return sum(c >= 0 for c in self.books[-1].chunk)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def set_rows(self, rows: int) -> None:
        """Change the number of denoising steps: new rows start as copies of the last row
        (the nearest history there is), removed rows are dropped."""
        if rows == self.rows:
            return
        self.graphs.clear()
        for i in range(self.blocks):
            self.k[i] = _resize_rows(self.k[i], rows)
            self.v[i] = _resize_rows(self.v[i], rows)
        self.positions = _resize_rows(self.positions, rows)
        self.row_epoch = (self.row_epoch + [self.row_epoch[-1]] * rows)[:rows]
        self.rows = rows

    # --- admission of a new chunk (called once per chunk, before its first step) -----------

    def admit(self, chunk: int) -> int:
        """Give the chunk its frame position (starting a new wrap epoch first when positions
        would pass rope_max); returns the position.  Positions never change afterwards."""
        if self.next_position > self.policy.rope_max:
            shift = self.next_position - (self.policy.frames - 1)
            self.shifts.append(shift)
            self.next_position -= shift
        position = self.next_position
        self.chunk_position[chunk] = position
        self.chunk_epoch[chunk] = len(self.shifts)
        self.next_position += 1
        return position

    def prepare(self, rows: list[int], chunks: list[int]) -> None:
        """Before a forward: bring each row to the wrap epoch of the chunk about to use it.

        Rows are re-anchored lazily, when the first chunk admitted after a wrap reaches them,
        so a chunk still in flight at a wrap finishes its remaining steps against rows that
        have not moved yet, exactly as in the sequential schedule.
        """
        for row, chunk in zip(rows, chunks):
            target = self.chunk_epoch.get(chunk, len(self.shifts))
            while self.row_epoch[row] < target:
                self._wrap_row(row, self.shifts[self.row_epoch[row]])
                self.row_epoch[row] += 1

    def _wrap_row(self, row: int, shift: int) -> None:
        """Re-rotate one row's keys: ring frames shift down by ``shift``, sinks re-anchor at
        positions 0 .. sinks - 1."""
        p = self.policy
        old = self.positions[row]                      # blocks, frames
        new = old.clone()
        filled = new != self.EMPTY
        new[:, p.sinks:][filled[:, p.sinks:]] -= shift
        sink_pos = torch.arange(p.sinks).expand(self.blocks, -1)
        new[:, :p.sinks] = torch.where(filled[:, :p.sinks], sink_pos, new[:, :p.sinks])
        delta = torch.where(filled, new - old, torch.zeros_like(new))
        td = self.t_dim
        for block in range(self.blocks):
            d = delta[block]
            if not d.any():
                continue
            cos, sin = rope_cos_sin(d, self.inv_freq_t)  # frames, t_dim
            k = self.k[block][row].unflatten(1, (p.frames, self.tokens))  # heads, f, t, dim
            k[..., :td] = rotate_pairs(k[..., :td], cos[None, :, None, :].to(k.device),
                                       sin[None, :, None, :].to(k.device))
        self.positions[row] = new

    def slot_for(self, block: int, chunk: int, k_new: torch.Tensor, v_new: torch.Tensor
                 ) -> int | torch.Tensor:
        """The frame slot this chunk occupies in ``block`` (decided at its first call): an int,
        or with ``defer`` a 0-d device tensor while a refresh decision is unresolved.

        ``k_new``/``v_new``: this chunk's keys/values at its first step, (tokens, heads, dim).
        """
        waiting = self.pending.get((block, chunk))
        if waiting is not None:
            return waiting[0]
        targets = self.targets.get(chunk)
        if targets is not None and targets[block] >= 0:
            return targets[block]
        if any(b == block for b, _ in self.pending):
            self.resolve()  # another chunk's decision in this block comes first
        if targets is None:
            targets = self.targets[chunk] = [-1] * self.blocks
        p, book = self.policy, self.books[block]
        if -1 in book.chunk:
            slot = book.chunk.index(-1)
        elif p.refresh_threshold > 0 and p.sinks > 0:
            choice = self._refresh_choice(block, k_new, v_new, book.next_ring)
            if self.defer:
                self.pending[(block, chunk)] = [choice, book.next_ring, None, None]
                return choice
            slot = int(choice)
            self._advance_ring(book, slot)
        else:
            slot = book.next_ring
            self._advance_ring(book, slot)
        book.chunk[slot] = chunk
        targets[block] = slot
        return slot

    def _advance_ring(self, book: _BlockBook, slot: int) -> None:
        """The ring's victim moves on only when the ring (not a sink) took the chunk."""
        if slot != book.next_ring:
            return
        p = self.policy
        ring = p.frames - p.sinks
        book.next_ring = p.sinks + (book.next_ring - p.sinks + 1) % ring if ring else p.sinks

    def _refresh_choice(self, block: int, k_new: torch.Tensor, v_new: torch.Tensor,
                        ring_slot: int | torch.Tensor) -> torch.Tensor:
        """The least similar sink if its similarity is below the threshold, else the ring
        slot; a 0-d long tensor on the cache's device (no host synchronisation)."""
        t = self.tokens
        k_sinks = self.k[block][0, :, :self.policy.sinks * t].unflatten(1, (-1, t))
        v_sinks = self.v[block][0, :, :self.policy.sinks * t].unflatten(1, (-1, t))
        f32 = torch.float32  # accumulate in float32 without a float32 copy of the sinks
        km = k_sinks.mean(2, dtype=f32).transpose(0, 1).flatten(1)   # sinks, heads*dim
        vm = v_sinks.mean(2, dtype=f32).transpose(0, 1).flatten(1)
        kn = k_new.mean(0, dtype=f32).flatten()
        vn = v_new.mean(0, dtype=f32).flatten()
        sim = 0.5 * (torch.cosine_similarity(km, kn[None], dim=-1) +
                     torch.cosine_similarity(vm, vn[None], dim=-1))
        low, worst = sim.min(0)
        ring = ring_slot if isinstance(ring_slot, torch.Tensor) else \
            torch.full_like(worst, ring_slot)
        return torch.where(low < self.policy.refresh_threshold, worst, ring)

    def store(self, block: int, row: int, slot: int | torch.Tensor, position: int,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one chunk's keys/values (tokens, heads, dim) into a row's frame slot."""
        t = self.tokens
        if isinstance(slot, torch.Tensor):  # an unresolved decision: index on the device
            index = slot.view(1)
            for cache, new in ((self.k, k), (self.v, v)):
                frames = cache[block][row].unflatten(1, (self.policy.frames, t))
                frames.index_copy_(1, index, new.transpose(0, 1).unsqueeze(1))
            for key, entry in self.pending.items():
                if key[0] == block and entry[0] is slot:
                    entry[2], entry[3] = row, position
            return
        self.k[block][row, :, slot * t:(slot + 1) * t].copy_(k.transpose(0, 1))
        self.v[block][row, :, slot * t:(slot + 1) * t].copy_(v.transpose(0, 1))
        self.positions[row, block, slot] = position

    def resolve(self) -> None:
        """Read back every deferred decision (one synchronisation) and book it."""
        if not self.pending:
            return
        items = list(self.pending.items())
        self.pending.clear()
        slots = torch.stack([entry[0] for _, entry in items]).tolist()
        for ((block, chunk), (_, ring, row, position)), slot in zip(items, slots):
            book = self.books[block]
            self._advance_ring(book, slot)
            book.chunk[slot] = chunk
            self.targets.setdefault(chunk, [-1] * self.blocks)[block] = slot
            if row is not None:
                self.positions[row, block, slot] = position

    # --- the fixed-shape forward (one CUDA graph per stream and batch shape) -------------------

    def static_plan(self, rows: list[int], chunks: list[int]) -> StaticPlan | None:
        """The slots of a forward whose shape never changes: rows 0..B-1 all full, at most one
        new chunk and it is element 0 (Stream Batch's steady state, or a sequential step).
        None when the forward is not of that kind (the cache is still filling, say)."""
        b = len(rows)
        if rows != list(range(b)) or self.pending:
            return None
        if not bool((self.positions[:b] != self.EMPTY).all()):
            return None
        new = [e for e, c in enumerate(chunks)
               if c not in self.targets or min(self.targets[c]) < 0]
        if new not in ([], [0]):
            return None
        ring = [book.next_ring for book in self.books]
        slots = [[ring[block] if e in new else self.targets[c][block]
                  for e, c in enumerate(chunks)] for block in range(self.blocks)]
        p = self.policy
        return StaticPlan(slots, ring, refresh=bool(new) and p.refresh_threshold > 0 and
                          p.sinks > 0, new=bool(new))

    def static_commit(self, plan: StaticPlan, chunks: list[int], positions: list[int],
                      chosen: list[int] | None) -> None:
        """Book a fixed-shape forward: the new chunk's slots (``chosen`` per block when the
        refresh decision was taken on the device) and every stored position."""
        for block in range(self.blocks):
            slots = plan.slots[block]
            if plan.new:
                slot = chosen[block] if plan.refresh else slots[0]
                slots = [slot] + slots[1:]
                book = self.books[block]
                self._advance_ring(book, slot)
                book.chunk[slot] = chunks[0]
                self.targets.setdefault(chunks[0], [-1] * self.blocks)[block] = slot
            for row, (slot, position) in enumerate(zip(slots, positions)):
                self.positions[row, block, slot] = position

    def filled_slots(self, block: int, row: int) -> int:
        """Frame slots of a row holding keys (always a prefix)."""
        return int((self.positions[row, block] != self.EMPTY).sum())

    def forget(self, chunk: int) -> None:
        """Drop the bookkeeping of a chunk that has passed its last step."""
        self.targets.pop(chunk, None)
        self.chunk_position.pop(chunk, None)
        self.chunk_epoch.pop(chunk, None)


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < t.shape[0]:
        return t[:rows].clone()
    extra = t[-1:].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra.clone()], 0)
