"""The steady-state chunk of the Wan 2.1 VAE as pure functions, for torch.compile.

diffusers' encoder/decoder keep their causal history in a list they mutate, switch on
``None`` and ``"Rep"`` markers for a stream's first calls, pad every causal convolution with a
separate copy and upsample in float32.  After a stream's first two calls every cache entry is
a tensor of fixed shape, and the computation of a chunk is always the same graph.  These
functions compute exactly that graph from diffusers' modules and weights, with the caches as
explicit inputs and outputs:

* a causal 3x3x3 convolution reads ``cat(cache, x)`` (the cache holds the last two input
  frames) and pads only space, inside the convolution;
* the per-frame 2D resampling convolutions run as (1, k, k) 3D convolutions, so activations
  never leave the (channels-last) 5D layout;
* nearest 2x upsampling stays in the activations' dtype (copying values is exact);
* the caches are walked in diffusers' own order, so a state produced by the eager path
  continues here unchanged (and the tests compare the two on every output and cache entry).

Only the Wan 2.1 VAE (non-residual blocks) is covered; ``supported()`` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _classes():
    from diffusers.models.autoencoders import autoencoder_kl_wan as K
    return K


def supported(vae) -> bool:
    """The Wan 2.1 layout: plain residual up/down blocks (Wan 2.2's residual variant is not)."""
    K = _classes()
    enc, dec = vae.encoder, vae.decoder
    return (all(isinstance(m, (K.WanResidualBlock, K.WanResample, K.WanAttentionBlock))
                for m in enc.down_blocks)
            and all(isinstance(m, K.WanUpBlock) for m in dec.up_blocks)
            and getattr(vae.config, "patch_size", None) in (None, 1))


class _Caches:
    """Reads the caches in order and collects their successors."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.old, self.new = caches, []

    def take(self) -> torch.Tensor:
        return self.old[len(self.new)]

    def put(self, t: torch.Tensor) -> None:
        self.new.append(t)


def _causal_conv(conv, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    """WanCausalConv3d with a temporal kernel of 3 and its two cached frames."""
    inp = torch.cat([c.take(), x], 2)
    c.put(inp[:, :, -2:].clone())
    return F.conv3d(inp, conv.weight, conv.bias, conv.stride,
                    (0, conv._padding[2], conv._padding[0]))


def _pointwise(conv, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 WanCausalConv3d (no history)."""
    return F.conv3d(x, conv.weight, conv.bias)


def _frame_conv2d(conv, x: torch.Tensor, padding) -> torch.Tensor:
    """A per-frame nn.Conv2d applied to (B, C, T, H, W) as a (1, k, k) 3D convolution."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, (1, *conv.stride), padding)


def _residual(block, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    K = _classes()
    h = _pointwise(block.conv_shortcut, x) if isinstance(block.conv_shortcut,
                                                         K.WanCausalConv3d) else x
    y = _causal_conv(block.conv1, block.nonlinearity(block.norm1(x)), c)
    y = _causal_conv(block.conv2, block.nonlinearity(block.norm2(y)), c)
    return y + h


def _resample(block, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    mode = block.mode
    if mode == "upsample3d":  # time first: each frame becomes two
        b, ch, t, h, w = x.shape
        y = _causal_conv(block.time_conv, x, c)                  # b, 2ch, t, h, w
        x = torch.stack((y[:, :ch], y[:, ch:]), 3).reshape(b, ch, 2 * t, h, w)
    if mode in ("upsample2d", "upsample3d"):
        conv = block.resample[1]
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return _frame_conv2d(conv, x, (0, 1, 1))
    if mode in ("downsample2d", "downsample3d"):
        x = _frame_conv2d(block.resample[1], F.pad(x, (0, 1, 0, 1)), 0)
        if mode == "downsample3d":
            inp = torch.cat([c.take()[:, :, -1:], x], 2)
            c.put(x[:, :, -1:].clone())
            x = F.conv3d(inp, block.time_conv.weight, block.time_conv.bias,
                         block.time_conv.stride)
        return x
    return x


def _layer(layer, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    K = _classes()
    if isinstance(layer, K.WanResidualBlock):
        return _residual(layer, x, c)
    if isinstance(layer, K.WanResample):
        return _resample(layer, x, c)
    return layer(x)  # attention: per frame, no history


def _mid(mid, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    x = _residual(mid.resnets[0], x, c)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        x = _residual(resnet, attn(x), c)
    return x


def encode_chunk(vae, x: torch.Tensor, caches: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """4 frames (B, 3, 4, H, W) -> (the quant conv's output (B, 2z, 1, h, w), new caches)."""
    enc = vae.encoder
    c = _Caches(caches)
    x = _causal_conv(enc.conv_in, x, c)
    for layer in enc.down_blocks:
        x = _layer(layer, x, c)
    x = _mid(enc.mid_block, x, c)
    x = _causal_conv(enc.conv_out, enc.nonlinearity(enc.norm_out(x)), c)
    return _pointwise(vae.quant_conv, x), c.new


def decode_chunk(vae, z: torch.Tensor, caches: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One de-normalised latent frame (B, z, 1, h, w) -> (4 frames in [-1, 1], new caches)."""
    dec = vae.decoder
    c = _Caches(caches)
    x = _causal_conv(dec.conv_in, _pointwise(vae.post_quant_conv, z), c)
    x = _mid(dec.mid_block, x, c)
    for up in dec.up_blocks:
        for resnet in up.resnets:
            x = _residual(resnet, x, c)
        if up.upsamplers is not None:
            x = _resample(up.upsamplers[0], x, c)
    x = _causal_conv(dec.conv_out, dec.nonlinearity(dec.norm_out(x)), c)
    return x.clamp(-1.0, 1.0), c.new
