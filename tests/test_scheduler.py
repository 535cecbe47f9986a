"""The scheduler: mailboxes (newest frames win), plans, fair rates, admission, and the
previous round-robin policy kept for comparison."""

from __future__ import annotations

import math

import pytest

from livediffusion.daemon.costs import CostModel
from livediffusion.daemon.scheduler import Refused, Scheduler
from livediffusion.daemon.step import FrameRef, StepResult, StreamReport


def ref(seq: int, arrived: float | None = None) -> FrameRef:
    if arrived is None:
        return FrameRef(seq=seq, ts=seq * 1000, slot=seq % 4)
    return FrameRef(seq=seq, ts=seq * 1000, slot=seq % 4, arrived=arrived)


def complete(sched: Scheduler, plan, ms: float = 10.0, frames_per_step=None) -> None:
    """The worker's answer to a plan: every stream served, in ``ms``."""
    reports = [StreamReport(i.stream_id, frames_in=len(i.frames),
                            frames_per_step=(frames_per_step or {}).get(i.stream_id,
                                                                        len(i.frames)))
               for i in plan.items]
    sched.update_from_result(StepResult(plan.step_id, plan.engine, plan.key, len(plan.items),
                                        reports, 0.0, ms))


def take(sched: Scheduler, engines=None) -> list[tuple[int, list[int]]]:
    """One plan as [(stream_id, [seq, ...]), ...], completed at once."""
    plan = sched.next_plan(engines)
    if plan is None:
        return []
    got = [(i.stream_id, [f.seq for f in i.frames]) for i in plan.items]
    complete(sched, plan)
    return got


# --- mailboxes ------------------------------------------------------------------------------

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
    sched.set_frames_per_step(1, 4)
    for seq in (1, 2, 3):
        sched.offer(1, ref(seq))
    assert take(sched) == []
    sched.offer(1, ref(4))
    assert take(sched) == [(1, [1, 2, 3, 4])]


def test_lowering_frames_per_step_keeps_only_the_newest_frames():
    sched = Scheduler()
    sched.add_stream(1, "video", 4)
    for seq in (1, 2, 3):
        sched.offer(1, ref(seq))
    sched.set_frames_per_step(1, 1)
    assert sched.dropped(1) == 2
    assert take(sched) == [(1, [3])]


def test_the_engines_next_frames_per_step_comes_back_with_the_result():
    """A chunked engine's first step takes one frame, the next ones four: the result says so
    and the mailbox follows, with no back-reference to the engine."""
    sched = Scheduler()
    sched.add_stream(1, "video", 1)
    sched.offer(1, ref(1))
    plan = sched.next_plan()
    complete(sched, plan, frames_per_step={1: 4})
    for seq in (2, 3, 4):
        sched.offer(1, ref(seq))
    assert take(sched) == []
    sched.offer(1, ref(5))
    assert take(sched) == [(1, [2, 3, 4, 5])]


def test_offer_to_an_unknown_stream_is_refused():
    sched = Scheduler()
    assert not sched.offer(9, ref(1))


def test_offer_to_a_removed_stream_is_refused_and_its_frames_are_gone():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.offer(1, ref(1))
    sched.remove_stream(1)
    assert not sched.offer(1, ref(2))
    assert take(sched) == []


def test_removing_an_unknown_stream_is_harmless():
    Scheduler().remove_stream(42)


# --- plans ----------------------------------------------------------------------------------

def test_a_stream_is_in_one_plan_at_a_time():
    """Until its step comes back, a stream's next frames wait (a chunk's order and the
    engine's per-stream state depend on it)."""
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.offer(1, ref(1))
    plan = sched.next_plan()
    sched.offer(1, ref(2))
    assert sched.next_plan() is None and not sched.has_work()
    complete(sched, plan)
    assert take(sched) == [(1, [2])]


def test_a_plan_carries_its_key_deadline_and_prediction():
    sched = Scheduler()
    sched.costs.observe(("video", 64, 48), 1, 20.0)
    sched.add_stream(1, "video", 1, key=("video", 64, 48), fps=30.0)
    sched.offer(1, ref(1, arrived=100.0))
    plan = sched.next_plan()
    assert plan.key == ("video", 64, 48) and plan.engine == "video" and plan.batch_size == 1
    assert plan.deadline == pytest.approx(100.0 + 1 / 30.0)
    assert plan.predicted_ms == 20.0


