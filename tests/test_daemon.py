"""The daemon serves streams end to end over real sockets and real shared memory."""

from __future__ import annotations

import numpy as np
import pytest

from livediffusion.shared import Client, DaemonError

from helpers import rgb, round_trip, shm_names, wait_until


def test_welcome_lists_capabilities(client):
    caps = client.capabilities
    assert "passthrough" in caps["engines"]
    assert set(caps["transports"]) == {"shm", "inline"}
    assert "float32" in caps["dtypes"] and "bgra" in caps["formats"]


def test_identity_round_trip_over_shared_memory(client):
    stream = client.open_stream("a", 64, 48)
    assert client.transport == "shm"
    frame = rgb()
    out = round_trip(stream, frame)
    assert np.array_equal(out.pixels, frame)
    assert out.in_seq == 1 and out.latency_ms > 0


def test_identity_round_trip_inline(daemon):
    with Client(daemon.endpoint, transport="inline") as c:
        stream = c.open_stream("inline", 64, 48)
        frame = rgb(seed=3)
        assert np.array_equal(round_trip(stream, frame).pixels, frame)


def test_touchdesigner_float_rgba_bottom_up_becomes_rgb_u8_top_down(client):
    stream = client.open_stream("td", 64, 48, format="rgba", dtype="float32", origin="bottom",
                                output={"format": "rgb", "dtype": "uint8", "origin": "top"})
    src = np.random.default_rng(1).random((48, 64, 4), dtype=np.float32)
    out = round_trip(stream, src)
    expected = np.round(src[::-1, :, :3] * 255).astype(np.uint8)
    assert out.pixels.shape == (48, 64, 3) and out.pixels.dtype == np.uint8
    assert np.abs(out.pixels.astype(int) - expected).max() <= 1


def test_obs_bgra_comes_back_as_bgra_with_opaque_alpha_when_converted(client):
    stream = client.open_stream("obs", 32, 16, format="bgra",
                                output={"format": "rgba", "dtype": "uint8"})
    src = np.random.default_rng(2).integers(0, 256, (16, 32, 4), dtype=np.uint8)
    out = round_trip(stream, src).pixels
    assert np.array_equal(out[..., :3], src[..., [2, 1, 0]])
    assert (out[..., 3] == 255).all()


def test_output_resolution_may_differ_from_input(client):
    stream = client.open_stream("resize", 64, 48, output={"width": 32, "height": 24})
    out = round_trip(stream, np.full((48, 64, 3), 200, np.uint8)).pixels
    assert out.shape == (24, 32, 3) and np.abs(out.astype(int) - 200).max() <= 1


def test_live_parameter_change_applies_to_the_next_frame(client):
    stream = client.open_stream("live", 64, 48)
    frame = rgb(seed=4)
    assert np.array_equal(round_trip(stream, frame).pixels, frame)
    assert stream.update(mode="invert", wait=2.0) == {"mode": "invert", "gain": 1.0}
    assert np.array_equal(round_trip(stream, frame).pixels, 255 - frame)


def test_bad_parameters_are_refused_and_the_stream_keeps_running(client):
    stream = client.open_stream("params", 64, 48)
    with pytest.raises(DaemonError) as info:
        stream.update(mode="sepia", wait=2.0)
    assert info.value.code == "bad_params"
    frame = rgb(seed=5)
    assert np.array_equal(round_trip(stream, frame).pixels, frame)


def test_unknown_engine_is_refused(client):
    with pytest.raises(DaemonError) as info:
        client.open_stream("x", 64, 48, engine="nope")
    assert info.value.code == "unknown_engine"


def test_many_streams_each_get_their_own_frames(daemon):
    clients = [Client(daemon.endpoint, name=f"c{i}").connect() for i in range(3)]
    try:
        streams = [c.open_stream(f"s{i}-{j}", 40 + 8 * j, 24, engine="passthrough")
                   for i, c in enumerate(clients) for j in range(2)]
        for rnd in range(5):
            frames = [rgb(24, s.spec.width, seed=100 * rnd + k) for k, s in enumerate(streams)]
            for s, f in zip(streams, frames):
                s.send(f)
            for s, f in zip(streams, frames):
                out = s.wait(5.0)
                assert out is not None and np.array_equal(out.pixels, f)
    finally:
        for c in clients:
            c.close()


