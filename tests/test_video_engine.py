"""The video engine on the tiny preset: schedules, live parameters, memory, transport."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediffusion.daemon.engines.base import InputFrame, ParamError, StreamConfig, StreamInput
from livediffusion.daemon.engines.video.factory import build_video_engine
from livediffusion.daemon.engines.video.noise import MotionController, timesteps
from livediffusion.shared import Client
from livediffusion.shared.protocol import FrameSpec

from helpers import daemon_stat, wait_until

SPEC = FrameSpec(64, 48)


@pytest.fixture(scope="module")
def engine():
    return build_video_engine("tiny")


class Feeder:
    """Feeds an engine stream the frames a scheduler would, from a seeded random clip."""

    def __init__(self, engine, sid: int, seed: int = 0, spec: FrameSpec = SPEC) -> None:
        self.engine, self.sid, self.spec = engine, sid, spec
        self.rng = np.random.default_rng(seed)
        self.seq = 0

    def chunk(self) -> list:
        frames = []
        for _ in range(self.engine.frames_per_step(self.sid)):
            self.seq += 1
            pixels = self.rng.integers(0, 256, self.spec.shape, dtype=np.uint8)
            frames.append(InputFrame(self.seq, pixels, self.spec, self.seq))
        return self.engine.submit([StreamInput(self.sid, frames)])[0].frames


def open_stream(engine, sid: int, **params) -> None:
    engine.open_stream(StreamConfig(sid, SPEC, SPEC, 30.0, params))
    engine.settle()  # its prompt is encoded on the text thread; these tests need it now


def test_first_chunk_is_one_frame_then_four(engine):
    open_stream(engine, 1, steps=1)
    try:
        feed = Feeder(engine, 1)
        assert engine.frames_per_step(1) == 1
        out = feed.chunk()
        assert [f.in_seq for f in out] == [1]
        assert engine.frames_per_step(1) == 4
        assert [f.in_seq for f in feed.chunk()] == [2, 3, 4, 5]
        assert out[0].pixels.shape == (48, 64, 3) and out[0].pixels.dtype == torch.uint8
    finally:
        engine.close_stream(1)


@pytest.mark.parametrize("steps,cache", [(2, {}), (3, {}),
                                         (2, {"cache_frames": 4, "sinks": 1, "rope_max": 6})])
def test_stream_batch_equals_sequential_schedule(engine, steps, cache):
    open_stream(engine, 1, steps=steps, stream_batch=True, seed=7, **cache)
    open_stream(engine, 2, steps=steps, stream_batch=False, seed=7, **cache)
    try:
        batched, sequential = {}, {}
        fa, fb = Feeder(engine, 1, seed=3), Feeder(engine, 2, seed=3)
        lags = []
        for _ in range(8 if not cache else 14):  # the last case wraps positions twice
            a, b = fa.chunk(), fb.chunk()
            lags.append(len(b) - len(a))
            batched.update({f.in_seq: f.pixels for f in a})
            sequential.update({f.in_seq: f.pixels for f in b})
        assert lags[1:steps] == [4] * (steps - 1)  # Stream Batch lags steps - 1 chunks
        common = sorted(set(batched) & set(sequential))
        assert len(common) == 1 + 4 * (len(lags) - 1 - (steps - 1))
        for seq in common:
            diff = (batched[seq].int() - sequential[seq].int()).abs().max()
            assert diff <= 1, f"frame {seq} differs by {diff}"
    finally:
        engine.close_stream(1)
        engine.close_stream(2)


def test_prompt_change_keeps_the_self_attention_cache_and_reset_clears_it(engine):
    open_stream(engine, 1, steps=1, prompt="a forest")
    try:
        feed = Feeder(engine, 1)
        for _ in range(3):
            feed.chunk()
        stream = engine.streams[1]
        keys = [k.clone() for k in stream.cache.k]
        positions = stream.cache.positions.clone()
        cross = stream.cross_kv[0][0].clone()
        engine.update_params(1, {"prompt": "a city at night"})
        engine.settle()
        assert all(torch.equal(a, b) for a, b in zip(keys, stream.cache.k))
        assert torch.equal(positions, stream.cache.positions)
        assert not torch.equal(cross, stream.cross_kv[0][0])
        assert engine.frames_per_step(1) == 4 and len(feed.chunk()) == 4  # no restart
        engine.update_params(1, {"reset": True})
        assert stream.cache.filled_slots(0, 0) == 0
        assert engine.frames_per_step(1) == 1 and len(feed.chunk()) == 1
    finally:
        engine.close_stream(1)


def test_weighted_prompts_blend_embeddings_linearly(engine):
    a = engine._prompt_embedding("a forest")
    b = engine._prompt_embedding("a city")
    from livediffusion.daemon.engines.video.params import VideoParams
    blend = engine._embed_prompts(VideoParams(prompts=(("a forest", 3.0), ("a city", 1.0))))
    torch.testing.assert_close(blend, 0.75 * a + 0.25 * b)


def test_every_live_parameter_applies_without_a_restart(engine):
    open_stream(engine, 1, steps=2)
    try:
        feed = Feeder(engine, 1)
        feed.chunk()
        changes = [{"seed": 3}, {"noise_scale": 0.5}, {"strength": 0.9}, {"steps": 4},
                   {"steps": 1}, {"motion_control": False}, {"stream_batch": False},
                   {"sinks": 1}, {"sink_refresh": 0.0}, {"cache_frames": 4},
                   {"prompts": [["a", 1], ["b", 2]]}, {"motion_scale": 0.3}]
        for change in changes:
            engine.update_params(1, change)
            out = feed.chunk()
            assert engine.frames_per_step(1) == 4, change
            for f in out:
                assert f.pixels.float().std() > 0, change  # a real frame, not a blank
        assert engine.streams[1].params.steps == 1
    finally:
        engine.close_stream(1)


def test_a_steps_change_loses_no_frame(engine):
    open_stream(engine, 1, steps=3)
    try:
        feed = Feeder(engine, 1)
        seen = [f.in_seq for f in feed.chunk()]
        for _ in range(3):
            seen += [f.in_seq for f in feed.chunk()]
        engine.update_params(1, {"steps": 1})
        for _ in range(2):
            seen += [f.in_seq for f in feed.chunk()]
        assert seen == list(range(1, feed.seq + 1))
    finally:
        engine.close_stream(1)


@pytest.mark.parametrize("change,match", [({"steps": 5}, "steps"), ({"sinks": 6}, "sinks"),
                                          ({"noise_scale": "lots"}, "noise_scale"),
                                          ({"colour": 1}, "no parameter 'colour'"),
                                          ({"prompts": [["x"]]}, "prompts")])
def test_bad_parameters_are_refused_with_a_sentence(engine, change, match):
    open_stream(engine, 1)
    try:
        with pytest.raises(ParamError, match=match):
            engine.update_params(1, change)
    finally:
        engine.close_stream(1)


def test_sizes_must_be_multiples_of_16(engine):
    with pytest.raises(ParamError, match="multiple of 16"):
        engine.open_stream(StreamConfig(9, FrameSpec(60, 48), FrameSpec(60, 48), 30.0, {}))
        engine.settle()


def test_first_timestep_follows_the_noise_scale():
    assert timesteps(2, 0.8) == [700.0, 500.0]
    assert timesteps(4, 0.8) == [700.0, 500.0, 400.0, 200.0]
    assert timesteps(3, 0.5) == [400.0, 400.0, 400.0]
    assert timesteps(1, 0.95)[0] == pytest.approx(850.0)


def test_motion_controller_follows_the_release_formula():
    ctl = MotionController()
    still = torch.zeros(4, 3, 8, 8)
    assert ctl.update(still, 0.8) == pytest.approx(0.8)           # no motion: s_init
    moving = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.1, 0.2, 0.3)])
    s = ctl.update(moving, 0.8)                                     # d = 0.1 -> m = 0.5
    assert ctl.last_motion == pytest.approx(0.5)
    assert s == pytest.approx(0.9 * (0.8 - 0.1 * 0.5) + 0.1 * 0.8)


@pytest.mark.slow
def test_hundreds_of_chunks_keep_memory_flat(engine):
    """400 chunks wrap the 12 RoPE positions 30 times over (the cache's own bookkeeping is
    run over thousands in test_kv_cache.py)."""
    spec = FrameSpec(32, 32)
    engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 2, "rope_max": 12,
                                                           "cache_frames": 4, "sinks": 1}))
    engine.settle()
    try:
        feed = Feeder(engine, 1, spec=spec)
        stream = engine.streams[1]
        sizes = []
        for i in range(400):
            feed.chunk()
            if i % 50 == 0:
                sizes.append((stream.nbytes(), len(stream.in_flight),
                              len(stream.cache.targets), len(stream.cache.chunk_position)))
        assert len(set(sizes[1:])) == 1, sizes
        assert stream.next_chunk == 400
        assert stream.cache.next_position <= 12 + 1  # positions wrapped, never ran away
    finally:
        engine.close_stream(1)


def test_video_stream_over_the_real_transport():
    from livediffusion.daemon.server import Daemon

    daemon = Daemon(port=0, engines=("video-tiny",)).start()
    try:
        with Client(daemon.endpoint) as c:
            stream = c.open_stream("v", 64, 48, engine="video-tiny", params={"steps": 1},
                                   timeout=30)
            assert stream.params["steps"] == 1 and "prompt" in stream.params
            rng = np.random.default_rng(0)
            sent = 0
            for chunk in (1, 4, 4, 4):  # a chunk at a time, as a camera slower than CPU would
                for _ in range(chunk):
                    assert stream.send(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
                sent += chunk
                assert wait_until(lambda: (c.poll(0.05),
                                           daemon_stat(daemon, stream.id, 'frames_out'))[1] == sent, 30)
            assert wait_until(lambda: (c.poll(0.05), stream.latest())[1] is not None
                              and stream.latest().in_seq == 13, 10)
            last = stream.latest()
            assert last.pixels.shape == (48, 64, 3) and last.pixels.std() > 0
            stats = c.stats()["v"]["daemon"]
            assert stats["frames_in"] == 13 and stats["frames_out"] == 13
    finally:
        daemon.stop()


def test_several_streams_share_one_forward_and_match_running_alone(engine):
    """Two streams (different prompts and seeds) in one submit: one DiT forward per step,
    and the same frames as when each stream runs alone."""
    def run(together: bool) -> dict[int, dict[int, torch.Tensor]]:
        for sid, prompt, seed in ((1, "a forest", 1), (2, "a city", 2)):
            open_stream(engine, sid, steps=2, prompt=prompt, seed=seed)
        feeds = {1: Feeder(engine, 1, seed=5), 2: Feeder(engine, 2, seed=6)}
        out = {1: {}, 2: {}}
        forwards = []
        try:
            for _ in range(5):
                engine.stage_times = {}
                if together:
                    inputs = []
                    for sid, feed in feeds.items():
                        frames = []
                        for _ in range(engine.frames_per_step(sid)):
                            feed.seq += 1
                            frames.append(InputFrame(feed.seq, feed.rng.integers(
                                0, 256, SPEC.shape, dtype=np.uint8), SPEC, feed.seq))
                        inputs.append(StreamInput(sid, frames))
                    results = {o.stream_id: o.frames for o in engine.submit(inputs)}
                else:
                    results = {sid: feed.chunk() for sid, feed in feeds.items()}
                forwards.append(len(engine.stage_times.get("dit", [])))
                for sid, frames in results.items():
                    out[sid].update({f.in_seq: f.pixels for f in frames})
        finally:
            engine.stage_times = None
            engine.close_stream(1)
            engine.close_stream(2)
        return out, forwards

    together, forwards = run(True)
    alone, forwards_alone = run(False)
    assert forwards[2:] == [1, 1, 1]            # steady state: one forward for both streams
    assert forwards_alone[2:] == [2, 2, 2]
    for sid in (1, 2):
        assert together[sid].keys() == alone[sid].keys() and len(alone[sid]) >= 13
        for seq, pixels in alone[sid].items():
            assert (together[sid][seq].int() - pixels.int()).abs().max() <= 1
    assert not torch.equal(together[1][13], together[2][13])


@pytest.mark.parametrize("change", [{"cache_frames": 4}, {"stream_batch": False},
                                    {"steps": 1}])
def test_schedule_and_cache_changes_lose_no_frame(engine, change):
    open_stream(engine, 1, steps=2)
    try:
        feed = Feeder(engine, 1)
        seen = []
        for _ in range(3):
            seen += [f.in_seq for f in feed.chunk()]
        engine.update_params(1, change)
        for _ in range(3):
            seen += [f.in_seq for f in feed.chunk()]
        engine.update_params(1, {"stream_batch": True, "steps": 2})
        for _ in range(3):
            seen += [f.in_seq for f in feed.chunk()]
        assert seen == list(range(1, seen[-1] + 1)) and seen[-1] >= feed.seq - 4
    finally:
        engine.close_stream(1)


def test_a_failed_step_restarts_the_stream_instead_of_wedging_it(engine, monkeypatch):
    open_stream(engine, 1, steps=2)
    try:
        feed = Feeder(engine, 1)
        real = engine.wan.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.OutOfMemoryError("simulated")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.wan, "forward", flaky)
        with pytest.raises(torch.OutOfMemoryError):
            feed.chunk()                          # the first chunk fails mid-way
        assert engine.frames_per_step(1) == 1    # the stream starts over, cleanly
        assert len(feed.chunk()) == 1
        assert len(feed.chunk()) == 0 and len(feed.chunk()) == 4  # Stream Batch lag, then on
    finally:
        engine.close_stream(1)


def test_motion_control_never_makes_the_noise_scale_negative():
    ctl = MotionController(reduce=0.9)
    moving = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 1.0, -1.0, 1.0)])
    assert ctl.update(moving, 0.5) > 0.1


@pytest.mark.parametrize("steps,params", [(1, {}), (2, {"sink_refresh": 0.9}),
                                          (3, {"cache_frames": 4, "sinks": 1, "rope_max": 6,
                                               "sink_refresh": 0.5}),
                                          (2, {"sink_refresh": 0.0})])
def test_fixed_shape_forward_equals_the_general_one(steps, params):
    """Once a stream's cache is full, GPUs run one fixed sequence of kernels (recorded as a
    CUDA graph): slots as device tensors, the sink-refresh decision on the device.  Here the
    same code runs directly and must give the general path's frames and cache books."""
    general, fixed = build_video_engine("tiny"), build_video_engine("tiny")
    fixed.wan.fixed_shape = True
    runs = {}
    for engine in (general, fixed):
        engine.open_stream(StreamConfig(1, SPEC, SPEC, 30.0,
                                        dict(params, steps=steps, seed=4)))
        engine.settle()
        feed = Feeder(engine, 1, seed=9)
        frames = [f for _ in range(16) for f in feed.chunk()]
        runs[engine] = (frames, engine.streams[1].cache)
    (a, ca), (b, cb) = runs[general], runs[fixed]
    assert len(a) == len(b) > 40
    for x, y in zip(a, b):
        assert (x.pixels.int() - y.pixels.int()).abs().max() <= 1
    assert [k.chunk for k in ca.books] == [k.chunk for k in cb.books]
    assert torch.equal(ca.positions, cb.positions)
    assert cb.graphs and not ca.graphs  # the fixed path ran (and the general one did not)
    if params.get("sink_refresh", 0.2) > 0.5:
        assert any(k.chunk[:2] != [0, 1] for k in ca.books)  # sinks were refreshed


