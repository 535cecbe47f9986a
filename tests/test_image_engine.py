"""The image engine on the tiny SD preset: Stream Batch against the sequential computation,
the guidance formulas computed directly, the similarity filter's statistics, live parameters,
several streams in one UNet call, resolutions, the diffusers-layout loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from livediffusion.daemon.engines.base import InputFrame, ParamError, StreamConfig, StreamInput
from livediffusion.daemon.engines.image import lcm
from livediffusion.daemon.engines.image.engine import encode_prompt, skip_probability
from livediffusion.daemon.engines.image.factory import build_image_engine
from livediffusion.shared.protocol import FrameSpec

SPEC = FrameSpec(64, 48)


@pytest.fixture(scope="module")
def engine():
    e = build_image_engine("tiny")
    with torch.no_grad():  # random init leaves some layers near zero: make every path matter
        g = torch.Generator().manual_seed(3)
        for p in e.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return e


def clip(n: int, spec: FrameSpec = SPEC, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, spec.shape, dtype=np.uint8) for _ in range(n)]


def run(engine, sid: int, frames: list[np.ndarray], spec: FrameSpec = SPEC) -> list:
    out = []
    for i, px in enumerate(frames):
        got = engine.submit([StreamInput(sid, [InputFrame(i + 1, px, spec, i)])])[0].frames
        out.extend(got)
    return out


def open_stream(engine, sid: int, spec: FrameSpec = SPEC, **params) -> None:
    engine.open_stream(StreamConfig(sid, spec, spec, 30.0, params))


# --- the sequential reference, written from the formulas -------------------------------------


@torch.no_grad()
def sequential(engine, stream, pixels: np.ndarray) -> torch.Tensor:
    """Denoise one frame through all stages, one UNet call per stage, with the unconditional
    noise computed from the formulas directly (not from the engine's carried buffers)."""
    p, sch = stream.params, stream.sched
    x = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 255 * 2 - 1
    z = engine._encode(x)
    noise = stream.noise
    xs = sch.a[:1] * z + sch.b[:1] * noise[:1]
    z_anchor = z
    for s in range(sch.stages):
        t = sch.timesteps[s:s + 1]

        def unet(cond):
            return engine.unet(xs, t, encoder_hidden_states=cond["emb"]).sample

        eps_c = unet(stream.cond)
        eps_u = None
        if p.cfg == "full":
            eps_u = unet(stream.uncond)
        elif p.cfg == "initialize" and s == 0:
            eps_u = unet(stream.uncond)
            z_anchor = (xs - sch.b[:1] * eps_u) / sch.a[:1]   # residual anchored here
        elif p.cfg in ("self", "initialize"):
            eps_u = p.delta * (xs - sch.a[s] * z_anchor) / sch.b[s]
        eps = eps_c if eps_u is None else eps_u + p.guidance * (eps_c - eps_u)
        x0 = sch.c_out[s] * (xs - sch.b[s] * eps) / sch.a[s] + sch.c_skip[s] * xs
        if s + 1 < sch.stages:
            xs = sch.a[s + 1] * x0 + sch.b[s + 1] * noise[s + 1:s + 2]
    img = engine._decode(x0)
    return ((img + 1) * 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255


@pytest.mark.parametrize("cfg,steps", [("none", 2), ("self", 3), ("full", 2),
                                       ("initialize", 3), ("self", 1)])
def test_stream_batch_equals_the_sequential_computation(engine, cfg, steps):
    open_stream(engine, 1, steps=steps, cfg=cfg, guidance=1.7, delta=0.8, strength=0.7)
    try:
        frames = clip(6 + steps)
        out = run(engine, 1, frames)
        assert len(out) == len(frames)  # one output per input from the first frame on
        stream = engine.streams[1]
        n = stream.sched.stages
        assert n == steps
        for k in range(len(frames) - n + 1):   # frame k leaves the last stage at k + n - 1
            got = out[k + n - 1].pixels.float()
            want = sequential(engine, stream, frames[k])
            assert (got - want).abs().max() <= 2.0, f"frame {k} differs"
    finally:
        engine.close_stream(1)


def test_carried_residual_noise_equals_its_definition():
    """r_{s+1} carried from (x_s, r_s, x0_s) equals (x_{s+1} - a z) / b for the frame's z."""
    from livediffusion.daemon.models.sd import scheduler_config

    sch = lcm.make_schedule(scheduler_config(), (10, 25, 40), "cpu", torch.float64)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    x0_hat = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)  # any estimate
    xs = torch.cat([sch.a[:1] * z + sch.b[:1] * noise[:1],
                    sch.a[1:2] * x0_hat[:1] + sch.b[1:2] * noise[1:2]], 0)
    rs = (xs - sch.a[:2] * z) / sch.b[:2]
    carried = lcm.carry_residual(x0_hat, xs, rs, noise[1:], sch)
    x_next = sch.a[1:] * x0_hat + sch.b[1:] * noise[1:]
    torch.testing.assert_close(carried, (x_next - sch.a[1:] * z) / sch.b[1:])


# --- similarity filter -----------------------------------------------------------------------


def test_skip_rate_matches_the_formula(engine):
    open_stream(engine, 1, similarity_filter=True, similarity_threshold=0.9, max_skip=10**3)
    try:
        stream = engine.streams[1]
        run(engine, 1, clip(1))
        g = torch.Generator().manual_seed(1)
        a = torch.rand(48, 64, 3, generator=g)
        for noise_level in (0.05, 0.12, 0.2):
            b = (a + noise_level * torch.randn(48, 64, 3, generator=g)).clamp(0, 1)
            cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
            expected = skip_probability(cos, 0.9)
            skipped = 0
            trials = 3000
            for _ in range(trials):
                stream.prev_input, stream.skips = a, 0
                skipped += engine._skip(stream, b)
            assert abs(skipped / trials - expected) < 4 * math.sqrt(0.25 / trials) + 1e-9, \
                (noise_level, cos, expected, skipped / trials)
        assert skip_probability(0.9, 0.9) == 0.0 and skip_probability(1.0, 0.9) == 1.0
    finally:
        engine.close_stream(1)


def test_max_skip_is_honoured_and_skips_repeat_the_last_output(engine):
    open_stream(engine, 1, similarity_filter=True, similarity_threshold=0.5, max_skip=3)
    try:
        still = clip(1)[0]
        out = run(engine, 1, [still] * 12)
        stream = engine.streams[1]
        # identical frames: cos = 1, skip probability 1, so process, skip x3, process, ...
        assert stream.counters == {"processed": 3, "skipped": 9}
        assert [f.in_seq for f in out] == list(range(1, 13))  # every frame answered, on time
        for i in (1, 2, 3):
            assert torch.equal(out[i].pixels, out[0].pixels)
    finally:
        engine.close_stream(1)


# --- live parameters -------------------------------------------------------------------------


CHANGES = [
    {"prompt": "a red lighthouse"}, {"prompts": [["a forest", 1.0], ["a city", 2.0]]},
    {"prompt_blend": "slerp"}, {"negative_prompt": "blurry"}, {"seed": 99},
    {"seeds": [[1, 1.0], [2, 0.5]]}, {"strength": 0.9}, {"steps": 3}, {"steps": 1},
    {"t_index_list": [20, 35, 45]}, {"guidance": 2.5}, {"delta": 0.5}, {"cfg": "full"},
    {"cfg": "initialize"}, {"cfg": "none"}, {"cfg": "self"}, {"noise": "fresh"},
    {"noise": "fixed"}, {"similarity_filter": True}, {"similarity_threshold": 0.5},
    {"max_skip": 2}, {"reset": True},
]


def test_every_parameter_change_keeps_frames_normal(engine):
    open_stream(engine, 1, steps=2, guidance=1.4)
    try:
        frames = clip(len(CHANGES) + 3, seed=4)
        run(engine, 1, frames[:3])
        for i, change in enumerate(CHANGES):
            params = engine.update_params(1, change)
            for key, value in change.items():
                if key != "reset":
                    got = params[key]
                    assert got == value or [list(x) for x in value] == got or \
                        list(value) == got, (key, got)
            out = run(engine, 1, [frames[3 + i]])[0].pixels.float()
            assert torch.isfinite(out).all()
            assert 5 < float(out.mean()) < 250 and float(out.std()) > 1, change
    finally:
        engine.close_stream(1)


@pytest.mark.parametrize("change,match", [
    ({"cfg": "double"}, "cfg must be one of"), ({"steps": 5}, "steps must be"),
    ({"strength": 1.5}, "strength must be"), ({"t_index_list": [30, 10]}, "increasing"),
    ({"seeds": [[1, 0.0]]}, "must not all be zero"), ({"guidance": "high"}, "guidance"),
    ({"nonsense": 1}, "no parameter 'nonsense'"), ({"prompt_blend": "cubic"}, "prompt_blend")])
def test_bad_parameters_are_refused_with_a_sentence(engine, change, match):
    open_stream(engine, 1)
    try:
        with pytest.raises(ParamError, match=match):
            engine.update_params(1, change)
    finally:
        engine.close_stream(1)


def test_strength_maps_onto_the_schedule():
    from livediffusion.daemon.engines.image.params import ImageParams

    assert ImageParams(strength=1.0, steps=1).indices() == (0,)
    assert ImageParams(strength=0.4, steps=1).indices() == (30,)
    assert ImageParams(strength=0.4, steps=2).indices() == (30, 40)
    assert ImageParams(strength=0.02, steps=4).indices() == (49,)   # no room left: one stage
    assert ImageParams(t_index_list=(32, 45)).indices() == (32, 45)
    for s in np.linspace(0, 1, 21):
        for n in range(1, 5):
            idx = ImageParams(strength=float(s), steps=n).indices()
            assert list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] <= 49


