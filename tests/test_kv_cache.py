"""The per-stream KV cache policy: slot order, sinks + FIFO ring, Stream Batch reuse, adaptive
sink refresh, RoPE wrap, reset, row resizing, bounded bookkeeping, policy validation.

The cache is driven the way the engine and the causal forward drive it: for each chunk,
``pos = cache.admit(chunk)``; then for each of its steps ``cache.prepare([row], [chunk])``,
``plan = cache.plan([row], [chunk])``, the plan executed per block as the model does
(``write_block``: keys/values written, a refresh rule evaluated) and ``cache.commit(plan,
chosen)`` (later steps use other rows with the same slot); ``cache.forget(chunk)`` after the
chunk's last step.  A wrap re-rotates a row when ``prepare`` brings the first chunk of the new
epoch to it.
"""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon.engines.video.kv_cache import CachePolicy, KVCache
from livediffusion.daemon.models.causal_wan import (AttentionPlan, RefreshRule, read_back,
                                                   refresh_choice, rope_cos_sin, rope_inv_freq,
                                                   rotate_pairs, write_block)

HEADS, HEAD_DIM, TOKENS, T_DIM = 2, 16, 3, 4
EMPTY = KVCache.EMPTY


# --- helpers -------------------------------------------------------------------------------


def make_cache(*, blocks: int = 2, rows: int = 1, frames: int = 6, sinks: int = 3,
               refresh: float = 0.0, rope_max: int = 50, t_dim: int = T_DIM) -> KVCache:
    cache = KVCache(blocks=blocks, rows=rows, heads=HEADS, head_dim=HEAD_DIM, tokens=TOKENS,
                    policy=CachePolicy(frames=frames, sinks=sinks, refresh_threshold=refresh,
                                       rope_max=rope_max))
    cache.t_dim = t_dim
    cache.inv_freq_t = rope_inv_freq(t_dim)
    return cache


def rope(k: torch.Tensor, position: int, t_dim: int = T_DIM) -> torch.Tensor:
    """Wan's temporal RoPE of keys (tokens, heads, dim) at one frame position."""
    out = k.clone()
    if t_dim == 0:
        return out
    cos, sin = rope_cos_sin(torch.tensor([position]), rope_inv_freq(t_dim))  # (1, t_dim)
    out[..., :t_dim] = rotate_pairs(k[..., :t_dim], cos, sin)
    return out


