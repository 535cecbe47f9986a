"""Engine parameters declared once, as data.

An engine's parameters are the fields of a frozen dataclass, each declared with ``param``:
its default, a one-line description and what values it takes (a range, choices, a length),
its unit, and whether a change applies live (at the next step), rebuilds part of the
stream's state or restarts its history.  ``Schema`` reads that declaration and drives:

- validation: ``Schema.apply(current, changes)`` checks every change and returns the new
  parameters (the engines' only validator);
- the welcome's ``capabilities.schema`` (``Schema.to_list``), so a client knows every range
  before it is refused, and the TouchDesigner pages, the OBS properties, the OSC addresses and
  ``livediffusion params --list ENGINE`` come from the same list.

A new field with ``param(...)`` appears everywhere with no other change.

Kinds: ``float``, ``int`` (a float with an integral value is taken, 2.0 -> 2; any other float
is refused, never rounded), ``bool``, ``choice``, ``text``, and four lists: ``prompts``
([text, weight] pairs), ``seeds`` ([seed, weight] pairs), ``indices`` (strictly increasing
integers) and ``loras`` ([name, scale] pairs, distinct names, each scale in ``lo..hi``).
NaN is refused wherever a number is expected (it is never clamped).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from .base import ParamError, shown

KINDS = ("float", "int", "bool", "choice", "text", "prompts", "seeds", "indices", "loras")
EFFECTS = ("live", "rebuild", "restart")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str
    default: Any
    description: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    #: "live": applies from the next step; "rebuild": part of the stream's state is rebuilt
    #: (frames keep coming; e.g. the KV cache, so the model's memory of the past restarts);
    #: "restart": the stream's whole history restarts (its next step is a first step)
    effect: str = "live"
    #: text: the most characters; lists: the most entries
    max_length: int = 0
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind,
                               "default": _plain(self.default),
                               "description": self.description, "effect": self.effect}
        for key in ("lo", "hi", "unit", "max_length"):
            value = getattr(self, key)
            if value not in (None, "", 0) or (key in ("lo", "hi") and value == 0):
                out[key] = value
        if self.choices:
            out["choices"] = list(self.choices)
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out

    def check(self, value: Any) -> Any:
        """``value`` as this parameter holds it, or ParamError saying what it takes."""
        kind = self.kind
        if kind in ("float", "int"):
            return _number(self.name, value, self.lo, self.hi, integer=kind == "int")
        if kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"{self.name} must be true or false, not {shown(value)}.")
            return value
        if kind == "choice":
            if value not in self.choices:
                raise ParamError(f"{self.name} must be one of "
                                 f"{', '.join(repr(c) for c in self.choices)}, not "
                                 f"{shown(value)}.")
            return value
        if kind == "text":
            if not isinstance(value, str) or len(value) > self.max_length:
                raise ParamError(f"{self.name} must be a string of at most {self.max_length} "
                                 f"characters.")
            return value
        if kind == "prompts":
            return _pairs(self.name, value, self.max_length, "text", self._text_ok)
        if kind == "seeds":
            return _pairs(self.name, value, self.max_length, "seed", self._seed_ok)
        if kind == "indices":
            return self._indices(value)
        if kind == "loras":
            return self._loras(value)
        raise AssertionError(kind)

    def _text_ok(self, item: Any) -> bool:
        return isinstance(item, str) and len(item) <= 2000

    def _seed_ok(self, item: Any) -> bool:
        """An integer seed (an integral float too, as for int parameters) in range."""
        return isinstance(item, (int, float)) and not isinstance(item, bool) and \
            math.isfinite(item) and float(item).is_integer() and \
            0 <= item <= (self.hi if self.hi is not None else 2**63 - 1)

    def _indices(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > self.max_length:
            raise ParamError(f"{self.name} must be a list of 1 to {self.max_length} indices "
                             f"(or empty).")
        out = [_number(f"{self.name} entries", v, self.lo, self.hi, integer=True)
               for v in value]
        if out != sorted(set(out)):
            raise ParamError(f"{self.name} must be strictly increasing (more noise first).")
        return tuple(out)

    def _loras(self, value: Any) -> tuple[tuple[str, float], ...]:
        """[name, scale] pairs: a name (1 to 200 characters, each once) and a finite scale in
        lo..hi (negative scales subtract a LoRA's change)."""
        if not isinstance(value, (list, tuple)) or len(value) > self.max_length:
            raise ParamError(f"{self.name} must be a list of up to {self.max_length} "
                             f"[name, scale] pairs.")
        out: list[tuple[str, float]] = []
        for item in value:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and
                    isinstance(item[0], str) and 0 < len(item[0].strip()) and
                    len(item[0]) <= 200):
                raise ParamError(f"each entry of {self.name} must be [name, scale] with a "
                                 f"name of 1 to 200 characters.")
            scale = _number(f"the scale of {self.name} entry {item[0]!r:.60}", item[1],
                            self.lo, self.hi)
            if any(name == item[0] for name, _ in out):
                raise ParamError(f"{self.name} names {item[0]!r:.60} twice.")
            out.append((item[0], scale))
        return tuple(out)