def test_plans_are_only_for_the_asking_workers_engines():
    sched = Scheduler()
    sched.add_stream(1, "passthrough", 1)
    sched.add_stream(2, "video", 1)
    sched.offer(1, ref(1))
    sched.offer(2, ref(2))
    assert take(sched, engines=("video",)) == [(2, [2])]
    assert take(sched, engines=("video",)) == []
    assert take(sched, engines=("passthrough",)) == [(1, [1])]


def test_earliest_deadline_first():
    sched = Scheduler(max_batch=lambda engine: 1)
    for sid in (1, 2, 3):
        sched.add_stream(sid, "sd", 1, key=("sd", sid))
    sched.offer(1, ref(10, arrived=300.0))
    sched.offer(2, ref(20, arrived=100.0))
    sched.offer(3, ref(30, arrived=200.0))
    assert [take(sched) for _ in range(3)] == [[(2, [20])], [(3, [30])], [(1, [10])]]


def test_a_slower_stream_has_a_later_deadline():
    """Deadline = oldest waiting frame + the stream's chunk period: at equal arrival, a
    10 FPS stream can wait longer than a 30 FPS one."""
    sched = Scheduler(max_batch=lambda engine: 1)
    sched.add_stream(1, "sd", 1, key=("sd", 1), fps=10.0)
    sched.add_stream(2, "sd", 1, key=("sd", 2), fps=30.0)
    sched.offer(1, ref(1, arrived=100.0))
    sched.offer(2, ref(2, arrived=100.02))
    assert take(sched) == [(2, [2])]


def test_streams_of_one_batch_key_share_a_step_and_others_wait():
    sched = Scheduler()
    sched.add_stream(1, "video", 1, key=("video", 64, 48))
    sched.add_stream(2, "video", 1, key=("video", 96, 64))
    sched.add_stream(3, "video", 1, key=("video", 64, 48))
    for sid in (1, 2, 3):
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1]), (3, [3])]
    assert take(sched) == [(2, [2])]


def test_max_batch_limits_a_step_and_leaves_the_rest_waiting():
    sched = Scheduler(max_batch=lambda engine: 2)
    for sid in (1, 2, 3):
        sched.add_stream(sid, "sd", 1)
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1]), (2, [2])]
    assert take(sched) == [(3, [3])]


def test_batch_sizes_round_down_to_a_warmed_shape():
    """Only batch shapes compiled at warm-up are used: 3 ready streams with shapes {1, 2, 4}
    run as 2 now and 1 next (the latest deadline waits)."""
    sched = Scheduler(max_batch=lambda engine: 4, batch_sizes=lambda engine: [1, 2, 4])
    for sid in (1, 2, 3):
        sched.add_stream(sid, "video", 1)
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1]), (2, [2])]
    assert take(sched) == [(3, [3])]


def test_max_batch_below_one_still_serves_one_stream():
    sched = Scheduler(max_batch=lambda engine: 0)
    sched.add_stream(1, "sd", 1)
    sched.offer(1, ref(1))
    assert take(sched) == [(1, [1])]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="edf, rr"):
        Scheduler(policy="fifo")


# --- the previous policy ("rr"), kept for comparison ------------------------------------------

def test_rr_two_ready_engines_take_turns():
    sched = Scheduler(max_batch=lambda engine: 1, policy="rr")
    sched.add_stream(1, "a", 1)
    sched.add_stream(2, "b", 1)
    engine_of = {1: "a", 2: "b"}
    served = []
    for step in range(6):
        sched.offer(1, ref(2 * step + 1))
        sched.offer(2, ref(2 * step + 2))
        batch = take(sched)
        assert len(batch) == 1
        served.append(engine_of[batch[0][0]])
    assert served in (["a", "b"] * 3, ["b", "a"] * 3)


def test_rr_batches_every_ready_stream_of_an_engine_whatever_its_size():
    sched = Scheduler(policy="rr")
    sched.add_stream(1, "video", 1, key=("video", 64, 48))
    sched.add_stream(2, "video", 1, key=("video", 96, 64))
    for sid in (1, 2):
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1]), (2, [2])]


