"""FP8 linear layers of the video DiT: error, which layers, and the engine on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livediffusion.daemon.engines.base import InputFrame, StreamConfig, StreamInput
from livediffusion.daemon.engines.video.engine import VideoEngine
from livediffusion.daemon.engines.video.factory import build_video_parts
from livediffusion.daemon.models import fp8
from livediffusion.daemon.models import wan as W
from livediffusion.shared.protocol import FrameSpec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_linear_is_close_to_the_layer_it_replaces(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64).to(dtype)
    x = torch.randn(2, 7, 96, dtype=dtype) * 3.0
    q = fp8.FP8Linear(linear)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1, 64)
    got, want = q(x), linear(x)
    assert got.shape == want.shape and got.dtype == dtype
    err = fp8.relative_l2(got, want)
    # e4m3 keeps 3 mantissa bits: a few per cent per product, never exact
    assert 1e-3 < err < 0.06, err
    # per-row scales: a row 1000x larger than the others costs the others nothing
    x[0, 0] *= 1000.0
    assert fp8.relative_l2(q(x)[1], linear(x)[1]) < 0.06


def test_quantize_rows_uses_the_whole_e4m3_range_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [1e-3, 0.0, -4e-3]])
    q, scale = fp8.quantize_rows(x)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((2,), fp8.FP8_MAX))
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0.0)
    q, scale = fp8.quantize_rows(torch.zeros(1, 16))    # an all-zero row stays zero
    assert not q.float().any() and torch.isfinite(scale).all()


def test_the_linears_of_every_block_are_replaced_and_the_rest_kept():
    torch.manual_seed(0)
    model = W.build_transformer(W.PRESETS["tiny"], torch.float32, "cpu")
    model.blocks[1].to("meta")   # another pipeline rank's block
    replaced = fp8.quantize_blocks(model)
    assert replaced == 10   # block 0: q, k, v, out; cross q, k, v, out; the FFN's two
    block = model.blocks[0]
    for layer in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
                  block.attn2.to_q, block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0],
                  block.ffn.net[0].proj, block.ffn.net[2]):
        assert isinstance(layer, fp8.FP8Linear)
    assert isinstance(model.blocks[1].attn1.to_q, torch.nn.Linear)   # left to its rank
    # the cross-attention keys and values (once per prompt) may stay as they are
    model = W.build_transformer(W.PRESETS["tiny"], torch.float32, "cpu")
    assert fp8.quantize_blocks(model, prompt_layers=False) == 16
    assert isinstance(model.blocks[0].attn2.to_k, torch.nn.Linear)
    assert isinstance(model.blocks[0].attn2.to_v, torch.nn.Linear)
    assert not isinstance(model.proj_out, fp8.FP8Linear)
    assert fp8.is_quantized(model)


def _frames(engine, fp8_on: bool):
    spec = FrameSpec(64, 64, dtype="float32")
    engine.open_stream(StreamConfig(1, spec, spec, 30.0, {"steps": 2, "seed": 3}))
    engine.settle()
    rng = np.random.default_rng(1)
    out = []
    for _ in range(6):
        frames = [InputFrame(i, rng.random(spec.shape, dtype=np.float32), spec, i)
                  for i in range(engine.frames_per_step(1))]
        out += [np.asarray(f.pixels) for o in engine.submit([StreamInput(1, frames)])
                for f in o.frames]
    engine.close_stream(1)
    return np.stack(out)


def test_the_engine_on_fp8_linears_gives_nearly_the_same_frames():
    engines = {}
    for on in (False, True):
        parts = build_video_parts("tiny", fp8=on)
        engines[on] = VideoEngine("video-tiny", parts.transformer, parts.vae, parts.text,
                                  tiny_decoder=parts.tiny_decoder, min_side=parts.min_side)
    assert engines[True].capabilities()["precision"] == "fp8"
    assert engines[False].capabilities()["precision"] == "float32"
    full, quantised = _frames(engines[False], False), _frames(engines[True], True)
    err = np.linalg.norm(quantised - full) / np.linalg.norm(full)
    assert full.shape == quantised.shape and 1e-5 < err < 0.05, err


def test_fp8_is_supported_on_cpus_and_hopper_class_gpus_only(monkeypatch):
    assert fp8.supported("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    assert not fp8.supported("cuda:0")    # Ampere: no FP8 matmuls
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.supported("cuda:0")
    assert not fp8.supported("mps")