def test_prompt_blends():
    a, b = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    torch.testing.assert_close(lcm.blend([(a, 1.0), (b, 3.0)], "linear"), 0.25 * a + 0.75 * b)
    mid = lcm.blend([(a, 1.0), (b, 1.0)], "slerp")
    # halfway on the arc: equal angles to both ends, length between theirs
    cos = torch.nn.functional.cosine_similarity
    assert abs(float(cos(mid.flatten(), a.flatten(), dim=0)) -
               float(cos(mid.flatten(), b.flatten(), dim=0))) < 1e-5
    torch.testing.assert_close(lcm.blend([(a, 1.0)], "slerp"), a)


def test_seed_blend_keeps_unit_variance():
    n = lcm.seeded_noise(((1, 1.0), (2, 1.0), (3, 2.0)), (1, 4, 64, 64), "cpu", torch.float32)
    assert abs(float(n.std()) - 1.0) < 0.03
    one = lcm.seeded_noise(((1, 1.0),), (1, 4, 8, 8), "cpu", torch.float32)
    torch.testing.assert_close(one, lcm.seeded_noise(((1, 5.0),), (1, 4, 8, 8), "cpu",
                                                     torch.float32))


# --- streams, sizes ---------------------------------------------------------------------------


def test_several_streams_share_one_unet_call_and_match_running_alone(engine):
    calls = {"n": 0}
    real = engine._unet

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    specs = {1: SPEC, 2: SPEC, 3: FrameSpec(40, 72)}
    settings = {1: dict(steps=2, cfg="self", guidance=1.5), 2: dict(steps=3, cfg="full",
                                                                      guidance=2.0, seed=5),
                3: dict(steps=1)}
    frames = {sid: clip(4, spec, seed=sid) for sid, spec in specs.items()}
    alone = {}
    for sid, spec in specs.items():
        open_stream(engine, 10 + sid, spec, **settings[sid])
        alone[sid] = [f.pixels for f in run(engine, 10 + sid, frames[sid], spec)]
        engine.close_stream(10 + sid)
    for sid, spec in specs.items():
        open_stream(engine, sid, spec, **settings[sid])
    engine._unet = counting
    try:
        together = {sid: [] for sid in specs}
        for i in range(4):
            batch = [StreamInput(sid, [InputFrame(i + 1, frames[sid][i], spec, i)])
                     for sid, spec in specs.items()]
            for out in engine.submit(batch):
                together[out.stream_id] += [f.pixels for f in out.frames]
        assert calls["n"] == 4 * 2  # one call per size per step: two sizes
        for sid in specs:
            for x, y in zip(alone[sid], together[sid]):
                assert (x.int() - y.int()).abs().max() <= 1
    finally:
        engine._unet = real
        for sid in specs:
            engine.close_stream(sid)


