"""The playout clock: output leaves at the cadence its input arrived."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from livediffusion.daemon.playout import Playout

PERIOD = 1 / 30.0


@dataclass
class F:
    in_seq: int
    arrived: float


def release(playout: Playout, until: float, step: float = 0.001) -> list[tuple[float, int]]:
    """Ask for due frames every millisecond (a front's poll loop); (time, in_seq) of each."""
    out, t = [], 0.0
    while t <= until:
        out += [(t, f.in_seq) for f in playout.due(t, tolerance=0.0)]
        t = round(t + step, 6)
    return out


def chunked_stream(playout: Playout, chunks: int, step_s: float = 0.05) -> None:
    """Frames arrive at 30 FPS; each chunk of 4 is ready step_s after its last frame."""
    for c in range(chunks):
        frames = [F(4 * c + i, (4 * c + i) * PERIOD) for i in range(4)]
        ready = frames[-1].arrived + step_s
        for f in frames:
            playout.push(f, ready)


def test_a_chunk_ready_at_once_leaves_one_input_period_apart():
    playout = Playout()
    chunked_stream(playout, 8)
    out = release(playout, 3.0)
    assert [seq for _, seq in out] == list(range(32))   # every frame, in order
    gaps = [b - a for (a, _), (b, _) in zip(out[4:], out[5:])]  # once the delay settled
    assert max(gaps) == pytest.approx(PERIOD, abs=0.002)
    assert min(gaps) == pytest.approx(PERIOD, abs=0.002)


def test_the_delay_is_what_the_oldest_frame_of_a_chunk_needs():
    playout = Playout()
    chunked_stream(playout, 8, step_s=0.05)
    # the first frame of a chunk waits for the other three (3 periods) and the step
    assert playout.delay == pytest.approx(3 * PERIOD + 0.05 + playout.margin, abs=1e-6)


def test_a_late_frame_leaves_at_once_and_the_delay_jumps_without_reordering():
    playout = Playout()
    chunked_stream(playout, 4, step_s=0.05)
    before = playout.delay
    late = F(100, 16 * PERIOD)
    playout.push(late, late.arrived + 0.4)            # the engine stalled 0.4 s
    assert playout.late == 1 and playout.delay == pytest.approx(0.4 + playout.margin)
    following = F(101, 17 * PERIOD)
    playout.push(following, following.arrived + 0.1)
    dues = [p.due for p in playout.queue]
    assert dues == sorted(dues)                         # never out of order
    assert playout.queue[-1].due - playout.queue[-2].due == pytest.approx(PERIOD)
    assert before < playout.delay


def test_the_delay_glides_down_slowly_after_a_stall():
    playout = Playout()
    playout.push(F(0, 0.0), 0.5)                        # a slow first frame: delay 0.5
    delays = []
    for k in range(1, 200):
        playout.push(F(k, k * PERIOD), k * PERIOD + 0.02)
        delays.append(playout.delay)
    steps = [a - b for a, b in zip(delays, delays[1:])]
    assert max(steps) <= playout.glide + 1e-9           # never a jump down
    assert delays[-1] < 0.05                            # but it is down within ~6 s


def test_unpaced_streams_get_every_frame_as_soon_as_it_is_ready():
    playout = Playout(paced=False)
    chunked_stream(playout, 2)
    ready = 3 * PERIOD + 0.05
    assert [seq for t, seq in release(playout, 0.5) if t <= ready + 0.001] == [0, 1, 2, 3]


def test_a_backlog_beyond_max_pending_leaves_early_rather_than_piling_up():
    playout = Playout(max_pending=4)
    for k in range(10):
        playout.push(F(k, 0.0), 0.0 + k * 1e-4)
    early = playout.due(-1.0)
    assert [f.in_seq for f in early] == list(range(6)) and len(playout.queue) == 4