def test_stats_count_frames_on_both_sides(client):
    stream = client.open_stream("stats", 64, 48)
    for i in range(5):
        round_trip(stream, rgb(seed=i))
    stats = client.stats()["stats"]
    assert stats["client"]["sent"] == 5 and stats["client"]["received"] == 5
    assert stats["daemon"]["frames_in"] == 5 and stats["daemon"]["frames_out"] == 5
    assert stats["client"]["latency_p50_ms"] > 0


def test_closing_a_stream_unlinks_its_shared_memory(client):
    stream = client.open_stream("closing", 64, 48)
    names = {stream._ring_in.name, stream._ring_out.name}
    assert names <= shm_names()
    stream.close()
    assert wait_until(lambda: not (names & shm_names()))


def test_stream_names_free_again_after_close(client):
    client.open_stream("again", 64, 48).close()
    stream = client.open_stream("again", 64, 48)
    assert stream.ready


def test_stopping_the_daemon_unlinks_every_segment(daemon):
    c = Client(daemon.endpoint).connect()
    streams = [c.open_stream(f"s{i}", 64, 48) for i in range(3)]
    names = {r.name for s in streams for r in (s._ring_in, s._ring_out)}
    assert names <= shm_names()
    daemon.stop()
    assert not (names & shm_names())
    c.close()


@pytest.mark.skipif(not hasattr(__import__("socket"), "AF_UNIX"), reason="POSIX only")
def test_ipc_endpoint_serves_too(tmp_path):
    from livediffusion.daemon.server import Daemon

    path = tmp_path / "ld.ipc"
    d = Daemon(port=0, ipc_path=str(path)).start()
    try:
        with Client(f"ipc://{path}") as c:
            assert c.transport == "shm"
            frame = rgb(seed=11)
            assert np.array_equal(round_trip(c.open_stream("ipc", 64, 48), frame).pixels, frame)
    finally:
        d.stop()


def test_warm_up_runs_every_engine_before_serving(monkeypatch, caplog):
    """--warm-up WxH: each engine runs a throwaway stream of that size to a steady state
    before the daemon serves (on GPUs this is where kernels compile); a size an engine cannot
    take is one log line, not a failure."""
    import logging

    from livediffusion.daemon.engines.video.engine import VideoEngine
    from livediffusion.daemon.server import Daemon

    seen = []
    real = VideoEngine.submit

    def counting(self, batch):
        seen.append([item.stream_id for item in batch])
        return real(self, batch)

    monkeypatch.setattr(VideoEngine, "submit", counting)
    with caplog.at_level(logging.INFO, logger="livediffusion.worker"):
        daemon = Daemon(port=0, engines=("video-tiny", "passthrough"),
                        warm_up=((64, 48), (30, 30))).start(timeout=120)
    try:
        sizes = daemon.capabilities["video-tiny"]["batch_sizes"]
        assert sizes == [1, 2, 3, 4]
        steps = 1 + 6 + 2 + 2                                  # first frame, cache, steady
        # throwaway streams only: for every batch size the engine declares, that many of
        # them together, so every batch shape is compiled before a user's stream needs it
        expected = [[-1 - i for i in range(n)] for n in sizes for _ in range(steps)]
        assert seen == expected
        video = [w for w in daemon.workers if "video-tiny" in w.engines][0]
        assert not video.worker.engines["video-tiny"].streams
        text = caplog.text
        assert "warmed up video-tiny at 64x48" in text and "warmed up passthrough" in text
        assert "for 4 streams" in text
        assert "no warm-up of video-tiny at 30x30" in text and "multiple of 16" in text
        # the warm-up's steady steps seed the scheduler's cost model
        from livediffusion.daemon.step import batch_key
        key = batch_key("video-tiny", 64, 48, daemon.capabilities["video-tiny"])
        # the default steps, decoder, encoder and Stream Batch
        assert key == ("video-tiny", 64, 48, 2, "vae", "vae", True)
        measured = daemon.scheduler.costs.measured(key)
        assert sorted(measured) == sizes and all(ms > 0 for ms in measured.values())
    finally:
        daemon.stop()
