"""Memory profiles: what a video engine keeps on the GPU, chosen from the card's free memory.

The most frequent complaint about the reference is running out of memory on 16 and 24 GB
cards.  At start-up each real-size video engine picks the first profile of its model that
fits the GPU's free memory and says which and why (one log line, the welcome's
``capabilities.profile``, ``livediffusion doctor``).  A profile fixes:

- the DiT's linear layers in FP8 or bf16 (FP8 only where the GPU has FP8 matmuls: compute
  capability 8.9+, Ada and Hopper);
- where umT5-XXL lives: resident on the GPU (a prompt change is a ~10 ms encode), offloaded
  whole (11 GB visits per prompt change) or streamed layer by layer (0.4 GB at a time; the
  embedding lookup runs in host memory);
- the largest frame side served, and the defaults of ``steps`` and ``decoder`` (a stream may
  still ask for other values within the size cap).

``--profile NAME`` (or ``LIVEDIFFUSION_PROFILE``) overrides the choice; ``LIVEDIFFUSION_FP8``
overrides the profile's FP8 choice.  The thresholds come from peak memory measured on an
H200 (docs/benchmarks.md, "Memory profiles"; the table below says which).  Each holds one
stream at the profile's size cap; more streams need more (each has its own KV cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import env

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    #: free GPU memory this profile needs, GiB
    needs_gib: float
    fp8: bool
    #: "resident", "offloaded" (whole visits) or "streamed" (layer by layer)
    text: str
    max_side: int
    steps: int
    decoder: str
    #: filled in by choose(): why this one
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        text = {"resident": "umT5 resident on the GPU",
                "offloaded": "umT5 in host memory, visiting whole per prompt",
                "streamed": "umT5 in host memory, streamed layer by layer per prompt"}[self.text]
        return (f"{'FP8' if self.fp8 else 'bf16'} DiT, {text}, frames up to "
                f"{self.max_side} px, {self.steps} step{'s' if self.steps != 1 else ''}, "
                f"{'tiny' if self.decoder == 'tiny' else 'Wan VAE'} decoder by default")


#: per model, best first; the first whose ``needs_gib`` fits the free memory is chosen (an
#: FP8 profile only where the GPU has FP8 matmuls).  ``needs_gib`` = the peak allocated in
#: ``bench video --text umt5`` at the profile's size cap and steps (H200, 2026-12-01, commit
#: b942348 / cc59f60; one stream, a prompt change included) + 2.5 GiB for the CUDA context,
#: the allocator's slack and the cuDNN workspace, + 10.6 GiB where umT5 is resident.
#: Measured peaks: 1.3B 480x832 2 steps Wan VAE 11.64 (FP8 10.82), 1 step tiny decoder 8.04
#: (FP8 7.20), 720x1280 2 steps 21.83; 14B 480x832 2 steps 47.36 (FP8 34.44), 1 step FP8
#: 27.26.  FP8 is on by default for the 14B model (1.13x / 1.20x the FPS at 1 / 2 steps,
#: error 1.7-1.8% of the flow, 0.8% of the frames against bf16, random weights) and only
#: for memory on the 1.3B model (1.00-1.03x the FPS there).  The roomy profiles keep the
#: engine's own 1280 px cap; 14B frames above 480x832 are not measured.
PROFILES: dict[str, list[Profile]] = {
    "1.3b": [
        Profile("roomy", 35.0, False, "resident", 1280, 2, "vae"),
        Profile("32gb", 24.5, False, "streamed", 1280, 2, "vae"),
        Profile("16gb", 13.5, True, "streamed", 832, 2, "vae"),
        Profile("16gb-bf16", 14.2, False, "streamed", 832, 2, "vae"),
        Profile("12gb", 9.7, True, "streamed", 832, 1, "tiny"),
        Profile("12gb-bf16", 10.5, False, "streamed", 832, 1, "tiny"),
    ],
    "14b": [
        Profile("roomy", 48.0, True, "resident", 1280, 2, "vae"),
        Profile("roomy-bf16", 61.0, False, "resident", 1280, 2, "vae"),
        Profile("48gb", 37.0, True, "streamed", 832, 2, "vae"),
        Profile("64gb-bf16", 50.0, False, "streamed", 832, 2, "vae"),
        Profile("32gb", 29.8, True, "streamed", 832, 1, "vae"),
    ],
}


def fp8_override() -> bool | None:
    value = env("LIVEDIFFUSION_FP8").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def choose(model: str, free_gib: float, fp8_ok: bool, name: str | None = None,
           gpu: str = "the GPU") -> Profile:
    """The profile for ``model`` ("1.3b" or "14b") with ``free_gib`` free; ``name`` forces
    one (None: ``LIVEDIFFUSION_PROFILE``, "auto" chooses).  Raises ValueError when none
    fits, saying what would."""
    options = PROFILES[model]
    name = name or env("LIVEDIFFUSION_PROFILE").strip() or "auto"
    if name != "auto":
        chosen = next((p for p in options if p.name == name), None)
        if chosen is None:
            raise ValueError(f"no profile {name!r} for the {model} video model; there are "
                             f"{', '.join(p.name for p in options)} (or auto).")
        why = f"asked for (--profile {name}); {free_gib:.1f} GiB free on {gpu}"
    else:
        fitting = [p for p in options if p.needs_gib <= free_gib and (fp8_ok or not p.fp8)]
        if not fitting:
            plain = [p for p in options if not p.fp8]
            least = min(plain or options, key=lambda p: p.needs_gib)
            least_fp8 = min((p for p in options if p.fp8), key=lambda p: p.needs_gib,
                            default=None)
            message = f"the {model} video model needs {least.needs_gib:.1f} GiB of free GPU " \
                      f"memory (profile {least.name})"
            if least_fp8 is not None and least_fp8.needs_gib < least.needs_gib:
                message += f", or {least_fp8.needs_gib:.1f} GiB with FP8 matmuls (profile " \
                           f"{least_fp8.name}; compute capability 8.9+: Ada, Hopper)"
            message += f"; {gpu} has {free_gib:.1f} GiB free"
            if not fp8_ok:
                message += " and no FP8 matmuls"
            raise ValueError(message + (". The 1.3B model fits smaller cards."
                                        if model != "1.3b" else "."))
        chosen = fitting[0]
        why = (f"{free_gib:.1f} GiB free on {gpu}; {chosen.name} needs "
               f"{chosen.needs_gib:.1f}")
        if not fp8_ok:
            why += " (no FP8 matmuls here)"
    forced = fp8_override()
    if forced is not None and forced != chosen.fp8:
        if forced and not fp8_ok:
            raise ValueError(f"LIVEDIFFUSION_FP8=1, but {gpu} has no FP8 matmuls "
                             "(compute capability 8.9+: Ada, Hopper).")
        chosen = dataclasses.replace(chosen, fp8=forced)
        why += f"; FP8 {'on' if forced else 'off'} by LIVEDIFFUSION_FP8"
    return dataclasses.replace(chosen, why=why)


def for_device(model: str, device: str, name: str | None = None) -> Profile | None:
    """The profile for ``model`` on ``device`` (None on CPUs and other devices: there every
    engine keeps its defaults)."""
    import torch
    from .models import fp8
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    gpu = f"{dev} ({torch.cuda.get_device_name(dev)})"
    return choose(model, free / GiB, fp8.supported(dev), name, gpu)