def test_sizes_must_be_multiples_of_8_in_range(engine):
    with pytest.raises(ParamError, match="multiple of 8"):
        open_stream(engine, 1, FrameSpec(60, 48))
    open_stream(engine, 1, FrameSpec(40, 72))
    try:
        out = run(engine, 1, clip(2, FrameSpec(40, 72)), FrameSpec(40, 72))
        assert out[-1].pixels.shape == (72, 40, 3)
    finally:
        engine.close_stream(1)


# --- weights -----------------------------------------------------------------------------------


def test_diffusers_layout_directory_loads_to_the_same_model(engine, tmp_path):
    from livediffusion.daemon.models import sd

    models = engine.models
    models.unet.save_pretrained(tmp_path / "unet")
    models.vae.save_pretrained(tmp_path / "taesd")
    tokenizer, encoder = models.text[0]
    encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = sd.load_dir(tmp_path, dtype=torch.float32, tiny_vae=tmp_path / "taesd")
    assert not loaded.xl
    for a, b in ((models.unet, loaded.unet), (models.vae, loaded.vae),
                 (encoder, loaded.text[0][1])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(encode_prompt(loaded, "a cat", "cpu")["emb"],
                               encode_prompt(models, "a cat", "cpu")["emb"])
    with pytest.raises(FileNotFoundError, match="diffusers-layout"):
        sd.load_dir(tmp_path / "taesd")


def test_real_presets_have_the_published_sizes():
    from diffusers import UNet2DConditionModel
    from livediffusion.daemon.models.sd import PRESETS

    sizes = {}
    for name in ("sd-turbo", "sd15", "sdxl-turbo"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**PRESETS[name].unet)
        sizes[name] = sum(p.numel() for p in unet.parameters()) / 1e6
    assert 860 < sizes["sd-turbo"] < 870 and 855 < sizes["sd15"] < 865
    assert 2560 < sizes["sdxl-turbo"] < 2575


def test_the_sdxl_conditioning_path_runs_on_the_tiny_xl_preset():
    """Two text encoders (penultimate layers concatenated, pooled output of the second) and
    the size ids, as sdxl-turbo needs them."""
    e = build_image_engine("tiny-xl")
    assert e.models.xl
    cond = encode_prompt(e.models, "a cat", "cpu")
    assert cond["emb"].shape == (1, 77, 64) and cond["pooled"].shape == (1, 32)
    open_stream(e, 1, steps=2, cfg="full", guidance=1.5)
    out = run(e, 1, clip(3))
    assert len(out) == 3 and out[-1].pixels.shape == (48, 64, 3)
    assert torch.isfinite(out[-1].pixels.float()).all()
    ids = e.streams[1].cond["time_ids"]
    assert ids.tolist() == [[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]]


def test_real_engine_loads_a_pulled_pipeline_and_fuses_lcm_lora(engine, tmp_path, monkeypatch):
    """build_real_image_engine on snapshots laid out as the Hub's (tiny weights here): the
    diffusers pipeline folders, TAESD, and LCM-LoRA in the kohya layout fused at load."""
    from safetensors.torch import save_file

    from livediffusion.daemon.engines.image.factory import build_real_image_engine
    from livediffusion.daemon.models import registry

    models = engine.models
    pipe, taesd, lora_dir = tmp_path / "sd15", tmp_path / "taesd", tmp_path / "lcm"
    models.unet.save_pretrained(pipe / "unet")
    models.text[0][1].save_pretrained(pipe / "text_encoder")
    models.text[0][0].save_pretrained(pipe / "tokenizer")
    models.vae.save_pretrained(taesd)
    target = "down_blocks.0.attentions.0.proj_in"
    weight = dict(models.unet.named_modules())[target].weight
    down, up = torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2)
    lora_dir.mkdir()
    key = "lora_unet_" + target.replace(".", "_")
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
               f"{key}.alpha": torch.tensor(2.0)}, str(lora_dir / "pytorch_lora_weights.safetensors"))
    places = {"sd15": pipe, "taesd": taesd, "lcm-lora-sdv1-5": lora_dir}
    monkeypatch.setattr(registry, "require", lambda name: places[name])
    monkeypatch.setattr(registry, "local_path", lambda name: places.get(name))
    real = build_real_image_engine("sd15-lcm", device="cpu")
    assert real.name == "image-sd15-lcm" and "lcm-lora-sdv1-5" in real.models.source
    fused = dict(real.unet.named_modules())[target].weight
    torch.testing.assert_close(fused, weight + up @ down)
    big = FrameSpec(256, 256)  # the real engines take sides from 256
    open_stream(real, 1, big, steps=2)
    assert len(run(real, 1, clip(2, big), big)) == 2


