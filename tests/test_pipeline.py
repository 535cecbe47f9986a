"""Pipeline parallelism on CPU ranks (gloo): the pipelined engine gives the single-process
engine's output, blocks move between ranks mid-stream, a dead rank is one clear error and
the engine goes on alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediffusion.daemon.engines.base import EngineError, InputFrame, StreamConfig, StreamInput
from livediffusion.daemon.engines.video.factory import build_video_engine
from livediffusion.daemon.engines.video.pipelined import build_pipeline_engine
from livediffusion.daemon.parallel.pipeline import parse_gpus
from livediffusion.shared.protocol import FrameSpec

SPEC = FrameSpec(64, 48, dtype="float32")   # float output: compared to 1e-5, not to a u8 step
#: sinks refreshed often, the RoPE position wrapping every few chunks, a small cache
PARAMS = {"steps": 2, "rope_max": 8, "cache_frames": 4, "sinks": 2, "sink_refresh": 0.9}
CHUNKS = 13


def play(engine, *, move=None, steps_at=6, streams=(1, 2), switch_at=None):
    """Two streams batched in every step, prompts of their own; a live steps change at
    chunk ``steps_at``; ``move`` (chunk, ranges): a block rebalance there; ``switch_at``: the
    last stream switches to the tiny decoder there.  Returns
    {(stream, input seq): pixels}."""
    for sid in streams:
        engine.open_stream(StreamConfig(sid, SPEC, SPEC, 30.0,
                                        {**PARAMS, "prompt": f"prompt {sid}", "seed": sid}))
    engine.settle()
    rng = np.random.default_rng(7)
    out, seq = {}, 0
    for k in range(CHUNKS):
        if k == steps_at:
            engine.update_params(streams[0], {"steps": 1})
        if k == switch_at:  # a live decoder switch (done by the last rank)
            engine.update_params(streams[-1], {"decoder": "tiny"})
        if move is not None and k == move[0]:
            assert engine.rebalance(move[1])
        batch = []
        for sid in streams:
            frames = []
            for _ in range(engine.frames_per_step(sid)):
                seq += 1
                frames.append(InputFrame(seq, rng.random(SPEC.shape, dtype=np.float32), SPEC,
                                         seq))
            batch.append(StreamInput(sid, frames))
        for o in engine.submit(batch):
            for f in o.frames:
                out[(o.stream_id, f.in_seq)] = np.asarray(f.pixels.cpu())
    return out


@pytest.fixture(scope="module")
def reference():
    return play(build_video_engine("tiny6"))


def compare(reference, got, lag_frames):
    common = set(reference) & set(got)
    assert set(got) <= set(reference)
    # what is still in the pipeline when the stream stops: the last few chunks
    assert len(reference) - len(common) <= lag_frames
    assert len(common) > 60
    keys = sorted(common)
    ref = np.stack([reference[k] for k in keys])
    diff = np.stack([got[k] for k in keys]) - ref
    # the same computation batched differently (which chunks share a forward) moves float32
    # results in their last bits only
    assert np.linalg.norm(diff) / np.linalg.norm(ref) < 1e-5
    assert float(np.abs(diff).max()) < 1e-4


def test_one_rank_is_the_engine_exactly(reference):
    engine = build_pipeline_engine("random:tiny6", ["cpu"], name="video-tiny6")
    try:
        got = play(engine)
        assert engine.ranks.world == 1
    finally:
        engine.shutdown()
    compare(reference, got, 0)


@pytest.mark.parametrize("world,move,fixed", [
    (2, [range(0, 4), range(4, 6)], "0"),
    (3, [range(0, 1), range(1, 4), range(4, 6)], "0"),
    # each rank's stage as a fixed-shape forward (what its CUDA graph records on a GPU)
    (2, [range(0, 2), range(2, 6)], "1")])
def test_ranks_match_one_process_across_a_block_move(reference, world, move, fixed,
                                                      monkeypatch):
    monkeypatch.setenv("LIVEDIFFUSION_FIXED_SHAPE", fixed)   # the ranks inherit it
    engine = build_pipeline_engine("random:tiny6", ["cpu"] * world, name="video-tiny6",
                                   rebalance_every=0, timeout=120)
    try:
        assert [len(r) for r in engine.ranks.ranges] == [6 // world] * world
        got = play(engine, move=(4, move))
        assert engine.ranks.ranges == move and engine.moves_done == 1
        # rank 0 holds only its blocks' weights and cache rows
        blocks = engine.wan.model.blocks
        assert all(blocks[i].attn1.to_q.weight.is_meta for i in range(6) if i not in move[0])
        cache_k = engine.stage.streams[1].cache.k
        assert [k is not None for k in cache_k] == [i in move[0] for i in range(6)]
        assert engine.vae.vae.decoder.conv_in.weight.is_meta   # the last rank decodes
        if fixed == "1":  # rank 0 ran its stage through the fixed-shape forward
            recorded = [key for _, graphs in engine.stage._shared_graphs.values()
                        for key in graphs]
            assert any(key[2:4] == (0, move[0].stop) for key in recorded), recorded
    finally:
        engine.shutdown()
    compare(reference, got, 2 * 4 * 2 * world)


def test_a_live_decoder_switch_on_the_last_rank_loses_no_frame(reference):
    """The switch applies from the next chunk the last rank decodes (in one process: the
    next chunk to finish; with chunks in flight these can differ), primed with the last
    latent decoded, so the stream goes on at 4 frames a chunk with nothing lost."""
    engine = build_pipeline_engine("random:tiny6", ["cpu"] * 2, name="video-tiny6",
                                   rebalance_every=0, timeout=120)
    try:
        got = play(engine, steps_at=-1, switch_at=5)
        assert engine.stage.streams[2].decoder == "tiny"
    finally:
        engine.shutdown()
    sent = sorted(seq for sid, seq in reference if sid == 2)   # the same inputs
    seqs = sorted(seq for sid, seq in got if sid == 2)
    assert seqs == sent[:len(seqs)]            # every frame, none lost, none twice
    assert len(sent) - len(seqs) <= 2 * 4 * 2  # but the last chunks still in the pipeline


def test_block_scheduler_moves_blocks_from_measured_stage_times():
    engine = build_pipeline_engine("random:tiny6", ["cpu"] * 2, name="video-tiny6",
                                   rebalance_every=0, timeout=120)
    try:
        play(engine, steps_at=-1, streams=(1,))
        assert engine.ranks.ranges == [range(0, 3), range(3, 6)]
        engine.rebalance_every = 1
        # the last rank reports itself three times slower per block than the first
        engine.ranks.stage_ms = [{"blocks": 3.0, "encode": 0.0}, {"blocks": 9.0, "extra": 0.0}]
        engine._ticks_since_balance = 1
        engine._maybe_rebalance()
        assert engine.ranks.ranges == [range(0, 4), range(4, 6)]
        # and the stream goes on from there
        spec = FrameSpec(64, 48, dtype="float32")
        frames = [InputFrame(1000 + i, np.zeros(spec.shape, np.float32), spec, 1000 + i)
                  for i in range(4)]
        for _ in range(3):
            engine.submit([StreamInput(1, frames)])
            frames = [InputFrame(f.seq + 4, f.pixels, spec, f.seq + 4) for f in frames]
        assert engine.fell_back is None
    finally:
        engine.shutdown()


def stepper(engine, spec: FrameSpec):
    """One step of stream 1 with black frames; returns its output frames."""
    seq = 0

    def step():
        nonlocal seq
        frames = []
        for _ in range(engine.frames_per_step(1)):
            seq += 1
            frames.append(InputFrame(seq, np.zeros(spec.shape, np.uint8), spec, seq))
        return engine.submit([StreamInput(1, frames)])[0].frames
    return step


def test_a_killed_rank_is_one_clear_error_and_the_engine_goes_on_alone(caplog):
    engine = build_pipeline_engine("random:tiny6", ["cpu"] * 2, name="video-tiny6",
                                   rebalance_every=0, timeout=60)
    try:
        spec = FrameSpec(64, 48)
        engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 2}))
        engine.settle()
        step = stepper(engine, spec)

        for _ in range(3):
            step()
        engine.ranks.processes[0].kill()
        engine.ranks.processes[0].wait()
        with pytest.raises(EngineError, match="rank 1"):
            for _ in range(3):  # the next step that talks to rank 1 finds it gone
                step()
        assert engine.fell_back and "rank 1" in engine.fell_back
        assert engine.ranks.world == 1
        got = [len(step()) for _ in range(4)]   # serving on one device, stream restarted
        assert sum(got) >= 9 and got[-1] == 4
        assert sum("pipeline failed" in r.message for r in caplog.records) == 1
    finally:
        engine.shutdown()


def test_parse_gpus_on_a_machine_without_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_gpus("3") == ["cpu"] * 3
    assert parse_gpus("all") == ["cpu"]
    with pytest.raises(ValueError, match="no CUDA device 0"):
        parse_gpus("0,1")
    with pytest.raises(ValueError):
        parse_gpus("0")


def test_a_daemon_with_two_cpu_ranks_serves_hosts_through_the_pipeline():
    """`livediffusion daemon --gpus 2` on a machine without GPUs: two gloo ranks; two real
    clients' streams batched through them; the WELCOME capabilities say so."""
    import time

    from livediffusion.daemon.server import Daemon
    from livediffusion.shared import Client
    from test_serving import distinct_fps, drive

    daemon = Daemon(port=0, engines=("video-tiny",), gpus=("cpu", "cpu")).start(timeout=120)
    try:
        with Client(daemon.endpoint) as c:
            caps = c.capabilities["engines"]["video-tiny"]
            assert caps["pipeline"]["ranks"] == 2 and caps["pipeline"]["blocks"] == [[0, 1],
                                                                                     [1, 2]]
            streams = [c.open_stream(n, 64, 64, engine="video-tiny", timeout=60)
                       for n in ("a", "b")]
            seen = drive(c, streams, 6.0)
            if min(len(v) for v in seen.values()) <= 10:
                # a loaded 2-core machine (the ranks, the clients and whatever else runs)
                # may take seconds for the first chunks: the test is about frames coming
                # through the pipeline, so it waits longer once rather than fail on speed
                more = drive(c, streams, 10.0)
                seen = {name: seen[name] + more[name] for name in seen}
        t1 = time.monotonic() - 0.2
        for name in ("a", "b"):
            assert len(seen[name]) > 10, seen
            # past the first chunks (the pipeline fills): frames keep coming (a loaded
            # 2-core machine runs both ranks and the clients)
            assert distinct_fps(seen[name], seen[name][4][0], t1) > 2.0
        engine = next(w.worker.engines["video-tiny"] for w in daemon.workers
                      if "video-tiny" in w.worker.engines)
        processes = list(engine.ranks.processes)
        assert processes
    finally:
        daemon.stop()
    assert all(p.poll() is not None for p in processes)  # the ranks ended with the daemon


