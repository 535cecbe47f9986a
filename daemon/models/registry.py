"""The model weights livediffusion knows, where they live on the Hugging Face Hub, and
whether they are in the local cache (``livediffusion models list|pull``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    name: str
    repo: str
    what: str
    allow: tuple[str, ...] | None = None  # file patterns to fetch (None: the whole repo)


def _sd_files(xl: bool = False) -> tuple[str, ...]:
    """The files of a diffusers-layout SD pipeline the image engine reads (the repositories
    also hold single-file checkpoints and fp16/ema variants it does not need)."""
    files = ["model_index.json", "scheduler/scheduler_config.json",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    for enc, tok in (("text_encoder", "tokenizer"),) + ((("text_encoder_2", "tokenizer_2"),)
                                                       if xl else ()):
        files += [f"{enc}/config.json", f"{enc}/model.safetensors",
                  f"{tok}/merges.txt", f"{tok}/special_tokens_map.json",
                  f"{tok}/tokenizer_config.json", f"{tok}/vocab.json"]
    return tuple(files)


MODELS: dict[str, ModelEntry] = {m.name: m for m in [
    ModelEntry("wan-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
               "Wan 2.1 T2V 1.3B, diffusers layout (DiT, VAE, umT5-XXL encoder, tokenizer)"),
    ModelEntry("wan-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
               "Wan 2.1 T2V 14B, diffusers layout (DiT, VAE, umT5-XXL encoder, tokenizer)"),
    ModelEntry("sdv2-1.3b", "jerryfeng/StreamDiffusionV2",
               "StreamDiffusionV2 causal few-step generator for Wan 1.3B",
               ("wan_causal_dmd_v2v/model.pt",)),
    ModelEntry("sdv2-14b", "jerryfeng/StreamDiffusionV2",
               "StreamDiffusionV2 causal few-step generator for Wan 14B",
               ("wan_causal_dmd_v2v_14b/model.pt",)),
    ModelEntry("taew2_1", "madebyollin/taehv",
               "TAEHV tiny decoder for Wan 2.1 latents (the video engine's fast decoder)",
               ("taew2_1.pth",)),
    ModelEntry("sd-turbo", "stabilityai/sd-turbo",
               "SD-Turbo (SD 2.1 UNet, 1 step), diffusers layout: the image engine's default",
               _sd_files()),
    ModelEntry("sdxl-turbo", "stabilityai/sdxl-turbo",
               "SDXL-Turbo, diffusers layout (the image engine, larger)", _sd_files(xl=True)),
    ModelEntry("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "Stable Diffusion 1.5, diffusers layout (with lcm-lora-sdv1-5: 2-4 steps)",
               _sd_files()),
    ModelEntry("lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdv1-5",
               "LCM-LoRA for SD 1.5 (fused into the UNet at load)",
               ("pytorch_lora_weights.safetensors",)),
    ModelEntry("taesd", "madebyollin/taesd", "TAESD tiny VAE for SD 1.x/2.x latents",
               ("config.json", "diffusion_pytorch_model.safetensors")),
    ModelEntry("taesdxl", "madebyollin/taesdxl", "TAESDXL tiny VAE for SDXL latents",
               ("config.json", "diffusion_pytorch_model.safetensors")),
]}


class MissingWeights(FileNotFoundError):
    """Weights are not in the local cache; the message names the command that fetches them."""


def local_path(name: str) -> Path | None:
    """The cached snapshot of a model, or None when it has not been pulled."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    entry = MODELS[name]
    try:
        path = Path(snapshot_download(entry.repo, allow_patterns=list(entry.allow or ()) or None,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    if entry.allow and not all((path / pattern).exists() for pattern in entry.allow):
        return None
    return path


def require(name: str) -> Path:
    path = local_path(name)
    if path is None:
        entry = MODELS[name]
        raise MissingWeights(f"{entry.what} is not downloaded; fetch it with: "
                             f"livediffusion models pull {name}")
    return path


def pull(name: str) -> Path:
    """Download into the Hugging Face cache (progress bars from huggingface_hub)."""
    from huggingface_hub import snapshot_download

    entry = MODELS[name]
    return Path(snapshot_download(entry.repo, allow_patterns=list(entry.allow or ()) or None))
