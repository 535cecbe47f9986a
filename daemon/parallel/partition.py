"""Splitting the DiT's blocks over pipeline ranks, and moving them as measured times change.

Plain arithmetic, no torch.distributed: the pipeline runner (issue 13, still to come) asks
these functions where each rank's contiguous block range starts and ends, and which blocks
move (with their KV-cache rows) when the measured stage times drift apart.  The first rank
also encodes with the VAE and the last one decodes, so their ranges come out shorter.

A pipeline of ranks runs at the pace of its slowest stage: one chunk leaves every
``max(stage)`` seconds once every rank is busy (several chunks in flight), so the best split
is the one that minimises the slowest rank's time.
"""

from __future__ import annotations

from typing import Sequence


def stage_times(block_ms: Sequence[float], ranges: Sequence[range],
                extra_ms: Sequence[float] | None = None) -> list[float]:
    """Each rank's time per chunk: its blocks plus its extra work (VAE, transfers)."""
    extra = list(extra_ms) if extra_ms is not None else [0.0] * len(ranges)
    return [sum(block_ms[i] for i in r) + e for r, e in zip(ranges, extra)]


def partition(block_ms: Sequence[float], ranks: int,
              extra_ms: Sequence[float] | None = None) -> list[range]:
    """Contiguous, non-empty block ranges, one per rank, that minimise the slowest rank's
    time (``block_ms``: measured time per block and chunk; ``extra_ms``: each rank's other
    work).  Exact, by dynamic programming over (blocks, ranks): 40 blocks x 8 ranks is
    instant."""
    n = len(block_ms)
    if not 1 <= ranks <= n:
        raise ValueError(f"cannot give {n} blocks to {ranks} ranks (each needs one).")
    extra = list(extra_ms) if extra_ms is not None else [0.0] * ranks
    if len(extra) != ranks:
        raise ValueError("one extra time per rank is needed.")
    prefix = [0.0]
    for ms in block_ms:
        prefix.append(prefix[-1] + ms)
    inf = float("inf")
    # best[r][i]: the slowest of ranks 0..r-1 when they hold blocks 0..i-1
    best = [[inf] * (n + 1) for _ in range(ranks + 1)]
    cut = [[0] * (n + 1) for _ in range(ranks + 1)]
    best[0][0] = 0.0
    for r in range(1, ranks + 1):
        for i in range(r, n - (ranks - r) + 1):
            for j in range(r - 1, i):
                slowest = max(best[r - 1][j], prefix[i] - prefix[j] + extra[r - 1])
                if slowest < best[r][i]:
                    best[r][i], cut[r][i] = slowest, j
    bounds, i = [], n
    for r in range(ranks, 0, -1):
        j = cut[r][i]
        bounds.append(range(j, i))
        i = j
    return bounds[::-1]


def rebalance(ranges: Sequence[range], stage_ms: Sequence[float],
              extra_ms: Sequence[float] | None = None, *, gain: float = 0.05
              ) -> list[range] | None:
    """New ranges from each rank's measured stage time, or None when moving blocks would
    not make the slowest stage at least ``gain`` faster (moving blocks costs a KV-cache
    copy, so small drifts are left alone).  Blocks are assumed to cost the same within a
    rank (what one rank's timer can tell); their extra work is taken off first."""
    extra = list(extra_ms) if extra_ms is not None else [0.0] * len(ranges)
    block_ms: list[float] = []
    for r, ms, e in zip(ranges, stage_ms, extra):
        per_block = max(ms - e, 0.0) / len(r)
        block_ms += [per_block] * len(r)
    proposal = partition(block_ms, len(ranges), extra)
    now = max(stage_ms)
    then = max(stage_times(block_ms, proposal, extra))
    if then > now * (1.0 - gain) or list(proposal) == list(ranges):
        return None
    return proposal


def moves(old: Sequence[range], new: Sequence[range]) -> list[tuple[int, int, int]]:
    """(block, from rank, to rank) for every block whose owner changes."""
    owner_old = {b: r for r, blocks in enumerate(old) for b in blocks}
    return [(b, owner_old[b], r) for r, blocks in enumerate(new) for b in blocks
            if owner_old[b] != r]


def pipeline_fps(block_ms: Sequence[float], ranks: int, extra_ms: Sequence[float],
                 transfer_ms: float, frames_per_chunk: int = 4) -> float:
    """The scaling model: output FPS of ``ranks`` pipelined ranks with the best split,
    each stage paying one activation transfer (overlapped with compute when that is faster
    than the stage, hence max, not sum)."""
    ranges = partition(block_ms, ranks, extra_ms)
    stages = stage_times(block_ms, ranges, extra_ms)
    slowest = max(max(s, transfer_ms) for s in stages) if ranks > 1 else stages[0]
    return frames_per_chunk * 1000.0 / slowest
