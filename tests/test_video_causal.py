"""The cached chunk-by-chunk forward is the block-causal forward of the same model; it runs
from plain plans (no cache policy involved); the fixed-shape forward equals the general one."""

from __future__ import annotations

import copy

import pytest
import torch

from livediffusion.daemon.engines.video.kv_cache import CachePolicy, KVCache
from livediffusion.daemon.models.causal_wan import (AttentionPlan, CausalWan, ChunkCall,
                                                   RefreshRule)
from livediffusion.daemon.models.wan import PRESETS, TEXT_LEN, build_transformer


class _MaskedSelfAttention:
    """Reference: diffusers' own processor, given a block-causal mask."""

    def __init__(self, base, mask):
        self.base, self.mask = base, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        return self.base(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def make_cache(wan: CausalWan, rows: int, h: int, w: int, policy: CachePolicy) -> KVCache:
    cache = KVCache(wan.num_blocks, rows, wan.heads, wan.head_dim, wan.tokens_per_frame(h, w),
                    policy, dtype=wan.dtype, device=wan.device)
    cache.t_dim, cache.inv_freq_t = wan.t_dim, wan.inv_freq[0]
    return cache


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = build_transformer(PRESETS["tiny"])
    # random init leaves some projections near zero: perturb so every path matters
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference, CausalWan(copy.deepcopy(reference))


def test_chunked_cached_forward_equals_block_causal_forward(models):
    reference, wan = models
    frames, h, w = 4, 8, 12
    tokens = wan.tokens_per_frame(h, w)
    latents = torch.randn(1, 16, frames, h, w)
    prompt = torch.randn(1, TEXT_LEN, reference.config.text_dim)
    t = torch.tensor([700.0])
    frame_of = torch.arange(frames).repeat_interleave(tokens)
    mask = frame_of[None, :] <= frame_of[:, None]
    saved = [b.attn1.processor for b in reference.blocks]
    for b in reference.blocks:
        b.attn1.set_processor(_MaskedSelfAttention(b.attn1.processor, mask))
    try:
        full = reference(latents, t, prompt).sample
    finally:
        for b, p in zip(reference.blocks, saved):
            b.attn1.set_processor(p)
    cache = make_cache(wan, 1, h, w, CachePolicy(frames=6, sinks=2, refresh_threshold=0))
    cross = wan.cross_kv(prompt)
    for c in range(frames):
        cache.admit(c)
        plan = cache.plan([0], [c])
        out, chosen = wan.forward(latents[:, :, c:c + 1], t, ChunkCall([plan], [cross]))
        cache.commit(plan, chosen[0])
        torch.testing.assert_close(out, full[:, :, c:c + 1], atol=2e-5, rtol=1e-4)


def test_rope_tables_match_diffusers(models):
    reference, wan = models
    h, w = 8, 12
    cos_ref, sin_ref = reference.rope(torch.zeros(1, 16, 3, h, w))
    cos, sin = wan.rope([0, 1, 2], h // 2, w // 2)
    torch.testing.assert_close(cos.reshape(1, -1, 1, cos.shape[-1]), cos_ref.float(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.reshape(1, -1, 1, sin.shape[-1]), sin_ref.float(),
                               atol=1e-6, rtol=0)


def test_a_forward_split_into_stages_equals_the_whole(models):
    """Pipeline parallelism runs contiguous block ranges on different ranks."""
    reference, wan = models
    h, w = 8, 12
    latents = torch.randn(2, 16, 1, h, w)
    t = torch.tensor([700.0, 500.0])
    cross = wan.cross_kv(torch.randn(1, TEXT_LEN, reference.config.text_dim))
    policy = CachePolicy(frames=4, sinks=1, refresh_threshold=0)
    outs = []
    for split in (None, 1):
        cache = make_cache(wan, 2, h, w, policy)
        cache.admit(0)
        cache.admit(1)
        call = ChunkCall([cache.plan(rows=[0, 1], chunks=[1, 0])], [cross])
        assert call.positions == [1, 0]
        x, temb, proj = wan.embed(latents, t)
        rope = wan.rope(call.positions, h // 2, w // 2)
        if split is None:
            x, _ = wan.blocks(x, proj, rope, call)
        else:
            x, _ = wan.blocks(x, proj, rope, call, 0, split)   # stage on rank 0
            x, _ = wan.blocks(x, proj, rope, call, split)      # stage on rank 1
        outs.append(wan.head(x, temb, h, w))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    cache = make_cache(wan, 2, h, w, policy)
    cache.admit(0)
    cache.admit(1)
    out, _ = wan.forward(latents, t, ChunkCall([cache.plan(rows=[0, 1], chunks=[1, 0])],
                                               [cross]))
    torch.testing.assert_close(outs[0], out, atol=1e-5, rtol=1e-5)


# --- the boundary: the model executes plain plans ----------------------------------------------


def storage(wan: CausalWan, rows: int, frames: int, tokens: int
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (rows, wan.heads, frames * tokens, wan.head_dim)
    return ([torch.zeros(shape, device=wan.device) for _ in range(wan.num_blocks)],
            [torch.zeros(shape, device=wan.device) for _ in range(wan.num_blocks)])


def test_a_forward_runs_from_a_hand_built_plan_as_from_the_policy(models):
    """Slots, lengths and positions written by hand, storage of our own, no KVCache: the
    forward writes where it is told and gives what the policy-driven forward gives."""
    reference, wan = models
    h, w, frames = 8, 12, 3
    tokens = wan.tokens_per_frame(h, w)
    cross = wan.cross_kv(torch.randn(1, TEXT_LEN, reference.config.text_dim))
    latents = torch.randn(frames, 16, 1, h, w).to(wan.device)
    t = torch.tensor([600.0])
    cache = make_cache(wan, 1, h, w, CachePolicy(frames=frames, sinks=1, refresh_threshold=0))
    k, v = storage(wan, 1, frames, tokens)
    for c in range(frames):
        cache.admit(c)
        by_policy = cache.plan([0], [c])
        out_policy, chosen = wan.forward(latents[c:c + 1], t, ChunkCall([by_policy], [cross]))
        cache.commit(by_policy, chosen[0])
        by_hand = AttentionPlan(k, v, frames, rows=[0], positions=[c],
                                slots=[[c]] * wan.num_blocks,
                                lengths=[[c + 1]] * wan.num_blocks)
        out_hand, chosen_hand = wan.forward(latents[c:c + 1], t, ChunkCall([by_hand], [cross]))
        assert chosen == chosen_hand == [{}]
        torch.testing.assert_close(out_hand, out_policy, atol=0, rtol=0)
    for block in range(wan.num_blocks):
        assert torch.equal(k[block], cache.k[block]) and torch.equal(v[block], cache.v[block])
        assert k[block].abs().sum(-1).bool().all()  # every token of every slot written


@pytest.mark.parametrize("threshold,expect", [(-2.0, "ring"), (2.0, "sink")])
def test_the_model_follows_a_refresh_rule_given_as_data(models, threshold, expect):
    """A rule whose threshold no similarity can pass keeps the ring slot; one every
    similarity passes takes a sink; the model reports what it chose per block, in both the
    general and the fixed-shape forward."""
    reference, wan = models
    h, w, frames, sinks, ring = 8, 12, 4, 2, 3
    tokens = wan.tokens_per_frame(h, w)
    cross = wan.cross_kv(torch.randn(1, TEXT_LEN, reference.config.text_dim))
    g = torch.Generator().manual_seed(1)
    k, v = storage(wan, 1, frames, tokens)
    for x in (*k, *v):
        x.copy_(torch.randn(x.shape, generator=g))   # a full row of past frames
    latents = torch.randn(1, 16, 1, h, w, generator=g).to(wan.device)
    t = torch.tensor([600.0])
    rule = RefreshRule(sinks=sinks, ring=ring, threshold=threshold)
    results = []
    for fixed in (False, True):
        kk, vv = [x.clone() for x in k], [x.clone() for x in v]
        plan = AttentionPlan(kk, vv, frames, rows=[0], positions=[5],
                             slots=[[rule]] * wan.num_blocks,
                             lengths=[[frames]] * wan.num_blocks, fixed=fixed)
        wan.fixed_shape = fixed
        try:
            out, chosen = wan.forward(latents, t, ChunkCall([plan], [cross], graphs={}))
        finally:
            wan.fixed_shape = False
        assert set(chosen[0]) == set(range(wan.num_blocks))
        for block, slot in chosen[0].items():
            assert (slot == ring) if expect == "ring" else (0 <= slot < sinks)
            # the new keys are in the chosen slot, every other slot is as it was
            changed = (kk[block][0] != k[block][0]).any(-1).any(0)  # per token
            changed = changed.unflatten(0, (frames, tokens)).any(-1)  # per frame slot
            assert changed.tolist() == [f == slot for f in range(frames)]
        results.append((out, chosen, kk))
    (a, ca, ka), (b, cb, kb) = results
    assert ca == cb
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for x, y in zip(ka, kb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


# --- several streams in one fixed-shape forward -----------------------------------------------


class Stream:
    """One stream as the engine drives it, at the model's level: a cache, a prompt, Stream
    Batch over ``steps`` rows (chunk c at step s is in flight with c - 1 at s + 1, ...)."""

    def __init__(self, wan: CausalWan, sid: int, steps: int, h: int, w: int) -> None:
        self.sid, self.steps = sid, steps
        policy = CachePolicy(frames=4, sinks=2, refresh_threshold=0.9, rope_max=6)
        self.cache = make_cache(wan, steps, h, w, policy)
        g = torch.Generator().manual_seed(100 + sid)
        text_dim = wan.model.config.text_dim
        self.cross = wan.cross_kv(torch.randn(1, TEXT_LEN, text_dim, generator=g))
        self.in_flight: list[int] = []   # newest first: element e is at step e
        self.next = 0
        self.h, self.w, self.device = h, w, wan.device

    def admit(self) -> None:
        self.cache.admit(self.next)
        self.in_flight.insert(0, self.next)
        self.next += 1

    def plan(self):
        rows = list(range(len(self.in_flight)))
        self.cache.prepare(rows, self.in_flight)
        return self.cache.plan(rows, self.in_flight)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and timesteps of the elements in flight (seeded per chunk and step)."""
        x = [torch.randn(1, 16, 1, self.h, self.w,
                         generator=torch.Generator().manual_seed(1000 * self.sid + 10 * c + s))
             for s, c in enumerate(self.in_flight)]
        return (torch.cat(x).to(self.device),
                torch.tensor([800.0 - 300.0 * s for s in range(len(x))]))

    def retire(self) -> None:
        if len(self.in_flight) == self.steps:
            self.cache.forget(self.in_flight.pop())


def run_streams(wan: CausalWan, steps: tuple[int, ...], together: bool, fixed: bool,
                chunks: int = 14) -> tuple[dict, list[Stream], dict]:
    """Feed every stream ``chunks`` chunks; one forward per tick over all streams (together)
    or one per stream.  Returns the flow of every (stream, chunk, step), the streams and the
    several-stream graphs."""
    h, w = 8, 12
    streams = [Stream(wan, sid, n, h, w) for sid, n in enumerate(steps)]
    shared: dict = {}
    flows = {}
    wan.fixed_shape = fixed
    try:
        for _ in range(chunks):
            for s in streams:
                s.admit()
            groups = [streams] if together else [[s] for s in streams]
            for group in groups:
                plans = [s.plan() for s in group]
                inputs = [s.inputs() for s in group]
                graphs = shared if len(group) > 1 else group[0].cache.graphs
                out, chosen = wan.forward(torch.cat([x for x, _ in inputs]),
                                          torch.cat([t for _, t in inputs]),
                                          ChunkCall(plans, [s.cross for s in group], graphs))
                start = 0
                for s, plan, decided in zip(group, plans, chosen):
                    s.cache.commit(plan, decided)
                    for step, c in enumerate(s.in_flight):
                        flows[(s.sid, c, step)] = out[start + step]
                    start += len(s.in_flight)
            for s in streams:
                s.retire()
    finally:
        wan.fixed_shape = False
    return flows, streams, shared


@pytest.mark.parametrize("steps", [(1, 1), (2, 2), (1, 2, 2), (2, 2, 2)])
def test_several_streams_in_one_fixed_shape_forward_equal_each_alone(models, steps):
    """Streams with full caches batched into one fixed-shape forward (one graph for the set on
    GPUs): each element writes and reads only its stream's cache rows and attends to its own
    prompt, so every flow equals that of the stream run alone, through sink refreshes and RoPE
    wraps, with the same books."""
    _, wan = models
    together, streams, shared = run_streams(wan, steps, together=True, fixed=True)
    alone_general, reference, _ = run_streams(wan, steps, together=False, fixed=False)
    alone_fixed, _, _ = run_streams(wan, steps, together=False, fixed=True)
    assert together.keys() == alone_general.keys() == alone_fixed.keys()
    for key, flow in together.items():
        torch.testing.assert_close(flow, alone_general[key], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(flow, alone_fixed[key], atol=2e-5, rtol=1e-5)
    for a, b in zip(streams, reference):
        assert [x.chunk for x in a.cache.books] == [x.chunk for x in b.cache.books]
        assert torch.equal(a.cache.positions, b.cache.positions)
        for x, y in zip(a.cache.k, b.cache.k):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    # the several-stream fixed-shape forward ran, with every stream's part in one record
    assert [len(st.parts) for st in shared.values()] == [len(steps)] * len(shared)
    assert len(shared) >= 1
    # the run went through what makes the cache hard: refreshes and wraps, in every stream
    for s in streams:
        assert s.cache.shifts
    assert any(x.chunk[:2] != [0, 1] for s in streams for x in s.cache.books)


def test_several_streams_keep_their_own_prompts_in_the_fixed_shape_forward(models):
    """A prompt change of one stream reaches only that stream's elements of the shared
    record (its static copy of the cross-attention K/V is refreshed)."""
    reference, wan = models
    _, streams, shared = run_streams(wan, (1, 2), together=True, fixed=True, chunks=6)
    g = torch.Generator().manual_seed(7)
    streams[1].cross = wan.cross_kv(torch.randn(1, TEXT_LEN, reference.config.text_dim,
                                                generator=g))
    for s in streams:
        s.admit()
    plans = [s.plan() for s in streams]
    inputs = [s.inputs() for s in streams]
    # each stream alone, from copies of its storage as it is before the shared forward
    alone = []
    for s, plan, (x, t) in zip(streams, plans, inputs):
        copy_ = AttentionPlan([k.clone() for k in plan.k], [v.clone() for v in plan.v],
                              plan.frames, plan.rows, plan.positions, plan.slots, plan.lengths)
        alone.append(wan.forward(x, t, ChunkCall([copy_], [s.cross]))[0])
    wan.fixed_shape = True
    try:
        out, _ = wan.forward(torch.cat([x for x, _ in inputs]),
                             torch.cat([t for _, t in inputs]),
                             ChunkCall(plans, [s.cross for s in streams], shared))
    finally:
        wan.fixed_shape = False
    [record] = shared.values()   # the same record, replayed with the new prompt
    assert record.parts[1].cross_src is streams[1].cross
    torch.testing.assert_close(out, torch.cat(alone), atol=2e-5, rtol=1e-5)


def _engine_with_streams(steps: int, sids=(1, 2)):
    import numpy as np

    from livediffusion.daemon.engines.base import InputFrame, StreamConfig, StreamInput
    from livediffusion.daemon.engines.video.factory import build_video_engine
    from livediffusion.shared.protocol import FrameSpec

    spec = FrameSpec(64, 48)
    engine = build_video_engine("tiny")
    engine.wan.fixed_shape = True
    for sid in sids:
        engine.open_stream(StreamConfig(sid, spec, spec, 30.0,
                                        {"steps": steps, "prompt": f"prompt {sid}",
                                         "seed": sid, "sink_refresh": 0.9}))
    engine.settle()
    rngs = {sid: np.random.default_rng(sid) for sid in sids}
    seqs = {sid: 0 for sid in sids}

    def tick(order) -> dict[int, list]:
        inputs = []
        for sid in order:
            frames = []
            for _ in range(engine.frames_per_step(sid)):
                seqs[sid] += 1
                frames.append(InputFrame(seqs[sid], rngs[sid].integers(
                    0, 256, spec.shape, dtype=np.uint8), spec, seqs[sid]))
            inputs.append(StreamInput(sid, frames))
        return {o.stream_id: o.frames for o in engine.submit(inputs)}

    return engine, tick


def test_the_engine_keeps_one_record_per_set_of_streams_and_drops_it_with_them():
    import gc
    import weakref

    engine, tick = _engine_with_streams(steps=2)
    alone, tick_alone = _engine_with_streams(steps=2)
    together, separate = {1: {}, 2: {}}, {1: {}, 2: {}}
    for i in range(12):
        # the scheduler's order changes from tick to tick: still one record for the set
        for sid, frames in tick((1, 2) if i % 2 else (2, 1)).items():
            together[sid].update({f.in_seq: f.pixels for f in frames})
        for sid in (1, 2):
            for f in tick_alone((sid,))[sid]:
                separate[sid][f.in_seq] = f.pixels
    for sid in (1, 2):
        assert together[sid].keys() == separate[sid].keys() and len(separate[sid]) > 30
        for seq, pixels in separate[sid].items():
            assert (together[sid][seq].int() - pixels.int()).abs().max() <= 1
    shared = vars(engine)["_shared_graphs"]
    assert list(shared) == [(1, 2)]
    [(storages, records)] = shared.values()
    assert records and all(len(st.parts) == 2 for st in records.values())
    assert not any(s.cache.graphs for s in engine.streams.values())  # not in either cache

    # a steps change replaces stream 1's storage: the record is stale, the next forward of
    # the set records a new one against the new storage
    engine.update_params(1, {"steps": 1})
    for _ in range(8):
        tick((1, 2))
    [new_storages] = [storage for storage, _ in shared.values()]
    assert new_storages != storages and new_storages[1] == storages[1]

    # closing a stream frees the set's buffers by reference counting alone
    buffers = [weakref.ref(st.out) for _, records in shared.values()
               for st in records.values()]
    assert buffers
    del records
    gc.disable()
    try:
        engine.close_stream(2)
        engine._drop_stale_graphs()   # what close_stream calls (or the next forward does)
        assert not shared
        assert all(ref() is None for ref in buffers)
    finally:
        gc.enable()
    tick((1,))  # the remaining stream goes on alone


def test_sigma_is_the_shifted_scheduler_grid_point_not_t_over_1000():
    """The models were distilled with flow matching at shift 8 over 1000 training steps;
    x0 and the re-noise take the scheduler's sigma at the grid point nearest t."""
    from livediffusion.daemon.engines.video.noise import renoise, sigma
    expected = {700: 0.700232, 500: 0.499719, 400: 0.400260, 200: 0.198347}
    for t, s in expected.items():
        assert sigma(t) == pytest.approx(s, abs=5e-7)
    # the same grid diffusers' scheduler gives, point by point
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=8.0)
    i = int((sched.timesteps - 700).abs().argmin())
    assert sigma(700) == pytest.approx(float(sched.sigmas[i]), abs=1e-7)
    # t/1000 would move x0 by 5e-4 of the flow per step at t = 700 (the figure)
    assert abs(sigma(700) - 0.7) == pytest.approx(2.32e-4, abs=1e-6)
    x0 = torch.zeros(1, 4, 1, 2, 2)
    noised = renoise(x0 + 1.0, sigma(500), 3, 0, 1)
    from livediffusion.daemon.engines.video.noise import chunk_noise
    eps = chunk_noise(3, 0, 1, tuple(x0.shape), "cpu")
    torch.testing.assert_close(noised, (1 - 0.499719) * 1.0 + 0.499719 * eps, atol=1e-6,
                               rtol=0)


def test_the_timestep_sinusoid_is_computed_in_float64_as_wan_does():
    from diffusers.models.embeddings import get_timestep_embedding

    from livediffusion.daemon.models.causal_wan import timestep_sinusoid
    t = torch.tensor([700.0, 500.0, 399.5, 1.0])
    ours = timestep_sinusoid(t, 256)
    # Wan's sinusoidal_embedding_1d, written out: float64, cos then sin
    half = 128
    pos = t.to(torch.float64)
    wan = torch.outer(pos, torch.pow(10000, -torch.arange(half).to(pos).div(half)))
    wan = torch.cat([torch.cos(wan), torch.sin(wan)], 1)
    assert ours.dtype == torch.float64 and torch.equal(ours, wan)
    # diffusers' float32 version is 3.8e-5 away at most (the issue's measurement)
    f32 = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert float((ours - f32.double()).abs().max()) == pytest.approx(3.8e-5, rel=0.15)