def chunk_kv(seed: int, sign: float = 1.0, noise: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys and values (tokens, heads, dim): ``sign * ones`` plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (TOKENS, HEADS, HEAD_DIM)
    k = sign * torch.ones(shape) + noise * torch.randn(shape, generator=g)
    v = sign * torch.ones(shape) + noise * torch.randn(shape, generator=g)
    return k, v


def execute(cache: KVCache, plan: AttentionPlan, k: torch.Tensor, v: torch.Tensor
            ) -> list[list[int]]:
    """Run ``plan`` as the causal forward does, without the model: every block's keys/values
    (the same in every block; one element: (tokens, heads, dim), else (elements, ...)) are
    written, refresh rules evaluated; then the policy books it.  Returns the booked slots
    [block][element]."""
    if k.dim() == 3:
        k, v = k[None], v[None]
    chosen = {}
    for block in range(cache.blocks):
        decided = write_block(plan, block, k, v)
        if decided is not None:
            chosen[block] = decided
    return cache.commit(plan, read_back([chosen])[0])


def step(cache: KVCache, rows: list[int], chunks: list[int], k: torch.Tensor,
         v: torch.Tensor) -> list[list[int]]:
    """One forward over these elements: plan, execute, commit."""
    return execute(cache, cache.plan(rows, chunks), k, v)


def run_chunk(cache: KVCache, chunk: int, k: torch.Tensor, v: torch.Tensor, *,
              rows: tuple[int, ...] = (0,), forget: bool = True) -> tuple[int, list[int]]:
    """Admit a chunk and run its steps (rows) through every block, as the engine does with
    the sequential schedule.  ``k`` is pre-RoPE; it is rotated at the admitted position.
    Returns (position, per-block slots)."""
    pos = cache.admit(chunk)
    kr = rope(k, pos, cache.t_dim)
    slots = []
    for row in rows:
        cache.prepare([row], [chunk])
        row_slots = [s[0] for s in step(cache, [row], [chunk], kr, v)]
        if slots:
            assert row_slots == slots
        slots = row_slots
    if forget:
        cache.forget(chunk)
    return pos, slots


def stored(cache: KVCache, block: int, row: int, slot: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values of one frame slot, back as (tokens, heads, dim)."""
    t = cache.tokens
    return (cache.k[block][row, :, slot * t:(slot + 1) * t].transpose(0, 1),
            cache.v[block][row, :, slot * t:(slot + 1) * t].transpose(0, 1))


# --- 1. filling ------------------------------------------------------------------------------


def test_slots_fill_in_order_with_growing_prefix_and_consecutive_positions():
    cache = make_cache(blocks=2, rows=1, frames=6, sinks=3)
    for c in range(6):
        k, v = chunk_kv(c, noise=1.0)
        pos, slots = run_chunk(cache, c, k, v)
        assert pos == c
        assert slots == [c, c]
        for block in range(2):
            assert cache.filled_slots(block, 0) == c + 1
            expected = [p if p <= c else EMPTY for p in range(6)]
            assert cache.positions[0, block].tolist() == expected
            ks, vs = stored(cache, block, 0, c)
            torch.testing.assert_close(ks, rope(k, c), rtol=0, atol=0)
            torch.testing.assert_close(vs, v, rtol=0, atol=0)
        assert cache.filled == c + 1
        assert cache.next_position == c + 1
    assert [b.chunk for b in cache.books] == [list(range(6))] * 2


def test_filled_slots_and_filled_count_stop_at_frames():
    cache = make_cache(frames=4, sinks=1)
    for c in range(9):
        run_chunk(cache, c, *chunk_kv(c))
    assert cache.filled == 4
    assert cache.filled_slots(0, 0) == 4
    assert cache.filled_slots(1, 0) == 4


# --- 2. sinks + FIFO ring --------------------------------------------------------------------


def test_full_cache_replaces_oldest_non_sink_frame_fifo():
    cache = make_cache(frames=6, sinks=3, refresh=0.0)
    slots = [run_chunk(cache, c, *chunk_kv(c))[1][0] for c in range(10)]
    assert slots == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3]
    for block in range(2):
        assert cache.books[block].chunk == [0, 1, 2, 9, 7, 8]
        assert cache.positions[0, block].tolist() == [0, 1, 2, 9, 7, 8]
        assert cache.filled_slots(block, 0) == 6


def test_sinks_are_never_evicted_when_refresh_is_off():
    cache = make_cache(frames=6, sinks=3, refresh=0.0, rope_max=50)
    sink_kv = {}
    for c in range(3):
        sink_kv[c] = chunk_kv(c, sign=1.0, noise=0.1)
        run_chunk(cache, c, *sink_kv[c])
    # Later chunks point the opposite way: with refresh on they would replace sinks.
    slots = [run_chunk(cache, c, *chunk_kv(c, sign=-1.0, noise=0.1))[1]
             for c in range(3, 40)]
    assert all(s[0] in (3, 4, 5) and s[1] in (3, 4, 5) for s in slots)
    assert [s[0] for s in slots[3:]] == [3, 4, 5] * 11 + [3]
    for block in range(2):
        assert cache.books[block].chunk[:3] == [0, 1, 2]
        assert cache.positions[0, block, :3].tolist() == [0, 1, 2]
        for c in range(3):
            ks, vs = stored(cache, block, 0, c)
            torch.testing.assert_close(ks, rope(sink_kv[c][0], c), rtol=0, atol=0)
            torch.testing.assert_close(vs, sink_kv[c][1], rtol=0, atol=0)


def test_zero_sinks_make_the_whole_cache_a_ring():
    cache = make_cache(frames=3, sinks=0, refresh=0.0)
    slots = [run_chunk(cache, c, *chunk_kv(c))[1][0] for c in range(8)]
    assert slots == [0, 1, 2, 0, 1, 2, 0, 1]
    assert cache.books[0].chunk == [6, 7, 5]


def test_zero_sinks_with_refresh_on_is_still_a_plain_ring():
    cache = make_cache(frames=3, sinks=0, refresh=1.0)
    slots = [run_chunk(cache, c, *chunk_kv(c, sign=(-1.0) ** c))[1][0] for c in range(7)]
    assert slots == [0, 1, 2, 0, 1, 2, 0]


# --- 3. Stream Batch: slot decided once ------------------------------------------------------


def test_slot_decided_at_first_call_is_reused_for_later_rows_after_other_admissions():
    """Stream Batch with 3 steps: chunk c is at row 0 when chunk c-1 is at row 1 and chunk c-2
    at row 2; each chunk keeps the slot it got at its first call."""
    rows = 3
    cache = make_cache(blocks=2, rows=rows, frames=6, sinks=3, refresh=0.0)
    in_flight: list[tuple[int, int]] = []   # (chunk, position), newest first
    first_slot: dict[int, list[int]] = {}
    later_slots: dict[int, list[list[int]]] = {}
    kv = {c: chunk_kv(c, noise=1.0) for c in range(12)}
    for c in range(12):
        pos = cache.admit(c)
        in_flight.insert(0, (c, pos))
        for row, (chunk, p) in enumerate(in_flight):
            k, v = kv[chunk]
            # Later steps see different activations; the slot must not depend on them.
            if row:
                k, v = -3.0 * k, -3.0 * v
            kr = rope(k, p)
            got = [s[0] for s in step(cache, [row], [chunk], kr, v)]
            if row == 0:
                first_slot[chunk] = got
            else:
                later_slots.setdefault(chunk, []).append(got)
        if len(in_flight) == rows:
            done, _ = in_flight.pop()
            cache.forget(done)
    assert [first_slot[c][0] for c in range(12)] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]
    for c, slots in later_slots.items():
        assert all(s == first_slot[c] for s in slots), c
    # Row r lags row 0 by r chunks: its filled prefix is shorter until the cache is full.
    assert cache.filled_slots(0, 0) == 6
    assert cache.filled_slots(0, 1) == 6
    assert cache.filled_slots(0, 2) == 6


def test_stream_batch_rows_fill_as_lagging_prefixes():
    cache = make_cache(blocks=1, rows=3, frames=6, sinks=3)
    kr, v = chunk_kv(0)
    # chunk 0 at row 0; then chunk 1 at row 0 and chunk 0 at row 1.
    cache.admit(0)
    [[s0]] = step(cache, [0], [0], kr, v)
    assert [cache.filled_slots(0, r) for r in range(3)] == [1, 0, 0]
    cache.admit(1)
    [[s1]] = step(cache, [0], [1], kr, v)
    plan = cache.plan([1], [0])
    assert plan.slots[0][0] == s0 == 0
    execute(cache, plan, kr, v)
    assert s1 == 1
    assert [cache.filled_slots(0, r) for r in range(3)] == [2, 1, 0]
    assert cache.positions[:, 0].tolist() == [[0, 1] + [EMPTY] * 4,
                                              [0] + [EMPTY] * 5,
                                              [EMPTY] * 6]


def test_later_call_with_dissimilar_keys_does_not_trigger_refresh():
    cache = make_cache(blocks=1, rows=2, frames=4, sinks=2, refresh=0.5)
    for c in range(4):
        run_chunk(cache, c, *chunk_kv(c, sign=1.0))
    pos = cache.admit(4)
    k, v = chunk_kv(4, sign=1.0)
    plan = cache.plan([0], [4])
    slot = int(refresh_choice(cache.k[0], cache.v[0], TOKENS, rope(k, pos), v,
                              plan.slots[0][0]))
    assert slot == 2  # similar: ring
    cache.commit(plan, {0: slot})
    assert cache.plan([1], [4]).slots[0][0] == 2  # decided already, no refresh
    assert cache.books[0].chunk == [0, 1, 4, 3]
    assert cache.books[0].next_ring == 3


# --- 4. adaptive sink refresh ----------------------------------------------------------------


def _fill_refresh_cache(sink_signs, frames=5, blocks=1, refresh=0.5, rope_max=50,
                        sink_kvs=None):
    """Sinks get keys/values pointing along the given directions, ring chunks along +1."""
    sinks = len(sink_signs)
    cache = make_cache(blocks=blocks, frames=frames, sinks=sinks, refresh=refresh,
                       rope_max=rope_max)
    for c in range(frames):
        if c < sinks:
            k, v = sink_kvs[c] if sink_kvs else (sink_signs[c].clone(), sink_signs[c].clone())
        else:
            k, v = chunk_kv(c, sign=1.0)
        _, slots = run_chunk(cache, c, k, v)
        assert slots == [c] * blocks
    return cache


def _direction(kind: str) -> torch.Tensor:
    shape = (TOKENS, HEADS, HEAD_DIM)
    if kind == "+":
        return torch.ones(shape)
    if kind == "-":
        return -torch.ones(shape)
    # orthogonal to +/-ones: first half of each head +1, second half -1
    d = torch.ones(shape)
    d[..., HEAD_DIM // 2:] = -1.0
    return d


def test_dissimilar_chunk_replaces_the_least_similar_sink():
    # New chunk is -ones: similarity ~0 to sink 0, ~-1 to sink 1, ~+1 to sink 2.
    cache = _fill_refresh_cache([_direction("x"), _direction("+"), _direction("-")],
                                frames=5, refresh=0.5)
    pos, slots = run_chunk(cache, 5, *chunk_kv(5, sign=-1.0))
    assert pos == 5
    assert slots == [1]
    assert cache.books[0].chunk == [0, 5, 2, 3, 4]
    assert cache.books[0].next_ring == 3  # the ring's victim is unchanged
    assert cache.positions[0, 0].tolist() == [0, 5, 2, 3, 4]


def test_exactly_opposite_chunk_replaces_the_sink_without_rope_dims():
    """Sink keys all +1, new chunk all -1 (no RoPE dims so the cosine is exactly -1)."""
    cache = make_cache(blocks=1, frames=4, sinks=1, refresh=0.2, t_dim=0)
    cache.inv_freq_t = rope_inv_freq(0)
    ones = torch.ones(TOKENS, HEADS, HEAD_DIM)
    for c in range(4):
        cache.admit(c)
        assert step(cache, [0], [c], ones, ones) == [[c]]
        cache.forget(c)

    def decide(chunk: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """The slot the chunk gets, booked without storing its keys (as if the model did not
        write them yet): the next decision still sees the old sinks."""
        plan = cache.plan([0], [chunk])
        slot = int(refresh_choice(cache.k[0], cache.v[0], TOKENS, k, v, plan.slots[0][0]))
        cache.commit(plan, {0: slot})
        return slot

    cache.admit(4)
    assert decide(4, -ones, -ones) == 0
    cache.admit(5)
    assert decide(5, ones, ones) == 1


def test_similar_chunk_goes_to_the_ring():
    cache = _fill_refresh_cache([_direction("+"), _direction("+")], frames=4, refresh=0.5)
    slots = [run_chunk(cache, c, *chunk_kv(c, sign=1.0, noise=0.1))[1][0]
             for c in range(4, 9)]
    assert slots == [2, 3, 2, 3, 2]
    assert cache.books[0].chunk[:2] == [0, 1]


def test_after_refresh_the_ring_continues_with_its_oldest_frame():
    """No RoPE dims, so similarities are exact.  Sinks: x (orthogonal to ones) and +ones."""
    cache = make_cache(blocks=1, frames=4, sinks=2, refresh=0.5, t_dim=0)
    x, plus = _direction("x"), _direction("+")
    assert run_chunk(cache, 0, x, x)[1] == [0]
    assert run_chunk(cache, 1, plus, plus)[1] == [1]
    assert run_chunk(cache, 2, plus, plus)[1] == [2]
    assert run_chunk(cache, 3, plus, plus)[1] == [3]
    # x + ones: cosine 0.707 to both sinks -> ring (oldest non-sink: slot 2)
    assert run_chunk(cache, 4, x + plus, x + plus)[1] == [2]
    # -ones: cosine 0 to sink 0, -1 to sink 1 -> replaces sink 1
    assert run_chunk(cache, 5, -plus, -plus)[1] == [1]
    # x - ones: cosine 0.707 to both sinks (x, -ones) -> ring, whose oldest frame is slot 3
    assert run_chunk(cache, 6, x - plus, x - plus)[1] == [3]
    assert run_chunk(cache, 7, x - plus, x - plus)[1] == [2]
    assert cache.books[0].chunk == [0, 5, 7, 6]
    assert cache.positions[0, 0].tolist() == [0, 5, 7, 6]


def test_refresh_never_happens_before_the_cache_is_full():
    """Alternating, mutually opposite chunks still fill slots in order: empty (zero) sinks
    and unfilled slots are never chosen by refresh."""
    cache = make_cache(blocks=2, frames=6, sinks=3, refresh=1.0)
    slots = [run_chunk(cache, c, *chunk_kv(c, sign=(-1.0) ** c))[1] for c in range(6)]
    assert slots == [[c, c] for c in range(6)]
    # The cache is full now: an opposite chunk refreshes a sink (slot 0 or 2 hold +1 chunks,
    # slot 1 a -1 chunk; the new one is -1, so one of the +1 sinks goes).
    assert run_chunk(cache, 6, *chunk_kv(6, sign=-1.0))[1][0] in (0, 2)


def test_refresh_is_decided_per_block():
    cache = make_cache(blocks=2, frames=4, sinks=1, refresh=0.5)
    ones = torch.ones(TOKENS, HEADS, HEAD_DIM)
    for c in range(4):
        pos = cache.admit(c)
        assert step(cache, [0], [c], rope(ones, pos), ones) == [[c], [c]]
        cache.forget(c)
    pos = cache.admit(4)
    k_dis, k_sim = rope(-ones, pos), rope(ones, pos)
    plan = cache.plan([0], [4])
    chosen = {0: write_block(plan, 0, k_dis[None], -ones[None]),
              1: write_block(plan, 1, k_sim[None], ones[None])}
    assert chosen[0] == 0   # block 0 sees an opposite chunk
    assert chosen[1] == 1   # block 1 a similar one
    cache.commit(plan, chosen)
    assert cache.targets[4] == [0, 1]
    assert cache.filled == 4


# --- 5. RoPE wrap ----------------------------------------------------------------------------


def test_wrap_reanchors_positions_once_next_position_passes_rope_max():
    cache = make_cache(blocks=2, rows=1, frames=4, sinks=1, rope_max=6)
    got = [run_chunk(cache, c, *chunk_kv(c, noise=1.0)) for c in range(7)]
    assert [p for p, _ in got] == [0, 1, 2, 3, 4, 5, 6]          # no wrap up to rope_max
    assert [s[0] for _, s in got] == [0, 1, 2, 3, 1, 2, 3]
    assert cache.positions[0, 0].tolist() == [0, 4, 5, 6]
    pos = cache.admit(7)                                           # 7 would pass 6: wrap
    assert pos == 3 == cache.policy.frames - 1
    assert cache.next_position == 4
    assert cache.positions[0, 0].tolist() == [0, 4, 5, 6]          # rows move lazily...
    cache.prepare([0], [7])                                        # ...when chunk 7 arrives
    # sink at 0, ring frames (4, 5, 6) shifted by 4 keeping their offsets to the new chunk.
    assert cache.positions[0].tolist() == [[0, 0, 1, 2]] * 2
    assert cache.chunk_position == {7: 3}


def test_wrap_rerotates_cached_keys_to_their_new_positions():
    blocks, rows = 2, 2
    cache = make_cache(blocks=blocks, rows=rows, frames=4, sinks=1, rope_max=6)
    kv = {c: chunk_kv(c, noise=1.0) for c in range(7)}
    slot_of = {}
    for c in range(7):
        _, slots = run_chunk(cache, c, *kv[c], rows=(0, 1))
        slot_of[c] = slots[0]
    # slot -> chunk living there now: 0:c0, 1:c4, 2:c5, 3:c6
    before_k = [t.clone() for t in cache.k]
    before_v = [t.clone() for t in cache.v]
    cache.admit(7)
    cache.prepare([0, 1], [7, 7])
    new_pos = {0: 0, 4: 0, 5: 1, 6: 2}
    for block in range(blocks):
        for row in range(rows):
            for chunk, p in new_pos.items():
                ks, vs = stored(cache, block, row, slot_of[chunk])
                expected = rope(kv[chunk][0], p)
                torch.testing.assert_close(ks, expected, rtol=0, atol=1e-5)
                torch.testing.assert_close(ks[..., T_DIM:], kv[chunk][0][..., T_DIM:],
                                           rtol=0, atol=0)
                torch.testing.assert_close(vs, kv[chunk][1], rtol=0, atol=0)
        assert torch.equal(cache.k[block][..., T_DIM:], before_k[block][..., T_DIM:])
        assert torch.equal(cache.v[block], before_v[block])


def test_wrap_reanchors_a_refreshed_sink_and_keeps_ring_offsets():
    """frames=4, sinks=2: chunk 4 refreshes sink 1 at position 4; after the wrap the sinks are
    at 0, 1 and the ring frames (5, 6) at (1, 2), next to the new chunk at 3."""
    g = torch.Generator().manual_seed(0)

    def noisy(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (d + 0.1 * torch.randn(d.shape, generator=g),
                d + 0.1 * torch.randn(d.shape, generator=g))

    # sink 0 orthogonal to the coming -1 chunk, sink 1 opposite to it.
    kv = {0: noisy(_direction("x")), 1: noisy(_direction("+"))}
    cache = _fill_refresh_cache([None, None], frames=4, refresh=0.5, rope_max=6,
                                sink_kvs=kv)
    kv[2], kv[3] = chunk_kv(2, sign=1.0), chunk_kv(3, sign=1.0)
    kv[4] = chunk_kv(4, sign=-1.0, noise=0.1)
    # x - ones is zero on the RoPE dims and has cosine ~0.707 to both x and -ones: ring.
    kv[5] = noisy(_direction("x") - 1.0)
    kv[6] = noisy(_direction("x") - 1.0)
    assert run_chunk(cache, 4, *kv[4])[1] == [1]     # refreshes sink 1
    assert run_chunk(cache, 5, *kv[5])[1] == [2]     # ring
    assert run_chunk(cache, 6, *kv[6])[1] == [3]
    assert cache.books[0].chunk == [0, 4, 5, 6]
    assert cache.positions[0, 0].tolist() == [0, 4, 5, 6]
    assert cache.admit(7) == 3                       # 7 > rope_max: wrap, shift 4
    cache.prepare([0], [7])
    assert cache.positions[0, 0].tolist() == [0, 1, 1, 2]
    for slot, (chunk, p) in enumerate([(0, 0), (4, 1), (5, 1), (6, 2)]):
        ks, vs = stored(cache, 0, 0, slot)
        torch.testing.assert_close(ks, rope(kv[chunk][0], p), rtol=0, atol=1e-5)
        torch.testing.assert_close(vs, kv[chunk][1], rtol=0, atol=0)


def test_a_chunk_in_flight_at_a_wrap_finishes_against_rows_that_have_not_moved():
    """Stream Batch: chunk 6 is at its second step (row 1) when chunk 7 wraps positions.
    Chunk 6 keeps position 6 in row 1 as in the sequential schedule; row 1 is re-anchored only
    when chunk 7 reaches it, and chunk 6's keys move with it."""
    cache = make_cache(blocks=1, rows=2, frames=4, sinks=1, rope_max=6)
    for c in range(6):
        run_chunk(cache, c, *chunk_kv(c), rows=(0, 1))
    k6, v6 = chunk_kv(6, noise=1.0)
    assert cache.admit(6) == 6
    cache.prepare([0], [6])
    [[slot6]] = step(cache, [0], [6], rope(k6, 6), v6)
    assert cache.admit(7) == 3                        # wrap: shift 4
    assert cache.chunk_position == {6: 6, 7: 3}       # positions never change after admission
    cache.prepare([0, 1], [7, 6])                     # one forward: 7 at row 0, 6 at row 1
    assert cache.positions[0, 0].tolist()[slot6] == 2  # row 0 re-anchored (6 -> 2)
    assert cache.positions[1, 0].tolist()[slot6] != 2  # row 1 not yet
    assert step(cache, [1], [6], rope(k6, 6), v6) == [[slot6]]
    cache.prepare([1], [7])                           # chunk 7 reaches row 1
    assert cache.positions[1, 0].tolist()[slot6] == 2
    ks, _ = stored(cache, 0, 1, slot6)
    torch.testing.assert_close(ks, rope(k6, 2), rtol=0, atol=1e-5)


def test_repeated_wraps_keep_positions_bounded_and_keys_exact():
    cache = make_cache(blocks=1, rows=1, frames=4, sinks=1, rope_max=6)
    kv, slot_pos = {}, {}
    for c in range(40):
        kv[c] = chunk_kv(c, noise=1.0)
        pos, slots = run_chunk(cache, c, *kv[c])
        assert 0 <= pos <= 6
        slot_pos[slots[0]] = (c, pos)
    positions = cache.positions[0, 0].tolist()
    assert max(positions) <= 6
    book = cache.books[0].chunk
    for slot in range(4):
        chunk = book[slot]
        ks, vs = stored(cache, 0, 0, slot)
        torch.testing.assert_close(ks, rope(kv[chunk][0], positions[slot]), rtol=0, atol=1e-4)
        torch.testing.assert_close(vs, kv[chunk][1], rtol=0, atol=0)
    # Ring offsets: the three ring frames are the last three chunks at consecutive positions.
    ring = sorted((book[s], positions[s]) for s in range(1, 4))
    assert [c for c, _ in ring] == [37, 38, 39]
    assert [p for _, p in ring] == [ring[0][1], ring[0][1] + 1, ring[0][1] + 2]
    assert positions[0] == 0


# --- 6. reset --------------------------------------------------------------------------------


def test_reset_empties_everything():
    cache = make_cache(blocks=2, rows=2, frames=4, sinks=1, rope_max=6)
    for c in range(9):
        run_chunk(cache, c, *chunk_kv(c, noise=1.0), rows=(0, 1), forget=c != 8)
    nbytes = cache.nbytes()
    cache.reset()
    assert (cache.positions == EMPTY).all()
    assert cache.positions.shape == (2, 2, 4)
    assert all(cache.filled_slots(b, r) == 0 for b in range(2) for r in range(2))
    assert all(not t.any() for t in (*cache.k, *cache.v))
    assert cache.targets == {} and cache.chunk_position == {}
    assert cache.filled == 0 and cache.next_position == 0
    assert [b.chunk for b in cache.books] == [[-1] * 4] * 2
    assert [b.next_ring for b in cache.books] == [1, 1]
    assert cache.nbytes() == nbytes
    pos, slots = run_chunk(cache, 9, *chunk_kv(9))
    assert pos == 0 and slots == [0, 0]


# --- 7. set_rows -----------------------------------------------------------------------------


def test_set_rows_growing_copies_the_last_row():
    cache = make_cache(blocks=2, rows=2, frames=4, sinks=1)
    run_chunk(cache, 0, *chunk_kv(0, noise=1.0), rows=(0, 1))
    run_chunk(cache, 1, *chunk_kv(1, noise=1.0), rows=(0,))   # row 1 lags one chunk
    old_k = [t.clone() for t in cache.k]
    old_v = [t.clone() for t in cache.v]
    old_pos = cache.positions.clone()
    cache.set_rows(4)
    assert cache.rows == 4
    assert cache.positions.shape == (4, 2, 4)
    for b in range(2):
        assert cache.k[b].shape == cache.v[b].shape == (4, HEADS, 4 * TOKENS, HEAD_DIM)
        assert torch.equal(cache.k[b][:2], old_k[b])
        assert torch.equal(cache.v[b][:2], old_v[b])
        for r in (2, 3):
            assert torch.equal(cache.k[b][r], old_k[b][1])
            assert torch.equal(cache.v[b][r], old_v[b][1])
    assert torch.equal(cache.positions[:2], old_pos)
    assert torch.equal(cache.positions[2], old_pos[1])
    assert torch.equal(cache.positions[3], old_pos[1])
    assert [cache.filled_slots(0, r) for r in range(4)] == [2, 1, 1, 1]
    # new rows are independent storage
    cache.k[0][3].fill_(7.0)
    assert not torch.equal(cache.k[0][2], cache.k[0][3])


def test_set_rows_shrinking_drops_rows():
    cache = make_cache(blocks=2, rows=3, frames=4, sinks=1)
    run_chunk(cache, 0, *chunk_kv(0, noise=1.0), rows=(0, 1, 2))
    run_chunk(cache, 1, *chunk_kv(1, noise=1.0), rows=(0,))
    old_k = [t.clone() for t in cache.k]
    old_pos = cache.positions.clone()
    cache.set_rows(1)
    assert cache.rows == 1
    assert cache.positions.shape == (1, 2, 4)
    assert torch.equal(cache.positions, old_pos[:1])
    for b in range(2):
        assert cache.k[b].shape == cache.v[b].shape == (1, HEADS, 4 * TOKENS, HEAD_DIM)
        assert torch.equal(cache.k[b], old_k[b][:1])
    assert cache.nbytes() == 2 * 2 * 1 * HEADS * 4 * TOKENS * HEAD_DIM * 4


def test_set_rows_same_count_is_a_no_op():
    cache = make_cache(rows=2)
    k0 = cache.k[0]
    cache.set_rows(2)
    assert cache.k[0] is k0 and cache.rows == 2


# --- 8. bounded bookkeeping ------------------------------------------------------------------


def test_forget_drops_chunk_bookkeeping():
    cache = make_cache(blocks=2, frames=4, sinks=1)
    pos, _ = run_chunk(cache, 0, *chunk_kv(0), forget=False)
    assert cache.targets == {0: [0, 0]} and cache.chunk_position == {0: pos}
    cache.forget(0)
    assert cache.targets == {} and cache.chunk_position == {}
    cache.forget(12345)  # unknown chunk: no error


def test_thousands_of_chunks_keep_bookkeeping_bounded():
    rows = 3
    cache = make_cache(blocks=2, rows=rows, frames=5, sinks=2, refresh=0.2, rope_max=50)
    nbytes = cache.nbytes()
    in_flight: list[tuple[int, int]] = []
    k, v = chunk_kv(0, noise=1.0)
    max_targets = max_positions = 0
    for c in range(5000):
        pos = cache.admit(c)
        in_flight.insert(0, (c, pos))
        n = len(in_flight)  # one Stream Batch forward: chunk at row r is in_flight[r]
        step(cache, list(range(n)), [chunk for chunk, _ in in_flight],
             k[None].expand(n, -1, -1, -1), v[None].expand(n, -1, -1, -1))
        max_targets = max(max_targets, len(cache.targets))
        max_positions = max(max_positions, len(cache.chunk_position))
        if len(in_flight) == rows:
            cache.forget(in_flight.pop()[0])
        assert 0 <= pos <= 50
    assert max_targets <= rows and max_positions <= rows
    assert len(cache.targets) == rows - 1 and len(cache.chunk_position) == rows - 1
    assert cache.nbytes() == nbytes
    assert cache.filled == 5
    assert cache.positions.shape == (rows, 2, 5)


# --- 9. policy validation --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(frames=6, sinks=6),
    dict(frames=6, sinks=7),
    dict(frames=6, sinks=-1),
    dict(frames=1, sinks=0, rope_max=50),
    dict(frames=0, sinks=0),
    dict(frames=65, sinks=3, rope_max=100),
    dict(frames=6, sinks=3, rope_max=5),
    dict(frames=6, sinks=3, refresh_threshold=-0.1),
    dict(frames=6, sinks=3, refresh_threshold=1.1),
], ids=["sinks_eq_frames", "sinks_gt_frames", "negative_sinks", "frames_1", "frames_0",
        "frames_65", "rope_max_below_frames", "refresh_negative", "refresh_above_1"])
