"""A tiny streaming video decoder and encoder for Wan latents, in the layout of the public
TAEHV checkpoints (``taew2_1.pth`` from madebyollin/taehv), written here from the published
architecture: 2D convolutions per frame, "memory" blocks that also see the previous frame's
features, 1x1 "time grow" projections that turn one latent frame into several frames (the
decoder) and 1x1 "time pool" projections that merge consecutive frames (the encoder).

Decoder stack (indices are the checkpoint's ``decoder.N`` keys):
  0 clamp (3 tanh(x / 3)), 1 conv 16->w0, 2 ReLU,
  3-5 memory blocks (w0), 6 upsample x2, 7 time-grow (stride 1 for Wan 2.1), 8 conv w0->w1,
  9-11 memory blocks (w1), 12 upsample x2, 13 time-grow x2, 14 conv w1->w2,
  15-17 memory blocks (w2), 18 upsample x2, 19 time-grow x2, 20 conv w2->w3,
  21 ReLU, 22 conv w3->3.
One latent frame becomes 4 frames; the first 3 frames of a stream are dropped, so the first
latent gives 1 frame, like the causal Wan VAE.  Output is mapped from [0, 1] to [-1, 1].

Encoder stack (``encoder.N``):
  0 conv 3->64, 1 ReLU,
  2 time pool x2, 3 conv stride 2 (no bias), 4-6 memory blocks,
  7 time pool x2, 8 conv stride 2, 9-11 memory blocks,
  12 time pool x1 (a 1x1 projection), 13 conv stride 2, 14-16 memory blocks,
  17 conv 64->16.
Four frames become one latent frame (8x smaller each side).  A stream's first chunk is one
frame: it is repeated to four, so it becomes one latent, which the decoder (dropping its
first three frames) turns back into one frame, as with the causal Wan VAE.  Input is mapped
from [-1, 1] to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WAN_WIDTHS = (256, 128, 64, 64)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class MemoryBlock(nn.Module):
    """Residual block whose first convolution also sees the previous frame's input."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out),
                                  nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TimeGrow(nn.Module):
    """1x1 projection to ``stride`` times the channels, unfolded into ``stride`` frames."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c, h, w = x.shape
        return self.conv(x).reshape(t * self.stride, c, h, w)


class TimePool(nn.Module):
    """``stride`` consecutive frames stacked on the channels, projected back (1x1)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c, h, w = x.shape
        return self.conv(x.reshape(t // self.stride, self.stride * c, h, w))


def _run(layers: nn.Sequential, x: torch.Tensor, memory: dict[int, torch.Tensor]
         ) -> torch.Tensor:
    """Frames (T, C, H, W) through ``layers``, each memory block seeing the frame before
    (the last frame of the previous call from ``memory``, which is updated; zeros at the
    start of a stream)."""
    for i, layer in enumerate(layers):
        if isinstance(layer, MemoryBlock):
            prev = memory.get(i)
            if prev is None:
                prev = torch.zeros_like(x[:1])
            past = torch.cat([prev, x[:-1]], 0)
            memory[i] = x[-1:].detach().clone()
            x = layer(x, past)
        else:
            x = layer(x)
    return x


@dataclass
class TinyDecoderState:
    """Per stream: each memory block's input for the last frame, frames still to drop."""

    memory: dict[int, torch.Tensor] = field(default_factory=dict)
    to_trim: int = 3


class TinyVideoDecoder(nn.Module):
    def __init__(self, latent_channels: int = 16, widths: tuple[int, ...] = WAN_WIDTHS,
                 time_upscale: tuple[bool, bool, bool] = (False, True, True)) -> None:
        super().__init__()
        w = widths
        layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, w[0]), nn.ReLU()]
        for stage in range(3):
            c = w[stage]
            layers += [MemoryBlock(c, c), MemoryBlock(c, c), MemoryBlock(c, c),
                       nn.Upsample(scale_factor=2),
                       TimeGrow(c, 2 if time_upscale[stage] else 1),
                       _conv(c, w[stage + 1], bias=False)]
        layers += [nn.ReLU(), _conv(w[3], 3)]
        self.decoder = nn.Sequential(*layers)
        self.t_upscale = 2 ** sum(time_upscale)

    def new_state(self) -> TinyDecoderState:
        return TinyDecoderState(to_trim=self.t_upscale - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: TinyDecoderState) -> torch.Tensor:
        """(1, z, T, h, w) latents -> (1, 3, N, 8h, 8w) frames in [-1, 1], streaming."""
        if latents.shape[0] != 1:
            raise ValueError("the tiny decoder streams one video at a time.")
        param = next(self.parameters())
        x = latents[0].transpose(0, 1).to(param.device, param.dtype)  # T, z, h, w
        x = _run(self.decoder, x, state.memory)
        if state.to_trim:
            drop = min(state.to_trim, x.shape[0])
            x = x[drop:]
            state.to_trim -= drop
        return (x.clamp(0.0, 1.0) * 2.0 - 1.0).transpose(0, 1)[None]


