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
H200 (docs/benchmarks.md, "Memory profiles"): the peak of the profile's worst case (its size
cap, default steps, one stream, a prompt change included) plus 1.5 GiB for the CUDA context
and the allocator's slack must fit in the free memory.
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
#: FP8 profile only where the GPU has FP8 matmuls)
PROFILES: dict[str, list[Profile]] = {
    "1.3b": [
        Profile("roomy", 32.0, False, "resident", 1280, 2, "vae"),
        Profile("24gb", 17.0, False, "streamed", 1280, 2, "vae"),
        Profile("16gb", 12.5, True, "streamed", 832, 2, "vae"),
        Profile("16gb-bf16", 13.5, False, "streamed", 832, 2, "vae"),
        Profile("12gb", 8.0, True, "streamed", 640, 1, "tiny"),
        Profile("12gb-bf16", 9.0, False, "streamed", 640, 1, "tiny"),
    ],
    "14b": [
        Profile("roomy", 80.0, False, "resident", 1280, 2, "vae"),
        Profile("48gb", 44.0, False, "streamed", 832, 2, "vae"),
        Profile("24gb", 21.0, True, "streamed", 832, 2, "vae"),
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
