"""Streaming VAE: chunk-by-chunk encode/decode equals the whole-clip encode/decode."""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon.engines.video.vae_stream import StreamingVAE
from livediffusion.daemon.models.wan import PRESETS, build_vae


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(PRESETS["tiny"])


def test_streaming_encode_equals_whole_clip(vae):
    sv = StreamingVAE(vae)
    clip = torch.rand(1, 3, 13, 32, 48) * 2 - 1
    whole = (vae.encode(clip).latent_dist.mode() - sv.mean) / sv.std
    state = sv.new_state()
    parts = [sv.encode(clip[:, :, :1], state)] + \
        [sv.encode(clip[:, :, i:i + 4], state) for i in range(1, 13, 4)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=1e-4)


def test_streaming_decode_equals_whole_clip(vae):
    sv = StreamingVAE(vae)
    latents = torch.randn(1, 16, 4, 4, 6)
    whole = vae.decode(latents * sv.std + sv.mean).sample
    state = sv.new_state()
    parts = [sv.decode(latents[:, :, i:i + 1], state) for i in range(4)]
    streamed = torch.cat(parts, 2)
    assert streamed.shape == (1, 3, 13, 32, 48)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-4)


def test_streams_do_not_share_history(vae):
    sv = StreamingVAE(vae)
    a, b = sv.new_state(), sv.new_state()
    clip = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    first = sv.encode(clip, a)
    sv.encode(torch.rand(1, 3, 1, 32, 48), b)  # another stream in between
    again = sv.encode(clip, sv.new_state())
    torch.testing.assert_close(first, again)


def test_chunks_must_be_whole_latent_frames(vae):
    sv = StreamingVAE(vae)
    state = sv.new_state()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        sv.encode(torch.zeros(1, 3, 4, 32, 48), state)


def test_channels_last_layout_computes_the_same(vae):
    clip = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    plain = StreamingVAE(vae, channels_last=False)
    z = plain.encode(clip, plain.new_state())
    y = plain.decode(z, plain.new_state())
    fast = StreamingVAE(vae, channels_last=True)
    assert fast.memory_format == torch.channels_last_3d
    torch.testing.assert_close(fast.encode(clip, fast.new_state()), z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.decode(z, fast.new_state()), y, atol=1e-5, rtol=1e-4)
    for p in vae.parameters():  # leave the shared module as the other tests expect it
        p.data = p.data.contiguous()


@pytest.mark.parametrize("channels_last", [False, True])
def test_steady_state_graph_equals_diffusers_forward(vae, channels_last):
    """After a stream's first two calls the chunk runs through vae_steady's functions (the
    graph the GPU compiles); it must equal diffusers' own forward on every output frame and
    on the history it hands to the next chunk."""
    steady = StreamingVAE(vae, channels_last=channels_last)
    eager = StreamingVAE(vae, channels_last=channels_last)
    eager.steady = False
    assert steady.steady  # the Wan 2.1 layout is covered
    calls = {"enc": 0, "dec": 0}
    enc_fn, dec_fn = steady._encode_chunk, steady._decode_chunk

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    steady._encode_chunk, steady._decode_chunk = count("enc", enc_fn), count("dec", dec_fn)
    torch.manual_seed(1)
    clip = torch.rand(1, 3, 1 + 4 * 6, 32, 48) * 2 - 1
    states = {id(sv): (sv.new_state(), sv.new_state()) for sv in (steady, eager)}
    for start, n in [(0, 1)] + [(1 + 4 * i, 4) for i in range(6)]:
        outs = []
        for sv in (steady, eager):
            enc, dec = states[id(sv)]
            z = sv.encode(clip[:, :, start:start + n], enc)
            outs.append((z, sv.decode(z, dec)))
        (z_s, y_s), (z_e, y_e) = outs
        torch.testing.assert_close(z_s, z_e, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(y_s, y_e, atol=1e-5, rtol=1e-4)
    assert calls == {"enc": 5, "dec": 5}
    (enc_s, dec_s), (enc_e, dec_e) = states[id(steady)], states[id(eager)]
    for mine, theirs in ((enc_s.enc, enc_e.enc), (dec_s.dec, dec_e.dec)):
        assert len(mine) == len(theirs)
        assert [t is None for t in mine] == [t is None for t in theirs]
        for a, b in zip([t for t in mine if t is not None], [t for t in theirs if t is not None]):
            torch.testing.assert_close(a, b[:, :, -a.shape[2]:], atol=1e-5, rtol=1e-4)