def test_a_rank_that_fails_a_tick_says_so_once_and_keeps_serving():
    """A tick a rank cannot run (here: for a stream it does not know) comes back as one
    clear error for that step; the rank stays up and the next steps are served."""
    engine = build_pipeline_engine("random:tiny6", ["cpu"] * 2, name="video-tiny6",
                                   rebalance_every=0, timeout=60)
    try:
        spec = FrameSpec(64, 48)
        engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 1}))
        engine.settle()
        step = stepper(engine, spec)

        step()
        engine._collect(keep=0)
        # what rank 0's first stage would send for a stream rank 1 never heard of
        n, tokens, dim = 1, 6 * 8 // 4, engine.wan.heads * engine.wan.head_dim
        bad = {"kind": "tick", "tick": 10**6, "latent": [6, 8], "stage": {},
               "elements": [{"sid": 999, "gen": 1, "cid": 0, "step": 0, "last": True,
                             "seed": 0, "sigma": 0.5, "sigma_next": None}]}
        engine.ranks.channel.send(1, bad, [torch.zeros(n, 16, 1, 6, 8),
                                           torch.zeros(n, tokens, dim), torch.zeros(n, dim),
                                           torch.zeros(n, 6, dim)])
        engine._outstanding.append((10**6, {999}))
        with pytest.raises(EngineError, match="pipeline rank 1 failed on a step: KeyError"):
            step()
        assert engine.fell_back is None and engine.ranks.processes[0].poll() is None
        # the failed step's streams restart (a new first frame), then chunks of 4 again
        assert [len(step()) for _ in range(4)] == [1, 0, 4, 4]
    finally:
        engine.shutdown()


