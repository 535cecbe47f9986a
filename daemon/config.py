"""One table of the daemon's settings: every environment variable it reads, with its default.

Modules read settings from here, never from ``os.environ`` directly, so that this file is
the whole list (``livediffusion doctor`` prints it).  Command-line flags override the
serving settings; the environment variables are for switches a user rarely needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: name -> (default, one line of description)
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "LIVEDIFFUSION_COMPILE": ("1", "torch.compile the DiT and VAE regions on GPUs (0: off)"),
    "LIVEDIFFUSION_CUDA_GRAPHS": ("1", "record fixed-shape forwards as CUDA graphs (0: off)"),
    "LIVEDIFFUSION_FIXED_SHAPE": ("auto", "the fixed-shape DiT forward once caches are full: "
                                  "auto (on GPUs, with CUDA graphs), 1 (on CPUs too, run "
                                  "directly: tests compare it), 0 (off)"),
    "LIVEDIFFUSION_IMAGE_UNET": ("", "a single-file UNet checkpoint for the image engine"),
    "LIVEDIFFUSION_COMMIT": ("", "the commit benchmarks report (a copied tree has no git)"),
    "LIVEDIFFUSION_POLICY": ("edf", "scheduler policy: edf (deadline-aware) or rr (previous)"),
    "LIVEDIFFUSION_PACING": ("1", "pace each stream's output at its input cadence (0: off)"),
    "LIVEDIFFUSION_PROFILE": ("auto", "video engines' memory profile (daemon/profiles.py): "
                              "auto (from the GPU's free memory) or a profile's name"),
    "LIVEDIFFUSION_FP8": ("auto", "the video DiT's linear layers in FP8: auto (as the "
                          "profile says), 1 (on), 0 (off)"),
    "LIVEDIFFUSION_PRESETS": ("", "the presets file (default: presets.json in the user's "
                              "config directory, platformdirs)"),
    "LIVEDIFFUSION_UTILISATION": ("0.9", "share of the device the fair rates may plan for"),
    "LIVEDIFFUSION_WEIGHTS": ("", "a Wan weights folder of any layout people have (daemon "
                              "--weights DIR; models/wan_folders.py)"),
    "LIVEDIFFUSION_LORA_SLOTS": ("0", "video: LoRA slots in every DiT block (daemon "
                                 "--lora-slots; 0: no LoRA branch)"),
    "LIVEDIFFUSION_LORA_RANK": ("64", "video: the largest LoRA rank a slot holds"),
    "LIVEDIFFUSION_LORAS": ("", "video: the folder LoRA names resolve in (default: loras in "
                            "the user's data directory, platformdirs)"),
}


def env(name: str) -> str:
    """The variable's value, or its default from the table (unknown names are a bug)."""
    default, _ = ENVIRONMENT[name]
    return os.environ.get(name, default)


def env_flag(name: str) -> bool:
    return env(name).strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class ServeConfig:
    """How the daemon schedules and delivers frames."""

    #: "edf": deadline-aware, fair rates, admission; "rr": the previous round robin
    policy: str = "edf"
    #: pace output at the input cadence (a client may still ask for unpaced delivery)
    pacing: bool = True
    #: share of the device's time the fair rates plan for (headroom for jitter)
    utilisation: float = 0.9
    #: a stream that does not say ``min_fps`` accepts down to this share of its fps
    min_fps_share: float = 0.25

    @classmethod
    def from_env(cls, **overrides) -> ServeConfig:
        values = dict(policy=env("LIVEDIFFUSION_POLICY"),
                      pacing=env_flag("LIVEDIFFUSION_PACING"),
                      utilisation=float(env("LIVEDIFFUSION_UTILISATION")))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
