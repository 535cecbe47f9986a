"""Chunk-by-chunk encoding and decoding with diffusers' AutoencoderKLWan.

The VAE's causal convolutions keep the last frames of their inputs between calls; diffusers
keeps that cache on the module.  Here every stream owns its own cache lists and passes them
to the encoder/decoder, so streams never see each other's history.

A stream's first two encoder and decoder calls run diffusers' own forward (they change shape
as the caches fill).  Every later call is the same fixed-shape graph, computed by
``vae_steady`` from the same modules and caches; ``compile()`` hands that graph to
torch.compile (the engine does on GPUs).

Latents are normalised with the VAE's latents_mean/std on encode and de-normalised on decode
(the DiT was trained on normalised latents; the public StreamDiffusionV2 release skips the
normalisation on encode only, which we take for an oversight: revisit with real weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import vae_steady


def _conv_count(module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


@dataclass
class VAEStreamState:
    enc: list = field(default_factory=list)
    dec: list = field(default_factory=list)
    encoded: int = 0   # latent frames encoded so far
    decoded: int = 0   # latent frames decoded so far

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.enc, *self.dec)
                   if isinstance(t, torch.Tensor))


class StreamingVAE:
    def __init__(self, vae, normalize: bool = True, channels_last: bool | None = None) -> None:
        self.vae = vae
        if channels_last is None:  # on GPUs cuDNN's 3D convolutions want NDHWC
            channels_last = next(vae.parameters()).device.type == "cuda"
        self.memory_format = torch.channels_last_3d if channels_last else \
            torch.contiguous_format
        if channels_last:  # the 3D convolutions' weights (the 2D ones stay as they are)
            for param in vae.parameters():
                if param.ndim == 5:
                    param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        self.z_dim = vae.config.z_dim
        self.enc_convs = _conv_count(vae.encoder)
        self.dec_convs = _conv_count(vae.decoder)
        dev, dt = self.device, self.dtype
        if normalize:
            mean = torch.tensor(vae.config.latents_mean, device=dev, dtype=dt)
            std = torch.tensor(vae.config.latents_std, device=dev, dtype=dt)
        else:
            mean = torch.zeros(self.z_dim, device=dev, dtype=dt)
            std = torch.ones(self.z_dim, device=dev, dtype=dt)
        self.mean = mean.view(1, -1, 1, 1, 1)
        self.std = std.view(1, -1, 1, 1, 1)
        self.steady = vae_steady.supported(vae)  # False: diffusers' forward for every call
        self.regions = vae_steady.Regions()

    @property
    def compiled(self) -> bool:
        return self.regions.compiled

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the steady-state regions (one graph per region and frame size)."""
        if self.steady:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(
                torch._dynamo.config.cache_size_limit, 64)
            self.regions = vae_steady.Regions(mode, compiled=True)

    def _encode_chunk(self, x: torch.Tensor, caches: list) -> torch.Tensor:
        return vae_steady.encode_chunk(self.regions, self.vae, x, caches)

    def _decode_chunk(self, z: torch.Tensor, caches: list) -> torch.Tensor:
        return vae_steady.decode_chunk(self.regions, self.vae, z, caches)

    @property
    def device(self) -> torch.device:
        return self.vae.post_quant_conv.weight.device   # kept by both halves (see keep_only)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.post_quant_conv.weight.dtype

    def keep_only(self, half: str) -> None:
        """Free the other half's weights (a pipeline's first rank only encodes, its last only
        decodes): ``half`` is "encoder" or "decoder"."""
        if half == "encoder":
            self.vae.decoder.to("meta")
        elif half == "decoder":
            self.vae.encoder.to("meta")
            self.vae.quant_conv.to("meta")
        else:
            raise ValueError(f"keep_only: 'encoder' or 'decoder', not {half!r}")

    def new_state(self) -> VAEStreamState:
        return VAEStreamState([None] * self.enc_convs, [None] * self.dec_convs)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """frames (B, 3, N, H, W) in [-1, 1]: N = 1 for a stream's first call, then 4 per
        latent frame.  Returns normalised latents (B, z, N', H/8, W/8)."""
        n = frames.shape[2]
        first = state.encoded == 0
        if (first and (n - 1) % 4) or (not first and n % 4):
            raise ValueError(f"{n} frames do not make whole latent frames "
                             f"({'1 + 4k' if first else '4k'} expected).")
        x = frames.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        outs = []
        start = 0
        if first:
            outs.append(self.vae.quant_conv(
                self.vae.encoder(x[:, :, :1], feat_cache=state.enc, feat_idx=[0])))
            start = 1
        for i in range(start, n, 4):
            if self.steady and state.encoded + len(outs) >= 2:
                outs.append(self._encode_chunk(x[:, :, i:i + 4], state.enc))
                continue
            outs.append(self.vae.quant_conv(
                self.vae.encoder(x[:, :, i:i + 4], feat_cache=state.enc, feat_idx=[0])))
        h = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        mu = h[:, :self.z_dim]
        state.encoded += mu.shape[2]
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """Normalised latents (B, z, N', h, w) -> frames (B, 3, N, H, W) in [-1, 1]."""
        z = (latents.to(self.device, self.dtype) * self.std + self.mean).contiguous(
            memory_format=self.memory_format)
        outs = []
        for i in range(z.shape[2]):
            if self.steady and state.decoded >= 2:
                out = self._decode_chunk(z[:, :, i:i + 1], state.dec)
            else:
                out = self.vae.decoder(self.vae.post_quant_conv(z[:, :, i:i + 1]),
                                       feat_cache=state.dec, feat_idx=[0],
                                       first_chunk=state.decoded == 0).clamp_(-1.0, 1.0)
            outs.append(out)
            state.decoded += 1
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]