def test_policy_validate_rejects(kwargs):
    with pytest.raises(ValueError):
        CachePolicy(**kwargs).validate()
    with pytest.raises(ValueError):
        KVCache(blocks=1, rows=1, heads=1, head_dim=4, tokens=1, policy=CachePolicy(**kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(frames=2, sinks=0, rope_max=2),
    dict(frames=2, sinks=1, rope_max=2),
    dict(frames=64, sinks=63, rope_max=64),
    dict(frames=6, sinks=3, refresh_threshold=0.0),
    dict(frames=6, sinks=3, refresh_threshold=1.0),
])
def test_policy_validate_accepts_edges(kwargs):
    CachePolicy(**kwargs).validate()


def test_deferred_refresh_decisions_equal_immediate_ones():
    """With ``defer`` (the GPU path) the slot choice stays a device tensor until the end of
    the forward; over a long run with refreshes, ring moves and wraps, and two denoising rows,
    it must book and store exactly what the immediate path does."""
    caches = [make_cache(blocks=3, rows=2, frames=5, sinks=2, refresh=0.4, rope_max=9)
              for _ in range(2)]
    caches[1].defer = True
    assert caches[0].defer is False  # a CPU cache decides immediately by default
    deferred_seen = 0
    for c in range(40):
        sign = -1.0 if c % 7 == 3 else 1.0   # now and then an opposite chunk: a refresh
        k, v = chunk_kv(c, sign=sign, noise=0.8)
        for cache in caches:
            pos = cache.admit(c)
            kr = rope(k, pos)
            for row in (0, 1):
                cache.prepare([row], [c])
                plan = cache.plan([row], [c])
                chosen = {}
                for block in range(cache.blocks):
                    slot = write_block(plan, block, kr[None], v[None])
                    deferred_seen += isinstance(slot, torch.Tensor)
                    if slot is not None:
                        chosen[block] = slot
                cache.commit(plan, read_back([chosen])[0])  # once per forward
            cache.forget(c)
        a, b = caches
        assert [x.chunk for x in a.books] == [x.chunk for x in b.books]
        assert [x.next_ring for x in a.books] == [x.next_ring for x in b.books]
        assert torch.equal(a.positions, b.positions)
        for block in range(3):
            assert torch.equal(a.k[block], b.k[block]) and torch.equal(a.v[block], b.v[block])
    assert deferred_seen > 0
    assert any(x.chunk[:2] != [0, 1] for x in caches[0].books)  # some sink was refreshed


