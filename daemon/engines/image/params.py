"""The image engine's live parameters: defaults, validation, and what each change touches.

A change never resets a stream unless ``reset`` is asked for: it re-derives only the state
that depends on it (prompt embeddings, the stage noise, the schedule tables, the residual
noise), so an artist never sees a blank or brown frame mid-show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from ..base import ParamError
from ..video.params import _bool, _number, _prompt_list

CFG_MODES = ("none", "full", "self", "initialize")
NUM_TRAIN_INDEX = 50  # the LCM schedule t_index_list indexes into (50 steps)


@dataclass(frozen=True)
class ImageParams:
    prompt: str = "a painting in vivid colours"
    #: weighted prompt list [[text, weight], ...]; when set it replaces ``prompt``
    prompts: tuple[tuple[str, float], ...] = ()
    prompt_blend: str = "linear"          # "linear" or "slerp" (of the text embeddings)
    negative_prompt: str = ""
    seed: int = 2
    #: weighted seed list [[seed, weight], ...]; when set it replaces ``seed`` (noise blended
    #: with weights normalised to unit variance)
    seeds: tuple[tuple[int, float], ...] = ()
    strength: float = 0.4                 # 0..1: how much of the input is re-imagined
    #: explicit indices into the 50-step LCM schedule (lower = more noise); when set, they
    #: replace ``strength`` and ``steps``
    t_index_list: tuple[int, ...] = ()
    steps: int = 1                        # 1..4 denoising stages (Stream Batch width)
    guidance: float = 1.0                 # classifier-free guidance scale
    delta: float = 1.0                    # residual-noise weight of "self"/"initialize"
    cfg: str = "self"                     # none | full | self | initialize
    noise: str = "fixed"                  # "fixed" seeded noise per stage, or "fresh" per frame
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skip: int = 10

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompts"] = [list(p) for p in self.prompts]
        out["seeds"] = [list(s) for s in self.seeds]
        out["t_index_list"] = list(self.t_index_list)
        out["t_index_list_effective"] = list(self.indices())
        return out

    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        return self.prompts or ((self.prompt, 1.0),)

    def weighted_seeds(self) -> tuple[tuple[int, float], ...]:
        return self.seeds or ((self.seed, 1.0),)

    def indices(self) -> tuple[int, ...]:
        """The stages' indices into the 50-step schedule.  From ``strength``: the first
        index is (1 - strength) * 50 (strength 1 starts from almost pure noise), the others
        split the rest of the schedule evenly."""
        if self.t_index_list:
            return self.t_index_list
        first = min(NUM_TRAIN_INDEX - 1, max(0, round((1.0 - self.strength) * NUM_TRAIN_INDEX)))
        span = NUM_TRAIN_INDEX - first
        out = [first + (k * span) // self.steps for k in range(self.steps)]
        for k in range(1, len(out)):  # strictly increasing, inside the schedule
            out[k] = min(NUM_TRAIN_INDEX - 1, max(out[k], out[k - 1] + 1))
        return tuple(sorted(set(out)))

    @property
    def stages(self) -> int:
        return len(self.indices())


_FIELDS = set(ImageParams.__dataclass_fields__)
#: what each group of fields invalidates
PROMPT_FIELDS = {"prompt", "prompts", "prompt_blend", "negative_prompt"}
NOISE_FIELDS = {"seed", "seeds", "noise"}
SCHEDULE_FIELDS = {"strength", "t_index_list", "steps"}


def apply(current: ImageParams, changes: Mapping[str, Any]) -> tuple[ImageParams, bool]:
    """Validate ``changes`` on top of ``current``; returns (params, reset requested)."""
    updates: dict[str, Any] = {}
    reset = False
    for key, value in changes.items():
        if key == "reset":
            reset = _bool("reset", value)
            continue
        if key not in _FIELDS:
            raise ParamError(f"the image engine has no parameter {key!r}; it knows "
                             f"{', '.join(sorted(_FIELDS | {'reset'}))}.")
        if key in ("prompt", "negative_prompt"):
            if not isinstance(value, str) or len(value) > 2000:
                raise ParamError(f"{key} must be a string of at most 2000 characters.")
            updates[key] = value
        elif key == "prompts":
            updates[key] = _prompt_list(value)
        elif key == "prompt_blend":
            if value not in ("linear", "slerp"):
                raise ParamError("prompt_blend must be 'linear' or 'slerp'.")
            updates[key] = value
        elif key == "seed":
            updates[key] = _number("seed", value, 0, 2**63 - 1, integer=True)
        elif key == "seeds":
            updates[key] = _seed_list(value)
        elif key == "strength":
            updates[key] = _number("strength", value, 0.0, 1.0)
        elif key == "t_index_list":
            updates[key] = _index_list(value)
        elif key == "steps":
            updates[key] = _number("steps", value, 1, 4, integer=True)
        elif key == "guidance":
            updates[key] = _number("guidance", value, 0.0, 20.0)
        elif key == "delta":
            updates[key] = _number("delta", value, 0.0, 2.0)
        elif key == "cfg":
            if value not in CFG_MODES:
                raise ParamError(f"cfg must be one of {', '.join(CFG_MODES)}, not {value!r}.")
            updates[key] = value
        elif key == "noise":
            if value not in ("fixed", "fresh"):
                raise ParamError("noise must be 'fixed' or 'fresh'.")
            updates[key] = value
        elif key == "similarity_filter":
            updates[key] = _bool(key, value)
        elif key == "similarity_threshold":
            updates[key] = _number(key, value, 0.0, 0.9999)
        elif key == "max_skip":
            updates[key] = _number(key, value, 0, 1000, integer=True)
    if "strength" in updates or "steps" in updates:
        updates.setdefault("t_index_list", ())  # the knob takes over from raw indices
    return replace(current, **updates), reset


def _seed_list(value: Any) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        raise ParamError("seeds must be a list of up to 8 [seed, weight] pairs.")
    out = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and isinstance(item[0], int) and not isinstance(item[0], bool)
                and 0 <= item[0] < 2**63 and isinstance(item[1], (int, float))
                and not isinstance(item[1], bool) and item[1] >= 0):
            raise ParamError("each entry of seeds must be [seed, weight] with weight >= 0.")
        out.append((int(item[0]), float(item[1])))
    if out and sum(w for _, w in out) <= 0:
        raise ParamError("the weights of seeds must not all be zero.")
    return tuple(out)


def _index_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not 0 <= len(value) <= 4:
        raise ParamError("t_index_list must be a list of 1 to 4 indices (or empty).")
    out = []
    for v in value:
        out.append(_number("t_index_list entries", v, 0, NUM_TRAIN_INDEX - 1, integer=True))
    if out != sorted(set(out)):
        raise ParamError("t_index_list must be strictly increasing (more noise first).")
    return tuple(out)
