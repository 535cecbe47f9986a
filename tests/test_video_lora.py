"""LoRAs on the video DiT (models/video_lora.py): the key layouts people publish, outputs
equal to the LoRA fused into the weights, live changes that neither reset a stream nor record
a new fixed-shape forward, several streams with their own LoRAs in one forward, and clear
refusals.  Tiny preset, CPU, random weights and generated LoRA files."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from livediffusion.daemon.engines.base import InputFrame, ParamError, StreamConfig, StreamInput
from livediffusion.daemon.engines.video.engine import VideoEngine
from livediffusion.daemon.engines.video.factory import build_video_parts
from livediffusion.daemon.models import fp8
from livediffusion.daemon.models import video_lora as VL
from livediffusion.shared.protocol import FrameSpec

SPEC = FrameSpec(64, 48)
DIFFUSERS_TO_WAN = {v: k for k, v in VL.WAN_TO_DIFFUSERS.items()}
#: a short cache so the fixed-shape forward starts after a few chunks
STREAM = {"steps": 2, "cache_frames": 3, "sinks": 1, "rope_max": 8, "seed": 5}


@pytest.fixture(scope="module")
def parts():
    return build_video_parts("tiny")


@pytest.fixture(scope="module")
def shapes(parts):
    out = {}
    for i, block in enumerate(parts.transformer.blocks):
        for target in VL.TARGETS:
            layer = block.get_submodule(target)
            out[(i, target)] = (layer.in_features, layer.out_features)
    return out


def make_lora(shapes, *, rank=4, alpha=2.0, seed=0, layout="peft", targets=None):
    """A random LoRA as (its state dict, metadata, {(block, target): (A, B)})."""
    g = torch.Generator().manual_seed(seed)
    state, ref = {}, {}
    for (b, t), (fin, fout) in shapes.items():
        if targets is not None and t not in targets:
            continue
        a = torch.randn(rank, fin, generator=g) * 0.3
        up = torch.randn(fout, rank, generator=g) * 0.3
        ref[(b, t)] = (a, up)
        if layout == "peft":
            key = f"transformer.blocks.{b}.{t}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, up
        elif layout == "wan":   # Wan's names, as musubi-tuner's "other" format writes them
            key = f"diffusion_model.blocks.{b}.{DIFFUSERS_TO_WAN[t]}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, up
            state[f"{key}.alpha"] = torch.tensor(alpha)
        else:                   # kohya / musubi-tuner's default
            key = f"lora_unet_blocks_{b}_{DIFFUSERS_TO_WAN[t].replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, up
            state[f"{key}.alpha"] = torch.tensor(alpha)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha,
                                                 "transformer.r": rank})} \
        if layout == "peft" else None
    return state, meta, ref


def write_lora(folder, name, shapes, **kw):
    state, meta, ref = make_lora(shapes, **kw)
    save_file(state, str(folder / f"{name}.safetensors"), metadata=meta)
    return ref


@torch.no_grad()
def fuse(transformer, ref, scale, alpha, rank):
    """A deep copy with scale * alpha / rank * B @ A added to each adapted weight."""
    out = copy.deepcopy(transformer)
    for (b, t), (a, up) in ref.items():
        out.blocks[b].get_submodule(t).weight.add_(scale * alpha / rank * (up @ a))
    return out


def engine_on(parts, transformer, **kw):
    engine = VideoEngine("video-tiny", transformer, parts.vae, parts.text, device="cpu",
                         min_side=parts.min_side, tiny_decoder=parts.tiny_decoder,
                         tiny_encoder=parts.tiny_encoder, **kw)
    engine.wan.fixed_shape = True   # the fixed-shape forward (CUDA graphs on GPUs) runs too
    engine.latents = {}
    plain = engine._decode

    def keep(stream, finished):   # the clean latents, for tight comparisons
        for c in stream.flushed + finished:
            engine.latents.setdefault(stream.config.stream_id, {})[c.id] = c.x.clone()
        return plain(stream, finished)
    engine._decode = keep
    return engine


class Ticks:
    """Feeds streams of an engine the same seeded frames, together or alone."""

    def __init__(self, engine):
        self.engine, self.rngs, self.seqs = engine, {}, {}

    def open(self, sid, **params):
        self.engine.open_stream(StreamConfig(sid, SPEC, SPEC, 30.0, {**STREAM, **params}))
        self.engine.settle()
        self.rngs[sid], self.seqs[sid] = np.random.default_rng(100 + sid % 10), 0

    def __call__(self, *sids):
        inputs = []
        for sid in sids:
            frames = []
            for _ in range(self.engine.frames_per_step(sid)):
                self.seqs[sid] += 1
                frames.append(InputFrame(self.seqs[sid], self.rngs[sid].integers(
                    0, 256, SPEC.shape, dtype=np.uint8), SPEC, self.seqs[sid]))
            inputs.append(StreamInput(sid, frames))
        self.engine.submit(inputs)


def close(a, b, tol=2e-5):
    assert a.keys() == b.keys() and len(a) >= 4
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        assert err <= tol * max(1.0, b[k].abs().max().item()), (k, err)


# --- layouts --------------------------------------------------------------------------------

def test_the_three_key_layouts_read_as_the_same_lora_and_match_diffusers(tmp_path, shapes):
    """PEFT/diffusers (alpha from its metadata), Wan's own names and kohya's flattened names
    name the same layers; what the slots load equals diffusers' own converters' reading."""
    loaded = {}
    for layout in ("peft", "wan", "kohya"):
        ref = write_lora(tmp_path, layout, shapes, layout=layout, rank=4, alpha=2.0)
        info = VL.inspect_file(tmp_path / f"{layout}.safetensors", shapes, max_rank=8)
        assert info.layout == {"peft": "diffusers"}.get(layout, layout) and info.rank == 4
        assert set(info.entries) == set(shapes)
        assert all(alpha == 2.0 and rank == 4 for *_, rank, alpha in info.entries.values())
        loaded[layout] = VL.load_weights(info, torch.float32, "cpu")
        for key, (a, up) in loaded[layout].items():
            torch.testing.assert_close(up @ a, 0.5 * ref[key][1] @ ref[key][0])
    for key in shapes:
        for layout in ("wan", "kohya"):
            torch.testing.assert_close(loaded[layout][key][0], loaded["peft"][key][0])
            torch.testing.assert_close(loaded[layout][key][1], loaded["peft"][key][1])
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    for layout, fn in (("wan", "_convert_non_diffusers_wan_lora_to_diffusers"),
                       ("kohya", "_convert_musubi_wan_lora_to_diffusers")):
        if not hasattr(conv, fn):
            continue
        state, _, _ = make_lora(shapes, layout=layout, rank=4, alpha=2.0)
        theirs = getattr(conv, fn)(dict(state))
        for (b, t), (a, up) in loaded[layout].items():
            key = f"transformer.blocks.{b}.{t}"
            want = theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"]
            torch.testing.assert_close(up @ a, want)


# --- outputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_lora_at_a_scale_equals_it_fused_into_the_weights(tmp_path, parts, shapes, layout):
    ref = write_lora(tmp_path, "style", shapes, layout=layout, rank=4, alpha=2.0, seed=1)
    scale = 0.7
    base = copy.deepcopy(parts.transformer)
    fused = engine_on(parts, fuse(parts.transformer, ref, scale, 2.0, 4))
    lora = engine_on(parts, base, lora_slots=2, lora_rank=8, lora_folder=tmp_path)
    plain = engine_on(parts, copy.deepcopy(parts.transformer))
    for engine in (fused, lora, plain):
        tick = Ticks(engine)
        tick.open(1, loras=[["style", scale]] if engine is lora else [])
        for _ in range(7):
            tick(1)
    assert lora.streams[1].cache.graphs   # the fixed-shape forward ran with the branch
    close(lora.latents[1], fused.latents[1])
    # and the LoRA does change the picture (the comparison is not vacuous)
    assert max((lora.latents[1][k] - plain.latents[1][k]).abs().max().item()
               for k in plain.latents[1]) > 1e-2


def test_scale_zero_and_removal_equal_no_lora_exactly(tmp_path, parts, shapes):
    write_lora(tmp_path, "a", shapes, seed=2)
    plain = engine_on(parts, copy.deepcopy(parts.transformer))
    lora = engine_on(parts, copy.deepcopy(parts.transformer), lora_slots=1, lora_rank=4,
                     lora_folder=tmp_path)
    ta, tb = Ticks(plain), Ticks(lora)
    ta.open(1)
    tb.open(1, loras=[["a", 0.0]])
    for _ in range(6):
        ta(1)
        tb(1)
    assert all(torch.equal(lora.latents[1][k], plain.latents[1][k]) for k in plain.latents[1])
    # removed (its last stream closes): the slot is zero, a stale scale changes nothing
    lora.update_params(1, {"loras": [["a", 1.0]]})
    lora.settle()
    tb(1)
    lora.close_stream(1)
    assert not lora._loras.held
    layers = lora._loras.bank.layers.values()
    assert all(not m.lora_down.any() and not m.lora_up.any() for m in layers)
    lora._loras.bank.write_rows([[3.0]] * 8)
    ta.open(2)
    tb.open(2)
    for _ in range(5):
        ta(2)
        tb(2)
    assert all(torch.equal(lora.latents[2][k], plain.latents[2][k]) for k in plain.latents[2])


def test_two_streams_in_one_forward_each_equal_their_own_run(tmp_path, parts, shapes):
    write_lora(tmp_path, "a", shapes, layout="peft", rank=4, seed=3)
    write_lora(tmp_path, "b", shapes, layout="kohya", rank=2, alpha=1.0, seed=4,
               targets=("attn1.to_q", "attn2.to_k", "ffn.net.2"))
    kw = dict(lora_slots=2, lora_rank=4, lora_folder=tmp_path)
    together = engine_on(parts, copy.deepcopy(parts.transformer), **kw)
    alone = engine_on(parts, copy.deepcopy(parts.transformer), **kw)
    tt, ta = Ticks(together), Ticks(alone)
    for tick in (tt, ta):
        tick.open(1, loras=[["a", 0.8]], prompt="one")
        tick.open(2, loras=[["b", -1.5], ["a", 0.3]], prompt="two")
    for _ in range(7):
        tt(1, 2)
        ta(1)
        ta(2)
    assert together._shared_graphs   # one several-stream fixed-shape forward
    for sid in (1, 2):
        close(together.latents[sid], alone.latents[sid])


def test_fp8_base_with_a_bf16_branch(tmp_path, parts, shapes):
    """The branch beside an FP8 linear adds its low-rank product (in bf16); at scale 0 the
    engine on FP8 layers is the FP8 engine without slots, exactly; at a scale it is near
    the LoRA fused into the float32 weights (FP8's own error), far nearer than without."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q = fp8.FP8Linear(linear)
    scales = VL._Scales(torch.zeros(4, 2 * 4, dtype=torch.bfloat16))
    layer = VL.LoraLinear(q, scales, 8, torch.bfloat16, torch.device("cpu"))
    a, up = torch.randn(3, 64).bfloat16(), torch.randn(32, 3).bfloat16()
    with torch.no_grad():
        layer.lora_down[4:7] = a
        layer.lora_up[:, 4:7] = up
        scales.rows[1, 4:] = 0.5
    x = torch.randn(2, 5, 64).bfloat16()
    got = layer(x)
    torch.testing.assert_close(got[0], q(x[:1])[0])
    want = q(x[1:])[0].float() + 0.5 * (x[1].float() @ a.float().t()) @ up.float().t()
    assert fp8.relative_l2(got[1], want) < 1e-2   # the branch's bf16 rounding only

    write_lora(tmp_path, "a", shapes, seed=7)
    ref = make_lora(shapes, seed=7)[2]
    quantised = copy.deepcopy(parts.transformer)
    fp8.quantize_blocks(quantised)
    plain = engine_on(parts, copy.deepcopy(quantised))
    lora = engine_on(parts, copy.deepcopy(quantised), lora_slots=1, lora_rank=4,
                     lora_folder=tmp_path)
    fused = engine_on(parts, fuse(parts.transformer, ref, 0.7, 2.0, 4))
    unfused = engine_on(parts, copy.deepcopy(parts.transformer))
    runs = [(plain, 1, []), (lora, 1, [["a", 0.0]]), (lora, 2, [["a", 0.7]]), (fused, 2, []),
            (unfused, 2, [])]
    for engine, sid, loras in runs:
        tick = Ticks(engine)
        tick.open(sid, loras=loras)
        for _ in range(4):
            tick(sid)
    assert all(torch.equal(lora.latents[1][k], plain.latents[1][k]) for k in plain.latents[1])
    keys = sorted(fused.latents[2])
    stack = lambda e: torch.cat([e.latents[2][k] for k in keys])   # noqa: E731
    err = fp8.relative_l2(stack(lora), stack(fused))
    effect = fp8.relative_l2(stack(unfused), stack(fused))
    assert err < 0.1 and err < effect / 3, (err, effect)


# --- live changes ---------------------------------------------------------------------------

def test_live_changes_keep_the_stream_and_its_records(tmp_path, parts, shapes):
    write_lora(tmp_path, "a", shapes, seed=5)
    write_lora(tmp_path, "b", shapes, layout="kohya", seed=6)
    engine = engine_on(parts, copy.deepcopy(parts.transformer), lora_slots=2, lora_rank=4,
                       lora_folder=tmp_path)
    tick = Ticks(engine)
    tick.open(1)
    for _ in range(6):
        tick(1)
    stream = engine.streams[1]
    cache, records = stream.cache, dict(stream.cache.graphs)
    assert records
    # a load runs beside the stream: the steps go on without it until it is ready
    gate = threading.Event()
    submit = engine._loras.submit
    engine._loras.submit = lambda fn, *a: submit(lambda *b: gate.wait(10) and fn(*b), *a)
    engine.update_params(1, {"loras": [["a", 1.0]]})
    tick(1)
    assert stream.lora_scales == (0.0, 0.0) and engine._loras.held["a"].job is not None
    gate.set()
    engine._loras.submit = submit
    changes = [{}, {"loras": [["a", -0.5]]}, {"loras": [["a", -0.5], ["b", 2.0]]},
               {"loras": [["b", 2.0]]}, {"loras": []}]
    seen = []
    for change in changes:
        ids_before = stream.next_chunk
        engine.update_params(1, change)
        engine.settle()
        tick(1)
        tick(1)
        seen.append(stream.lora_scales)
        assert stream.next_chunk == ids_before + 2 and stream.started   # never reset
        assert engine.streams[1] is stream and stream.cache is cache    # same KV cache
        assert stream.cache.graphs.keys() == records.keys()             # no new record
        assert all(stream.cache.graphs[k] is st for k, st in records.items())
    assert seen == [(1.0, 0.0), (-0.5, 0.0), (-0.5, 2.0), (0.0, 2.0), (0.0, 0.0)]
    assert not engine._loras.held   # nobody holds a or b any more: both slots were zeroed


# --- refusals -------------------------------------------------------------------------------

def test_bad_loras_are_refused_with_one_clear_message_and_change_nothing(tmp_path, parts,
                                                                          shapes):
    write_lora(tmp_path, "good", shapes)
    write_lora(tmp_path, "other", shapes, seed=9)
    write_lora(tmp_path, "wide", shapes, rank=16)
    big = {k: (i * 2, o) for k, (i, o) in shapes.items()}
    write_lora(tmp_path, "bigger", big)
    state, _, _ = make_lora(shapes)
    state["text_embedding.0.lora_down.weight"] = torch.zeros(4, 32)
    save_file(state, str(tmp_path / "extra.safetensors"))
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)},
              str(tmp_path / "half.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled.pt")

    none = engine_on(parts, copy.deepcopy(parts.transformer))
    with pytest.raises(ParamError, match="--lora-slots"):
        Ticks(none).open(1, loras=[["good", 1.0]])
    assert not none.streams

    engine = engine_on(parts, copy.deepcopy(parts.transformer), lora_slots=1, lora_rank=8,
                       lora_folder=tmp_path)
    Ticks(engine).open(1, loras=[["good", 1.0]])
    cases = [([["missing", 1.0]], "no LoRA 'missing'"),
             ([["pickled.pt", 1.0]], "safetensors files only"),
             ([["../good", 1.0]], "inside the LoRA folder"),
             ([["wide", 1.0]], "rank 16.*--lora-rank"),
             ([["bigger", 1.0]], "another model size"),
             ([["extra", 1.0]], "text_embedding.*attention and FFN"),
             ([["half", 1.0]], "lacks its up"),
             ([["broken", 1.0]], "not a readable safetensors"),
             ([["good", 1.0], ["other", 1.0]], "1 slot"),
             ([["other", 1.0], ["good", 0.5]], "1 slot"),
             ([["good", 5.0]], "from -4 to 4"),
             ([["good", 1.0], ["good", 2.0]], "twice"),
             ([["good"]], r"\[name, scale\]")]
    for loras, message in cases:
        with pytest.raises(ParamError, match=message):
            engine.update_params(1, {"loras": loras, "steps": 1})
        with pytest.raises(ParamError, match=message):
            engine.check_params(1, {"loras": loras})
        stream = engine.streams[1]
        assert stream.params.loras == (("good", 1.0),) and stream.params.steps == 2
        assert list(engine._loras.held) == ["good"] and engine._loras.held["good"].refs == 1
    # a second stream may share the one slot by name, not take another LoRA
    Ticks(engine).open(2, loras=[["good", -2.0]])
    assert engine._loras.held["good"].refs == 2
    with pytest.raises(ParamError, match="in use"):
        engine.update_params(2, {"loras": [["other", 1.0]]})
    engine.update_params(1, {"loras": []})
    engine.update_params(2, {"loras": [["other", 1.0]]})   # the slot is free now
    assert list(engine._loras.held) == ["other"]
    caps = engine.capabilities()["loras"]
    assert caps["slots"] == 1 and "good" in caps["available"]
