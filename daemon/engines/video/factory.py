"""Build a VideoEngine from a preset: random weights (tiny, benchmarks) or real checkpoints."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ... import profiles
from ...models import wan as W
from ...profiles import PROFILES
from .engine import VideoEngine

log = logging.getLogger("livediffusion.video")


@dataclasses.dataclass
class VideoParts:
    """What a video engine (or one pipeline rank of it) is built from."""

    transformer: object
    vae: object
    text: tuple | None          # (tokenizer, encoder), or None where no text is encoded
    tiny_decoder: object
    description: str
    min_side: int
    tiny_encoder: object = None


def _text_stand_in(preset: W.WanPreset, dtype: torch.dtype, device: str):
    """A one-layer random umT5 of the real output width (benchmarks: the text encoder runs
    once per prompt, never per chunk)."""
    text_dim = preset.transformer["text_dim"]
    stand_in = W.WanPreset("text-stand-in", {}, text_encoder=dict(
        vocab_size=384, d_model=text_dim, d_kv=64, d_ff=256, num_layers=1,
        num_heads=max(1, text_dim // 64), relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    return W.build_text_encoder(stand_in, dtype, device)


def resolve_profile(preset_name: str, device: str, name: str | None = None):
    """The memory profile of a real-size preset on a GPU (daemon/profiles.py), logged in
    one line; None for tiny presets and on CPUs."""
    if preset_name not in PROFILES:
        return None
    profile = profiles.for_device(preset_name, device, name)
    if profile is not None:
        log.info("video %s: memory profile %s (%s): %s", preset_name, profile.name,
                 profile.why, profile.summary())
    return profile


def build_video_parts(preset_name: str, *, device: str = "cpu",
                      dtype: torch.dtype | None = None, weights=None, seed: int = 0,
                      text: str | None = "real", fp8: bool = False) -> VideoParts:
    """``weights``: a loaders.WanWeights with real networks; None builds random weights of
    the preset's size (the tiny preset always does), the same for a seed on every process
    (pipeline ranks build their own).  ``text``: "real" (umT5 of the preset's size, random
    unless loaded), "stand-in" (one random layer of the real width) or None (no text
    encoder: a pipeline rank that never encodes prompts).  ``fp8``: the DiT's per-frame
    linear layers in FP8 (models/fp8.py), quantised onto ``device`` block by block."""
    preset = W.PRESETS[preset_name]
    small = preset_name.startswith("tiny")
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if weights is not None:
        transformer, vae, text_parts = weights.transformer, weights.vae, weights.text
        description = f"Wan 2.1 {preset.name} ({weights.source})"
    else:
        torch.manual_seed(seed)
        transformer = W.build_transformer(preset, dtype, device)
        vae = W.build_vae(preset, torch.float32 if dtype == torch.float32 else dtype, device)
        text_parts = None
        if text == "stand-in":
            text_parts = _text_stand_in(preset, dtype, device)
        elif text is not None:
            # the text tower in the engine's dtype: random umT5-XXL in float32 would be
            # 22 GB; real sizes get a random umT5-XXL of the real size (the engine keeps it
            # in host memory), so a prompt change costs what it costs with the real weights
            text_preset = preset if preset.text_encoder else \
                dataclasses.replace(preset, text_encoder=W.UMT5_XXL)
            text_parts = W.build_text_encoder(text_preset, torch.float32 if small else dtype,
                                              device)
        description = f"Wan 2.1 {preset.name} architecture with RANDOM weights"
    if text is not None and text_parts is None:
        raise ValueError("a text encoder is needed; load real weights for this preset.")
    if fp8:
        from ...models.fp8 import quantize_blocks
        quantize_blocks(transformer, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the bf16 weights' memory goes back to the card
        description += ", DiT linear layers in FP8"
    min_side = 32 if small else 256
    if weights is not None:
        tiny_decoder, tiny_encoder = weights.tiny_decoder, weights.tiny_encoder
    else:
        from ...models.tiny_decoder import TinyVideoDecoder, TinyVideoEncoder
        torch.manual_seed(seed + 1)  # the same weights whether a text encoder was built
        if small:
            tiny_decoder = TinyVideoDecoder(widths=(16, 8, 8, 8)).to(device).eval()
        else:
            tiny_decoder = TinyVideoDecoder().to(device, dtype).eval()
        torch.manual_seed(seed + 2)
        tiny_encoder = TinyVideoEncoder(width=8 if small else 64).to(
            device, torch.float32 if small else dtype).eval()
    return VideoParts(transformer, vae, text_parts if text is not None else None,
                      tiny_decoder, description, min_side, tiny_encoder)


def build_video_engine(preset_name: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                       weights=None, seed: int = 0, profile: str | None = None) -> VideoEngine:
    """``weights``: a loaders.WanWeights with real networks; None builds random weights of the
    preset's size (the tiny preset always does).  Real sizes on a GPU get a memory profile
    (``profile``: its name; None: ``LIVEDIFFUSION_PROFILE``, by default chosen from the
    free memory)."""
    chosen = resolve_profile(preset_name, device, profile)
    parts = build_video_parts(preset_name, device=device, dtype=dtype, weights=weights,
                              seed=seed, fp8=chosen is not None and chosen.fp8)
    return VideoEngine(f"video-{preset_name}" if preset_name == "tiny" else "video",
                       parts.transformer, parts.vae, parts.text, device=device,
                       min_side=parts.min_side, description=parts.description,
                       tiny_decoder=parts.tiny_decoder, tiny_encoder=parts.tiny_encoder,
                       profile=chosen)


def load_real_video_parts(size: str = "1.3b", *, device: str = "cuda",
                          text: bool = True, fp8: bool = False,
                          family: str | None = None) -> VideoParts:
    """The downloaded Wan 2.1 weights and StreamDiffusionV2 generator (``text=False``: no
    umT5, for pipeline ranks that never encode a prompt; ``fp8``: the DiT loads to host
    memory and is quantised onto the GPU block by block)."""
    from ...models import loaders, registry

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    folder = weights_folder()
    if family is not None:   # a causal family member on the Wan base (models/family.py)
        from ...models.family import FAMILY, load_family_generator
        entry = FAMILY[family]
        wan_dir = registry.require(entry.base_entry)
        checkpoint = registry.require(entry.name) / entry.files[0]
        dit = load_family_generator(entry, checkpoint, size, dtype=dtype,
                                    device="cpu" if fp8 else device)
        dit.source = checkpoint.name
        weights = loaders.load_diffusers_dir(wan_dir, dtype=dtype, device=device,
                                             preset=size, text_device="cpu", text=text,
                                             transformer=dit)
    elif folder is not None:   # --weights DIR: any layout people have (models/wan_folders.py)
        from ...models import wan_folders
        _, _, found = wan_folders.resolve(folder, size)
        generator = found or _registry_generator(size)
        weights, _ = wan_folders.load_weights_dir(
            folder, size=size, dtype=dtype, device=device, generator=generator,
            text_device="cpu", text=text, dit_device="cpu" if fp8 else None)
    else:
        wan_dir = registry.require(f"wan-{size}")
        generator = _registry_generator(size, required=True)
        weights = loaders.load_diffusers_dir(wan_dir, dtype=dtype, device=device,
                                             generator=generator, preset=size,
                                             text_device="cpu", text=text,
                                             dit_device="cpu" if fp8 else None)
    tiny_dir = registry.local_path("taew2_1")
    if tiny_dir is not None:
        from ...models.tiny_decoder import load_tiny_decoder, load_tiny_encoder
        weights.tiny_decoder = load_tiny_decoder(tiny_dir / "taew2_1.pth", dtype=dtype,
                                                 device=device)
        weights.tiny_encoder = load_tiny_encoder(tiny_dir / "taew2_1.pth", dtype=dtype,
                                                 device=device)
    return build_video_parts(size, device=device, dtype=dtype, weights=weights,
                             text="real" if text else None, fp8=fp8)


def weights_folder() -> str | None:
    """The folder ``livediffusion daemon --weights DIR`` named (LIVEDIFFUSION_WEIGHTS)."""
    import os
    return os.environ.get("LIVEDIFFUSION_WEIGHTS") or None


def _registry_generator(size: str, required: bool = False):
    """The downloaded StreamDiffusionV2 generator of this size: its file, or None (with
    ``required``: MissingWeights naming the command that fetches it)."""
    from ...models import loaders, registry
    name = f"sdv2-{size}"
    path = registry.require(name) if required else registry.local_path(name)
    if path is None:
        raise loaders.WeightsError(
            f"the weights folder has no causal generator (the reference tree keeps it in "
            f"ckpts/wan_causal_dmd_v2v/model.pt); fetch it with: livediffusion models pull "
            f"{name}")
    return path / registry.MODELS[name].allow[0]


def build_real_video_engine(size: str = "1.3b", *, device: str = "cuda",
                            profile: str | None = None, family: str | None = None,
                            name: str | None = None) -> VideoEngine:
    """The video engine on the downloaded Wan 2.1 weights and StreamDiffusionV2 generator
    (``family``: another causal generator of models/family.py, with its schedule), in the
    memory profile chosen for the GPU (see build_video_engine)."""
    chosen = resolve_profile(size, device, profile)
    parts = load_real_video_parts(size, device=device, fp8=chosen is not None and chosen.fp8,
                                  family=family)
    model = None
    if family is not None:
        from ...models.family import FAMILY
        model = FAMILY[family]
    return VideoEngine(name or ("video" if size == "1.3b" else f"video-{size}"),
                       parts.transformer, parts.vae, parts.text, device=device,
                       min_side=parts.min_side, description=parts.description,
                       tiny_decoder=parts.tiny_decoder, tiny_encoder=parts.tiny_encoder,
                       profile=chosen, model=model)


def build_parts(spec: str, device: str, *, text: bool = True) -> VideoParts:
    """Parts by name, as a pipeline rank is told to build them: ``random:<preset>``,
    ``bench:<preset>`` (random, one-layer text stand-in) or ``real:<size>``; a trailing
    ``@fp8`` quantises the DiT's linear layers (every rank alike, so blocks can move)."""
    spec, _, precision = spec.partition("@")
    fp8 = precision == "fp8"
    kind, _, preset = spec.partition(":")
    if kind == "real":
        return load_real_video_parts(preset, device=device, text=text, fp8=fp8)
    if kind in ("random", "bench"):
        return build_video_parts(preset, device=device,
                                 text=None if not text else
                                 ("stand-in" if kind == "bench" else "real"), fp8=fp8)
    raise ValueError(f"unknown video parts {spec!r} (random:, bench: or real:<preset>).")