def _bench(tmp_path, *args: str) -> dict:
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "livediffusion.daemon", "bench", *args, "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {"stdout": run.stdout, **json.loads(out.read_text())}


@pytest.mark.slow
def test_bench_video_on_one_rank_compares_and_predicts(tmp_path):
    got = _bench(tmp_path, "video", "--gpus", "1", "--iterations", "2", "--steps", "1",
                 "--decoders", "tiny")
    assert "scaling model" in got["stdout"]
    engines = {r["engine"]: r for r in got["records"]}
    assert set(engines) == {"plain", "pipeline", "stage path"}
    assert engines["pipeline"]["vs_plain"] > 0 and engines["pipeline"]["ranks"][0]["blocks"] \
        == [0, 6]
    predicted = {(p["basis"], p["gpus"]): p for p in got["meta"]["predictions"]}
    assert {g for _, g in predicted} == {1, 2, 4}
    two = predicted[("stage path", 2)]
    assert two["fps"] > 0 and len(two["split"]) == 2 and two["split"][0][0] == 0


@pytest.mark.slow
def test_bench_video_and_stream_run_on_two_cpu_ranks(tmp_path):
    video = _bench(tmp_path, "video", "--gpus", "2", "--iterations", "2", "--steps", "1",
                   "--decoders", "tiny")
    (record,) = video["records"]
    assert record["engine"] == "pipeline" and [r["rank"] for r in record["ranks"]] == [0, 1]
    assert record["fps"] > 0 and record["frames_out_fps"] > 0
    stream = _bench(tmp_path, "stream", "--gpus", "2", "--clients", "1", "--seconds", "2",
                    "--policies", "edf", "--no-events", "--no-engine-bench", "--device", "cpu")
    assert "split over pipeline ranks --gpus 2" in stream["stdout"]
    (record,) = stream["records"]
    assert stream["meta"]["gpus"] == "2" and not record["errors"]
    assert record["fps_mean"] > 3.0


