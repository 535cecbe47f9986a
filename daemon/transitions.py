"""Timed transitions and cue lists: a stream's parameters moving over seconds, chunk by chunk.

A transition goes from the stream's effective parameters when it begins to a target (any
change an engine accepts, a preset's parameters included) over ``seconds``.  The engine
worker asks it for the parameters of the moment before each step of the stream and hands
them to the engine as an ordinary live change, so nothing resets and no warm-up frame is
shown.  What moves, by the parameter's kind in the engine's schema:

- ``float`` parameters: linearly, along the curve (``linear`` or ``smooth``, a smoothstep),
  and the scales of ``loras`` lists the same way (a LoRA added comes in from 0, one removed
  goes out to 0 and leaves at the end);
- the prompt (``prompt``/``prompts``): the embeddings of the prompts before and after are
  blended with weights (1 - u, u), linearly or by slerp (the engine's ``prompt_blend``);
- the seed (``seed``/``seeds``): the noises of the seeds before and after are mixed with
  weights (cos(u pi/2), sin(u pi/2)), a slerp of two independent Gaussians, which keeps the
  noise at unit variance all the way;
- everything else (integers, switches, choices, other text) changes when the transition
  ends: an integer in between would change the stream's cost shape (steps) or rebuild state.

A transition does not start its clock until the engine has what the target needs (its
prompts encoded, ``Engine.prepare``), so the first chunks do not stall on an encode.

A cue list is a sequence of targets, each with a transition time and a hold time; it plays,
pauses (the running transition too), resumes, jumps and loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .engines.base import ParamError, shown

CURVES = ("linear", "smooth")
BLENDS = ("linear", "slerp")
#: the longest transition, hold or cue list taken
MAX_SECONDS = 3600.0
MAX_CUES = 256
PROMPT_KEYS = ("prompt", "prompts", "prompt_blend")
SEED_KEYS = ("seed", "seeds")


def parse_spec(spec: Any) -> tuple[float, str, str]:
    """A message's ``transition``: seconds, or a map {"seconds", "curve", "blend"}; returns
    (seconds, curve, blend) or raises ParamError saying what it takes."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"seconds", "curve", "blend"}
        if unknown:
            raise ParamError(f"a transition takes seconds, curve and blend, not "
                             f"{shown(sorted(unknown)[0])}.")
        seconds, curve, blend = spec.get("seconds"), spec.get("curve", "linear"), \
            spec.get("blend", "linear")
    else:
        seconds, curve, blend = spec, "linear", "linear"
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or \
            not 0 <= seconds <= MAX_SECONDS:  # NaN fails this too
        raise ParamError(f"a transition's seconds must be a number from 0 to "
                         f"{MAX_SECONDS:g}, not {shown(seconds)}.")
    if curve not in CURVES:
        raise ParamError(f"a transition's curve must be linear or smooth, not {shown(curve)}.")
    if blend not in BLENDS:
        raise ParamError(f"a transition's blend must be linear or slerp, not {shown(blend)}.")
    return float(seconds), curve, blend


def _weighted(params: Mapping[str, Any], many: str, one: str) -> list[tuple[Any, float]]:
    pairs = params.get(many) or [(params.get(one), 1.0)]
    return [(k, float(w)) for k, w in pairs]


def _merge(*sets: list[tuple[Any, float]]) -> list[list[Any]]:
    out: dict[Any, float] = {}
    for pairs in sets:
        for key, w in pairs:
            out[key] = out.get(key, 0.0) + w
    return [[k, w] for k, w in out.items()]


