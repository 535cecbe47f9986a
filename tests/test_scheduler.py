"""The scheduler: per-stream mailboxes (newest frames win) and batch selection."""

from __future__ import annotations

import pytest

from livediffusion.daemon.scheduler import FrameRef, Scheduler


def ref(seq: int, arrived: float | None = None) -> FrameRef:
    if arrived is None:
        return FrameRef(seq=seq, ts=seq * 1000, slot=seq % 4)
    return FrameRef(seq=seq, ts=seq * 1000, slot=seq % 4, arrived=arrived)


def seqs(frames: list[FrameRef]) -> list[int]:
    return [f.seq for f in frames]


def take(sched: Scheduler) -> list[tuple[int, list[int]]]:
    """One batch as [(stream_id, [seq, ...]), ...], without blocking."""
    _, batch = sched.take()
    return [(sid, seqs(frames)) for sid, frames in batch]


# --- mailboxes ------------------------------------------------------------------------

def test_single_frame_stream_is_ready_with_one_frame():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    assert sched.offer(1, ref(1))
    assert take(sched) == [(1, [1])]


def test_offer_beyond_frames_per_step_drops_the_oldest_and_counts_it():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    for seq in (1, 2, 3):
        assert sched.offer(1, ref(seq))
    assert sched.dropped(1) == 2
    assert take(sched) == [(1, [3])]


def test_chunked_stream_keeps_the_newest_frames_in_order():
    sched = Scheduler()
    sched.add_stream(1, "video", 4)
    for seq in range(1, 7):
        sched.offer(1, ref(seq))
    assert sched.dropped(1) == 2
    assert take(sched) == [(1, [3, 4, 5, 6])]


def test_chunked_stream_is_ready_only_with_a_full_chunk():
    sched = Scheduler()
    sched.add_stream(1, "video", 4)
    for seq in (1, 2, 3):
        sched.offer(1, ref(seq))
        assert take(sched) == []
    sched.offer(1, ref(4))
    assert take(sched) == [(1, [1, 2, 3, 4])]
    assert sched.dropped(1) == 0


def test_taken_frames_leave_the_mailbox():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.offer(1, ref(1))
    assert take(sched) == [(1, [1])]
    assert take(sched) == []


def test_frames_per_step_below_one_counts_as_one():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 0)
    sched.offer(1, ref(1))
    assert take(sched) == [(1, [1])]


def test_raising_frames_per_step_waits_for_a_full_chunk():
    sched = Scheduler()
    sched.add_stream(1, "video", 1)
    sched.set_frames_per_step(1, 2)
    sched.offer(1, ref(1))
    assert take(sched) == []
    sched.offer(1, ref(2))
    assert take(sched) == [(1, [1, 2])]


def test_lowering_frames_per_step_keeps_only_the_newest_frames():
    sched = Scheduler()
    sched.add_stream(1, "video", 4)
    for seq in (1, 2, 3, 4):
        sched.offer(1, ref(seq))
    sched.set_frames_per_step(1, 1)
    assert take(sched) == [(1, [4])]


def test_offer_to_an_unknown_stream_is_refused():
    sched = Scheduler()
    assert not sched.offer(5, ref(1))
    assert take(sched) == []


def test_offer_to_a_removed_stream_is_refused_and_its_frames_are_gone():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.offer(1, ref(1))
    sched.remove_stream(1)
    assert not sched.offer(1, ref(2))
    assert take(sched) == []
    assert sched.dropped(1) == 0


def test_removing_an_unknown_stream_is_harmless():
    sched = Scheduler()
    sched.remove_stream(42)
    sched.set_frames_per_step(42, 3)
    assert sched.dropped(42) == 0


# --- take: commands and readiness ------------------------------------------------------------

def test_take_is_empty_while_no_chunk_is_complete():
    sched = Scheduler()
    sched.add_stream(1, "video", 2)
    sched.offer(1, ref(1))  # not a full chunk
    assert not sched.has_work()
    assert sched.take() == ([], [])