def test_static_buffer_unet_calls_equal_direct_ones():
    """On GPUs the UNet call is recorded as a CUDA graph per batch shape: inputs are copied
    into static buffers and the output copied out.  The same buffer logic runs here without
    recording and must give the direct results, across shapes and repeated shapes."""
    direct, static = build_image_engine("tiny"), build_image_engine("tiny")
    static.unet_call.static = True
    assert not static.unet_call.enabled  # no CUDA here: nothing is recorded
    specs = [SPEC, SPEC, FrameSpec(40, 72)]
    outs = {}
    for e in (direct, static):
        for sid, spec in enumerate(specs, 1):
            open_stream(e, sid, spec, steps=sid, cfg="full", guidance=1.3)
        got = []
        for i in range(4):
            batch = [StreamInput(sid, [InputFrame(i + 1, clip(1, spec, seed=i)[0], spec, i)])
                     for sid, spec in enumerate(specs, 1)]
            got += [f.pixels for o in e.submit(batch) for f in o.frames]
        outs[e] = got
    assert len(static.unet_call.entries) == 2  # one per batch shape (two sizes)
    for a, b in zip(outs[direct], outs[static]):
        assert torch.equal(a, b)


def test_graphed_call_keeps_a_bounded_number_of_shapes():
    from livediffusion.daemon.engines.graphs import GraphedCall

    call = GraphedCall(lambda x: x * 2, enabled=False, static=True, max_graphs=3)
    for n in range(1, 7):
        torch.testing.assert_close(call(torch.ones(n)), torch.full((n,), 2.0))
    assert len(call.entries) == 3
    first = call(torch.arange(6.0))
    first.add_(100)  # the caller owns its copy; the static output is untouched
    torch.testing.assert_close(call(torch.arange(6.0)), torch.arange(6.0) * 2)


