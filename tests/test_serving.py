"""Serving many streams through a real daemon: paced delivery, fairness, admission, and
nobody held back by anybody else (real sockets, real shared memory, real client)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from livediffusion.daemon.config import ServeConfig
from livediffusion.daemon.engines import REGISTRY
from livediffusion.daemon.engines.passthrough import PassthroughEngine
from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client, DaemonError

from helpers import Raw, daemon_stat, rgb, round_trip, wait_until


def drive(client: Client, streams, seconds: float, fps: float = 30.0, poll_hz: float = 200.0,
          size=(64, 64), paused=()):
    """Hosts sending at ``fps`` and reading latest() at ``poll_hz``; returns, per stream,
    the (time, seq) of every distinct frame seen."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    seen = {s.name: [] for s in streams}
    start = time.monotonic()
    next_send = start
    while (now := time.monotonic()) - start < seconds:
        if now >= next_send:
            for s in streams:
                s.send(frame)
            next_send += 1.0 / fps
        for s in streams:
            if s.name in paused:
                continue
            f = s.latest()
            if f is not None and (not seen[s.name] or seen[s.name][-1][1] != f.seq):
                seen[s.name].append((now, f.seq))
        time.sleep(max(0.0, min(next_send, now + 1.0 / poll_hz) - time.monotonic()))
    return seen


def distinct_fps(times: list[tuple[float, int]], start: float, end: float) -> float:
    return sum(start <= t <= end for t, _ in times) / (end - start)


# --- pacing -----------------------------------------------------------------------------

def test_a_polling_host_sees_every_frame_of_a_chunked_engine_once():
    """The video engine finishes 4 frames at once; paced, a host reading the newest frame
    sees them one input period apart (about the engine's output rate), not 1 in 4."""
    daemon = Daemon(port=0, engines=("video-tiny",)).start(timeout=60)
    try:
        with Client(daemon.endpoint) as c:
            paced = c.open_stream("paced", 64, 64, engine="video-tiny", timeout=60)
            burst = c.open_stream("burst", 64, 64, engine="video-tiny", paced=False,
                                  timeout=60)
            seen = drive(c, [paced, burst], 6.0)
            stats = {name: c.stats()[name]["daemon"] for name in ("paced", "burst")}
        t0 = seen["paced"][0][0] + 2.0  # past the first chunks
        t1 = time.monotonic() - 0.2
        out_rate = {n: stats[n]["frames_out"] / (t1 - seen[n][0][0] + 2.0) for n in stats}
        got = {n: distinct_fps(seen[n], t0, t1) for n in seen}
        assert stats["paced"]["paced"] and not stats["burst"]["paced"]
        # every frame the daemon published reached the host (within 10%)...
        assert got["paced"] >= 0.9 * out_rate["paced"], (got, out_rate)
        # ...while unpaced the host sees about one frame per chunk
        assert got["burst"] <= 0.5 * out_rate["burst"], (got, out_rate)
        assert got["paced"] >= 2.5 * got["burst"]
    finally:
        daemon.stop()


def test_paced_frames_keep_their_order_and_a_steady_latency():
    daemon = Daemon(port=0, engines=("video-tiny",)).start(timeout=60)
    try:
        with Client(daemon.endpoint) as c:
            s = c.open_stream("v", 64, 64, engine="video-tiny", timeout=60)
            seen = drive(c, [s], 5.0)["v"]
            p50, p99 = s.latency.percentile(50), s.latency.percentile(99)
        seqs = [seq for _, seq in seen]
        assert seqs == sorted(seqs)
        # the delay is one chunk period plus the step; jitter stays small beside it
        assert p99 <= 1.5 * p50, (p50, p99)
    finally:
        daemon.stop()


# --- nobody holds anybody back -----------------------------------------------------------

class SleepyEngine(PassthroughEngine):
    """Frames back after a fixed step time, as a GPU engine would (not a front engine:
    it runs on the engine thread); a step of n streams takes 20 + 10 n ms."""

    name = "sleepy"
    borrows_input = False

    def max_batch(self) -> int:
        return 4

    def submit(self, batch):
        time.sleep(0.020 + 0.010 * len(batch))
        return super().submit(batch)


class ChunkyEngine(SleepyEngine):
    """Takes chunks of 4 frames per step, as the video engine does, and answers the chunk's
    last frame (a step of n streams: 100 + 30 n ms)."""

    name = "chunky"

    def capabilities(self):
        return {**super().capabilities(), "frames_per_step": 4}

    def frames_per_step(self, stream_id: int) -> int:
        return 4

    def submit(self, batch):
        time.sleep(0.100 + 0.030 * len(batch))
        return PassthroughEngine.submit(self, batch)


