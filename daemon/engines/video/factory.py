"""Build a VideoEngine from a preset: random weights (tiny, benchmarks) or real checkpoints."""

from __future__ import annotations

import dataclasses

import torch

from ...models import wan as W
from .engine import VideoEngine


def build_video_engine(preset_name: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                       weights=None, seed: int = 0) -> VideoEngine:
    """``weights``: a loaders.WanWeights with real networks; None builds random weights of the
    preset's size (the tiny preset always does)."""
    preset = W.PRESETS[preset_name]
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if weights is not None:
        transformer, vae, text = weights.transformer, weights.vae, weights.text
        description = f"Wan 2.1 {preset.name} ({weights.source})"
    else:
        torch.manual_seed(seed)
        transformer = W.build_transformer(preset, dtype, device)
        vae = W.build_vae(preset, torch.float32 if dtype == torch.float32 else dtype, device)
        # the text tower in the engine's dtype: random umT5-XXL in float32 would be 22 GB
        # real sizes get a random umT5-XXL of the real size (the engine keeps it in host
        # memory), so a prompt change costs what it costs with the real weights
        text_preset = preset if preset.text_encoder else \
            dataclasses.replace(preset, text_encoder=W.UMT5_XXL)
        text = W.build_text_encoder(text_preset, torch.float32 if preset_name == "tiny"
                                    else dtype, device)
        description = f"Wan 2.1 {preset.name} architecture with RANDOM weights"
    if text is None:
        raise ValueError("a text encoder is needed; load real weights for this preset.")
    min_side = 32 if preset_name == "tiny" else 256
    if weights is not None:
        tiny_decoder = weights.tiny_decoder
    elif preset_name == "tiny":
        from ...models.tiny_decoder import TinyVideoDecoder
        tiny_decoder = TinyVideoDecoder(widths=(16, 8, 8, 8)).to(device).eval()
    else:
        from ...models.tiny_decoder import TinyVideoDecoder
        tiny_decoder = TinyVideoDecoder().to(device, dtype).eval()
    return VideoEngine(f"video-{preset_name}" if preset_name == "tiny" else "video",
                       transformer, vae, text, device=device, min_side=min_side,
                       description=description, tiny_decoder=tiny_decoder)


def build_real_video_engine(size: str = "1.3b", *, device: str = "cuda") -> VideoEngine:
    """The video engine on the downloaded Wan 2.1 weights and StreamDiffusionV2 generator."""
    from ...models import loaders, registry

    wan_dir = registry.require(f"wan-{size}")
    gen_dir = registry.require(f"sdv2-{size}")
    generator = gen_dir / registry.MODELS[f"sdv2-{size}"].allow[0]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    weights = loaders.load_diffusers_dir(wan_dir, dtype=dtype, device=device,
                                         generator=generator, preset=size, text_device="cpu")
    tiny_dir = registry.local_path("taew2_1")
    if tiny_dir is not None:
        from ...models.tiny_decoder import load_tiny_decoder
        weights.tiny_decoder = load_tiny_decoder(tiny_dir / "taew2_1.pth", dtype=dtype,
                                                 device=device)
    engine = build_video_engine(size, device=device, dtype=dtype, weights=weights)
    engine.name = "video" if size == "1.3b" else f"video-{size}"
    return engine