def param(default: Any, description: str, *, kind: str | None = None,
          lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = (),
          unit: str = "", effect: str = "live", max_length: int = 0,
          aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that declares an engine parameter (see the module docstring).  The
    kind is taken from the default when not given (bool, int, float, str with choices or
    text)."""
    if kind is None:
        kind = "bool" if isinstance(default, bool) else "int" if isinstance(default, int) \
            else "float" if isinstance(default, float) \
            else "choice" if choices else "text"
    if kind not in KINDS or effect not in EFFECTS:
        raise ValueError(f"bad parameter declaration: kind {kind!r}, effect {effect!r}")
    spec = dict(kind=kind, description=description, lo=lo, hi=hi, choices=tuple(choices),
                unit=unit, effect=effect, max_length=max_length, aliases=tuple(aliases))
    return dataclasses.field(default=default, metadata={"param": spec})


class Schema:
    """The parameters of one engine: its dataclass's ``param`` fields, plus cross-field
    ``checks`` (each takes the new parameters and raises ParamError) and ``after`` (each
    takes the validated updates dict and may add to it: knobs that take over from others)."""

    def __init__(self, cls: type, engine: str, *,
                 checks: tuple[Callable[[Any], None], ...] = (),
                 after: tuple[Callable[[dict[str, Any]], None], ...] = (),
                 derived: tuple[str, ...] = ()) -> None:
        self.cls = cls
        self.engine = engine
        #: read-only entries the engine adds to its effective parameters (the image engine's
        #: ``t_index_list_effective``): ignored when sent back, so that what a client got
        #: can always be re-sent (a reconnecting client re-opens with it)
        self.derived = frozenset(derived)
        self.checks, self.after = checks, after
        self.params: dict[str, Param] = {}
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("param")
            if spec is None:
                raise ValueError(f"{cls.__name__}.{f.name} is not declared with param().")
            self.params[f.name] = Param(f.name, default=f.default, **spec)
        self.aliases = {a: p.name for p in self.params.values() for a in p.aliases}

    def names(self) -> list[str]:
        return sorted(set(self.params) | set(self.aliases) | {"reset"})

    def apply(self, current: Any, changes: Mapping[str, Any]) -> tuple[Any, bool]:
        """Validate ``changes`` on top of ``current`` (an instance of the dataclass);
        returns (the new parameters, reset asked for or implied by a ``restart`` change)."""
        if not isinstance(changes, Mapping):
            raise ParamError("parameters must be a map of names to values.")
        updates: dict[str, Any] = {}
        reset = False
        for key, value in changes.items():
            if key in self.derived:
                continue
            if key == "reset":
                if not isinstance(value, bool):
                    raise ParamError(f"reset must be true or false, not {shown(value)}.")
                reset = reset or value
                continue
            name = self.aliases.get(key, key)
            spec = self.params.get(name) if isinstance(name, str) else None
            if spec is None:
                raise ParamError(f"the {self.engine} engine has no parameter "
                                 f"{shown(key)}; it knows {', '.join(self.names())}.")
            updates[name] = spec.check(value)
        for rule in self.after:
            rule(updates)
        new = dataclasses.replace(current, **updates)
        for check in self.checks:
            check(new)
        restart = any(self.params[k].effect == "restart" and getattr(current, k) != v
                      for k, v in updates.items())
        return new, reset or restart

    def to_list(self, defaults: Any = None) -> list[dict[str, Any]]:
        """Every parameter as a map (``Param.to_dict``); ``defaults``: an instance whose
        values are given as the defaults (an engine whose memory profile changes some)."""
        out = [p.to_dict() for p in self.params.values()]
        if defaults is not None:
            for entry in out:
                entry["default"] = _plain(getattr(defaults, entry["name"]))
        return out

    def defaults(self) -> dict[str, Any]:
        return {name: _plain(p.default) for name, p in self.params.items()}


def _plain(value: Any) -> Any:
    """Tuples (of tuples) as lists, for msgpack and JSON."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _number(name: str, value: Any, lo: float | None, hi: float | None,
            integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        not (isinstance(value, float) and math.isnan(value))
    if integer:
        ok = ok and float(value).is_integer()
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        span = f" from {lo:g} to {hi:g}" if lo is not None and hi is not None else ""
        raise ParamError(f"{name} must be {kind}{span}, not {shown(value)}.")
    return int(value) if integer else float(value)


def _pairs(name: str, value: Any, most: int, first: str,
           first_ok: Callable[[Any], bool]) -> tuple[tuple[Any, float], ...]:
    if not isinstance(value, (list, tuple)) or len(value) > most:
        raise ParamError(f"{name} must be a list of up to {most} [{first}, weight] pairs.")
    out = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and first_ok(item[0])
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
                and math.isfinite(item[1]) and item[1] >= 0):
            raise ParamError(f"each entry of {name} must be [{first}, weight] with a finite "
                             f"weight >= 0.")
        out.append((item[0] if isinstance(item[0], str) else int(item[0]), float(item[1])))
    if out and sum(w for _, w in out) <= 0:
        raise ParamError(f"the weights of {name} must not all be zero.")
    return tuple(out)
