"""The LCM few-step math of the image engine, as plain tensor functions.

Schedule: an LCM scheduler set to 50 steps; a stream's stages are indices into it (lower =
more noise).  Per stage s: timestep t_s, a_s = sqrt(alpha_bar(t_s)), b_s = sqrt(1 - alpha_bar),
and LCM's boundary scalings c_skip, c_out.

* noising:  x_s = a_s * z + b_s * n_s
* one step: x0_hat = c_out * (x_s - b_s * eps) / a_s + c_skip * x_s
* next stage: x_{s+1} = a_{s+1} * x0_hat + b_{s+1} * n_{s+1}

Guidance: eps = eps_u + g * (eps_c - eps_u), where the unconditional eps_u is
* ``full``: the UNet on the negative prompt (a second batch);
* ``self``: delta * r_s, r_s the stage's *virtual residual noise* (the noise that explains x_s
  from the frame's own input latent z: r_s = (x_s - a_s z) / b_s, so r_0 = n_0);
* ``initialize``: the UNet on the negative prompt for stage 0 only (r_0 := that eps_u), then
  delta * r_s for the later stages;
* ``none``: eps = eps_c.
The residual noise is carried from stage to stage without keeping z:
r_{s+1} = n_{s+1} + a_{s+1} * (x0_hat_s - (x_s - b_s r_s) / a_s) / b_{s+1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blend import blend, seeded_noise, slerp  # noqa: F401 - the engine's names for them
from .params import NUM_TRAIN_INDEX


@dataclass
class Schedule:
    indices: tuple[int, ...]
    timesteps: torch.Tensor   # (n,) long
    a: torch.Tensor           # (n, 1, 1, 1)
    b: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @property
    def stages(self) -> int:
        return len(self.indices)


def make_schedule(config: dict, indices: tuple[int, ...], device, dtype) -> Schedule:
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(config)
    sched.set_timesteps(NUM_TRAIN_INDEX)
    ts = sched.timesteps[list(indices)].long()
    alpha_bar = sched.alphas_cumprod[ts].double()
    skips, outs = zip(*(sched.get_scalings_for_boundary_condition_discrete(int(t))
                        for t in ts))

    def col(values) -> torch.Tensor:
        return torch.as_tensor([float(v) for v in values], dtype=torch.float64) \
            .view(-1, 1, 1, 1).to(device, dtype)

    return Schedule(tuple(indices), ts.to(device), col(alpha_bar.sqrt()),
                    col((1 - alpha_bar).sqrt()), col(skips), col(outs))


def denoise(x: torch.Tensor, eps: torch.Tensor, sch: Schedule, stage: slice) -> torch.Tensor:
    a, b = sch.a[stage], sch.b[stage]
    return sch.c_out[stage] * (x - b * eps) / a + sch.c_skip[stage] * x


def guide(eps_c: torch.Tensor, eps_u: torch.Tensor | None, guidance: float) -> torch.Tensor:
    return eps_c if eps_u is None else eps_u + guidance * (eps_c - eps_u)


def carry_residual(x0_hat: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                   noise_next: torch.Tensor, sch: Schedule) -> torch.Tensor:
    """Residual noise of stages 1..n-1 from stages 0..n-2 (see the module docstring)."""
    a, b = sch.a[:-1], sch.b[:-1]
    a_next, b_next = sch.a[1:], sch.b[1:]
    z = (x - b * r) / a
    return noise_next + a_next * (x0_hat - z) / b_next
