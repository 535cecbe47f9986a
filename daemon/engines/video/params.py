"""The video engine's live parameters: defaults, validation, and what a change invalidates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from ..base import ParamError


@dataclass(frozen=True)
class VideoParams:
    prompt: str = "a painting in vivid colours"
    #: weighted prompt list [[text, weight], ...]; when set it replaces ``prompt``
    prompts: tuple[tuple[str, float], ...] = ()
    seed: int = 42
    noise_scale: float = 0.8       # 0..1: how much of the input is replaced ("strength")
    steps: int = 2                 # 1..4 denoising steps
    stream_batch: bool = True      # one forward per chunk over all steps (else sequential)
    motion_control: bool = True
    motion_scale: float = 0.2
    motion_reduce: float = 0.1
    motion_gain: float = 0.9
    cache_frames: int = 6
    sinks: int = 3
    sink_refresh: float = 0.2      # cosine threshold, 0 = off
    rope_max: int = 50
    decoder: str = "vae"           # "vae" (Wan VAE) or "tiny" (TAEHV-layout fast decoder)
    #: "vae" (Wan VAE) or "tiny" (TAEHV-layout fast encoder); a change restarts the stream's
    #: history (the two encoders' streaming states do not carry over)
    encoder: str = "vae"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompts"] = [list(p) for p in self.prompts]
        return out

    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        return self.prompts or ((self.prompt, 1.0),)


_ALIASES = {"strength": "noise_scale"}
_FIELDS = set(VideoParams.__dataclass_fields__)
#: changes that only need the cross-attention K/V recomputed
PROMPT_FIELDS = {"prompt", "prompts"}
#: changes that re-shape the KV cache (it is rebuilt; the stream continues from the next chunk)
CACHE_SHAPE_FIELDS = {"cache_frames"}


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ParamError(f"{name} must be {kind} from {lo:g} to {hi:g}, not {value!r}.")
    return int(value) if integer else float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParamError(f"{name} must be true or false, not {value!r}.")
    return value


def apply(current: VideoParams, changes: Mapping[str, Any]) -> tuple[VideoParams, bool]:
    """Validate ``changes`` on top of ``current``; returns (params, reset requested)."""
    updates: dict[str, Any] = {}
    reset = False
    for key, value in changes.items():
        key = _ALIASES.get(key, key)
        if key == "reset":
            reset = _bool("reset", value)
            continue
        if key not in _FIELDS:
            raise ParamError(f"the video engine has no parameter {key!r}; it knows "
                             f"{', '.join(sorted(_FIELDS | {'reset', 'strength'}))}.")
        if key == "prompt":
            if not isinstance(value, str) or len(value) > 2000:
                raise ParamError("prompt must be a string of at most 2000 characters.")
            updates[key] = value
        elif key == "prompts":
            updates[key] = _prompt_list(value)
        elif key == "seed":
            updates[key] = _number("seed", value, 0, 2**63 - 1, integer=True)
        elif key == "noise_scale":
            updates[key] = _number("noise_scale", value, 0.11, 1.0)
        elif key == "steps":
            updates[key] = _number("steps", value, 1, 4, integer=True)
        elif key in ("stream_batch", "motion_control"):
            updates[key] = _bool(key, value)
        elif key == "motion_scale":
            updates[key] = _number(key, value, 1e-3, 2.0)
        elif key in ("motion_reduce", "motion_gain", "sink_refresh"):
            updates[key] = _number(key, value, 0.0, 1.0)
        elif key == "cache_frames":
            updates[key] = _number(key, value, 2, 64, integer=True)
        elif key == "sinks":
            updates[key] = _number(key, value, 0, 63, integer=True)
        elif key == "rope_max":
            updates[key] = _number(key, value, 2, 1000, integer=True)
        elif key in ("decoder", "encoder"):
            if value not in ("vae", "tiny"):
                raise ParamError(f"{key} must be 'vae' or 'tiny'.")
            updates[key] = value
    params = replace(current, **updates)
    if params.sinks >= params.cache_frames:
        raise ParamError(f"sinks ({params.sinks}) must be fewer than cache_frames "
                         f"({params.cache_frames}).")
    if params.rope_max < params.cache_frames:
        raise ParamError("rope_max must be at least cache_frames.")
    return params, reset


def _prompt_list(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        raise ParamError("prompts must be a list of up to 8 [text, weight] pairs.")
    out = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
                and item[1] >= 0):
            raise ParamError("each entry of prompts must be [text, weight] with weight >= 0.")
        out.append((item[0], float(item[1])))
    if out and sum(w for _, w in out) <= 0:
        raise ParamError("the weights of prompts must not all be zero.")
    return tuple(out)