def test_rr_has_no_rates_and_admits_everything():
    sched = Scheduler(policy="rr")
    sched.costs.observe(("video",), 1, 1000.0)
    sched.add_stream(1, "video", 1, fps=30.0, min_fps=30.0)
    assert sched.admit("video", ("video",), 30.0, 30.0) == 30.0
    for seq in range(1, 10):
        sched.offer(1, ref(seq, arrived=seq / 30.0))
    assert sched.info(1)["decimated"] == 0


# --- cost model -----------------------------------------------------------------------------

def test_cost_model_averages_and_forgets_compilation():
    costs = CostModel()
    costs.observe(("v",), 1, 5000.0)   # the first step compiled kernels
    costs.observe(("v",), 1, 50.0)
    assert costs.predict(("v",), 1) == 50.0
    for _ in range(30):
        costs.observe(("v",), 1, 60.0)
    assert costs.predict(("v",), 1) == pytest.approx(60.0, rel=0.01)


def test_cost_model_predicts_other_batch_sizes_from_a_line():
    costs = CostModel()
    assert costs.predict(("v",), 2) == 0.0
    costs.observe(("v",), 1, 100.0)
    assert costs.predict(("v",), 3) == 300.0  # one point: no amortisation assumed
    costs.observe(("v",), 2, 160.0)
    assert costs.predict(("v",), 4) == pytest.approx(280.0)   # 100 + 60 per extra stream
    assert costs.per_stream_ms(("v",), 4) == pytest.approx(70.0)


# --- fair rates -----------------------------------------------------------------------------

def overloaded(n: int, policy: str = "edf") -> Scheduler:
    """n streams of 30 FPS, 4 frames a step, one step of k streams = 40 + 60 k ms."""
    sched = Scheduler(max_batch=lambda engine: 4, policy=policy, utilisation=0.9,
                      clock=lambda: 0.0)
    for k in (1, 2, 3, 4):
        sched.costs.observe(("video", 64, 48), k, 40.0 + 60.0 * k)
    for sid in range(1, n + 1):
        sched.add_stream(sid, "video", 4, key=("video", 64, 48), fps=30.0, steady_frames=4)
    return sched


def test_a_stream_the_device_keeps_up_with_gets_every_frame():
    sched = overloaded(1)   # one stream needs 7.5 steps/s of 100 ms: 75% of the device
    assert math.isinf(sched._boxes[1].serve_fps)
    assert sched.info(1)["serve_fps"] == 30.0


def test_overload_gives_every_stream_the_same_fair_rate():
    sched = overloaded(4)   # 4 streams in one step of 280 ms: 0.9 / 0.28 * 4 = 12.9 FPS
    rates = [sched.info(sid)["serve_fps"] for sid in (1, 2, 3, 4)]
    assert max(rates) - min(rates) < 1e-6
    assert rates[0] == pytest.approx(0.9 / 0.280 * 4, rel=0.01)


def test_fair_share_caps_a_stream_that_wants_less():
    """Max-min fairness: a 5 FPS stream keeps its 5, the others share the rest."""
    sched = overloaded(3)
    sched.add_stream(9, "video", 4, key=("video", 64, 48), fps=5.0, steady_frames=4)
    assert sched.info(9)["serve_fps"] == 5.0
    others = [sched.info(sid)["serve_fps"] for sid in (1, 2, 3)]
    assert len(set(others)) == 1 and 5.0 < others[0] < 30.0


def test_decimation_spreads_the_kept_frames_evenly():
    """At 12.9 of 30 FPS every 2nd or 3rd frame is kept, never a burst of neighbours."""
    sched = overloaded(4)
    box = sched._boxes[1]
    kept = [seq for seq in range(1, 301) if (sched.offer(1, ref(seq, arrived=seq / 30.0)),
                                              box.frames and box.frames[-1].seq == seq)[1]]
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {2, 3}
    assert len(kept) / 10.0 == pytest.approx(box.serve_fps, rel=0.05)
    assert sched.info(1)["decimated"] == 300 - len(kept)