# --- 10. plan and commit: the policy decides, the model executes -----------------------------


def snapshot(cache: KVCache):
    return ([(b.chunk[:], b.next_ring) for b in cache.books],
            {c: t[:] for c, t in cache.targets.items()}, cache.positions.clone(),
            [t.clone() for t in (*cache.k, *cache.v)])


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and \
        all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_plan_changes_nothing_and_commit_books_it():
    cache = make_cache(blocks=2, rows=2, frames=4, sinks=1, refresh=0.5)
    for c in range(5):
        run_chunk(cache, c, *chunk_kv(c, noise=1.0), rows=(0, 1))
    cache.admit(5)
    before = snapshot(cache)
    plans = [cache.plan([0], [5]) for _ in range(2)]
    assert same(before, snapshot(cache))
    a, b = plans
    assert (a.rows, a.positions, a.slots, a.lengths, a.fixed, a.chunks) == \
        (b.rows, b.positions, b.slots, b.lengths, b.fixed, b.chunks)
    assert a.k is cache.k and a.v is cache.v and a.frames == 4
    # a full cache with refresh on: the slot is a rule, as data (sinks, ring slot, threshold)
    ring = [book.next_ring for book in cache.books]
    assert a.slots == [[RefreshRule(sinks=1, ring=ring[0], threshold=0.5, row=0)],
                       [RefreshRule(sinks=1, ring=ring[1], threshold=0.5, row=0)]]
    assert a.lengths == [[4], [4]] and a.fixed
    # the model chose the sink in block 0 and the ring in block 1
    assert cache.commit(a, {0: 0, 1: ring[1]}) == [[0], [ring[1]]]
    assert cache.books[0].chunk[0] == 5 and cache.books[0].next_ring == ring[0]
    assert cache.books[1].chunk[ring[1]] == 5 and cache.books[1].next_ring != ring[1]
    assert cache.targets[5] == [0, ring[1]]
    assert cache.positions[0, 0, 0] == 5 and cache.positions[0, 1, ring[1]] == 5
    assert cache.plan([1], [5]).slots == [[0], [ring[1]]]   # decided at its first step


