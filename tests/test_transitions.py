"""Timed transitions and cue lists (daemon/transitions.py): the interpolation itself, the
video engine moved chunk by chunk through the engine worker without a reset, and a fade seen
frame by frame through a real daemon, with cue lists and bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from livediffusion.daemon.engines.base import ParamError
from livediffusion.daemon.engines.blend import blend
from livediffusion.daemon.engines.video.noise import chunk_noise
from livediffusion.daemon.server import Daemon
from livediffusion.daemon.step import FrameRef, OpenStream, PlanItem, StepPlan, UpdateParams
from livediffusion.daemon.transitions import CueList, Transition, parse_cues, parse_spec
from livediffusion.daemon.worker import EngineWorker
from livediffusion.shared import Client
from livediffusion.shared.client import DaemonError
from livediffusion.shared.protocol import FrameSpec

from helpers import wait_until

KINDS = {"prompt": "text", "prompts": "prompts", "prompt_blend": "choice", "seed": "int",
         "seeds": "seeds", "strength": "float", "steps": "int", "decoder": "choice"}
START = {"prompt": "a", "prompts": [], "prompt_blend": "linear", "seed": 1, "seeds": [],
         "strength": 0.2, "steps": 2, "decoder": "vae"}


def transition(seconds=1.0, curve="linear", **target) -> Transition:
    t = Transition(dict(START), {**START, **target}, dict(target), seconds, KINDS, curve,
                   "slerp")
    t.began = 100.0
    return t


def test_floats_move_along_the_curve_and_the_rest_changes_at_the_end():
    t = transition(2.0, strength=0.6, steps=4, decoder="tiny")
    assert t.moving == ["strength"]
    assert t.at(100.0) == {"strength": pytest.approx(0.2)}
    assert t.at(101.0) == {"strength": pytest.approx(0.4)}       # halfway: linear
    assert t.state(101.0)["at_end"] == ["decoder", "steps"]
    assert t.at(102.5) == {"strength": 0.6, "steps": 4, "decoder": "tiny"}
    assert t.done(102.0) and not t.done(101.9)
    smooth = transition(2.0, "smooth", strength=0.6)
    assert smooth.at(100.5)["strength"] == pytest.approx(0.2 + 0.4 * 0.15625)  # 3u^2 - 2u^3
    assert smooth.at(101.0)["strength"] == pytest.approx(0.4)


def test_a_prompt_blends_by_weight_and_a_seed_by_a_noise_slerp_at_unit_variance():
    t = transition(1.0, prompt="b", seed=9)
    assert t.moving == ["prompt", "seed"]
    quarter = t.at(100.25)
    assert quarter["prompts"] == [["a", 0.75], ["b", 0.25]]
    assert quarter["prompt_blend"] == "slerp"
    (s0, w0), (s1, w1) = quarter["seeds"]
    assert (s0, s1) == (1, 9) and w0 == pytest.approx(math.cos(math.pi / 8))
    assert w0 ** 2 + w1 ** 2 == pytest.approx(1.0)
    # the end sets the whole group back: no blend list left behind the target
    assert t.at(101.0) == {"prompt": "b", "prompts": [], "prompt_blend": "linear", "seed": 9,
                           "seeds": []}
    # the noise the engine draws from those weights: unit variance all the way
    for u in (0.0, 0.3, 0.5, 0.9):
        pairs = [(1, math.cos(u * math.pi / 2)), (9, math.sin(u * math.pi / 2))]
        n = chunk_noise(pairs, 3, 0, (4, 64, 64), "cpu")
        assert float(n.std()) == pytest.approx(1.0, abs=0.02)
    assert torch.equal(chunk_noise([(1, 1.0), (9, 0.0)], 3, 0, (8,), "cpu"),
                       chunk_noise(1, 3, 0, (8,), "cpu"))
    # weighted prompts on both sides: each side's weights are normalised first
    both = Transition({**START, "prompts": [["x", 3.0], ["y", 1.0]]},
                      {**START, "prompts": [["y", 2.0], ["z", 2.0]]}, {}, 1.0, KINDS)
    both.began = 0.0
    assert both.at(0.5)["prompts"] == [["x", 0.375], ["y", 0.125 + 0.25], ["z", 0.25]]


def test_a_plain_change_takes_its_parameters_out_of_a_transition():
    t = transition(1.0, prompt="b", strength=0.6, steps=3)
    extra = t.take_over({"prompt"})
    # the new prompt wins at once; the blend's prompts list goes back to the target's
    assert extra == {"prompts": [], "prompt_blend": "linear"}
    assert t.moving == ["strength"] and "prompt" not in t.at(101.0)
    t.take_over({"strength", "steps"})
    assert t.empty


def test_bad_transitions_and_cues_are_refused_with_what_they_take():
    assert parse_spec(2) == (2.0, "linear", "linear")
    assert parse_spec({"seconds": 1.5, "curve": "smooth", "blend": "slerp"}) == \
        (1.5, "smooth", "slerp")
    for bad, says in ((-1, "from 0 to 3600"), (float("nan"), "from 0 to 3600"),
                      (True, "seconds"), ("2", "seconds"), ({"seconds": 1, "curve": "cubic"},
                                                            "linear or smooth"),
                      ({"seconds": 1, "blend": "x"}, "linear or slerp"),
                      ({"seconds": 1, "speed": 2}, "not 'speed'"), (1e9, "3600")):
        with pytest.raises(ParamError, match=says):
            parse_spec(bad)
    for bad, says in (([], "1 to 256"), ([3], "must be a map"), ([{}], "sets no parameters"),
                      ([{"params": {"seed": 1}, "hold": -1}], "hold"),
                      ([{"params": {"seed": 1}, "when": 3}], "unknown field 'when'"),
                      ([{"params": {"seed": 1}, "transition": "soon"}], "seconds")):
        with pytest.raises(ParamError, match=says):
            parse_cues(bad)
    with pytest.raises(ParamError, match="at most 8"):
        Transition({**START, "prompts": [[str(i), 1.0] for i in range(5)]},
                   {**START, "prompts": [[str(i + 5), 1.0] for i in range(5)]}, {}, 1.0, KINDS)


def test_a_cue_list_holds_each_cue_after_its_transition_then_loops_or_ends():
    cues = CueList(parse_cues([{"params": {"seed": 1}, "hold": 2.0},
                               {"params": {"seed": 2}, "hold": 1.0, "label": "two"}]))
    assert cues.due(0.0, True) == 0
    cues.started(0)
    assert cues.due(1.0, False) is None          # its transition is still moving
    assert cues.due(1.0, True) is None           # held from here ...
    assert cues.due(2.9, True) is None
    assert cues.due(3.0, True) == 1              # ... for 2 s
    cues.started(1)
    cues.due(3.0, True)
    cues.pause(3.5)
    assert cues.due(10.0, True) is None and cues.report(10.0)["held_s"] == 0.5
    cues.resume(10.0)
    assert cues.due(10.4, True) is None and cues.report(10.4)["label"] == "two"
    assert cues.due(10.5, True) is None and cues.state == "done"
    looping = CueList(parse_cues([{"params": {"seed": 1}}]), loop=True)
    looping.started(0)
    assert looping.due(0.0, True) == 0


# --- the video engine through the engine worker ---------------------------------------------

SPEC = FrameSpec(64, 48)


def _frames(worker: EngineWorker, sid: int, seq: int, rng) -> tuple[StepPlan, int]:
    n = worker.engines["video-tiny"].frames_per_step(sid)
    refs = []
    for _ in range(n):
        seq += 1
        refs.append(FrameRef(seq, seq, data=bytearray(rng.integers(0, 256, SPEC.shape,
                                                          dtype=np.uint8).tobytes())))
    key = ("video-tiny", 64, 48)
    return StepPlan(seq, "video-tiny", key, [PlanItem(sid, refs)]), seq


def test_the_video_engine_moves_prompt_seed_and_noise_chunk_by_chunk_without_a_reset():
    worker = EngineWorker(("video-tiny",), "cpu")
    worker.build()
    engine = worker.engines["video-tiny"]
    rng = np.random.default_rng(0)
    try:
        held = worker.execute(OpenStream(None, 1, "video-tiny", SPEC, SPEC, 30.0,
                                         {"prompt": "a forest", "seed": 3}))
        engine.settle()
        assert [r.kind for r in held + worker.ready_opens()] == ["opened"]
        seq = 0
        for _ in range(2):
            plan, seq = _frames(worker, 1, seq, rng)
            worker.execute(plan)
        chunks_before = engine.streams[1].next_chunk
        cache_before = engine.streams[1].cache
        [ok] = worker.execute(UpdateParams(None, 1, {"prompt": "a city", "seed": 8,
                                                     "noise_scale": 0.5},
                                           (1.5, "linear", "slerp")))
        assert ok.kind == "params_ok" and ok.body["target"]["prompt"] == "a city"
        assert ok.body["transition"]["moving"] == ["noise_scale", "prompt", "seed"]
        seen, checked = [], False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            plan, seq = _frames(worker, 1, seq, rng)
            results = worker.execute(plan)
            assert all(r.kind != "error" for r in results if hasattr(r, "kind"))
            p = engine.streams[1].params
            seen.append((p.noise_scale, dict(p.prompts).get("a city", 0.0), p.prompts))
            if worker.streams[1].transition is None:
                break
            if 0 < seen[-1][1] < 1 and not checked:  # mid-way: the K/V are the slerp's
                checked = True
                emb_a = engine._prompt_cache["a forest"]
                emb_b = engine._prompt_cache["a city"]
                w = dict(p.prompts)
                want = engine.wan.cross_kv(blend([(emb_a, w["a forest"]),
                                                  (emb_b, w["a city"])], "slerp"))
                torch.testing.assert_close(engine.streams[1].cross_kv[0][0], want[0][0])
            time.sleep(0.05)
        assert worker.streams[1].transition is None, "the transition never ended"
        weights = [w for _, w, _ in seen[:-1]]
        scales = [s for s, _, _ in seen[:-1]]
        assert checked and weights == sorted(weights)
        assert len([w for w in weights if 0 < w < 1]) >= 3, weights
        assert scales == sorted(scales, reverse=True)
        assert len([s for s in scales if 0.5 < s < 0.8]) >= 3, scales
        end = engine.streams[1].params
        assert (end.prompt, end.prompts, end.seed, end.seeds, end.noise_scale) == \
            ("a city", (), 8, (), 0.5)
        # no reset: the chunks went on counting, the same cache, steady chunks of 4
        stream = engine.streams[1]
        assert stream.next_chunk == chunks_before + len(seen)
        assert stream.cache is cache_before and engine.frames_per_step(1) == 4
        torch.testing.assert_close(stream.cross_kv[0][0], engine.wan.cross_kv(
            engine._prompt_cache["a city"])[0][0])
    finally:
        worker.shutdown()


# --- through a real daemon: a fade seen frame by frame, cue lists, bad input --------------------

@pytest.fixture
def daemon(tmp_path):
    d = Daemon(port=0, engines=("passthrough",), presets_path=tmp_path / "presets.json")
    d.start()
    yield d
    d.stop()


class Feed:
    """A tool streaming a flat grey frame and reading back what the daemon makes of it."""

    def __init__(self, client: Client) -> None:
        self.stream = client.open_stream("cam", 32, 16, engine="passthrough")
        self.frame = np.full((16, 32, 3), 200, np.uint8)

    def level(self, timeout: float = 2.0) -> float:
        self.stream.send(self.frame)
        out = self.stream.wait(timeout)
        assert out is not None, "no frame came back"
        return float(out.pixels.mean())


def test_a_fade_over_a_transition_is_seen_frame_by_frame(daemon):
    with Client(daemon.endpoint, name="tool") as tool, \
            Client(daemon.endpoint, name="controller") as ctl:
        feed = Feed(tool)
        assert feed.level() == 200.0
        answer = ctl.control("cam", {"gain": 0.0}, transition={"seconds": 0.8})
        assert answer["gain"] == 1.0          # it starts where it is
        levels, states = [], []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            levels.append(feed.level())
            states.append(ctl.streams()[0]["stats"]["transition"])
            if levels[-1] == 0.0:
                break
            time.sleep(0.02)
        assert levels[-1] == 0.0, levels
        between = [v for v in levels if 0 < v < 200]
        assert len(set(between)) >= 5, levels          # many steps, not a jump
        assert levels == sorted(levels, reverse=True)   # never back up
        assert any(s and 0 < s["progress"] < 1 and s["moving"] == ["gain"] for s in states)
        # (the tool keeps sending while we wait: a host silent for 3 s is dropped)
        assert wait_until(lambda: (feed.level(), ctl.streams()[0]["stats"]["transition"])[1]
                          is None)
        assert ctl.streams()[0]["params"]["gain"] == 0.0
        # the owner's own change with a transition, and a plain change taking over mid-way
        feed.stream.update(gain=1.0, transition=5.0, wait=2.0)
        for _ in range(5):
            feed.level()
        feed.stream.update(gain=0.5, wait=2.0)
        assert feed.level() == 100.0
        time.sleep(0.2)
        assert feed.level() == 100.0 and ctl.streams()[0]["stats"]["transition"] is None


def test_a_cue_list_plays_pauses_jumps_and_ends(daemon):
    with Client(daemon.endpoint, name="tool") as tool, \
            Client(daemon.endpoint, name="controller") as ctl:
        feed = Feed(tool)
        ctl.presets("save", "dim", params={"gain": 0.25, "prompt": "ignored by passthrough"})
        cues = [{"preset": "dim", "transition": 0.2, "hold": 0.2},
                {"params": {"gain": 0.5}, "transition": 0.2, "hold": 0.3, "label": "half"}]
        reply = ctl.cues("cam", "play", cues)
        assert reply["cues"]["count"] == 2 and reply["cues"]["label"] == "dim"

        def run_until(pred, timeout=5.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                level = feed.level()
                ctl.poll(0)  # its heartbeats
                if pred(level):
                    return level
                time.sleep(0.02)
            raise AssertionError("the cue list never got there")
        run_until(lambda v: v == 50.0)                       # cue 0: 200 * 0.25
        run_until(lambda v: v == 100.0)                      # cue 1: 200 * 0.5
        assert wait_until(lambda: (feed.level(), ctl.streams()[0]["stats"]["cues"])[1] is None)
        # a looping list, paused mid-transition: the level holds still
        ctl.cues("cam", "play", [{"params": {"gain": 1.0}, "transition": 0.6, "hold": 0.5},
                                 {"params": {"gain": 0.5}, "transition": 0.6, "hold": 0.5}],
                 loop=True)
        run_until(lambda v: 100.0 < v < 180.0)
        paused = ctl.cues("cam", "pause")
        assert paused["cues"]["state"] == "paused" and paused["transition"]["paused"]
        held = feed.level()
        time.sleep(0.3)
        assert feed.level() == held
        ctl.cues("cam", "resume")
        run_until(lambda v: v == 200.0)
        jumped = ctl.cues("cam", "jump", index=1)
        assert jumped["cues"]["index"] == 1
        run_until(lambda v: v == 100.0)
        assert ctl.cues("cam", "next")["cues"]["index"] == 0     # it loops
        assert ctl.cues("cam", "stop").get("cues") is None
        # refusals: one clear error each, the stream unharmed
        for op, kwargs, says in (
                ("jump", {"index": 7}, "no cue list is playing"),
                ("dance", {}, "play, pause, resume"),
                ("play", {"cues": [{"preset": "gone"}]}, "no preset is named 'gone'"),
                ("play", {"cues": [{"params": {"gain": 9.0}}]}, "cue 0: gain must be"),
                ("play", {"cues": [{"params": {"gain": 0.1}, "hold": "long"}]}, "hold")):
            with pytest.raises(DaemonError, match=says):
                ctl.cues("cam", op, **kwargs)
        with pytest.raises(DaemonError, match="no open stream is named 'nobody'"):
            ctl.cues("nobody", "status")
        assert feed.level() > 0


def test_a_bad_transition_is_refused_and_changes_nothing(daemon):
    with Client(daemon.endpoint, name="tool") as tool:
        feed = Feed(tool)
        feed.stream.update(gain=0.5, wait=2.0)
        for change, spec, says in (({"gain": 5.0}, 1.0, "gain must be a number from 0 to 4"),
                                   ({"gain": 0.1}, -2, "from 0 to 3600"),
                                   ({"gain": 0.1}, {"seconds": 1, "curve": "bounce"},
                                    "linear or smooth"),
                                   ({"gain": 0.1, "reset": True}, 1.0, "reset cannot"),
                                   ({"mode": "sepia"}, 1.0, "mode must be one of")):
            with pytest.raises(DaemonError, match=says):
                feed.stream.update(change, transition=spec, wait=2.0)
        assert feed.level() == 100.0
        with pytest.raises(DaemonError, match="must be int/float/dict"):
            feed.stream.update({"gain": 0.1}, transition="slowly", wait=2.0)
        assert feed.level() == 100.0


def test_lora_scales_glide_a_new_lora_comes_in_from_zero_and_a_removed_one_leaves():
    kinds = {**KINDS, "loras": "loras"}
    start = {**START, "loras": [["ink", 1.0], ["old", 0.5]]}
    t = Transition(start, {**start, "loras": [["ink", 0.0], ["new", 0.8]]}, {}, 2.0, kinds)
    t.began = 0.0
    assert t.moving == ["loras"]
    assert t.at(1.0)["loras"] == [["ink", 0.5], ["old", 0.25], ["new", 0.4]]
    assert t.at(2.0) == {"loras": [["ink", 0.0], ["new", 0.8]]}