@dataclass
class Transition:
    """One transition of one stream (see the module docstring)."""

    start: dict[str, Any]
    target: dict[str, Any]
    #: the changes asked for (a later transition that replaces this one keeps them)
    changes: dict[str, Any]
    seconds: float
    kinds: dict[str, str]
    curve: str = "linear"
    blend: str = "linear"
    began: float | None = None     # None: waiting for the engine to prepare the target
    paused_at: float | None = None
    floats: list[str] = field(default_factory=list)
    scaled: list[str] = field(default_factory=list)
    prompts: tuple[list, list] | None = None   # (before, after), weights normalised
    seeds: tuple[list, list] | None = None     # (before, after), unit L2 each
    final: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # only declared parameters (an engine's effective map may carry derived entries)
        self.target = {k: v for k, v in self.target.items() if k in self.kinds}
        changed = {k for k in self.target if self.start.get(k) != self.target[k]}
        self.final = {k: self.target[k] for k in changed}
        self.floats = sorted(k for k in changed if self.kinds.get(k) == "float")
        #: LoRA lists whose scales glide (a LoRA coming in from 0, one leaving to 0)
        self.scaled = sorted(k for k in changed if self.kinds.get(k) == "loras")
        if "prompts" in self.kinds:
            before = _weighted(self.start, "prompts", "prompt")
            after = _weighted(self.target, "prompts", "prompt")
            if before != after:
                self.prompts = (_normalised(before, 1), _normalised(after, 1))
                most = 8
                if len(_merge(*self.prompts)) > most:
                    raise ParamError(f"a prompt transition blends the prompts before and "
                                     f"after: at most {most} of them together.")
        if "seeds" in self.kinds:
            before = _weighted(self.start, "seeds", "seed")
            after = _weighted(self.target, "seeds", "seed")
            if before != after:
                self.seeds = (_normalised(before, 2), _normalised(after, 2))
                if len(_merge(*self.seeds)) > 8:
                    raise ParamError("a seed transition mixes the seeds before and after: at "
                                     "most 8 of them together.")
        # the blends in between set prompts/seeds: the end sets the whole group back
        for moving, group in ((self.prompts, PROMPT_KEYS), (self.seeds, SEED_KEYS)):
            if moving:
                self.final.update({k: self.target[k] for k in group if k in self.target})

    @property
    def moving(self) -> list[str]:
        """The parameters that move (the others change at the end)."""
        return self.floats + self.scaled + (["prompt"] if self.prompts else []) + \
            (["seed"] if self.seeds else [])

    def progress(self, now: float) -> float:
        if self.began is None:
            return 0.0
        if self.seconds <= 0:
            return 1.0
        at = self.paused_at if self.paused_at is not None else now
        return min(max((at - self.began) / self.seconds, 0.0), 1.0)

    def at(self, now: float) -> dict[str, Any]:
        """The changes that bring the stream to where it is at ``now``; the whole target
        (``final``) once it is over."""
        u = self.progress(now)
        if u >= 1.0:
            return dict(self.final)
        c = u * u * (3.0 - 2.0 * u) if self.curve == "smooth" else u
        out: dict[str, Any] = {}
        for k in self.floats:
            a, b = float(self.start[k]), float(self.target[k])
            out[k] = a + (b - a) * c
        for k in self.scaled:
            a, b = dict(self.start.get(k) or []), dict(self.target[k] or [])
            out[k] = [[name, a.get(name, 0.0) + (b.get(name, 0.0) - a.get(name, 0.0)) * c]
                      for name in list(dict.fromkeys([*a, *b]))]
        if self.prompts:
            before, after = self.prompts
            out["prompts"] = _merge([(t, w * (1.0 - c)) for t, w in before],
                                    [(t, w * c) for t, w in after])
            out["prompt_blend"] = self.blend
        if self.seeds:
            before, after = self.seeds
            a, b = math.cos(c * math.pi / 2), math.sin(c * math.pi / 2)
            out["seeds"] = _merge([(s, w * a) for s, w in before],
                                  [(s, w * b) for s, w in after])
        return out

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is not None:
            if self.began is not None:
                self.began += now - self.paused_at
            self.paused_at = None

    def take_over(self, keys: set[str]) -> dict[str, Any]:
        """A plain change of ``keys`` while this runs: they leave the transition.  Returns
        the target values of the rest of a moving group the change touches (a new prompt
        mid-way must not leave the blend's ``prompts`` behind it), to apply under it."""
        asked, gone = set(keys), set(keys)
        extra: dict[str, Any] = {}
        for group, attr in ((PROMPT_KEYS, "prompts"), (SEED_KEYS, "seeds")):
            if asked & set(group) and getattr(self, attr):
                setattr(self, attr, None)
                extra.update({k: self.target[k] for k in group
                              if k in self.target and k not in asked})
                gone |= set(group)
        self.floats = [k for k in self.floats if k not in gone]
        self.scaled = [k for k in self.scaled if k not in gone]
        for k in gone:
            self.final.pop(k, None)
            self.changes.pop(k, None)
        return extra

    @property
    def empty(self) -> bool:
        """Nothing left to move or to set."""
        return not self.final and not self.moving

    def state(self, now: float) -> dict[str, Any]:
        return {"seconds": self.seconds, "progress": round(self.progress(now), 4),
                "waiting": self.began is None, "paused": self.paused_at is not None,
                "moving": self.moving, "curve": self.curve, "blend": self.blend,
                "at_end": sorted(k for k in self.final
                                 if k not in self.moving and k not in PROMPT_KEYS + SEED_KEYS)}

    def done(self, now: float) -> bool:
        return self.progress(now) >= 1.0


