"""The video engine's parameters, declared once (``engines/schema.py``): defaults, ranges,
descriptions and what a change does; validation and the welcome's schema come from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..base import ParamError
from ..schema import Schema, param


@dataclass(frozen=True)
class VideoParams:
    prompt: str = param("a painting in vivid colours", "what the picture should become",
                        max_length=2000)
    prompts: tuple[tuple[str, float], ...] = param(
        (), "weighted prompts [[text, weight], ...], blended; when set they replace prompt",
        kind="prompts", max_length=8)
    prompt_blend: str = param("linear", "how weighted prompts blend: linear or slerp of the "
                              "text embeddings", choices=("linear", "slerp"))
    seed: int = param(42, "noise seed (results are reproducible per seed)", lo=0,
                      hi=2**63 - 1)
    seeds: tuple[tuple[int, float], ...] = param(
        (), "weighted seeds [[seed, weight], ...], noise blended to unit variance; when set "
        "they replace seed", kind="seeds", max_length=8, hi=2**63 - 1)
    noise_scale: float = param(0.8, "how much of the input is replaced (0.11 keeps it almost, "
                               "1 replaces it)", lo=0.11, hi=1.0, aliases=("strength",))
    steps: int = param(2, "denoising steps per chunk (more: cleaner, slower)", lo=1, hi=4)
    stream_batch: bool = param(True, "one DiT forward per chunk over every step (Stream "
                               "Batch); off: one forward per step")
    motion_control: bool = param(True, "lower the noise scale when the input moves fast")
    motion_scale: float = param(0.2, "motion control: the motion that counts as fast",
                                lo=1e-3, hi=2.0)
    motion_reduce: float = param(0.1, "motion control: how much the noise scale drops",
                                 lo=0.0, hi=1.0)
    motion_gain: float = param(0.9, "motion control: smoothing of the measured motion",
                               lo=0.0, hi=1.0)
    cache_frames: int = param(6, "latent frames of history the DiT attends to", lo=2, hi=64,
                              unit="latent frames", effect="rebuild")
    sinks: int = param(3, "of those, the first frames kept as attention sinks", lo=0, hi=63,
                       unit="latent frames")
    sink_refresh: float = param(0.2, "replace a sink when its similarity to the new chunk "
                                "falls below this (0: never)", lo=0.0, hi=1.0)
    rope_max: int = param(50, "RoPE positions before they wrap", lo=2, hi=1000,
                          unit="latent frames")
    decoder: str = param("vae", "vae: the Wan VAE; tiny: the fast TAEHV decoder",
                         choices=("vae", "tiny"))
    encoder: str = param("vae", "vae: the Wan VAE; tiny: the fast TAEHV encoder (a change "
                         "restarts the stream's history)", choices=("vae", "tiny"),
                         effect="restart")
    loras: tuple[tuple[str, float], ...] = param(
        (), "LoRAs on the DiT [[name, scale], ...]: files in the LoRA folder (--loras), "
        "scale -4..4; needs an engine with LoRA slots (--lora-slots)", kind="loras",
        max_length=8, lo=-4.0, hi=4.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompts"] = [list(p) for p in self.prompts]
        out["seeds"] = [list(s) for s in self.seeds]
        out["loras"] = [list(entry) for entry in self.loras]
        return out

    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        return self.prompts or ((self.prompt, 1.0),)

    def noise_seeds(self) -> int | tuple[tuple[int, float], ...]:
        """What the chunk noise is drawn from: the seed, or the weighted seeds."""
        return self.seeds or self.seed


def _check(p: VideoParams) -> None:
    if p.sinks >= p.cache_frames:
        raise ParamError(f"sinks ({p.sinks}) must be fewer than cache_frames "
                         f"({p.cache_frames}).")
    if p.rope_max < p.cache_frames:
        raise ParamError("rope_max must be at least cache_frames.")


SCHEMA = Schema(VideoParams, "video", checks=(_check,))
#: changes that only need the cross-attention K/V recomputed
PROMPT_FIELDS = {"prompt", "prompts", "prompt_blend"}


def apply(current: VideoParams, changes: Mapping[str, Any]) -> tuple[VideoParams, bool]:
    """Validate ``changes`` on top of ``current``; returns (params, reset asked for or
    implied by a change that restarts the stream)."""
    return SCHEMA.apply(current, changes)