def test_plan_lengths_follow_the_lagging_rows_of_stream_batch():
    cache = make_cache(blocks=1, rows=3, frames=6, sinks=3)
    lengths = []
    for c in range(4):
        cache.admit(c)
        chunks = list(range(c, max(c - 3, -1), -1))       # newest first: rows 0, 1, ...
        plan = cache.plan(list(range(len(chunks))), chunks)
        lengths.append(plan.lengths[0])
        assert not plan.fixed                              # the cache is filling
        execute(cache, plan, *(x[None].expand(len(chunks), -1, -1, -1)
                               for x in chunk_kv(c)))
    # each element attends to its row's filled prefix after its own write
    assert lengths == [[1], [2, 1], [3, 2, 1], [4, 3, 2]]


def test_the_fixed_shape_flag():
    cache = make_cache(blocks=1, rows=2, frames=4, sinks=1)
    for c in range(4):
        run_chunk(cache, c, *chunk_kv(c), rows=(0, 1), forget=False)
    cache.admit(4)
    assert cache.plan([0, 1], [4, 3]).fixed          # steady Stream Batch: new chunk first
    assert cache.plan([0], [4]).fixed                # a sequential step
    assert cache.plan([1], [3]).fixed is False       # rows other than 0..B-1
    assert cache.plan([0, 1], [3, 4]).fixed is False  # the new chunk is not element 0
    cache.admit(5)
    assert cache.plan([0, 1], [4, 5]).fixed is False  # two new chunks
    cache.reset()
    cache.admit(0)
    assert cache.plan([0], [0]).fixed is False       # not full