def test_the_last_frame_a_rate_limited_stream_sends_is_served_after_all():
    """A frame the rate limit skipped is served if nothing newer comes within a serve
    period (the client paused or stopped): its newest frame is never left unanswered."""
    now = [0.0]
    sched = Scheduler(max_batch=lambda engine: 1, utilisation=0.9, clock=lambda: now[0])
    sched.costs.observe(("image",), 1, 100.0)      # 9 FPS of the 30 sent
    sched.add_stream(1, "image", 1, key=("image",), fps=30.0)
    box = sched._boxes[1]
    served = []
    for seq in range(1, 31):
        now[0] = seq / 30.0
        sched.offer(1, ref(seq, arrived=now[0]))
        plan = sched.next_plan()
        if plan is not None:
            served.append(plan.items[0].frames[0].seq)
            complete(sched, plan, ms=100.0)
    assert box.skipped is not None and served[-1] != 30     # the last one was skipped
    decimated = sched.info(1)["decimated"]
    now[0] += 0.5 / box.serve_fps          # not yet a whole serve period
    assert sched.next_plan() is None
    now[0] += 1.0 / box.serve_fps
    plan = sched.next_plan()
    assert [f.seq for f in plan.items[0].frames] == [30]
    assert sched.info(1)["decimated"] == decimated - 1 and box.skipped is None


def test_the_measured_input_rate_counts_not_the_declared_one():
    """A client that declares 30 FPS but sends 10 is served at the 10 it sends."""
    sched = overloaded(1)
    for seq in range(1, 40):
        sched.offer(1, ref(seq, arrived=seq / 10.0))
    assert sched.info(1)["input_fps"] == pytest.approx(10.0, rel=0.02)


def simulate(sched: Scheduler, n: int, seconds: float, cost=lambda k: 40.0 + 60.0 * k):
    """Streams sending 30 FPS and one worker whose step of k streams takes cost(k) ms, in
    simulated time; returns frames served per stream."""
    served = {sid: 0 for sid in range(1, n + 1)}
    t, next_frame, seq = 0.0, 0.0, 0
    busy_until, plan = 0.0, None
    while t < seconds:
        t = min(next_frame, busy_until if plan is not None else math.inf)
        if plan is not None and t >= busy_until:
            complete(sched, plan, ms=cost(plan.batch_size), frames_per_step={
                i.stream_id: 4 for i in plan.items})
            for item in plan.items:
                served[item.stream_id] += len(item.frames)
            plan = None
        if t >= next_frame:
            seq += 1
            for sid in served:
                sched.offer(sid, ref(seq, arrived=t + sid * 0.003))
            next_frame += 1 / 30.0
        if plan is None:
            plan = sched.next_plan()
            if plan is not None:
                busy_until = t + cost(plan.batch_size) / 1000.0
    return served


def test_overloaded_streams_are_served_fairly_and_none_starves():
    sched = overloaded(4)
    served = simulate(sched, 4, 20.0)
    rates = [v / 20.0 for v in served.values()]
    mean = sum(rates) / len(rates)
    assert min(rates) >= 0.85 * mean and max(rates) <= 1.15 * mean
    assert sum(rates) >= 40.0  # the batches formed: one-stream steps would give 30


# --- admission ------------------------------------------------------------------------------

def test_a_stream_that_would_break_the_others_is_refused_with_what_it_could_have():
    sched = overloaded(4)
    for sid in (1, 2, 3, 4):
        sched._boxes[sid].min_fps = 12.0
    with pytest.raises(Refused) as refused:
        sched.admit("video", ("video", 64, 48), 30.0, 1.0)
    assert 0 <= refused.value.sustainable_fps < 12.0
    assert "could have" in str(refused.value)


def test_a_stream_is_accepted_at_a_lower_rate_when_the_others_keep_theirs():
    sched = overloaded(2)
    rate = sched.admit("video", ("video", 64, 48), 30.0, 5.0)
    assert 5.0 <= rate < 30.0


def test_its_own_minimum_counts_only_when_the_client_names_one():
    sched = overloaded(4)
    with pytest.raises(Refused):
        sched.admit("video", ("video", 64, 48), 30.0, 29.0, explicit=True)
    assert sched.admit("video", ("video", 64, 48), 30.0, 29.0, explicit=False) > 0


def test_unknown_costs_admit():
    sched = Scheduler()
    assert sched.admit("video", ("video", 8, 8), 30.0, 30.0) == 30.0


