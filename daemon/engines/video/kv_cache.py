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

The policy decides, the model executes: before a forward, ``plan(rows, chunks)`` says for every
block what each element does (``AttentionPlan``: storage, row, frame slot, RoPE position,
attended prefix), without touching the cache.  Where the slot depends on the chunk's own keys
(adaptive refresh of a full cache) the plan holds a ``RefreshRule`` (the sinks, the ring slot,
the threshold) which the model evaluates on the device; after the forward ``commit(plan,
chosen)`` books what it chose and every stored position.  On GPUs the decisions stay on the
device until one synchronisation at the end of the forward (``defer``), instead of one per
block.  The bookkeeping is the same either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ...models.causal_wan import AttentionPlan, RefreshRule, Slot, rope_cos_sin, rotate_pairs

#: numbers of K/V storages, never reused (see ``KVCache.storage_id``)
_storage_ids = itertools.count()


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
    #: wrap epochs: shifts[e] is the shift of the wrap that started epoch e + 1
    shifts: list[int] = field(default_factory=list)
    chunk_epoch: dict[int, int] = field(default_factory=dict)
    row_epoch: list[int] = field(default_factory=list)
    t_dim: int = 0
    inv_freq_t: torch.Tensor | None = None
    #: keep refresh decisions on the device until the end of the forward (None: on CUDA)
    defer: bool | None = None
    #: fixed-shape forwards (CUDA graphs) recorded against this cache's storage
    graphs: dict = field(default_factory=dict)
    #: a process-unique number of the current storage, renewed whenever it is replaced, so
    #: that a forward recorded against it elsewhere (several streams' graphs, kept by the
    #: engine) is known to be stale and never replayed against other memory
    storage_id: int = -1
    #: the blocks whose keys/values this cache holds (a pipeline rank's stage); None: all.
    #: Lists stay indexed by block number; other blocks' entries are None and their books
    #: are not kept
    owned: range | tuple[int, ...] | None = None

    EMPTY = -10**9

    @classmethod
    def for_model(cls, wan, rows: int, latent_h: int, latent_w: int, policy: CachePolicy,
                  owned: range | None = None) -> KVCache:
        """A cache shaped for ``wan`` (a CausalWan) and a frame size; ``owned``: the blocks a
        pipeline rank holds (default all)."""
        cache = cls(wan.num_blocks, rows, wan.heads, wan.head_dim,
                    wan.tokens_per_frame(latent_h, latent_w), policy, dtype=wan.dtype,
                    device=wan.device, owned=owned)
        cache.t_dim, cache.inv_freq_t = wan.t_dim, wan.inv_freq[0]
        return cache

    def __post_init__(self) -> None:
        self.policy.validate()
        if self.defer is None:
            self.defer = torch.device(self.device).type == "cuda"
        if self.owned is None:
            self.owned = range(self.blocks)
        self.allocate()

    # --- storage ---------------------------------------------------------------------

    def allocate(self) -> None:
        self.graphs.clear()  # they point at the storage being replaced
        self.storage_id = next(_storage_ids)
        shape = (self.rows, self.heads, self.policy.frames * self.tokens, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  if b in self.owned else None for b in range(self.blocks)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                  if b in self.owned else None for b in range(self.blocks)]
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

    def reset(self) -> None:
        """Forget every frame (explicit stream reset); storage is kept and zeroed."""
        for t in self._storages():
            t.zero_()
        self.positions.fill_(self.EMPTY)
        self._clear_books()

    @property
    def filled(self) -> int:
        """Frame slots holding a chunk in every block (row 0's view), at most policy.frames."""
        return sum(c >= 0 for c in self.books[max(self.owned)].chunk)

    def _storages(self) -> list[torch.Tensor]:
        return [t for t in (*self.k, *self.v) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storages())

    def set_rows(self, rows: int) -> None:
        """Change the number of denoising steps: new rows start as copies of the last row
        (the nearest history there is), removed rows are dropped."""
        if rows == self.rows:
            return
        self.graphs.clear()
        self.storage_id = next(_storage_ids)
        for i in self.owned:
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
        for block in self.owned:
            d = delta[block]
            if not d.any():
                continue
            cos, sin = rope_cos_sin(d, self.inv_freq_t)  # frames, t_dim
            k = self.k[block][row].unflatten(1, (p.frames, self.tokens))  # heads, f, t, dim
            k[..., :td] = rotate_pairs(k[..., :td], cos[None, :, None, :].to(k.device),
                                       sin[None, :, None, :].to(k.device))
        self.positions[row] = new

    # --- one forward: plan before it, commit after it -----------------------------------

    def plan(self, rows: list[int], chunks: list[int]) -> AttentionPlan:
        """What a forward over chunk ``chunks[e]`` at row ``rows[e]`` does in every block
        (call ``prepare`` first).  The cache is not changed; ``commit`` books the forward.

        A chunk keeps the slot it got at its first call (its first step); a new chunk takes
        the first free slot, or once the cache is full the ring slot, or with adaptive
        refresh a ``RefreshRule`` the model evaluates.  One forward may admit any number of
        new chunks, but a rule at most once per block: the next new chunk's ring slot would
        depend on its outcome (the engine's schedules admit one new chunk per forward).
        """
        if len(set(chunks)) != len(chunks):
            raise ValueError("a chunk appears at most once in a forward.")
        p = self.policy
        refresh = p.refresh_threshold > 0 and p.sinks > 0
        # which slots of each row hold keys, updated with this forward's writes as they
        # happen: an element attends to its row's filled prefix after its own write
        occupied = {row: (self.positions[row] != self.EMPTY).tolist() for row in set(rows)}
        new = [e for e, c in enumerate(chunks) if c not in self.targets or
               min(self.targets[c][b] for b in self.owned) < 0]
        full = all(all(occupied[row][block]) for row in rows for block in self.owned)
        # Stream Batch's steady state (or a sequential step) on a full cache: the same
        # shapes at every forward
        fixed = rows == list(range(len(rows))) and full and new in ([], [0])
        slots: list[list[Slot]] = []
        lengths: list[list[int]] = []
        for block in range(self.blocks):
            if block not in self.owned:  # another rank's: nothing to plan here
                slots.append([])
                lengths.append([])
                continue
            book = self.books[block]
            scratch = _BlockBook(list(book.chunk), book.next_ring)  # this forward's bookings
            block_slots: list[Slot] = []
            block_lengths = []
            ruled = False
            for row, chunk in zip(rows, chunks):
                target = self.targets.get(chunk)
                if target is not None and target[block] >= 0:
                    slot = target[block]
                elif -1 in scratch.chunk:
                    slot = scratch.chunk.index(-1)
                    self._book(scratch, chunk, slot)
                elif refresh:
                    if ruled:
                        raise ValueError("with sink refresh, a full cache takes at most one "
                                         "new chunk per forward.")
                    slot = RefreshRule(p.sinks, scratch.next_ring, p.refresh_threshold)
                    ruled = True
                else:
                    slot = scratch.next_ring
                    self._book(scratch, chunk, slot)
                if isinstance(slot, int):
                    occupied[row][block][slot] = True
                # (a rule's write fills no new slot: rules come once the cache is full)
                block_slots.append(slot)
                block_lengths.append(sum(occupied[row][block]))
            slots.append(block_slots)
            lengths.append(block_lengths)
        return AttentionPlan(self.k, self.v, p.frames, list(rows),
                             [self.chunk_position[c] for c in chunks], slots, lengths,
                             fixed=fixed, defer=bool(self.defer), chunks=list(chunks))

    def commit(self, plan: AttentionPlan, chosen: Mapping[int, int]) -> list[list[int]]:
        """Book a forward run from ``plan``: each new chunk's slot per block (``chosen[block]``
        where the plan left it to a refresh rule) and the position of every key stored.
        Returns the slot of every element, per block."""
        booked = []
        stored: dict[tuple[int, int, int], int] = {}
        for block in range(self.blocks):
            if block not in self.owned:
                booked.append([])
                continue
            book = self.books[block]
            block_slots = []
            for e, (row, chunk) in enumerate(zip(plan.rows, plan.chunks)):
                slot = plan.slots[block][e]
                if isinstance(slot, RefreshRule):
                    slot = int(chosen[block])
                target = self.targets.setdefault(chunk, [-1] * self.blocks)
                if target[block] < 0:  # the chunk's first call
                    self._book(book, chunk, slot)
                    target[block] = slot
                stored[(row, block, slot)] = plan.positions[e]
                block_slots.append(slot)
            booked.append(block_slots)
        if stored:
            index = torch.tensor(list(stored)).T
            self.positions[index[0], index[1], index[2]] = torch.tensor(list(stored.values()))
        return booked

    def _book(self, book: _BlockBook, chunk: int, slot: int) -> None:
        """A new chunk takes ``slot``; a free slot leaves the ring alone, a full cache's
        choice (the ring slot or a refreshed sink) goes through ``_advance_ring``."""
        if -1 not in book.chunk:
            self._advance_ring(book, slot)
        book.chunk[slot] = chunk

    def _advance_ring(self, book: _BlockBook, slot: int) -> None:
        """The ring's victim moves on only when the ring (not a sink) took the chunk."""
        if slot != book.next_ring:
            return
        p = self.policy
        ring = p.frames - p.sinks
        book.next_ring = p.sinks + (book.next_ring - p.sinks + 1) % ring if ring else p.sinks

    # --- pipeline ranks: blocks move between caches with their history --------------------

    def block_state(self, block: int) -> BlockState:
        """Everything this cache holds for ``block`` (to hand over; nothing changes here)."""
        if block not in self.owned:
            raise ValueError(f"block {block} is not held here ({self.owned}).")
        book = self.books[block]
        return BlockState(block, self.k[block], self.v[block],
                          self.positions[:, block].clone(), list(book.chunk), book.next_ring,
                          {c: t[block] for c, t in self.targets.items()})

    def drop_block(self, block: int) -> None:
        """Stop holding ``block`` (handed over to another rank)."""
        self.k[block] = self.v[block] = None
        self._hold([b for b in self.owned if b != block])

    def put_block(self, state: BlockState) -> None:
        """Take over a block with its keys, values and books (a pipeline rebalance)."""
        block = state.block
        self.k[block] = state.k.to(self.device, self.dtype)
        self.v[block] = state.v.to(self.device, self.dtype)
        self.positions[:, block] = state.positions
        self.books[block] = _BlockBook(list(state.chunk), state.next_ring)
        for chunk, slot in state.targets.items():
            self.targets.setdefault(chunk, [-1] * self.blocks)[block] = slot
        self._hold(sorted({*self.owned, block}))

    def _hold(self, blocks: list[int]) -> None:
        """The blocks held now: a range when contiguous (what a stage runs), else a tuple
        (only while blocks move)."""
        if not blocks:
            raise ValueError("a cache holds at least one block.")
        contiguous = blocks == list(range(blocks[0], blocks[-1] + 1))
        self.owned = range(blocks[0], blocks[-1] + 1) if contiguous else tuple(blocks)
        self.graphs.clear()
        self.storage_id = next(_storage_ids)

    def filled_slots(self, block: int, row: int) -> int:
        """Frame slots of a row holding keys (always a prefix)."""
        return int((self.positions[row, block] != self.EMPTY).sum())

    def forget(self, chunk: int) -> None:
        """Drop the bookkeeping of a chunk that has passed its last step."""
        self.targets.pop(chunk, None)
        self.chunk_position.pop(chunk, None)
        self.chunk_epoch.pop(chunk, None)