def test_one_stream_batch_forward_books_what_element_by_element_steps_book():
    """The engine plans all chunks in flight in one forward; the same decisions, stores and
    positions come out as when every element is its own forward (with refreshes, ring moves
    and wraps)."""
    rows = 3
    caches = [make_cache(blocks=2, rows=rows, frames=5, sinks=2, refresh=0.4, rope_max=9)
              for _ in range(2)]
    kv = {c: chunk_kv(c, sign=-1.0 if c % 5 == 2 else 1.0, noise=0.8) for c in range(30)}
    in_flight: list[int] = []
    rules = 0
    for c in range(30):
        for cache in caches:
            cache.admit(c)
        in_flight.insert(0, c)
        steps = list(range(len(in_flight)))
        keys = [rope(kv[chunk][0], caches[0].chunk_position[chunk]) for chunk in in_flight]
        values = [kv[chunk][1] for chunk in in_flight]
        whole, single = caches
        whole.prepare(steps, in_flight)
        plan = whole.plan(steps, in_flight)
        rules += isinstance(plan.slots[0][0], RefreshRule)
        execute(whole, plan, torch.stack(keys), torch.stack(values))
        for row, chunk in zip(steps, in_flight):
            single.prepare([row], [chunk])
            step(single, [row], [chunk], keys[row], values[row])
        assert same(snapshot(whole), snapshot(single)), c
        if len(in_flight) == rows:
            for cache in caches:
                cache.forget(in_flight[-1])
            in_flight.pop()
    assert rules > 10
    assert any(b.chunk[:2] != [0, 1] for b in caches[0].books)  # some sink was refreshed
    assert caches[0].shifts  # positions wrapped


def test_a_rule_another_new_chunk_would_depend_on_is_refused():
    """Two new chunks on a full cache with refresh: the second's ring slot would depend on
    the first's decision on the device; the engine never asks for that."""
    cache = make_cache(blocks=1, rows=2, frames=4, sinks=1, refresh=0.5)
    for c in range(4):
        run_chunk(cache, c, *chunk_kv(c))
    cache.admit(4)
    cache.admit(5)
    with pytest.raises(ValueError, match="at most one new chunk"):
        cache.plan([0, 1], [4, 5])
    with pytest.raises(ValueError, match="at most once"):
        cache.plan([0, 1], [4, 4])
    # without refresh both decisions are known on the host: ring, then the next ring slot
    plain = make_cache(blocks=1, rows=2, frames=4, sinks=1, refresh=0.0)
    for c in range(6):
        plain.admit(c)
    for c in range(4):
        plain.prepare([0], [c])
        step(plain, [0], [c], *chunk_kv(c))
    assert plain.plan([0, 1], [4, 5]).slots == [[1, 2]]
