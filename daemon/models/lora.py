"""Fuse a LoRA (such as LCM-LoRA) into a diffusers UNet's weights at load time.

Two key layouts are read:
* kohya / original: ``lora_unet_<module path with '_'>.lora_down.weight``, ``.lora_up.weight``
  and an optional ``.alpha`` (LCM-LoRA for SD 1.5 ships this way);
* diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (or
  ``.lora.down.weight`` / ``.lora.up.weight``), alpha taken as the rank.
For each adapted Linear or Conv2d: W += scale * (alpha / rank) * up @ down (convolutions as
matrices over their input patch).  Fusing once means no extra work per frame.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


class LoraError(ValueError):
    pass


_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down|lora_up)\.weight$")
_PEFT = re.compile(r"^(?:unet\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")


def load_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def fuse_lora(unet: torch.nn.Module, state: dict[str, torch.Tensor], scale: float = 1.0
              ) -> int:
    """Add the LoRA's update to ``unet``'s weights in place; returns the modules changed.
    Unknown module names are an error (a LoRA for another architecture)."""
    by_flat = {name.replace(".", "_"): m for name, m in unet.named_modules()}
    by_dot = dict(unet.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha") and key.startswith("lora_unet_"):
            pairs.setdefault(key[len("lora_unet_"):-len(".alpha")], {})["alpha"] = tensor
            continue
        m = _KOHYA.match(key)
        if m:
            pairs.setdefault(m.group(1), {})["down" if m.group(2) == "lora_down" else "up"] = \
                tensor
            continue
        m = _PEFT.match(key)
        if m and not key.startswith(("text_encoder", "lora_te")):
            kind = "down" if m.group(2) in ("lora_A", "lora.down") else "up"
            pairs.setdefault("." + m.group(1), {})[kind] = tensor
    changed = 0
    for name, parts in pairs.items():
        module = by_dot.get(name[1:]) if name.startswith(".") else by_flat.get(name)
        if module is None:
            raise LoraError(f"the LoRA adapts {name.lstrip('.')!r}, which this UNet does not "
                            f"have: it was made for another model.")
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"the LoRA entry for {name.lstrip('.')!r} lacks its down or up "
                            f"matrix.")
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        delta = (up.flatten(1) @ down.flatten(1)) * (scale * alpha / rank)
        weight = module.weight
        if delta.numel() != weight.numel():
            raise LoraError(f"the LoRA's update for {name.lstrip('.')!r} has "
                            f"{tuple(delta.shape)} values, the weight {tuple(weight.shape)}.")
        weight.add_(delta.reshape(weight.shape).to(weight.dtype))
        changed += 1
    if not changed:
        raise LoraError("no UNet LoRA weights found in this file.")
    return changed