def test_image_stream_over_the_real_transport():
    from helpers import wait_until

    from livediffusion.daemon.server import Daemon
    from livediffusion.shared import Client

    daemon = Daemon(port=0, engines=("image-tiny",)).start()
    try:
        with Client(daemon.endpoint) as c:
            stream = c.open_stream("img", 64, 48, engine="image-tiny", keep=8, timeout=30,
                                   params={"steps": 2, "cfg": "self", "guidance": 1.2})
            assert stream.params["steps"] == 2 and stream.params["cfg"] == "self"
            frames = clip(6, seed=8)
            for px in frames[:3]:
                assert stream.send(px)
                assert wait_until(lambda: (c.poll(0.02), stream.latest())[1] is not None
                                  and stream.latest().in_seq >= 1, 20)
            effective = stream.update(prompt="a new prompt", strength=0.8, steps=3, wait=10)
            assert effective["steps"] == 3 and effective["t_index_list_effective"] == [10, 23, 36]
            for px in frames[3:]:
                stream.send(px)
            assert wait_until(lambda: (c.poll(0.02), stream.latest())[1] is not None
                              and stream.latest().in_seq == 6, 20)
            last = stream.latest()
            assert last.pixels.shape == (48, 64, 3) and last.pixels.std() > 1
            stats = c.stats()["img"]["daemon"]
            # newest frames win: a frame sent while the engine worked may be overtaken (or
            # skipped by the rate limit when the engine is slower than the sender), every
            # frame is accounted for, and every frame the daemon took is answered
            assert stats["frames_in"] + stats["dropped"] + stats["decimated"] + \
                stats["torn"] == 6
            assert stats["frames_out"] == stats["frames_in"] >= 3
    finally:
        daemon.stop()