class SharedGraphs(dict):
    """Fixed-shape forwards (CUDA graphs) of several streams together, keyed by their stream
    ids: stream ids -> (their storages' ids, the records).  One stream's are kept in its own
    cache (``KVCache.graphs``), which drops them with its storage.  A record here is valid
    only for the storages it was recorded against (a steps or cache change replaces a
    storage, a closed stream's id may come back), so ``drop_stale`` runs before every use:
    no graph is replayed against freed memory nor keeps a closed stream's buffers."""

    def for_caches(self, caches: list[tuple[int, KVCache]]) -> dict:
        """Where the forwards of this set of (stream id, cache) are kept."""
        if len(caches) == 1:
            return caches[0][1].graphs
        key = tuple(sid for sid, _ in caches)
        if key not in self:
            self[key] = (tuple(cache.storage_id for _, cache in caches), {})
        return self[key][1]

    def drop_stale(self, cache_of: Callable[[int], KVCache | None]) -> None:
        """Drop the records of any stream that closed (``cache_of`` gives None) or replaced
        its storage."""
        for key, (storages, _) in list(self.items()):
            for sid, storage in zip(key, storages):
                cache = cache_of(sid)
                if cache is None or cache.storage_id != storage:
                    del self[key]
                    break


@dataclass
class BlockState:
    """One block's share of a stream's cache, as it moves between pipeline ranks."""

    block: int
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor    # (rows, frames)
    chunk: list[int]           # the block's book: chunk per frame slot
    next_ring: int
    targets: dict[int, int]    # live chunk -> its slot in this block


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < t.shape[0]:
        return t[:rows].clone()
    extra = t[-1:].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra.clone()], 0)
