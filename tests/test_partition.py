"""Block ranges for pipeline ranks: the split, the rebalance, the scaling model."""

from __future__ import annotations

import pytest

from livediffusion.daemon.parallel.partition import (moves, partition, pipeline_fps, rebalance,
                                                     stage_times)


def test_equal_blocks_split_evenly():
    assert partition([1.0] * 30, 3) == [range(0, 10), range(10, 20), range(20, 30)]


def test_every_block_belongs_to_exactly_one_rank_in_order():
    ranges = partition([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], 3)
    assert [b for r in ranges for b in r] == list(range(8)) and all(len(r) for r in ranges)


def test_the_vae_at_the_ends_shortens_the_first_and_last_ranges():
    """1.3B at 480x832 on an H200: 30 blocks of ~1.2 ms per 2-step chunk; encode 23 ms on the
    first rank, decode 37 ms on the last."""
    ranges = partition([1.2] * 30, 4, [23.0, 0.0, 0.0, 37.0])
    lengths = [len(r) for r in ranges]
    assert lengths[0] < lengths[1] and lengths[3] < lengths[2] and lengths[3] <= lengths[0]
    slowest = max(stage_times([1.2] * 30, ranges, [23.0, 0.0, 0.0, 37.0]))
    assert slowest == pytest.approx(37.0 + 1.2 * lengths[3])


def test_the_split_is_the_best_there_is():
    import itertools
    blocks = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0]
    best = partition(blocks, 3)
    brute = min(max(stage_times(blocks, [range(0, a), range(a, b), range(b, 7)]))
                for a, b in itertools.combinations(range(1, 7), 2))
    assert max(stage_times(blocks, best)) == brute


def test_impossible_splits_are_refused():
    with pytest.raises(ValueError, match="each needs one"):
        partition([1.0, 1.0], 3)
    with pytest.raises(ValueError, match="one extra time per rank"):
        partition([1.0, 1.0], 2, [1.0])


def test_a_slow_rank_gives_blocks_to_a_fast_one():
    old = [range(0, 15), range(15, 30)]
    new = rebalance(old, [30.0, 15.0])       # rank 0 takes 2 ms a block, rank 1 1 ms
    assert new is not None and len(new[0]) < 15
    assert moves(old, new) == [(b, 0, 1) for b in range(new[0].stop, 15)]


def test_small_drifts_move_nothing():
    assert rebalance([range(0, 15), range(15, 30)], [15.5, 15.0]) is None


def test_the_scaling_model_counts_the_slowest_stage_and_the_transfer():
    blocks, extra = [1.0] * 30, [20.0, 30.0]
    one = pipeline_fps(blocks, 1, [50.0], 0.0)
    two = pipeline_fps(blocks, 2, extra, 2.0)
    assert one == pytest.approx(4000.0 / 80.0)
    assert two > 1.5 * one
    assert pipeline_fps(blocks, 2, extra, 100.0) == pytest.approx(40.0)  # transfer-bound