@pytest.fixture
def sleepy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "sleepy", (lambda device: SleepyEngine(device), "test"))
    monkeypatch.setitem(REGISTRY, "chunky", (lambda device: ChunkyEngine(device), "test"))
    daemon = Daemon(port=0, engines=("sleepy", "chunky", "passthrough"),
                    heartbeat_timeout=2.0).start()
    yield daemon
    daemon.stop()


def test_overloaded_streams_share_the_device_fairly(sleepy):
    """Four 30 FPS streams need 30 steps/s of 60 ms together: about twice what the device
    gives.  Each gets the same fair share (within 15%), none starves, and the batches
    form (more than one stream per step)."""
    with Client(sleepy.endpoint) as c:
        streams = [c.open_stream(f"s{k}", 64, 64, engine="sleepy") for k in range(4)]
        seen = drive(c, streams, 5.0)
        rates = [distinct_fps(v, v[0][0] + 1.5, v[-1][0]) for v in seen.values() if v]
        stats = [c.stats()[f"s{k}"]["daemon"] for k in range(4)]
    assert len(rates) == 4
    mean = sum(rates) / 4
    assert min(rates) >= 0.85 * mean and max(rates) <= 1.15 * mean, rates
    assert mean >= 5.0
    assert all(s["serve_fps"] < 30.0 and s["decimated"] > 0 for s in stats)
    # 4 streams at one step each would be 4 x 30 ms per round: batching beats it
    assert sum(rates) > 1000.0 / 30.0 * 1.2


def test_a_chunked_stream_served_below_its_rate_loses_no_chunk(sleepy):
    """Served at a fair share below 30 FPS, a stream's 4-frame chunk spans more input frames
    than its input ring holds: the daemon takes each kept frame out of its slot at once, so
    no chunk arrives torn (before, every chunk did and such streams showed nothing)."""
    with Client(sleepy.endpoint) as c:
        streams = [c.open_stream(f"c{k}", 64, 64, engine="chunky") for k in range(3)]
        seen = drive(c, streams, 4.0)
        stats = [c.stats()[f"c{k}"]["daemon"] for k in range(3)]
    assert all(s["serve_fps"] < 20.0 and s["decimated"] > 0 for s in stats), stats
    assert all(s["torn"] == 0 for s in stats), stats
    assert all(len(v) >= 10 for v in seen.values()), {k: len(v) for k, v in seen.items()}


def test_admission_refuses_with_the_rate_it_could_give(sleepy):
    with Client(sleepy.endpoint) as c:
        first = c.open_stream("first", 64, 64, engine="sleepy", min_fps=25.0)
        drive(c, [first], 1.5)   # the cost model measures the engine meanwhile
        with pytest.raises(DaemonError) as refused:
            c.open_stream("second", 64, 64, engine="sleepy", min_fps=25.0)
        assert refused.value.code == "overloaded"
        assert refused.value.sustainable_fps is not None
        assert 0 <= refused.value.sustainable_fps < 25.0
        assert "could have" in refused.value.message
        # asking for less is accepted, at a lower rate than it sends
        second = c.open_stream("second", 64, 64, engine="sleepy", min_fps=1.0)
        assert second.serve_fps is not None and second.serve_fps < 30.0
        assert first.ready


@pytest.mark.parametrize("fields,code", [({"fps": 0}, "bad_spec"), ({"fps": -5}, "bad_spec"),
                                         ({"fps": 1e9}, "bad_spec"),
                                         ({"fps": 30, "min_fps": 31}, "bad_spec"),
                                         ({"fps": 30, "min_fps": -1}, "bad_spec"),
                                         ({"paced": "yes"}, "bad_message")])
def test_impossible_rates_are_a_clear_error(sleepy, fields, code):
    raw = Raw(sleepy.endpoint)
    try:
        raw.hello()
        raw.send({"type": "open", "id": 2, "name": "x", "width": 64, "height": 64,
                  "engine": "sleepy", **fields})
        reply = raw.recv_type("error")
        assert reply["code"] == code and reply["message"]
    finally:
        raw.close()


def test_a_host_that_stops_reading_holds_nobody_back(sleepy):
    with Client(sleepy.endpoint) as c, Client(sleepy.endpoint, name="frozen") as frozen:
        # chunked, so both are paced: the frozen host's frames wait in the playout queue
        mine = c.open_stream("mine", 64, 64, engine="chunky")
        theirs = frozen.open_stream("theirs", 64, 64, engine="chunky")
        frame = rgb(64, 64, seed=3)
        # "frozen" sends a burst and then neither reads nor sends for 3 s
        for _ in range(20):
            theirs.send(frame)
        seen = drive(c, [mine], 3.0)["mine"]
        # the chunky fake answers one frame per 4-frame step: about 6 a second at most here
        assert distinct_fps(seen, seen[0][0] + 1.0, seen[-1][0]) >= 3.5
        assert theirs.latest() is not None  # and it finds its newest frame when it looks