def test_take_returns_posted_commands_in_order_once():
    sched = Scheduler()
    sched.post("open 1")
    sched.post("params 1")
    assert sched.has_work()
    assert sched.take() == (["open 1", "params 1"], [])
    assert sched.take() == ([], [])
    assert not sched.has_work()


def test_commands_come_with_the_batch_that_is_ready():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.offer(1, ref(1))
    sched.post("params 1")
    commands, batch = sched.take()
    assert commands == ["params 1"]
    assert [(sid, seqs(frames)) for sid, frames in batch] == [(1, [1])]


def test_commands_are_returned_before_a_batch_is_ready():
    sched = Scheduler()
    sched.add_stream(1, "video", 2)
    sched.offer(1, ref(1))
    sched.post("close 1")
    assert sched.take() == (["close 1"], [])


# --- batch selection ---------------------------------------------------------------------------

def test_earliest_arrived_stream_comes_first():
    sched = Scheduler()
    for sid in (1, 2, 3):
        sched.add_stream(sid, "sd", 1)
    sched.offer(1, ref(10, arrived=300.0))
    sched.offer(2, ref(20, arrived=100.0))
    sched.offer(3, ref(30, arrived=200.0))
    assert take(sched) == [(2, [20]), (3, [30]), (1, [10])]


def test_chunked_streams_are_ordered_by_their_oldest_waiting_frame():
    sched = Scheduler()
    sched.add_stream(1, "video", 2)
    sched.add_stream(2, "video", 2)
    sched.offer(1, ref(1, arrived=10.0))
    sched.offer(2, ref(2, arrived=20.0))
    sched.offer(2, ref(3, arrived=21.0))
    sched.offer(1, ref(4, arrived=30.0))
    assert take(sched) == [(1, [1, 4]), (2, [2, 3])]


def test_max_batch_limits_a_batch_and_leaves_the_rest_waiting():
    sched = Scheduler(max_batch=lambda engine: 2)
    for sid in (1, 2, 3):
        sched.add_stream(sid, "sd", 1)
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1]), (2, [2])]
    assert take(sched) == [(3, [3])]


def test_max_batch_is_asked_per_engine():
    asked: list[str] = []

    def max_batch(engine: str) -> int:
        asked.append(engine)
        return 1

    sched = Scheduler(max_batch=max_batch)
    for sid in (1, 2):
        sched.add_stream(sid, "small", 1)
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1])]
    assert asked == ["small"]


def test_max_batch_below_one_still_serves_one_stream():
    sched = Scheduler(max_batch=lambda engine: 0)
    sched.add_stream(1, "sd", 1)
    sched.offer(1, ref(1))
    assert take(sched) == [(1, [1])]


def test_a_batch_holds_streams_of_one_engine_only():
    sched = Scheduler()
    sched.add_stream(1, "a", 1)
    sched.add_stream(2, "b", 1)
    sched.add_stream(3, "a", 1)
    for sid in (1, 2, 3):
        sched.offer(sid, ref(sid, arrived=float(sid)))
    first, second = take(sched), take(sched)
    assert sorted([first, second]) == [[(1, [1]), (3, [3])], [(2, [2])]]


def test_two_ready_engines_take_turns():
    sched = Scheduler(max_batch=lambda engine: 1)
    sched.add_stream(1, "a", 1)
    sched.add_stream(2, "b", 1)
    engine_of = {1: "a", 2: "b"}
    served = []
    for step in range(6):
        # keep both engines ready all the time
        sched.offer(1, ref(2 * step + 1))
        sched.offer(2, ref(2 * step + 2))
        batch = take(sched)
        assert len(batch) == 1
        served.append(engine_of[batch[0][0]])
    assert served in (["a", "b"] * 3, ["b", "a"] * 3)


def test_an_engine_alone_is_served_every_time():
    sched = Scheduler()
    sched.add_stream(1, "a", 1)
    sched.add_stream(2, "b", 1)
    for seq in range(1, 4):
        sched.offer(1, ref(seq))
        assert take(sched) == [(1, [seq])]
