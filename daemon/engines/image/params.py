"""The image engine's live parameters: defaults, validation, and what each change touches.

A change never resets a stream unless ``reset`` is asked for: it re-derives only the state
that depends on it (prompt embeddings, the stage noise, the schedule tables, the residual
noise), so an artist never sees a blank or brown frame mid-show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..schema import Schema, param

CFG_MODES = ("none", "full", "self", "initialize")
NUM_TRAIN_INDEX = 50  # the LCM schedule t_index_list indexes into (50 steps)


@dataclass(frozen=True)
class ImageParams:
    prompt: str = param("a painting in vivid colours", "what the picture should become",
                        max_length=2000)
    prompts: tuple[tuple[str, float], ...] = param(
        (), "weighted prompts [[text, weight], ...], blended; when set they replace prompt",
        kind="prompts", max_length=8)
    prompt_blend: str = param("linear", "how weighted prompts blend: linear or slerp of the "
                              "text embeddings", choices=("linear", "slerp"))
    negative_prompt: str = param("", "what to steer away from (cfg full or initialize)",
                                 max_length=2000)
    seed: int = param(2, "noise seed", lo=0, hi=2**63 - 1)
    seeds: tuple[tuple[int, float], ...] = param(
        (), "weighted seeds [[seed, weight], ...], noise blended to unit variance; when set "
        "they replace seed", kind="seeds", max_length=8, hi=2**63 - 1)
    strength: float = param(0.4, "how much of the input is re-imagined (0 keeps it, 1 starts "
                            "from noise)", lo=0.0, hi=1.0)
    t_index_list: tuple[int, ...] = param(
        (), "explicit indices into the 50-step LCM schedule, lower = more noise; when set "
        "they replace strength and steps", kind="indices", lo=0, hi=NUM_TRAIN_INDEX - 1,
        max_length=4)
    steps: int = param(1, "denoising stages (Stream Batch width)", lo=1, hi=4)
    guidance: float = param(1.0, "classifier-free guidance scale (1: none)", lo=0.0, hi=20.0)
    delta: float = param(1.0, "residual-noise weight of cfg self and initialize", lo=0.0,
                         hi=2.0)
    cfg: str = param("self", "guidance mode: none, full (a negative pass), self or "
                     "initialize (residual noise)", choices=CFG_MODES)
    noise: str = param("fixed", "fixed: seeded noise per stage; fresh: new noise per frame",
                       choices=("fixed", "fresh"))
    similarity_filter: bool = param(False, "skip frames nearly equal to the last one "
                                    "(the previous output goes out again)")
    similarity_threshold: float = param(0.98, "similarity filter: cosine similarity above "
                                        "which frames may be skipped", lo=0.0, hi=0.9999)
    max_skip: int = param(10, "similarity filter: the most frames skipped in a row", lo=0,
                          hi=1000, unit="frames")

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


#: what each group of fields invalidates
PROMPT_FIELDS = {"prompt", "prompts", "prompt_blend", "negative_prompt"}
NOISE_FIELDS = {"seed", "seeds", "noise"}
SCHEDULE_FIELDS = {"strength", "t_index_list", "steps"}


def _knob_takes_over(updates: dict[str, Any]) -> None:
    if "strength" in updates or "steps" in updates:
        updates.setdefault("t_index_list", ())  # the knob takes over from raw indices


SCHEMA = Schema(ImageParams, "image", after=(_knob_takes_over,),
                derived=("t_index_list_effective",))


def apply(current: ImageParams, changes: Mapping[str, Any]) -> tuple[ImageParams, bool]:
    """Validate ``changes`` on top of ``current``; returns (params, reset requested)."""
    return SCHEMA.apply(current, changes)
