"""Loaders for the real Wan 2.1 checkpoints and the StreamDiffusionV2 causal generator.

Layouts:
  * diffusers layout (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): a directory with ``transformer/``,
    ``vae/``, ``text_encoder/`` (umT5-XXL) and ``tokenizer/``;
  * original layout (``Wan-AI/Wan2.1-T2V-1.3B``): the DiT as one file
    (``diffusion_pytorch_model.safetensors``, or sharded safetensors with an index, or .pth)
    with keys ``blocks.N.self_attn.q.weight`` ..., and the VAE as ``Wan2.1_VAE.pth``; both are
    converted with diffusers' own single-file converters;
  * StreamDiffusionV2 generator (``jerryfeng/StreamDiffusionV2``, ``.../model.pt``): a torch
    checkpoint whose state dict sits under ``generator``, ``generator_ema`` or ``state_dict``,
    original key layout, keys possibly prefixed ``model.``; it replaces the DiT weights.
Checkpoints are read with safetensors or ``torch.load(weights_only=True)``: never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .wan import PRESETS, WanPreset, cast

GENERATOR_KEYS = ("generator", "generator_ema", "state_dict")


class WeightsError(ValueError):
    """Weights missing or unusable; the message says what to do."""


@dataclass
class WanWeights:
    transformer: Any
    vae: Any
    text: tuple[Any, Any]  # (tokenizer, encoder)
    source: str
    tiny_decoder: Any = None  # TAEHV-layout fast decoder (taew2_1.pth), when downloaded
    tiny_encoder: Any = None  # and its encoder (the same file)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors (or a sharded index) or a torch file, without pickle."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {path} does not exist.")
    if path.name.endswith(".safetensors.index.json"):
        from safetensors.torch import load_file
        index = json.loads(path.read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise WeightsError(f"cannot read {path} as a weights-only checkpoint "
                           f"({type(exc).__name__}: {str(exc)[:200]}); it may contain "
                           f"code, which is never loaded.") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a state dict.")
    return data


def generator_state_dict(checkpoint: dict[str, Any], key: str | None = None
                         ) -> dict[str, torch.Tensor]:
    """The DiT weights inside a StreamDiffusionV2 checkpoint, 'model.' prefixes removed."""
    keys = (key,) if key else GENERATOR_KEYS
    for name in keys:
        if isinstance(checkpoint.get(name), dict):
            sd = checkpoint[name]
            break
    else:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            sd = checkpoint  # already a bare state dict
        else:
            raise WeightsError(f"no state dict under {', '.join(keys)} in the checkpoint "
                               f"(top-level keys: {', '.join(list(checkpoint)[:8])}).")
    out = {}
    for k, v in sd.items():
        while k.startswith("model."):
            k = k[len("model."):]
        out[k] = v
    return out


def original_to_diffusers_transformer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    return convert_wan_transformer_to_diffusers(dict(sd))


def original_to_diffusers_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    return convert_wan_vae_to_diffusers(dict(sd))


def _load_into(model, sd: dict[str, torch.Tensor], what: str):
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{what}: {first[1].strip() if len(first) > 1 else first[0]}; "
                           f"wrong model size?") from None
    missing = [k for k in result.missing_keys if not k.endswith(("freqs_cos", "freqs_sin"))]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(result.unexpected_keys)} unexpected "
                           f"(e.g. {result.unexpected_keys[:3]}); wrong model size or layout?")
    return model


def _empty(cls, config: dict[str, Any]):
    """A model with its real structure but no allocated weights (filled by assign=True)."""
    with torch.device("meta"):
        model = cls(**config)
    return model


def load_transformer_file(path: str | Path, preset: WanPreset | str = "1.3b", *,
                          dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """The DiT from an original-layout file (Wan release or a bare converted state dict)."""
    from diffusers import WanTransformer3DModel

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    sd = original_to_diffusers_transformer(read_state_dict(path))
    model = _load_into(_empty(WanTransformer3DModel, preset.transformer), sd, str(path))
    _restore_buffers(model, preset)
    return _finish(model, dtype, device)


def load_generator(path: str | Path, preset: WanPreset | str = "1.3b", *, key: str | None = None,
                   dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """The StreamDiffusionV2 causal generator (model.pt) as a WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    sd = original_to_diffusers_transformer(generator_state_dict(read_state_dict(path), key))
    model = _load_into(_empty(WanTransformer3DModel, preset.transformer), sd, str(path))
    _restore_buffers(model, preset)
    return _finish(model, dtype, device)


