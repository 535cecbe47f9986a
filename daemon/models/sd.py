"""SD-family networks for the image engine: UNet, VAE (tiny TAESD layout or full), CLIP text
encoders; presets at real sizes and a tiny one; loaders for the diffusers layout.

Real sizes:
* ``sd-turbo``: the SD 2.1 UNet (865M parameters, cross-attention width 1024, linear
  projections) with the OpenCLIP ViT-H text tower (23 layers of width 1024); 1 step.
* ``sd15``: the SD 1.5 UNet (860M, cross-attention 768) with CLIP ViT-L/14 (12 layers of
  768); meant for 2-4 steps with an LCM-LoRA fused into it.
* ``sdxl-turbo``: the SDXL UNet (2.6B, cross-attention 2048, "text_time" conditioning) with
  CLIP ViT-L and OpenCLIP ViT-bigG (32 layers of 1280, projected pooled output).
The tiny preset keeps the classes and the conditioning of ``sd-turbo`` at sizes that run on
two CPU cores in milliseconds; its tokenizer is byte-level and needs no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TEXT_LEN = 77

_SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"))


@dataclass(frozen=True)
class SDPreset:
    name: str
    unet: dict[str, Any]
    #: CLIPTextConfig kwargs per text encoder (SDXL has two; the second is projected)
    text: tuple[dict[str, Any], ...]
    vae_scaling: float = 0.18215
    tiny_vae: dict[str, Any] = field(default_factory=dict)   # AutoencoderTiny kwargs
    full_vae: dict[str, Any] = field(default_factory=dict)   # AutoencoderKL kwargs
    default_steps: int = 1
    xl: bool = False


_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
               projection_dim=768)
_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
               num_attention_heads=16, num_hidden_layers=23, max_position_embeddings=77,
               hidden_act="gelu", projection_dim=512)
_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                  num_attention_heads=20, num_hidden_layers=32, max_position_embeddings=77,
                  hidden_act="gelu", projection_dim=1280)
_FULL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)

#: the tiny presets' text tower (byte-level tokenizer ids) and TAESD-layout VAE
_CLIP_TINY = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu",
                  projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1)
_TAESD_TINY = dict(encoder_block_out_channels=(8, 8, 8, 8),
                   decoder_block_out_channels=(8, 8, 8, 8),
                   num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))

PRESETS: dict[str, SDPreset] = {
    "sd-turbo": SDPreset(
        "sd-turbo", dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                         use_linear_projection=True), (_CLIP_H,), full_vae=_FULL_VAE),
    "sd15": SDPreset(
        "sd15", dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8), (_CLIP_L,),
        full_vae=_FULL_VAE, default_steps=2),
    "sdxl-turbo": SDPreset(
        "sdxl-turbo",
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
             cross_attention_dim=2048, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        (_CLIP_L, _CLIP_BIGG), vae_scaling=0.13025,
        full_vae=dict(_FULL_VAE, scaling_factor=0.13025, force_upcast=True), xl=True),
    "tiny": SDPreset(
        "tiny",
        dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
             block_out_channels=(32, 64), norm_num_groups=8,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True),
        (_CLIP_TINY,), tiny_vae=_TAESD_TINY,
        full_vae=dict(_FULL_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                      norm_num_groups=4),
        default_steps=2),
    # SDXL's conditioning (two encoders, pooled text and size ids) at the tiny size
    "tiny-xl": SDPreset(
        "tiny-xl",
        dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
             block_out_channels=(32, 64), norm_num_groups=8,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=8,
             projection_class_embeddings_input_dim=8 * 6 + 32),
        (_CLIP_TINY, _CLIP_TINY), vae_scaling=0.13025, tiny_vae=_TAESD_TINY,
        default_steps=1, xl=True),
}


@dataclass
class SDModels:
    """Everything the image engine runs: one UNet, one VAE, 1-2 (tokenizer, encoder) pairs."""

    unet: Any
    vae: Any
    text: list[tuple[Any, Any]]
    scheduler_config: dict[str, Any]
    xl: bool = False
    source: str = "random weights"


def scheduler_config() -> dict[str, Any]:
    """The SD training schedule the LCM timesteps are read from (scaled-linear betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", original_inference_steps=50,
                timestep_scaling=10.0, prediction_type="epsilon")


def build(preset_name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
          vae: str = "tiny", seed: int = 0) -> SDModels:
    """Random weights at the preset's real size (the tiny preset: small)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, \
        CLIPTextModelWithProjection

    preset = PRESETS[preset_name]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**preset.unet)
        if vae == "tiny":
            codec = AutoencoderTiny(**preset.tiny_vae)
        else:
            codec = AutoencoderKL(**dict(preset.full_vae, scaling_factor=preset.vae_scaling))
        text = []
        for i, cfg in enumerate(preset.text):
            cls = CLIPTextModelWithProjection if preset.xl and i == 1 else CLIPTextModel
            text.append((ByT5Tokenizer(), cls(CLIPTextConfig(**cfg))))
    def ready(m):
        return (m if dtype == torch.float32 else m.to(dtype)).eval().requires_grad_(False)

    return SDModels(ready(unet), ready(codec), [(tok, ready(enc)) for tok, enc in text],
                    scheduler_config(), xl=preset.xl)


def load_unet_file(path: str | Path, config_dir: str | Path, *,
                   dtype: torch.dtype = torch.float16, device: str = "cpu"):
    """A UNet from a single-file checkpoint in the original (LDM) layout -- a fine-tuned SD
    model as artists download them -- converted by diffusers, with the architecture taken
    from a diffusers-layout directory of its base model (``config_dir/unet/config.json``),
    so nothing is fetched.  Loaded with safetensors, or torch.load(weights_only=True)."""
    from diffusers import UNet2DConditionModel

    path, config_dir = Path(path), Path(config_dir)
    if not (config_dir / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{config_dir} has no unet/config.json: the single file's "
                                f"base model must be pulled in the diffusers layout.")
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config_dir),
                                                 subfolder="unet", local_files_only=True,
                                                 torch_dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def load_dir(directory: str | Path, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
             tiny_vae: str | Path | None = None, unet_file: str | Path | None = None
             ) -> SDModels:
    """A diffusers-layout pipeline directory (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, for SDXL also ``text_encoder_2/`` and ``tokenizer_2/``, ``scheduler/``);
    ``tiny_vae``: a TAESD-layout directory used instead of the full VAE; ``unet_file``: a
    single-file checkpoint whose UNet replaces the directory's (``load_unet_file``)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(directory)
    for sub in ("unet", "text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a diffusers-layout SD directory (no {sub}/).")
    unet = load_unet_file(unet_file, root, dtype=dtype) if unet_file is not None else \
        UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
    xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if tiny_vae is not None:
        codec = AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=dtype)
    else:
        codec = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    text = [(AutoTokenizer.from_pretrained(root / "tokenizer"),
             CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype))]
    if xl:
        text.append((AutoTokenizer.from_pretrained(root / "tokenizer_2"),
                     CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2",
                                                                 torch_dtype=dtype)))
    cfg = scheduler_config()
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.exists():
        import json
        known = json.loads(sched.read_text())
        cfg.update({k: known[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                          "beta_schedule", "prediction_type") if k in known})
    unet, codec = (m.to(device).eval().requires_grad_(False) for m in (unet, codec))
    text = [(tok, enc.to(device).eval().requires_grad_(False)) for tok, enc in text]
    return SDModels(unet, codec, text, cfg, xl=xl, source=root.name)
