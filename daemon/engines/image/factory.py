"""Build an ImageEngine from a preset: random weights (tiny, benchmarks) or real checkpoints."""

from __future__ import annotations

import torch

from ...models import sd
from .engine import ImageEngine
from ...config import env

#: real models: (registry name of the pipeline, of the tiny VAE, of a LoRA fused at load)
REAL = {"sd-turbo": ("sd-turbo", "taesd", None),
        "sdxl-turbo": ("sdxl-turbo", "taesdxl", None),
        "sd15-lcm": ("sd15", "taesd", "lcm-lora-sdv1-5")}


def build_image_engine(preset: str = "tiny", *, device: str = "cpu", vae: str = "tiny",
                       dtype: torch.dtype | None = None) -> ImageEngine:
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    models = sd.build(preset, dtype=dtype, device=device, vae=vae)
    return ImageEngine(f"image-{preset}", models, device=device,
                       min_side=32 if preset.startswith("tiny") else 256,
                       description=f"{preset} architecture with RANDOM weights")


def build_real_image_engine(model: str = "sd-turbo", *, device: str = "cuda",
                            unet_file: str | None = None) -> ImageEngine:
    """The image engine on downloaded weights (diffusers layout) with the TAESD-layout tiny
    VAE when it has been pulled, else the model's own VAE.  ``unet_file`` (default: the
    LIVEDIFFUSION_IMAGE_UNET variable, which ``livediffusion daemon --image-unet`` sets): a
    single-file checkpoint of a model fine-tuned from this one, whose UNet is used instead."""
    import os

    unet_file = unet_file or env("LIVEDIFFUSION_IMAGE_UNET") or None
    from ...models import registry

    pipe_name, tiny_name, lora_name = REAL[model]
    root = registry.require(pipe_name)
    lora = registry.require(lora_name) if lora_name else None
    tiny = registry.local_path(tiny_name)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    models = sd.load_dir(root, dtype=dtype, device=device, tiny_vae=tiny, unet_file=unet_file)
    if unet_file:
        models.source += f", UNet from {os.path.basename(unet_file)}"
    if lora is not None:
        from ...models.lora import fuse_lora, load_lora_file
        fuse_lora(models.unet, load_lora_file(lora / registry.MODELS[lora_name].allow[0]))
        models.source += f" + {lora_name}"
    return ImageEngine("image" if model == "sd-turbo" else f"image-{model}", models,
                       device=device, description=f"{model} ({models.source})")