def test_a_stream_opening_meanwhile_does_not_stall_a_running_one(sleepy):
    with Client(sleepy.endpoint) as c:
        running = c.open_stream("running", 64, 64, engine="sleepy")
        drive(c, [running], 0.5)
        opened_at = time.monotonic()
        with Client(sleepy.endpoint, name="late") as other:
            other.open_stream("late", 64, 64, engine="sleepy")
            seen = drive(c, [running], 1.5)["running"]
        gaps = [b - a for (a, _), (b, _) in zip(seen, seen[1:])]
        assert seen[0][0] - opened_at < 0.3 and max(gaps) < 0.3, max(gaps)


def test_an_uncovered_frame_size_is_served_with_one_log_line(sleepy, caplog):
    with caplog.at_level(logging.INFO, logger="livediffusion.daemon"):
        with Client(sleepy.endpoint) as c:
            s = c.open_stream("odd", 80, 48, engine="sleepy")
            for seed in range(3):
                round_trip(s, rgb(48, 80, seed=seed))
    lines = [r for r in caplog.records if "no warm-up covered" in r.getMessage()]
    assert len(lines) == 1 and "80x48" in lines[0].getMessage()


def test_the_rr_policy_and_unpaced_delivery_are_still_there():
    daemon = Daemon(port=0, engines=("passthrough",),
                    serve=ServeConfig(policy="rr", pacing=False)).start()
    try:
        with Client(daemon.endpoint) as c:
            s = c.open_stream("p", 64, 48)
            frame = rgb(seed=4)
            assert np.array_equal(round_trip(s, frame).pixels, frame)
            assert c.stats()["p"]["daemon"]["paced"] is False
            assert wait_until(lambda: daemon_stat(daemon, s.id, "frames_out") == 1)
    finally:
        daemon.stop()


class BrittleEngine(SleepyEngine):
    """Fails a whole step when any frame of it starts with the value 13."""

    name = "brittle"

    def submit(self, batch):
        if any(item.frames[-1].pixels[0, 0, 0] == 13 for item in batch):
            raise RuntimeError("simulated failure mid-batch")
        return super().submit(batch)


def test_a_step_that_fails_mid_batch_loses_only_that_step(monkeypatch):
    """A failed step of several streams: each of them gets one error and carries on with
    its next frame; a stream of another engine never notices."""
    monkeypatch.setitem(REGISTRY, "brittle", (lambda device: BrittleEngine(device), "test"))
    daemon = Daemon(port=0, engines=("brittle", "passthrough")).start()
    try:
        with Client(daemon.endpoint) as c:
            streams = [c.open_stream(f"b{k}", 64, 48, engine="brittle") for k in range(3)]
            other = c.open_stream("other", 64, 48)
            poison = np.full((48, 64, 3), 13, np.uint8)
            for s in streams:
                s.send(poison)
            assert wait_until(lambda: (c.poll(0.02), all(s.last_error for s in streams))[1])
            assert {s.last_error.code for s in streams} == {"engine_error"}
            frame = rgb(seed=7)
            assert np.array_equal(round_trip(other, frame).pixels, frame)
            for s in streams:
                assert np.array_equal(round_trip(s, frame).pixels, frame)
    finally:
        daemon.stop()


def test_a_prompt_change_never_freezes_the_stream(monkeypatch):
    """With a text encoder that takes a whole second (umT5-XXL visiting a small card takes
    about 0.4 s), a re-prompted video stream keeps its cadence on its old prompt and the new
    one applies once encoded; encoded on the step's path it froze the stream for the encode."""
    from livediffusion.daemon.engines.video.engine import VideoEngine

    real = VideoEngine._encode_text
    encodes = []

    def slow(self, text):
        encodes.append(text)
        if text.startswith("slow"):
            time.sleep(1.0)
        return real(self, text)

    monkeypatch.setattr(VideoEngine, "_encode_text", slow)
    daemon = Daemon(port=0, engines=("video-tiny",)).start(timeout=60)
    try:
        with Client(daemon.endpoint) as c:
            s = c.open_stream("v", 64, 64, engine="video-tiny", timeout=60)
            drive(c, [s], 1.5)
            s.update(prompt="slow: a harbour at dusk")
            changed = time.monotonic()
            seen = drive(c, [s], 2.5)["v"]
        after = [t for t, _ in seen if t >= changed]
        gaps = [b - a for a, b in zip([changed] + after, after)]
        assert "slow: a harbour at dusk" in encodes
        assert len(after) >= 30 and max(gaps) < 0.5, max(gaps)
    finally:
        daemon.stop()
