"""The fast decoder in the TAEHV checkpoint layout: streaming, frame counts, loading."""

from __future__ import annotations

import pytest
import torch

from livediffusion.daemon.engines.base import ParamError, StreamConfig
from livediffusion.daemon.engines.video.engine import VideoEngine
from livediffusion.daemon.models import loaders
from livediffusion.daemon.models.tiny_decoder import TinyVideoDecoder, load_tiny_decoder

from test_video_engine import SPEC, Feeder, engine  # noqa: F401 - shared tiny engine fixture


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return TinyVideoDecoder(widths=(16, 8, 8, 8)).eval()


def test_streaming_decode_equals_decoding_the_clip_at_once(decoder):
    latents = torch.randn(1, 16, 4, 6, 8)
    whole = decoder.decode(latents, decoder.new_state())
    state = decoder.new_state()
    parts = [decoder.decode(latents[:, :, i:i + 1], state) for i in range(4)]
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]  # like the causal Wan VAE
    streamed = torch.cat(parts, 2)
    assert streamed.shape == (1, 3, 13, 48, 64)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    assert streamed.min() >= -1 and streamed.max() <= 1


def test_each_stream_keeps_its_own_memory(decoder):
    latents = torch.randn(1, 16, 2, 6, 8)
    a = decoder.new_state()
    first = decoder.decode(latents, a)
    decoder.decode(torch.randn(1, 16, 3, 6, 8), decoder.new_state())
    torch.testing.assert_close(decoder.decode(latents, decoder.new_state()), first)