def test_fp8_ranks_match_one_fp8_process_across_a_block_move(reference):
    """Every rank quantises its blocks alike (``@fp8``), and an FP8 block moves between ranks
    with its float8 weights and scales (sent as bytes)."""
    from livediffusion.daemon.engines.video.engine import VideoEngine
    from livediffusion.daemon.engines.video.factory import build_video_parts
    parts = build_video_parts("tiny6", fp8=True)
    one = VideoEngine("video-tiny6", parts.transformer, parts.vae, parts.text,
                      tiny_decoder=parts.tiny_decoder, min_side=parts.min_side)
    fp8_reference = play(one)
    move = [range(0, 4), range(4, 6)]
    engine = build_pipeline_engine("random:tiny6@fp8", ["cpu"] * 2, name="video-tiny6",
                                   rebalance_every=0, timeout=120)
    try:
        got = play(engine, move=(4, move))
        assert engine.ranks.ranges == move and engine.moves_done == 1
        assert engine.capabilities()["precision"] == "fp8"
    finally:
        engine.shutdown()
    keys = sorted(set(got) & set(fp8_reference))
    assert len(keys) > 60
    ref = np.stack([fp8_reference[k] for k in keys])
    split = np.linalg.norm(np.stack([got[k] for k in keys]) - ref) / np.linalg.norm(ref)
    full = np.stack([reference[k] for k in keys])
    quantised = np.linalg.norm(ref - full) / np.linalg.norm(full)
    print(f"pipeline vs one FP8 process {split:.2e}; FP8 vs float32 {quantised:.2e}")
    # batching moves float32 in its last bits (1e-5 above); an FP8 rounding that flips with
    # them amplifies that, still far below what the quantisation itself changes.  Measured
    # 8e-4 with sigma = t/1000 and 1.9e-3 since sigma is the shifted grid's (3878f73), the
    # FP8 error itself 1.05e-2; why the grid sigma widens the gap is not found yet (issue 18
    # note)
    assert split < 3e-3 and split < quantised / 4