def test_an_out_of_memory_step_leaves_every_stream_usable(engine):
    """A failed UNet call (out of memory) raises to the worker, which reports it; the next
    frame of the same streams is a normal one (no half-advanced Stream Batch buffers)."""
    open_stream(engine, 1, steps=3, cfg="self", guidance=1.3)
    open_stream(engine, 2, steps=2)
    real = engine.unet_call
    try:
        frames = clip(5, seed=2)
        for i in range(2):
            engine.submit([StreamInput(sid, [InputFrame(i + 1, frames[i], SPEC, i)])
                           for sid in (1, 2)])
        before = {sid: engine.streams[sid].buf_x.clone() for sid in (1, 2)}

        def oom(*args):
            raise torch.OutOfMemoryError("simulated")

        engine.unet_call = oom
        with pytest.raises(torch.OutOfMemoryError):
            engine.submit([StreamInput(sid, [InputFrame(3, frames[2], SPEC, 2)])
                           for sid in (1, 2)])
        for sid in (1, 2):
            assert torch.equal(engine.streams[sid].buf_x, before[sid])  # nothing advanced
        engine.unet_call = real
        out = engine.submit([StreamInput(sid, [InputFrame(4, frames[3], SPEC, 3)])
                             for sid in (1, 2)])
        for o in out:
            px = o.frames[0].pixels.float()
            assert torch.isfinite(px).all() and px.std() > 1
    finally:
        engine.unet_call = real
        engine.close_stream(1)
        engine.close_stream(2)


def test_a_new_prompt_is_encoded_beside_the_stream(monkeypatch):
    """With the text thread (the default on GPUs), a prompt change returns at once, the
    stream keeps its old conditioning until the new one is encoded, then switches."""
    import time as _time

    from livediffusion.daemon.engines.image import engine as image_engine

    real = image_engine.encode_prompt

    def slow(models, prompt, device):
        if prompt.startswith("slow"):
            _time.sleep(0.5)
        return real(models, prompt, device)

    monkeypatch.setattr(image_engine, "encode_prompt", slow)
    engine = build_image_engine("tiny")
    engine.text_thread = True
    try:
        open_stream(engine, 1)
        engine.settle()                        # its first prompt, encoded beside it
        assert engine.stream_ready(1)
        old = engine.streams[1].cond
        started = _time.monotonic()
        engine.update_params(1, {"prompt": "slow: a lighthouse"})
        assert _time.monotonic() - started < 0.2
        frame = np.zeros((SPEC.height, SPEC.width, 3), np.uint8)
        out = engine.submit([StreamInput(1, [InputFrame(1, frame, SPEC, 1)])])
        assert len(out[0].frames) == 1 and engine.streams[1].cond is old
        engine.settle()
        assert engine.streams[1].cond is not old
    finally:
        engine.shutdown()
