"""Pixel format conversion on the engine's device (torch).

Engines work on *canonical* frames: float32 RGB in [0, 1], shape (H, W, 3), row 0 at the
top.  Clients send whatever their host has cheaply (TouchDesigner float32 RGBA bottom-up,
OBS BGRA u8, webcams RGB u8); conversion happens here, on the GPU when the engine has one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from livediffusion.shared.protocol import FrameSpec

_SCALE = {"uint8": 255.0, "uint16": 65535.0, "float16": 1.0, "float32": 1.0}
_TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "float16": torch.float16,
                 "float32": torch.float32}
_LUMA = (0.299, 0.587, 0.114)


def as_tensor(pixels: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Wrap (CPU) or upload a frame without an intermediate host copy."""
    if isinstance(pixels, torch.Tensor):
        return pixels.to(device, non_blocking=True)
    return torch.from_numpy(pixels).to(device, non_blocking=True)


def same_layout(a: FrameSpec, b: FrameSpec) -> bool:
    """Equal except for row stride: a frame of ``a`` can be copied into ``b`` unchanged."""
    return (a.width, a.height, a.format, a.dtype, a.origin) == \
        (b.width, b.height, b.format, b.dtype, b.origin)


def to_canonical(frame: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    """(H, W, C) in ``spec`` -> float32 RGB (H, W, 3) in [0, 1], top row first; non-finite
    float input becomes 0 (NaN, -inf) or 1 (+inf)."""
    x = frame.float() if frame.dtype != torch.uint16 else frame.to(torch.int32).float()
    scale = _SCALE[spec.dtype]
    if scale != 1.0:
        x = x / scale
    if spec.format == "gray":
        x = x.expand(-1, -1, 3)
    elif spec.format in ("bgr", "bgra"):
        x = x[..., [2, 1, 0]]
    else:
        x = x[..., :3]
    if spec.origin == "bottom":
        x = x.flip(0)
    if spec.dtype in ("float16", "float32"):
        # a NaN or an infinity from a host never reaches an engine's caches: NaN is black,
        # +inf white (clamp alone keeps NaN)
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    return x.clamp(0.0, 1.0)


def from_canonical(rgb: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    """Float RGB (H, W, 3) top-first -> a contiguous frame in ``spec``."""
    if rgb.shape[0] != spec.height or rgb.shape[1] != spec.width:
        rgb = resize(rgb, spec.height, spec.width)
    x = rgb.clamp(0.0, 1.0)
    if spec.origin == "bottom":
        x = x.flip(0)
    if spec.format == "gray":
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
        x = (x * w).sum(-1, keepdim=True)
    elif spec.format in ("bgr", "bgra"):
        x = x[..., [2, 1, 0]]
    if spec.format in ("rgba", "bgra"):
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    scale = _SCALE[spec.dtype]
    if scale != 1.0:
        x = (x * scale).round_()
        if spec.dtype == "uint16":
            return x.to(torch.int32).to(torch.uint16).contiguous()
    return x.to(_TORCH_DTYPES[spec.dtype]).contiguous()


def resize(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of an (H, W, 3) float frame."""
    x = rgb.permute(2, 0, 1).unsqueeze(0)
    shrink = height < rgb.shape[0] or width < rgb.shape[1]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                      antialias=shrink)
    return x.squeeze(0).permute(1, 2, 0)


def convert(pixels: np.ndarray | torch.Tensor, src: FrameSpec, dst: FrameSpec,
            device: torch.device | str = "cpu") -> np.ndarray | torch.Tensor:
    """Convert one frame between specs; returns ``pixels`` itself when nothing changes."""
    if same_layout(src, dst):
        return pixels
    return from_canonical(to_canonical(as_tensor(pixels, device), src), dst)
