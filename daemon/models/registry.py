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
               "SD-Turbo (SD 2.1 UNet, 1 step), diffusers layout: the image engine's default"),
    ModelEntry("sdxl-turbo", "stabilityai/sdxl-turbo",
               "SDXL-Turbo, diffusers layout (the image engine, larger)"),
    ModelEntry("taesd", "madebyollin/taesd", "TAESD tiny VAE for SD 1.x/2.x latents"),
    ModelEntry("taesdxl", "madebyollin/taesdxl", "TAESDXL tiny VAE for SDXL latents"),
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