def _finish(model, dtype: torch.dtype, device: str):
    """Cast on the host first (float32 modules kept), then move: the device never holds a
    float32 copy of a model meant to run in bf16."""
    return cast(model.float(), dtype).to(device).eval().requires_grad_(False)


def _restore_buffers(model, preset: WanPreset) -> None:
    """RoPE tables are not in checkpoints: rebuild them (they were created on 'meta')."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = preset.transformer
    model.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"],
                                   cfg["rope_max_seq_len"])


def load_transformer_dir(directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                         device: str = "cpu"):
    """The DiT from a diffusers ``transformer/`` folder (config + safetensors, maybe sharded),
    without needing accelerate: built empty, filled in place, float32 modules kept."""
    from diffusers import WanTransformer3DModel

    root = Path(directory)
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    single = root / "diffusion_pytorch_model.safetensors"
    weights = index if index.exists() else single
    config = {k: v for k, v in WanTransformer3DModel.load_config(root).items()
              if not k.startswith("_")}
    model = _load_into(_empty(WanTransformer3DModel, config), read_state_dict(weights),
                       str(weights))
    preset = WanPreset("from-config", dict(config))
    preset.transformer.setdefault("rope_max_seq_len", 1024)
    preset.transformer.setdefault("patch_size", (1, 2, 2))
    _restore_buffers(model, preset)
    return _finish(model, dtype, device)


def load_vae_file(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  config: dict[str, Any] | None = None):
    """The Wan 2.1 VAE from the original ``Wan2.1_VAE.pth``."""
    from diffusers import AutoencoderKLWan

    sd = original_to_diffusers_vae(read_state_dict(path))
    model = _load_into(_empty(AutoencoderKLWan, config or {}), sd, str(path))
    return _finish(model, dtype, device)


def load_text_encoder(directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                      device: str = "cpu"):
    """umT5 encoder and tokenizer from a diffusers-layout Wan directory."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(directory)
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise WeightsError(f"{root} has no {sub}/ folder: the umT5 encoder and tokenizer "
                               f"come from the diffusers layout (livediffusion models pull "
                               f"wan-1.3b).")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_diffusers_dir(directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu", generator: str | Path | None = None,
                       preset: str = "1.3b", text_device: str | None = None,
                       text: bool = True, dit_device: str | None = None,
                       transformer=None) -> WanWeights:
    """Everything from a diffusers-layout directory; ``generator`` swaps in the causal DiT
    (``transformer``: one the caller built, e.g. a family member's, used as it is).
    ``text_device``: where the umT5 encoder is loaded (default ``device``; the video engine
    loads it to the CPU and lets it visit the GPU per new prompt).  ``dit_device``: where
    the DiT is loaded (default ``device``; an FP8 engine loads it to the CPU and quantises
    it onto the GPU block by block)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = Path(directory)
    if not (root / "transformer").is_dir() or not (root / "vae").is_dir():
        raise WeightsError(f"{root} is not a diffusers-layout Wan directory (no transformer/ "
                           f"and vae/).")
    if transformer is not None:   # a DiT built by the caller (a causal family member)
        source = f"{getattr(transformer, 'source', 'generator')} + {root.name}"
    elif generator is not None:
        transformer = load_generator(generator, preset, dtype=dtype,
                                     device=dit_device or device)
        source = f"{Path(generator).name} + {root.name}"
    else:
        transformer = load_transformer_dir(root / "transformer", dtype=dtype,
                                           device=dit_device or device)
        source = root.name
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32)
    vae = cast(vae.to(device), dtype).eval().requires_grad_(False)
    text_parts = load_text_encoder(root, dtype=dtype, device=text_device or device) \
        if text else None
    return WanWeights(transformer, vae, text_parts, source)
