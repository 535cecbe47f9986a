"""Blending for every engine: weighted prompt embeddings (linear or slerp) and weighted seeds
(Gaussian noise blended with unit variance kept).  Timed transitions (``daemon/transitions.py``)
move streams along these blends chunk by chunk."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors (flattened), lengths interpolated linearly."""
    fa, fb = a.flatten().double(), b.flatten().double()
    na, nb = fa.norm(), fb.norm()
    cos = torch.dot(fa / na, fb / nb).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    if float(theta) < 1e-4:
        return torch.lerp(a.double(), b.double(), t).to(a.dtype)
    s = torch.sin(theta)
    unit = (torch.sin((1 - t) * theta) / s) * (fa / na) + (torch.sin(t * theta) / s) * (fb / nb)
    return (unit * ((1 - t) * na + t * nb)).view_as(a).to(a.dtype)


def blend(items: list[tuple[torch.Tensor, float]], how: str) -> torch.Tensor:
    """Weighted blend of embeddings: linear (weights normalised), or slerp folded in order
    (each new item enters with its share of the weight so far)."""
    total = sum(w for _, w in items)
    if how == "linear" or len(items) == 1:
        return sum(t * (w / total) for t, w in items)
    out, acc = None, 0.0
    for t, w in items:
        if w <= 0:
            continue
        out = t if out is None else slerp(out, t, w / (acc + w))
        acc += w
    return out


def seeded_noise(seeds: tuple[tuple[int, float], ...], shape: tuple[int, ...], device,
                 dtype) -> torch.Tensor:
    """Gaussian noise from one seed, or several blended with unit variance kept
    (sum w_i n_i / sqrt(sum w_i^2))."""
    out, norm = None, 0.0
    for seed, weight in seeds:
        if weight <= 0:
            continue
        gen = torch.Generator().manual_seed(int(seed))
        n = torch.randn(shape, generator=gen, dtype=torch.float32) * weight
        out = n if out is None else out + n
        norm += weight * weight
    return (out / norm ** 0.5).to(device, dtype)