def test_floors_are_kept_before_the_rest_is_shared():
    """One-frame steps of 60 ms, no batching: the device gives 15 FPS in all.  A stream that
    asked for at least 10 keeps 10; a newcomer that accepts 4 gets the 5 left, not an equal
    7.5 that would break the first one's floor."""
    sched = Scheduler(max_batch=lambda engine: 1, clock=lambda: 0.0)
    sched.costs.observe(("sleepy",), 1, 60.0)
    sched.add_stream(1, "sleepy", 1, key=("sleepy",), fps=30.0, min_fps=10.0)
    assert sched.info(1)["serve_fps"] == pytest.approx(15.0, rel=0.01)
    assert sched.admit("sleepy", ("sleepy",), 30.0, 4.0) == pytest.approx(5.0, rel=0.01)
    with pytest.raises(Refused) as refused:
        sched.admit("sleepy", ("sleepy",), 30.0, 6.0)
    assert refused.value.sustainable_fps == pytest.approx(5.0, rel=0.01)
    sched.add_stream(2, "sleepy", 1, key=("sleepy",), fps=30.0, min_fps=4.0)
    assert sched.info(1)["serve_fps"] == pytest.approx(10.0, rel=0.01)
    assert sched.info(2)["serve_fps"] == pytest.approx(5.0, rel=0.01)


def test_the_batch_size_is_the_cheapest_per_stream_by_the_cost_model():
    """Batching is chosen when it saves device time per stream, not by default: with the
    costs measured on an H200 before the multi-stream graphs (one stream 90 ms, four 399 ms)
    four ready streams go one at a time; with amortising costs, together."""
    sched = Scheduler(max_batch=lambda engine: 4)
    for n, ms in ((1, 90.0), (2, 219.0), (3, 293.0), (4, 399.0)):
        sched.costs.observe(("video", 832, 480), n, ms)
    for sid in (1, 2, 3, 4):
        sched.add_stream(sid, "video", 1, key=("video", 832, 480))
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert [len(take(sched)) for _ in range(4)] == [1, 1, 1, 1]
    cheap = Scheduler(max_batch=lambda engine: 4)
    for n in (1, 2, 3, 4):
        cheap.costs.observe(("video", 832, 480), n, 60.0 + 30.0 * n)
    for sid in (1, 2, 3, 4):
        cheap.add_stream(sid, "video", 1, key=("video", 832, 480))
        cheap.offer(sid, ref(sid, arrived=float(sid)))
    assert len(take(cheap)) == 4


def test_floors_the_device_cannot_meet_give_way_to_plain_fair_shares():
    """Streams admitted before any cost was known can ask for more than the device gives:
    the plan then shares what there is instead of promising every floor."""
    sched = Scheduler(max_batch=lambda engine: 1, clock=lambda: 0.0)
    for sid in (1, 2):
        sched.add_stream(sid, "sleepy", 1, key=("sleepy",), fps=30.0, min_fps=20.0)
    sched.costs.observe(("sleepy",), 1, 60.0)   # 15 FPS in all
    sched._allocate()
    rates = [sched.info(sid)["serve_fps"] for sid in (1, 2)]
    assert rates[0] == rates[1] == pytest.approx(7.5, rel=0.01)


def test_a_stream_whose_cost_changes_moves_to_its_own_key():
    """A live steps change makes the stream's steps cost something else: it leaves the
    batch key (and cost entry) of the streams it shared steps with."""
    sched = Scheduler()
    old, new = ("video", 64, 48, 2, "vae", True), ("video", 64, 48, 1, "vae", True)
    for sid in (1, 2):
        sched.add_stream(sid, "video", 1, key=old)
    sched.set_key(2, new)
    for sid in (1, 2):
        sched.offer(sid, ref(sid, arrived=float(sid)))
    assert take(sched) == [(1, [1])]
    assert take(sched) == [(2, [2])]


def test_batch_keys_carry_the_parameters_that_change_the_cost():
    from livediffusion.daemon.step import batch_key
    caps = {"params": {"steps": 2, "decoder": "vae", "prompt": "x"},
            "cost_params": ["steps", "decoder"]}
    assert batch_key("video", 64, 48, caps) == ("video", 64, 48, 2, "vae")
    assert batch_key("video", 64, 48, caps, {"steps": 1, "prompt": "y"}) == \
        ("video", 64, 48, 1, "vae")
    assert batch_key("passthrough", 8, 8, {"params": {"mode": []}}) == ("passthrough", 8, 8)
