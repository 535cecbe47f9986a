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
                    policy)
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
    return ([torch.zeros(shape) for _ in range(wan.num_blocks)],
            [torch.zeros(shape) for _ in range(wan.num_blocks)])


def test_a_forward_runs_from_a_hand_built_plan_as_from_the_policy(models):
    """Slots, lengths and positions written by hand, storage of our own, no KVCache: the
    forward writes where it is told and gives what the policy-driven forward gives."""
    reference, wan = models
    h, w, frames = 8, 12, 3
    tokens = wan.tokens_per_frame(h, w)
    cross = wan.cross_kv(torch.randn(1, TEXT_LEN, reference.config.text_dim))
    latents = torch.randn(frames, 16, 1, h, w)
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
    latents = torch.randn(1, 16, 1, h, w, generator=g)
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
