"""The steady-state chunk of the Wan 2.1 VAE as pure functions, for torch.compile.

diffusers' encoder/decoder keep their causal history in a list they mutate, switch on
``None`` and ``"Rep"`` markers for a stream's first calls, pad every causal convolution with a
separate copy and upsample in float32.  After a stream's first two calls every cache entry is
a tensor of fixed shape, and the computation of a chunk is always the same graph.  These
functions compute exactly that graph from diffusers' modules and weights, with the caches as
explicit inputs and outputs, region by region (a residual block, a resampler, the first and
last convolutions), so each region's old caches are freed as soon as it returns:

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
    """Walks a stream's cache list in diffusers' order.  A region returns its new history as
    views into its own buffers (the concatenated input, typically: torch.compile drops a
    clone there), so ``put`` copies each into the cache tensor it replaces, in place: caches
    keep their size and address, and the region's buffers are freed when it returns."""

    def __init__(self, caches: list) -> None:
        self.list, self.i = caches, 0

    def take(self, n: int = 1) -> list[torch.Tensor]:
        return self.list[self.i:self.i + n]

    def put(self, *new: torch.Tensor) -> None:
        for j, t in enumerate(new, self.i):
            old = self.list[j]
            if isinstance(old, torch.Tensor) and old.shape == t.shape and \
                    old.dtype == t.dtype and old._base is None:
                old.copy_(t)
            else:
                self.list[j] = t.clone()
        self.i += len(new)


# --- pure regions: inputs and old caches in, outputs and new caches out (compiled on GPUs) --


