"""The cached chunk-by-chunk forward is the block-causal forward of the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from livediffusion.daemon.engines.video.kv_cache import CachePolicy, KVCache
from livediffusion.daemon.models.causal_wan import CausalWan, ChunkCall
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
        position = cache.admit(c)
        out = wan.forward(latents[:, :, c:c + 1], t,
                          ChunkCall.single(cache, rows=[0], chunks=[c], positions=[position],
                                    cross_kv=cross))
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
        call = ChunkCall.single(cache, rows=[0, 1], chunks=[1, 0], positions=[1, 0], cross_kv=cross)
        x, temb, proj = wan.embed(latents, t)
        rope = wan.rope(call.positions, h // 2, w // 2)
        if split is None:
            x = wan.blocks(x, proj, rope, call)
        else:
            x = wan.blocks(x, proj, rope, call, 0, split)   # stage on rank 0
            x = wan.blocks(x, proj, rope, call, split)      # stage on rank 1
        outs.append(wan.head(x, temb, h, w))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], wan.forward(latents, t, ChunkCall.single(
        make_cache(wan, 2, h, w, policy), rows=[0, 1], chunks=[1, 0], positions=[1, 0],
        cross_kv=cross)), atol=1e-5, rtol=1e-5)