@dataclass
class TinyEncoderState:
    """Per stream: each memory block's input for the last frame."""

    memory: dict[int, torch.Tensor] = field(default_factory=dict)


class TinyVideoEncoder(nn.Module):
    def __init__(self, latent_channels: int = 16, width: int = 64,
                 time_downscale: tuple[bool, bool, bool] = (True, True, False)) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, width), nn.ReLU()]
        for stage in range(3):
            layers += [TimePool(width, 2 if time_downscale[stage] else 1),
                       nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
                       MemoryBlock(width, width), MemoryBlock(width, width),
                       MemoryBlock(width, width)]
        layers += [_conv(width, latent_channels)]
        self.encoder = nn.Sequential(*layers)
        self.t_downscale = 2 ** sum(time_downscale)

    def new_state(self) -> TinyEncoderState:
        return TinyEncoderState()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, state: TinyEncoderState) -> torch.Tensor:
        """(1, 3, N, H, W) frames in [-1, 1] -> (1, z, N / 4, H / 8, W / 8) latents,
        streaming; a chunk of fewer than four frames (a stream's first) is completed with
        copies of its last frame."""
        if frames.shape[0] != 1:
            raise ValueError("the tiny encoder streams one video at a time.")
        param = next(self.parameters())
        x = ((frames[0].transpose(0, 1) + 1.0) * 0.5).to(param.device, param.dtype)
        short = -x.shape[0] % self.t_downscale
        if short:
            x = torch.cat([x, x[-1:].expand(short, -1, -1, -1)], 0)
        return _run(self.encoder, x, state.memory).transpose(0, 1)[None]


def _half(path: str | Path, half: str) -> dict[str, torch.Tensor]:
    """The ``encoder.`` or ``decoder.`` keys of a TAEHV checkpoint."""
    from .loaders import read_state_dict
    return {k: v for k, v in read_state_dict(path).items() if k.startswith(f"{half}.")}


def _install(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path, half: str, *,
             dtype: torch.dtype, device: str) -> nn.Module:
    from .loaders import WeightsError
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: not a TAEHV {half} for 16-channel latents ({exc}).") \
            from None
    if missing or unexpected:
        raise WeightsError(f"{path}: {len(missing)} missing, {len(unexpected)} unexpected "
                           f"{half} keys; is it taew2_1.pth?")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tiny_encoder(path: str | Path, *, dtype: torch.dtype = torch.float16,
                      device: str = "cpu") -> TinyVideoEncoder:
    """The encoder half of a TAEHV checkpoint for Wan 2.1 (``taew2_1.pth``), weights only."""
    return _install(TinyVideoEncoder(), _half(path, "encoder"), path, "encoder", dtype=dtype,
                    device=device)


def load_tiny_decoder(path: str | Path, *, dtype: torch.dtype = torch.float16,
                      device: str = "cpu") -> TinyVideoDecoder:
    """The decoder half of a TAEHV checkpoint for Wan 2.1 (``taew2_1.pth``), weights only."""
    sd = _half(path, "decoder")
    model = TinyVideoDecoder()
    own = model.state_dict()
    for key, value in list(sd.items()):
        # a checkpoint's time-grow may carry more frames than used: keep the last ones
        if key in own and value.ndim == 4 and value.shape[0] > own[key].shape[0] and \
                value.shape[1:] == own[key].shape[1:]:
            sd[key] = value[-own[key].shape[0]:]
    return _install(model, sd, path, "decoder", dtype=dtype, device=device)