def _public_layout(model: TinyVideoDecoder) -> dict[str, torch.Tensor]:
    """The state dict as the public taew2_1.pth holds it: decoder.N keys, an encoder beside
    them, and the first time-grow stored with two frames' worth of output channels."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["decoder.7.conv.weight"]
    sd["decoder.7.conv.weight"] = torch.cat([torch.randn_like(w), w], 0)  # last half is used
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    return sd


def test_loads_the_public_checkpoint_layout(tmp_path):
    torch.manual_seed(1)
    real = TinyVideoDecoder()  # the real widths 256/128/64/64
    names = set(real.state_dict())
    assert {"decoder.1.weight", "decoder.3.conv.0.weight", "decoder.7.conv.weight",
            "decoder.8.weight", "decoder.13.conv.weight", "decoder.22.bias"} <= names
    assert "decoder.3.skip.weight" not in names  # equal widths: identity skip
    path = tmp_path / "taew2_1.pth"
    torch.save(_public_layout(real), path)
    loaded = load_tiny_decoder(path, dtype=torch.float32)
    for key, value in real.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    z = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(loaded.decode(z, loaded.new_state()),
                               real.decode(z, real.new_state()))


def test_a_checkpoint_for_other_latents_is_refused(tmp_path):
    other = TinyVideoDecoder(latent_channels=48)
    path = tmp_path / "taew2_2.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(loaders.WeightsError, match="16-channel"):
        load_tiny_decoder(path)


def test_switching_decoders_mid_stream_keeps_every_frame(engine):  # noqa: F811
    engine.open_stream(StreamConfig(1, SPEC, SPEC, 30.0, {"steps": 1}))
    engine.settle()
    try:
        feed = Feeder(engine, 1)
        seen = [f.in_seq for f in feed.chunk()] + [f.in_seq for f in feed.chunk()]
        engine.update_params(1, {"decoder": "tiny"})
        seen += [f.in_seq for f in feed.chunk()]
        engine.update_params(1, {"decoder": "vae"})
        out = feed.chunk()
        seen += [f.in_seq for f in out]
        assert seen == list(range(1, feed.seq + 1))
        assert all(f.pixels.float().std() > 0 for f in out)
    finally:
        engine.close_stream(1)


def test_tiny_decoder_without_weights_names_the_pull_command(engine):  # noqa: F811
    bare = VideoEngine("video", engine.wan.model, engine.vae.vae,
                       (engine.tokenizer, engine.text_encoder), min_side=32)
    with pytest.raises(ParamError, match="models pull taew2_1"):
        bare.open_stream(StreamConfig(5, SPEC, SPEC, 30.0, {"decoder": "tiny"}))
        bare.settle()


# --- the encoder half (the same checkpoint) -------------------------------------------------

from livediffusion.daemon.models.tiny_decoder import TinyVideoEncoder, load_tiny_encoder  # noqa: E402


def _public_encoder_layout() -> dict[str, tuple[int, ...]]:
    """taew2_1.pth's encoder keys and shapes, written out from the published layout: conv
    3->64, then three stages of time pool (x2, x2, x1), stride-2 conv and three memory
    blocks, then conv 64->16."""
    shapes = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,),
              "encoder.17.weight": (16, 64, 3, 3), "encoder.17.bias": (16,)}
    for pool, stride in ((2, 2), (7, 2), (12, 1)):
        shapes[f"encoder.{pool}.conv.weight"] = (64, 64 * stride, 1, 1)
        shapes[f"encoder.{pool + 1}.weight"] = (64, 64, 3, 3)
        for block in range(pool + 2, pool + 5):
            shapes[f"encoder.{block}.conv.0.weight"] = (64, 128, 3, 3)
            for conv in (0, 2, 4):
                shapes[f"encoder.{block}.conv.{conv}.bias"] = (64,)
            shapes[f"encoder.{block}.conv.2.weight"] = (64, 64, 3, 3)
            shapes[f"encoder.{block}.conv.4.weight"] = (64, 64, 3, 3)
    return shapes


def test_the_encoder_loads_the_public_checkpoint_layout(tmp_path):
    shapes = _public_encoder_layout()
    assert {k: tuple(v.shape) for k, v in TinyVideoEncoder().state_dict().items()} == shapes
    torch.manual_seed(2)
    sd = {k: torch.randn(s) * 0.1 for k, s in shapes.items()}
    sd.update(_public_layout(TinyVideoDecoder()))   # the decoder beside it, as in the file
    path = tmp_path / "taew2_1.pth"
    torch.save(sd, path)
    encoder = load_tiny_encoder(path, dtype=torch.float32)
    assert all(torch.equal(encoder.state_dict()[k], sd[k]) for k in shapes)
    assert load_tiny_decoder(path, dtype=torch.float32) is not None   # both halves, one file
    torch.save({k: v for k, v in sd.items() if k != "encoder.17.bias"}, path)
    with pytest.raises(loaders.WeightsError, match="1 missing"):
        load_tiny_encoder(path)


def test_streaming_encode_equals_encoding_the_clip_at_once():
    torch.manual_seed(3)
    encoder = TinyVideoEncoder(width=8).eval()
    frames = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    state = encoder.new_state()
    parts = [encoder.encode(frames[:, :, :1], state), encoder.encode(frames[:, :, 1:5], state),
             encoder.encode(frames[:, :, 5:9], state)]
    assert [p.shape for p in parts] == [(1, 16, 1, 4, 6)] * 3   # 1 + 4 + 4 frames -> 3 latents
    # the first frame stands for four: the clip at once, with it repeated, is the same
    clip = torch.cat([frames[:, :, :1].expand(-1, -1, 4, -1, -1), frames[:, :, 1:]], 2)
    whole = encoder.encode(clip, encoder.new_state())
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=1e-5)


def test_a_stream_on_the_tiny_encoder_runs_and_switching_encoders_restarts_it(engine):  # noqa: F811
    assert engine.tiny_encoder is not None
    engine.open_stream(StreamConfig(1, SPEC, SPEC, 30.0, {"steps": 1, "encoder": "tiny"}))
    engine.settle()
    try:
        feed = Feeder(engine, 1)
        out = feed.chunk() + feed.chunk() + feed.chunk()
        assert [f.in_seq for f in out] == list(range(1, feed.seq + 1))
        assert engine.streams[1].tiny_enc is not None
        assert all(f.pixels.float().std() > 0 for f in out)
        engine.update_params(1, {"encoder": "vae"})   # new history: a first chunk again
        assert engine.frames_per_step(1) == 1 and engine.streams[1].tiny_enc is None
        out = feed.chunk() + feed.chunk()
        assert len(out) == 5 and out[-1].in_seq == feed.seq
    finally:
        engine.close_stream(1)
    bare = VideoEngine("video", engine.wan.model, engine.vae.vae,
                       (engine.tokenizer, engine.text_encoder), min_side=32)
    with pytest.raises(ParamError, match="tiny encoder.*models pull taew2_1"):
        bare.open_stream(StreamConfig(5, SPEC, SPEC, 30.0, {"encoder": "tiny"}))