def _causal_conv(conv, x: torch.Tensor, cache: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """WanCausalConv3d with a temporal kernel of 3 and its two cached input frames."""
    inp = torch.cat([cache, x], 2)
    y = F.conv3d(inp, conv.weight, conv.bias, conv.stride,
                 (0, conv._padding[2], conv._padding[0]))
    return y, inp[:, :, -2:]


def _pointwise(conv, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 WanCausalConv3d (no history)."""
    return F.conv3d(x, conv.weight, conv.bias)


def _frame_conv2d(conv, x: torch.Tensor, padding) -> torch.Tensor:
    """A per-frame nn.Conv2d applied to (B, C, T, H, W) as a (1, k, k) 3D convolution."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, (1, *conv.stride), padding)


def residual_region(block, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = _classes()
    h = _pointwise(block.conv_shortcut, x) if isinstance(block.conv_shortcut,
                                                         K.WanCausalConv3d) else x
    y, n1 = _causal_conv(block.conv1, block.nonlinearity(block.norm1(x)), c1)
    y, n2 = _causal_conv(block.conv2, block.nonlinearity(block.norm2(y)), c2)
    return y + h, n1, n2


def up_resample_region(block, x: torch.Tensor, cache: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """upsample3d (time first: each frame becomes two; then space) or upsample2d."""
    new = None
    if block.mode == "upsample3d":
        b, ch, t, h, w = x.shape
        y, new = _causal_conv(block.time_conv, x, cache)             # b, 2ch, t, h, w
        x = torch.stack((y[:, :ch], y[:, ch:]), 3).reshape(b, ch, 2 * t, h, w)
    x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    return _frame_conv2d(block.resample[1], x, (0, 1, 1)), new


def down_resample_region(block, x: torch.Tensor, cache: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """downsample2d, or downsample3d (space, then time with stride 2 over one cached frame)."""
    x = _frame_conv2d(block.resample[1], F.pad(x, (0, 1, 0, 1)), 0)
    if block.mode != "downsample3d":
        return x, None
    inp = torch.cat([cache[:, :, -1:], x], 2)
    y = F.conv3d(inp, block.time_conv.weight, block.time_conv.bias, block.time_conv.stride)
    return y, x[:, :, -1:]


def conv_in_region(conv, x: torch.Tensor, cache: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first convolution.  The encoder's reads 3 channels, which sends cuDNN to a slow
    generic kernel; zero channels up to 8 (input and weights) give it tensor-core kernels
    and the same sums."""
    if conv.in_channels >= 8 or x.device.type != "cuda":
        return _causal_conv(conv, x, cache)
    extra = 8 - conv.in_channels
    inp = torch.cat([cache, x], 2)
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra))
    y = F.conv3d(F.pad(inp, (0, 0, 0, 0, 0, 0, 0, extra)), weight, conv.bias, conv.stride,
                 (0, conv._padding[2], conv._padding[0]))
    return y, inp[:, :, -2:]


def conv_out_region(norm, act, conv, x: torch.Tensor, cache: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _causal_conv(conv, act(norm(x)), cache)


def attention_region(attn, x: torch.Tensor) -> torch.Tensor:
    return attn(x)  # per frame, no history


class Regions:
    """The region functions, compiled or not.  torch.compile generates one graph per
    region kind and activation shape; each region frees its old caches when it returns."""

    NAMES = ("residual_region", "up_resample_region", "down_resample_region",
             "conv_in_region", "conv_out_region", "attention_region")

    def __init__(self, compile_mode: str | None = None, compiled: bool = False) -> None:
        self.compiled = compiled
        for name in self.NAMES:
            fn = globals()[name]
            if compiled:
                fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=compile_mode)
            setattr(self, name, fn)


# --- the walk over diffusers' module tree --------------------------------------------------


def _residual(R: Regions, block, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    y, n1, n2 = R.residual_region(block, x, *c.take(2))
    c.put(n1, n2)
    return y


def _resample(R: Regions, block, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    if block.mode in ("upsample2d", "upsample3d"):
        timed = block.mode == "upsample3d"
        y, new = R.up_resample_region(block, x, c.take()[0] if timed else None)
    elif block.mode in ("downsample2d", "downsample3d"):
        timed = block.mode == "downsample3d"
        y, new = R.down_resample_region(block, x, c.take()[0] if timed else None)
    else:
        return x
    if timed:
        c.put(new)
    return y


def _mid(R: Regions, mid, x: torch.Tensor, c: _Caches) -> torch.Tensor:
    x = _residual(R, mid.resnets[0], x, c)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        x = _residual(R, resnet, R.attention_region(attn, x), c)
    return x


def encode_chunk(R: Regions, vae, x: torch.Tensor, caches: list) -> torch.Tensor:
    """4 frames (B, 3, 4, H, W) -> the quant conv's output (B, 2z, 1, h, w); the stream's
    cache list is updated in place."""
    K = _classes()
    enc = vae.encoder
    c = _Caches(caches)
    x, new = R.conv_in_region(enc.conv_in, x, c.take()[0])
    c.put(new)
    for layer in enc.down_blocks:
        if isinstance(layer, K.WanResidualBlock):
            x = _residual(R, layer, x, c)
        elif isinstance(layer, K.WanResample):
            x = _resample(R, layer, x, c)
        else:
            x = R.attention_region(layer, x)
    x = _mid(R, enc.mid_block, x, c)
    x, new = R.conv_out_region(enc.norm_out, enc.nonlinearity, enc.conv_out, x, c.take()[0])
    c.put(new)
    return _pointwise(vae.quant_conv, x)


def decode_chunk(R: Regions, vae, z: torch.Tensor, caches: list) -> torch.Tensor:
    """One de-normalised latent frame (B, z, 1, h, w) -> 4 frames in [-1, 1]; the stream's
    cache list is updated in place."""
    dec = vae.decoder
    c = _Caches(caches)
    x, new = R.conv_in_region(dec.conv_in, _pointwise(vae.post_quant_conv, z), c.take()[0])
    c.put(new)
    x = _mid(R, dec.mid_block, x, c)
    for up in dec.up_blocks:
        for resnet in up.resnets:
            x = _residual(R, resnet, x, c)
        if up.upsamplers is not None:
            x = _resample(R, up.upsamplers[0], x, c)
    x, new = R.conv_out_region(dec.norm_out, dec.nonlinearity, dec.conv_out, x, c.take()[0])
    c.put(new)
    return x.clamp(-1.0, 1.0)