def _normalised(pairs: list[tuple[Any, float]], power: int) -> list[tuple[Any, float]]:
    """Weights scaled to sum 1 (power 1) or to unit L2 norm (power 2); zero weights left."""
    live = [(k, w) for k, w in pairs if w > 0]
    norm = sum(w ** power for _, w in live) ** (1.0 / power)
    return [(k, w / norm) for k, w in live]


@dataclass
class Cue:
    changes: dict[str, Any]
    transition: float = 0.0
    hold: float = 0.0
    curve: str = "linear"
    blend: str = "linear"
    label: str = ""


def parse_cues(items: Any) -> list[Cue]:
    """A message's ``cues``: a list of maps with ``params`` (already merged with any preset
    by the daemon), ``transition`` (seconds or a transition map), ``hold`` (seconds) and
    ``label``."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_CUES:
        raise ParamError(f"cues must be a list of 1 to {MAX_CUES} cues.")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ParamError(f"cue {i} must be a map with params, transition and hold.")
        unknown = set(item) - {"params", "preset", "transition", "hold", "label"}
        if unknown:
            raise ParamError(f"cue {i} has an unknown field {shown(sorted(unknown)[0])}; a "
                             f"cue takes params, preset, transition, hold and label.")
        changes = item.get("params") or {}
        if not isinstance(changes, Mapping) or not changes:
            raise ParamError(f"cue {i} sets no parameters (give params or a preset).")
        seconds, curve, blend = parse_spec(item.get("transition", 0.0))
        hold = item.get("hold", 0.0)
        if not isinstance(hold, (int, float)) or isinstance(hold, bool) or \
                not 0 <= hold <= MAX_SECONDS:
            raise ParamError(f"cue {i}'s hold must be a number of seconds from 0 to "
                             f"{MAX_SECONDS:g}, not {shown(hold)}.")
        label = item.get("label", item.get("preset", ""))
        out.append(Cue(dict(changes), seconds, float(hold), curve, blend,
                       label if isinstance(label, str) else ""))
    return out


@dataclass
class CueList:
    """Which cue plays and since when; the worker starts each cue's transition."""

    cues: list[Cue]
    loop: bool = False
    index: int = -1
    state: str = "playing"          # playing, paused, done, stopped
    #: when the current cue's transition ended (its hold counts from there)
    held_since: float | None = None
    paused_at: float | None = None

    def due(self, now: float, transition_done: bool) -> int | None:
        """The index of the cue to start now, if any (the first one at once, then each
        after the previous one's transition and hold)."""
        if self.state != "playing":
            return None
        if self.index < 0:
            return 0
        if not transition_done:
            return None
        if self.held_since is None:
            self.held_since = now
        if now - self.held_since < self.cues[self.index].hold:
            return None
        nxt = self.index + 1
        if nxt >= len(self.cues):
            if not self.loop:
                self.state = "done"
                return None
            nxt = 0
        return nxt

    def started(self, index: int) -> None:
        self.index = index
        self.held_since = None

    def pause(self, now: float) -> None:
        if self.state == "playing":
            self.state, self.paused_at = "paused", now

    def resume(self, now: float) -> None:
        if self.state == "paused":
            if self.held_since is not None and self.paused_at is not None:
                self.held_since += now - self.paused_at
            self.state, self.paused_at = "playing", None

    def report(self, now: float) -> dict[str, Any]:
        cue = self.cues[self.index] if 0 <= self.index < len(self.cues) else None
        held = 0.0
        if self.held_since is not None:
            held = (self.paused_at or now) - self.held_since
        return {"state": self.state, "index": self.index, "count": len(self.cues),
                "loop": self.loop, "label": cue.label if cue else "",
                "held_s": round(max(held, 0.0), 3), "hold_s": cue.hold if cue else 0.0}
