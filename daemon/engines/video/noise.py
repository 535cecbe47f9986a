"""Noise for the video engine: the few-step flow-matching schedule, deterministic per-chunk
noise, and the motion-aware noise controller (REFERENCE.md section 1)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

#: timesteps of the distilled causal generator for 1..4 denoising steps
STEP_LISTS: dict[int, tuple[float, ...]] = {
    1: (700.0,),
    2: (700.0, 500.0),
    3: (700.0, 500.0, 400.0),
    4: (700.0, 500.0, 400.0, 200.0),
}


MIN_NOISE_SCALE = 0.11  # t0 = 1000 s - 100 stays a valid timestep above this


def timesteps(steps: int, noise_scale: float,
              table: tuple[float, ...] | None = None) -> list[float]:
    """The step list with the first timestep told to the model set by the noise scale:
    t0 = 1000 * s - 100 (the release's deliberate offset); the later steps are the model's
    ``table`` (default StreamDiffusionV2's 700, 500, 400, 200; a family member's own,
    warped, from models/family.py) from its second entry on, never above t0."""
    table = STEP_LISTS[4] if table is None else table
    if not 1 <= steps <= len(table):
        raise ValueError(f"steps must be 1 to {len(table)} for this model.")
    t0 = min(max(1000.0 * noise_scale - 100.0, 1.0), 999.0)
    return [t0] + [min(t, t0) for t in table[1:steps]]


#: the flow-matching schedule these models were distilled with (REFERENCE.md section 1.3)
SHIFT = 8.0
TRAIN_STEPS = 1000


@functools.lru_cache(maxsize=8)
def _grid(shift: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps and sigmas of diffusers' FlowMatchEulerDiscreteScheduler with these
    settings (its training grid), as float64."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    t = sched.timesteps.double().numpy()
    return t, sched.sigmas[:len(t)].double().numpy()


def sigma(t: float, shift: float = SHIFT, steps: int = TRAIN_STEPS) -> float:
    """The noise level at timestep ``t`` that the models were distilled with: the sigma of the
    shifted scheduler grid point nearest ``t`` (shift 8 over 1000 training steps), not
    t / 1000.  sigma(700) = 0.700232, sigma(500) = 0.499719 (the DiT still gets the raw t)."""
    ts, ss = _grid(float(shift), int(steps))
    return float(ss[int(np.abs(ts - t).argmin())])


def chunk_noise(seeds, chunk: int, step: int, shape: tuple[int, ...],
                device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, chunk, step): the same in Stream Batch and
    in the sequential schedule, and reproducible for a seed.  ``seeds``: one seed, or
    [seed, weight] pairs whose noises are blended with unit variance kept
    (sum w_i n_i / sqrt(sum w_i^2)), so a seed transition is a slerp of the noise."""
    pairs = [(int(s), float(w)) for s, w in (((seeds, 1.0),) if isinstance(seeds, int)
                                             else seeds) if w > 0]
    if len(pairs) == 1:
        return _noise(pairs[0][0], chunk, step, shape).to(device, dtype)
    out = sum(_noise(s, chunk, step, shape) * w for s, w in pairs)
    return (out / sum(w * w for _, w in pairs) ** 0.5).to(device, dtype)


def _noise(seed: int, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(
        (seed * 1_000_003 + chunk * 131 + step) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def renoise(x0: torch.Tensor, s_next: float, seeds, chunk: int, step: int) -> torch.Tensor:
    """A chunk's clean estimate noised to the next step's level (the sampler between two
    steps): (1 - s) * x0 + s * eps, eps the chunk's noise for that step."""
    eps = chunk_noise(seeds, chunk, step, tuple(x0.shape), x0.device, x0.dtype)
    return (1.0 - s_next) * x0 + s_next * eps


@dataclass
class MotionController:
    """More motion -> less noise, so fast movement keeps its structure.

    d = per-frame RMS pixel difference to the previous frame (pixels in [-1, 1]), max over the
    chunk; m = clamp(d / motion_scale, 0, 1); s = gain * (s_init - reduce * m) + (1 - gain) *
    s_prev.  Defaults are the release's constants (0.2, 0.1, 0.9)."""

    motion_scale: float = 0.2
    reduce: float = 0.1
    gain: float = 0.9
    previous_frame: torch.Tensor | None = None
    previous_scale: float | None = None
    last_motion: float = 0.0

    def update(self, frames: torch.Tensor, s_init: float) -> float:
        """frames: (N, 3, H, W) in [-1, 1], oldest first; returns the chunk's noise scale."""
        prev = self.previous_frame
        seq = frames if prev is None else torch.cat([prev[None], frames], 0)
        if seq.shape[0] > 1:
            diff = (seq[1:] - seq[:-1]).float()
            d = float(diff.pow(2).mean(dim=(1, 2, 3)).sqrt().max())
        else:
            d = 0.0
        m = min(max(d / self.motion_scale, 0.0), 1.0)
        s_prev = s_init if self.previous_scale is None else self.previous_scale
        s = self.gain * (s_init - self.reduce * m) + (1.0 - self.gain) * s_prev
        s = min(max(s, MIN_NOISE_SCALE), 1.0)  # strong constants must not flip the noise sign
        self.previous_frame = frames[-1].detach().clone()
        self.previous_scale = s
        self.last_motion = m
        return s

    def reset(self) -> None:
        self.previous_frame = None
        self.previous_scale = None
        self.last_motion = 0.0