def test_a_closed_stream_frees_its_fixed_shape_buffers_without_the_cycle_collector():
    import gc
    import weakref

    engine = build_video_engine("tiny")
    engine.wan.fixed_shape = True
    engine.open_stream(StreamConfig(1, SPEC, SPEC, 30.0, {"steps": 2}))
    engine.settle()
    feed = Feeder(engine, 1)
    for _ in range(12):
        feed.chunk()
    graphs = engine.streams[1].cache.graphs
    assert graphs
    buffers = [weakref.ref(st.out) for st in graphs.values()]
    del graphs
    gc.disable()
    try:
        engine.close_stream(1)
        assert all(ref() is None for ref in buffers)  # freed by reference counting alone
    finally:
        gc.enable()


def test_prompts_encode_the_same_with_the_text_encoder_offloaded():
    """On GPUs umT5 lives in host memory and visits the GPU per new prompt; the embedding
    (and so the cross-attention keys/values) must not change."""
    from livediffusion.daemon.models.offload import Offloaded

    plain, offloaded = build_video_engine("tiny"), build_video_engine("tiny")
    offloaded.text_home = Offloaded(offloaded.text_encoder, "cpu")
    for engine in (plain, offloaded):
        engine.open_stream(StreamConfig(1, SPEC, SPEC, 30.0, {"steps": 1}))
        engine.settle()
        engine.update_params(1, {"prompt": "a lighthouse at night, oil painting"})
        engine.settle()
    a, b = plain.streams[1].cross_kv, offloaded.streams[1].cross_kv
    for (ka, va), (kb, vb) in zip(a, b):
        torch.testing.assert_close(ka, kb)
        torch.testing.assert_close(va, vb)
    assert offloaded.text_home.visits >= 2  # the default prompt, then the new one
