"""The TouchDesigner component's logic, in plain Python (it imports no TD module).

TD calls three shims (``callbacks/``), each one line:
* Execute DAT ``onFrameStart``   -> ``on_frame_start(parent())``: reads the input TOP, forces
  the Script TOP to cook, writes the status readouts, builds the engine's parameter page
  when the engine changes, and writes back values the daemon set (a recalled preset);
* Script TOP ``onCook``          -> ``on_cook(parent(), scriptOp)``;
* Parameter Execute DAT          -> ``on_value_change`` / ``on_pulse``.

Nothing here blocks TD's main thread: the client polls with timeout 0, connects and opens its
stream without waiting, and reconnects by itself; requests (parameter changes, presets) are
sent with an id and their answers picked up at later frames (``TDBridge._ask``, through
``Client.ask`` and ``Client.answer``).  Input pixels
are read with ``numpyArray(delayed=True)`` (float32 RGBA, row 0 at the bottom; the first call
returns None) and copied raw into the stream's ring: the daemon converts on its side.  The
output comes back as RGBA uint8, bottom row first, ready for ``copyNumpyArray``.

The engine's parameters are not hand-written: the daemon's welcome describes each engine's
parameters (``capabilities.engines[<engine>].schema``, docs/protocol.md §3.3.1) and the
"Generation" page is made from that, once the engine is known (``engine_page``,
``sync_engine_page``).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Callable

import numpy as np

from livediffusion.shared import Client

#: the component's fixed custom parameters: page -> [(name, kind, default, label, attrs)];
#: ``build_fixed_pages`` creates them (the build script calls it) and ``par_change`` /
#: ``pulse`` understand them.  kinds: str, int, float, toggle, menu, pulse, status (read-only)
PAGES: dict[str, list[tuple[str, str, Any, str, dict[str, Any]]]] = {
    "Daemon": [
        ("Endpoint", "str", "tcp://127.0.0.1:5570", "Daemon endpoint", {}),
        ("Engine", "str", "auto", "Engine", {}),
        ("Active", "toggle", True, "Active", {}),
        ("Connect", "pulse", None, "Connect", {}),
        ("Disconnect", "pulse", None, "Disconnect", {}),
    ],
    "Stream": [
        ("Width", "int", 512, "Width", {"min": 32, "max": 4096, "normMin": 256,
                                        "normMax": 1280, "clampMin": True}),
        ("Height", "int", 512, "Height", {"min": 32, "max": 4096, "normMin": 256,
                                          "normMax": 1280, "clampMin": True}),
        ("Reset", "pulse", None, "Reset", {}),
    ],
    "Presets": [
        ("Preset", "menu", "", "Preset", {"menuNames": [], "menuLabels": []}),
        ("Refresh", "pulse", None, "Refresh presets", {}),
        ("Recall", "pulse", None, "Recall", {}),
        ("Transition", "float", 0.0, "Transition (seconds)",
         {"min": 0.0, "max": 60.0, "normMin": 0.0, "normMax": 10.0, "clampMin": True,
          "help": "recall the preset over this many seconds (0: at once), where the daemon "
                  "can blend"}),
        ("Presetname", "str", "", "Save as", {}),
        ("Save", "pulse", None, "Save", {"help": "save the stream's current parameters in "
                                                  "the daemon under Save as"}),
    ],
    "Status": [
        ("State", "status", "", "State", {}),
        ("Fpsin", "status", 0.0, "FPS in", {}),
        ("Fpsout", "status", 0.0, "FPS out", {}),
        ("Latency", "status", 0.0, "Latency ms", {}),
        ("Drops", "status", 0, "Drops", {}),
        ("Lasterror", "status", "", "Last error", {}),
    ],
}

#: the page made from the engine's schema, and where it goes among the fixed ones
ENGINE_PAGE = "Generation"
PAGE_ORDER = ("Daemon", ENGINE_PAGE, "Stream", "Presets", "Status")
FIXED_NAMES = frozenset(n for page in PAGES.values() for n, *_ in page)

#: TD's custom parameter names: a capital letter, then lowercase letters and digits
TD_NAME = re.compile(r"^[A-Z][a-z0-9]*$")
#: TD int parameters are kept within 32 bits here (seeds go up to 2^63-1 in the schema)
TD_INT_MAX = 2**31 - 1
#: slider ranges for numbers whose schema range is unbounded or huge (a seed): a MIDI CHOP
#: export maps 0..1 over normMin..normMax
NORM_SPAN = {"int": 1000, "float": 1.0}
MAX_NORM_SPAN = 100_000
#: TD parameter style per schema kind (anything else: a Str holding JSON)
STYLES = {"float": "Float", "int": "Int", "bool": "Toggle", "choice": "Menu", "text": "Str",
          "prompts": "Str", "seeds": "Str", "indices": "Str"}
#: how long an unanswered request is remembered
ASK_TIMEOUT_S = 10.0


# --- text syntax of the list kinds ---------------------------------------------------------

def parse_prompts(text: str) -> list[list[Any]]:
    """'a forest:1; a city:0.5' -> [['a forest', 1.0], ['a city', 0.5]] (weight 1 if none)."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        body, sep, weight = part.rpartition(":")
        try:
            out.append([body.strip(), float(weight)] if sep else [part, 1.0])
        except ValueError:
            out.append([part, 1.0])
    return out


def _weight(w: float) -> str:
    return f"{w:g}"


def format_prompts(value: list[list[Any]]) -> str:
    return "; ".join(f"{text}:{_weight(float(w))}" for text, w in value)


def parse_seeds(text: str) -> list[list[Any]]:
    """'42:1; 7:0.5' -> [[42, 1.0], [7, 0.5]] (weight 1 if none); ValueError if not."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        seed, sep, weight = part.partition(":")
        try:
            out.append([int(seed.strip()), float(weight) if sep else 1.0])
        except ValueError:
            raise ValueError(f"{part!r} is not seed:weight (e.g. 42:1; 7:0.5)") from None
    return out


def format_seeds(value: list[list[Any]]) -> str:
    return "; ".join(f"{int(s)}:{_weight(float(w))}" for s, w in value)


def parse_indices(text: str) -> list[int]:
    """'1, 5, 9' (commas or spaces) -> [1, 5, 9]; ValueError if not integers."""
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"{part!r} is not an integer (e.g. 1, 5, 9)") from None
    return out


# --- schema -> TD ----------------------------------------------------------------------------

def td_name(name: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A schema name as TD allows custom parameters to be named: 'noise_scale' ->
    'Noisescale'; a digit is added when that name is taken ('Noisescale2')."""
    base = re.sub(r"[^a-z0-9]", "", name.lower()) or "par"
    if base[0].isdigit():
        base = "p" + base
    base = base[0].upper() + base[1:]
    out, n = base, 2
    while out in taken:
        out, n = f"{base}{n}", n + 1
    return out


def td_names(schema: list[dict[str, Any]],
             reserved: frozenset[str] = FIXED_NAMES) -> dict[str, str]:
    """schema name -> TD name for every entry, distinct from each other and from the fixed
    parameters."""
    taken, out = set(reserved), {}
    for entry in schema:
        out[entry["name"]] = name = td_name(entry["name"], taken)
        taken.add(name)
    return out


def label_of(entry: dict[str, Any]) -> str:
    label = entry["name"].replace("_", " ").strip().capitalize()
    return f"{label} ({entry['unit']})" if entry.get("unit") else label


def help_of(entry: dict[str, Any]) -> str:
    text = str(entry.get("description", ""))
    effect = entry.get("effect")
    if effect == "restart":
        text += " (a change restarts the stream's history)"
    elif effect == "rebuild":
        text += " (a change rebuilds part of the stream's state)"
    return text


def to_daemon(entry: dict[str, Any], value: Any) -> Any:
    """A TD parameter's value as the schema's kind wants it (ValueError when the text of a
    list kind does not parse)."""
    kind = entry.get("kind")
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(round(float(value)))
    if kind == "bool":
        return bool(value)
    if kind in ("choice", "text"):
        return str(value)
    if kind == "prompts":
        return parse_prompts(str(value))
    if kind == "seeds":
        return parse_seeds(str(value))
    if kind == "indices":
        return parse_indices(str(value))
    try:  # an unknown kind: JSON if it is JSON, else the text as typed
        return json.loads(str(value))
    except ValueError:
        return str(value)


def to_td(entry: dict[str, Any], value: Any) -> Any:
    """A daemon value as the TD parameter shows it."""
    kind = entry.get("kind")
    if kind == "float":
        return float(value)
    if kind == "int":
        return max(-TD_INT_MAX, min(TD_INT_MAX, int(value)))
    if kind == "bool":
        return bool(value)
    if kind in ("choice", "text"):
        return str(value)
    if kind == "prompts":
        return format_prompts(value or [])
    if kind == "seeds":
        return format_seeds(value or [])
    if kind == "indices":
        return ", ".join(str(int(i)) for i in value or [])
    return value if isinstance(value, str) else json.dumps(value)


def _fits(entry: dict[str, Any], value: Any) -> bool:
    """Whether a carried-over TD value still suits this entry (in range, one of the
    choices, parses); the daemon checks for real."""
    try:
        v = to_daemon(entry, value)
    except (TypeError, ValueError):
        return False
    if entry.get("kind") in ("float", "int"):
        if isinstance(value, bool) or (isinstance(v, float) and math.isnan(v)):
            return False
        return entry.get("lo", -math.inf) <= v <= entry.get("hi", math.inf)
    if entry.get("kind") == "choice":
        return v in entry.get("choices", [])
    return True


def par_spec(entry: dict[str, Any], name: str) -> dict[str, Any]:
    """What one TD parameter of the engine page is: name, style, label, default (TD form),
    help, and for numbers min/max/clamp and the slider range, for menus its items."""
    kind = entry.get("kind")
    spec: dict[str, Any] = {"name": name, "param": entry["name"],
                            "style": STYLES.get(kind, "Str"), "label": label_of(entry),
                            "default": to_td(entry, entry.get("default")),
                            "help": help_of(entry), "attrs": {}}
    attrs = spec["attrs"]
    if kind in ("float", "int"):
        lo, hi = entry.get("lo"), entry.get("hi")
        if kind == "int":
            lo = None if lo is None else max(lo, -TD_INT_MAX)
            hi = None if hi is None else min(hi, TD_INT_MAX)
        if lo is not None:
            attrs.update(min=lo, clampMin=True)
        if hi is not None:
            attrs.update(max=hi, clampMax=True)
        if lo is not None and hi is not None and hi - lo <= MAX_NORM_SPAN:
            norm = (lo, hi)
        else:  # no range or a huge one (a seed): a span a fader can still step through
            start = lo if lo is not None else (hi - NORM_SPAN[kind] if hi is not None else 0)
            norm = (start, start + NORM_SPAN[kind])
        attrs.update(normMin=norm[0], normMax=norm[1])
    elif kind == "choice":
        attrs.update(menuNames=list(entry.get("choices", [])),
                     menuLabels=list(entry.get("choices", [])))
    return spec


def engine_page(schema: list[dict[str, Any]], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine page's parameters in the schema's order, each with ``value``: the TD
    value in ``values`` when there is one, else the default."""
    names = td_names(schema)
    out = []
    for entry in schema:
        spec = par_spec(entry, names[entry["name"]])
        spec["value"] = values.get(spec["name"], spec["default"])
        out.append(spec)
    return out


# --- the bridge ------------------------------------------------------------------------------

class TDBridge:
    def __init__(self, values: dict[str, Any] | None = None, client_factory=Client,
                 clock=time.monotonic) -> None:
        self.values = {name: default for page in PAGES.values()
                       for name, kind, default, *_ in page if kind != "pulse"}
        self.values.update(values or {})
        self.client_factory = client_factory
        self.clock = clock
        self.client: Client | None = None
        self.stream = None
        self.engine = ""
        self.size: tuple[int, int] | None = None
        self._out: np.ndarray | None = None
        self._last_input: np.ndarray | None = None
        self._sends: list[float] = []
        self._outs: list[float] = []
        self.last_error = ""
        self._seen_errors: list[Any] = []   # daemon errors already shown (by identity)
        self._opened: tuple[int, Any] | None = None
        # the engine's schema and the name mapping both ways (aliases map too)
        self.schema: list[dict[str, Any]] = []
        self._schema_src: Any = None
        self.by_td: dict[str, dict[str, Any]] = {}      # TD name -> schema entry
        self.td_of: dict[str, str] = {}                  # schema name -> TD name
        #: bumped when the engine page must be (re)built; the shim builds it (never before
        #: the engine is known: a saved project's page stays as it is until then)
        self.page_version = 0
        self.page_built = 0
        #: the values the daemon accepted for this stream (schema name -> value)
        self.accepted: dict[str, Any] = {}
        self.refused: set[str] = set()
        self._dirty: set[str] = set()    # changed while the stream was not open
        #: TD parameter -> value the daemon set (a recall), for the shim to write back
        self.par_updates: dict[str, Any] = {}
        self.presets: dict[str, dict[str, Any]] = {}
        self.presets_version = 0
        self.menu_shown = -1
        self._presets_asked = False
        #: request id -> (when, the parameters it changes, what handles the answer)
        self._asked: dict[int, tuple[float, set[str], Callable[[dict[str, Any]], None]]] = {}

    # --- connection --------------------------------------------------------------------

    def connect(self) -> None:
        self.disconnect()
        self.client = self.client_factory(self.values["Endpoint"], name="touchdesigner")
        self.client.connect(timeout=0)  # the handshake finishes over the next frames

    def disconnect(self) -> None:
        if self.client is not None:
            if self.stream is not None:
                self.stream.close(timeout=0)
            self.client.close()
        self.client = self.stream = None
        self.size = None
        self._asked.clear()
        self._presets_asked = False

    def _engine_caps(self) -> dict[str, Any]:
        return self.client.capabilities.get("engines", {}).get(self.engine, {})

    # --- the engine's schema -----------------------------------------------------------

    def adopt_schema(self, schema: list[dict[str, Any]]) -> None:
        """Take an engine's schema: map names, carry over the TD values that still suit a
        parameter (by its name or an alias), and ask for the page to be built."""
        self.schema = [dict(e) for e in schema if isinstance(e, dict) and "name" in e]
        self.td_of = td_names(self.schema)
        self.by_td = {}
        for entry in self.schema:
            self.by_td[self.td_of[entry["name"]]] = entry
        for entry in self.schema:  # aliases (and old names such as Strength) map too
            for alias in entry.get("aliases", ()):
                name = td_name(alias)
                if name not in self.by_td and name not in FIXED_NAMES:
                    self.by_td[name] = entry
        for entry in self.schema:
            name = self.td_of[entry["name"]]
            carried = [n for n in (name, *(td_name(a) for a in entry.get("aliases", ())))
                       if n in self.values]
            if carried and _fits(entry, self.values[carried[0]]):
                self.values[name] = self.values[carried[0]]
            else:
                self.values[name] = to_td(entry, entry.get("default"))
        self.accepted = {e["name"]: e.get("default") for e in self.schema}
        self.refused &= set(self.accepted)
        self.page_version += 1

    def _check_schema(self) -> None:
        """Follow the engine's schema (a new engine, or a daemon restarted with another)."""
        schema = self._engine_caps().get("schema")
        if schema is None or schema is self._schema_src:
            return
        self._schema_src = schema
        if schema != self.schema:
            self.adopt_schema(schema)

    def _value_of(self, entry: dict[str, Any]) -> Any:
        return to_daemon(entry, self.values[self.td_of[entry["name"]]])

    def _engine_params(self) -> dict[str, Any]:
        """What an open sends: each parameter whose TD value differs from the schema's
        default (a refused value is not sent again: the last accepted one is)."""
        out = {}
        for entry in self.schema:
            name = entry["name"]
            if name in self.refused:
                value = self.accepted.get(name, entry.get("default"))
            else:
                try:
                    value = self._value_of(entry)
                except ValueError:
                    continue
            if value != entry.get("default"):
                out[name] = value
        return out

    def _ensure_stream(self, width: int, height: int) -> None:
        if self.client is None:
            self.connect()
        self.client.poll(0)
        if not self.client.connected:
            return
        if self.stream is not None and self.size == (width, height):
            return
        if self.stream is not None:
            self.stream.close(timeout=0)
        self.engine = self.client.choose_engine(self.values["Engine"])
        self._check_schema()
        params = self._engine_params()
        self.accepted.update(params)
        self.stream = self.client.open_stream(
            "touchdesigner", width, height, format="rgba", dtype="float32", origin="bottom",
            output={"format": "rgba", "dtype": "uint8", "origin": "bottom"},
            engine=self.engine, params=params, timeout=0)
        self.size = (width, height)
        self._dirty.clear()

    # --- requests without waiting ------------------------------------------------------

    def _ask(self, msg: dict[str, Any], on_reply: Callable[[dict[str, Any]], None],
             names: set[str] | frozenset[str] = frozenset()) -> bool:
        """Send a request now (``Client.ask``), handle its answer (or error) at a later frame
        (``Client.answer``).  False if it could not be sent."""
        client = self.client
        if client is None or not client.connected:
            return False
        rid = client.ask(msg)
        if rid is None:
            return False
        self._asked[rid] = (self.clock(), set(names), on_reply)
        return True

    def _in_flight(self) -> set[str]:
        """The parameters of changes sent and not yet answered."""
        return set().union(*(names for _, names, _ in self._asked.values()))

    def _seen(self, err: Any) -> bool:
        if any(e is err for e in self._seen_errors):
            return True
        self._seen_errors = (self._seen_errors + [err])[-16:]
        return False

    def _answers(self) -> None:
        if self.client is None:
            return
        now = self.clock()
        for rid, (asked, _, on_reply) in list(self._asked.items()):
            reply = self.client.answer(rid)
            if reply is not None:
                del self._asked[rid]
                err = self.client.last_error
                if reply.get("type") == "error" and err is not None and \
                        getattr(err, "message", None) == reply.get("message"):
                    self._seen(err)   # told by on_reply, not again as a stray error
                on_reply(reply)
            elif now - asked > ASK_TIMEOUT_S:
                del self._asked[rid]

    def _send_params(self, params: dict[str, Any], *, preset: str | None = None,
                     transition: float = 0.0, what: str = "") -> bool:
        """The params message, with a preset and a transition when given (the
        transition field is new in the daemon: ``{"transition": {"seconds": T}}``)."""
        msg: dict[str, Any] = {"type": "params", "stream": self.stream.id, "params": params}
        if preset is not None:
            msg["preset"] = preset
        if transition > 0:
            msg["transition"] = {"seconds": float(transition)}
        names = set(params)
        return self._ask(msg, lambda reply: self._on_params_reply(reply, names, what), names)

    def _on_params_reply(self, reply: dict[str, Any], names: set[str], what: str) -> None:
        if reply.get("type") == "error":
            self.refused |= names & set(self.accepted)
            self.last_error = f"{what}: {reply.get('message', reply.get('code'))}" if what \
                else str(reply.get("message", reply.get("code")))
            return
        # during a transition ``params`` is where the stream is on its way, ``target``
        # where it goes: TD shows (and a reopen sends) the target
        effective = reply.get("target") or reply.get("params") or {}
        self.refused -= names
        self.last_error = ""
        self._take_effective(effective, keep=names | self._in_flight() | self._dirty)

    def _take_effective(self, effective: dict[str, Any], keep: set[str]) -> None:
        """The daemon's effective parameters: remembered as accepted, and shown in TD where
        they differ (a recalled preset), except ``keep``: the user's own changes, sent or
        about to be."""
        for entry in self.schema:
            name = entry["name"]
            if name not in effective:
                continue
            self.accepted[name] = effective[name]
            td = self.td_of[name]
            try:
                same = self._value_of(entry) == effective[name]
            except ValueError:
                same = False
            if not same and name not in keep:
                shown = to_td(entry, effective[name])
                self.values[td] = shown
                self.par_updates[td] = shown
        if self.stream is not None:  # what the client re-sends when it reopens the stream
            self.stream.params = {k: v for k, v in self.accepted.items()
                                  if k in effective}

    def _stream_open(self) -> bool:
        return self.stream is not None and self.stream.state == "open" and \
            self.stream.id is not None

    # --- presets -------------------------------------------------------------------------

    def refresh_presets(self) -> None:
        self._presets_asked = self._ask({"type": "presets", "op": "list"},
                                        self._on_presets)

    def _on_presets(self, reply: dict[str, Any], select: str | None = None) -> None:
        if reply.get("type") == "error":
            self.last_error = f"Presets: {reply.get('message', reply.get('code'))}"
            return
        self.presets = dict(reply.get("presets") or {})
        self.presets_version += 1
        if select is not None:
            self.values["Preset"] = select
            self.par_updates["Preset"] = select
        elif self.values.get("Preset") not in self.presets and self.presets:
            self.values["Preset"] = next(iter(self.presets))
            self.par_updates["Preset"] = self.values["Preset"]

    def preset_menu(self) -> tuple[list[str], list[str]]:
        """The Preset menu: names, and labels with the engine each was saved from."""
        names = list(self.presets)
        labels = [f"{n} ({self.presets[n].get('engine')})" if self.presets[n].get("engine")
                  else n for n in names]
        return names, labels

    def recall(self) -> None:
        name = str(self.values.get("Preset") or "")
        if not name:
            self.last_error = "Recall: choose a preset (Refresh fills the menu)"
        elif not self._stream_open():
            self.last_error = "Recall: the stream is not open yet"
        else:
            self._send_params({}, preset=name,
                              transition=float(self.values.get("Transition") or 0.0),
                              what=f"Recall {name}")

    def save_preset(self) -> None:
        name = str(self.values.get("Presetname") or "").strip()
        if not name:
            self.last_error = "Save: type a name in Save as"
        elif not self._stream_open():
            self.last_error = "Save: the stream is not open yet"
        else:
            self._ask({"type": "presets", "op": "save", "name": name,
                       "from": self.stream.name},
                      lambda reply: self._on_presets(reply, select=name))

    # --- the three TD callbacks ----------------------------------------------------------

    def frame_start(self, top) -> None:
        """Execute DAT onFrameStart: read the input TOP without stalling, send it."""
        if not self.values.get("Active", True):
            return
        pixels = top.numpyArray(delayed=True)  # previous frame's download; None at first
        if pixels is None:
            return
        h, w = pixels.shape[:2]
        self._ensure_stream(w, h)
        self._last_input = pixels
        if self.client is not None and self.client.connected:
            self._check_schema()
            if not self._presets_asked:
                self.refresh_presets()
        self._answers()
        self._pick_errors()
        if self.stream is None or self.stream.state != "open":
            return
        if self._opened != (id(self.stream), self.stream.id):  # opened, or reopened
            self._opened = (id(self.stream), self.stream.id)
            self._take_effective(self.stream.params, keep=self._dirty | self._in_flight())
        if self._dirty:
            self._send_changes(sorted(self._dirty))
            self._dirty.clear()
        if pixels.shape[2] == 4 and pixels.dtype == np.float32:
            frame = pixels
        else:  # a TOP of fewer channels: pad to RGBA float
            frame = np.zeros((h, w, 4), np.float32)
            frame[..., :pixels.shape[2]] = pixels
            frame[..., 3] = 1.0
        if self.stream.send(frame):
            self._sends.append(self.clock())
        self.client.poll(0)
        self._answers()
        out = self.stream.new_frame()
        if out is not None:
            self._out = np.ascontiguousarray(out.pixels)
            self._outs.append(self.clock())
        self._pick_errors()

    def _pick_errors(self) -> None:
        """Show an error the daemon sent that no request of ours handled (a refused open,
        a bad frame)."""
        for err in (self.stream.last_error if self.stream is not None else None,
                    self.client.last_error if self.client is not None else None):
            if err is not None and not self._seen(err):
                self.last_error = str(err)

    def cook(self, script_op) -> None:
        """Script TOP onCook: the newest output (or, until there is one, the input)."""
        frame = self._out if self._out is not None else self._last_input
        if frame is not None:
            script_op.copyNumpyArray(frame)

    def _send_changes(self, names: list[str]) -> None:
        """Send these schema parameters' TD values, converted to their kinds; one that
        does not convert is shown in Lasterror and not sent."""
        params = {}
        for name in names:
            entry = next(e for e in self.schema if e["name"] == name)
            try:
                params[name] = self._value_of(entry)
            except (TypeError, ValueError) as exc:
                self.refused.add(name)
                self.last_error = f"{self.td_of[name]}: {exc}"
        if params:
            self._send_params(params, what=", ".join(self.td_of[n] for n in params))

    def par_change(self, name: str, value: Any) -> None:
        """Parameter Execute DAT onValueChange: live, non-blocking.  An engine parameter
        goes to the daemon alone (nothing is sent when the daemon has that value)."""
        entry = self.by_td.get(name)
        if entry is not None:
            name = self.td_of[entry["name"]]  # an alias (Strength) sets its parameter
        self.values[name] = value
        self.par_updates.pop(name, None)
        if name == "Endpoint":
            self.connect()
        elif name == "Engine" and self.stream is not None:
            self.size = None  # reopen with the new engine at the next frame
        elif entry is not None:
            key = entry["name"]
            try:
                if self._value_of(entry) == self.accepted.get(key) and \
                        key not in self.refused and key not in self._in_flight():
                    return  # what the daemon has already (a value written back, a rebuild)
            except (TypeError, ValueError):
                pass
            if self._stream_open():
                self._send_changes([key])
            else:
                self._dirty.add(key)

    def pulse(self, name: str) -> None:
        if name == "Connect":
            self.connect()
        elif name == "Disconnect":
            self.disconnect()
        elif name == "Reset" and self._stream_open():
            self._send_params({"reset": True}, what="Reset")
        elif name == "Refresh":
            self.refresh_presets()
        elif name == "Recall":
            self.recall()
        elif name == "Save":
            self.save_preset()

    def take_par_updates(self) -> dict[str, Any]:
        out, self.par_updates = self.par_updates, {}
        return out

    # --- status readouts ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        self._sends = [t for t in self._sends if now - t < 1.0]
        self._outs = [t for t in self._outs if now - t < 1.0]
        if self.client is None:
            state = "disconnected"
        elif not self.client.connected:
            state = f"no daemon at {self.values['Endpoint']} (retrying)"
        elif getattr(self.client, "daemon_busy", False):
            state = "daemon busy (compiling for a new size?)"
        elif self.stream is None or self.stream.state != "open":
            state = f"opening {self.engine}"
        else:
            state = f"streaming {self.engine} {self.size[0]}x{self.size[1]}"
        stats = self.stream.stats() if self.stream is not None else {}
        drops = (stats.get("not_sent", 0) + stats.get("skipped", 0) + stats.get("torn", 0))
        return {"State": state, "Fpsin": float(len(self._sends)),
                "Fpsout": float(len(self._outs)),
                "Latency": float(stats.get("latency_p50_ms", 0.0)), "Drops": int(drops),
                "Lasterror": self.last_error}


_BRIDGES: dict[str, TDBridge] = {}


def bridge_for(comp_path: str, values: dict[str, Any] | None = None) -> TDBridge:
    """One bridge per component instance (TD can hold several)."""
    bridge = _BRIDGES.get(comp_path)
    if bridge is None:
        bridge = _BRIDGES[comp_path] = TDBridge(values)
    return bridge


# --- TD glue: building parameters on the COMP (Page / Par classes of TD's Python API) -------

def _page(comp, name: str):
    """The COMP's custom page of that name (appendCustomPage makes a second page of a name
    that exists, so look first)."""
    for page in comp.customPages:
        if page.name == name:
            return page
    return comp.appendCustomPage(name)


def _append(page, style: str, name: str, label: str):
    return getattr(page, "append" + style)(name, label=label)[0]


def _set_attrs(par, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(par, key, value)


_KIND_STYLES = {"str": "Str", "status": None, "int": "Int", "float": "Float",
                "toggle": "Toggle", "menu": "Menu", "pulse": "Pulse"}


def build_fixed_pages(comp) -> None:
    """The Daemon, Stream, Presets and Status pages, and an empty Generation page that the
    component fills from the engine's schema once connected (the build script calls this)."""
    for page_name in PAGE_ORDER:
        page = _page(comp, page_name)
        for name, kind, default, label, attrs in PAGES.get(page_name, ()):
            style = _KIND_STYLES[kind]
            if style is None:  # a read-only readout: Str, Int or Float by its default
                style = "Str" if isinstance(default, str) else \
                    "Int" if isinstance(default, int) else "Float"
            par = _append(page, style, name, label)
            _set_attrs(par, attrs)
            if kind not in ("pulse", "menu"):  # a menu's items come from the daemon
                par.default = default
                par.val = default
            if kind == "status":
                par.readOnly = True
    comp.sortCustomPages(*PAGE_ORDER)


def sync_engine_page(comp, specs: list[dict[str, Any]]) -> None:
    """Make the Generation page hold exactly these parameters (``engine_page``), in place:
    a parameter that exists with the same style keeps its value and mode (a CHOP export, an
    expression); new ones get their value; others are destroyed."""
    page = _page(comp, ENGINE_PAGE)
    wanted = {s["name"]: s for s in specs}
    for par in list(page.pars):
        spec = wanted.get(par.name)
        if spec is None or par.style != spec["style"]:
            par.destroy()
    existing = {par.name: par for par in page.pars}
    for spec in specs:
        par = existing.get(spec["name"])
        fresh = par is None
        if fresh:
            par = _append(page, spec["style"], spec["name"], spec["label"])
        else:
            par.label = spec["label"]
        _set_attrs(par, spec["attrs"])
        par.default = spec["default"]
        par.help = spec["help"]
        if fresh:
            par.val = spec["value"]
    if specs:
        page.sort(*[s["name"] for s in specs])
    comp.sortCustomPages(*PAGE_ORDER)


def _write_back(comp, name: str, value: Any) -> None:
    """Show a value the daemon set; a parameter driven by an export or expression is left to
    its driver (setting ``val`` would put it back in constant mode)."""
    par = getattr(comp.par, name, None)
    if par is None:
        return
    if "CONSTANT" not in str(getattr(par, "mode", "CONSTANT")).upper():
        return
    par.val = value


# --- what the one-line DAT shims call (TD objects come in as arguments, duck-typed) --------

def _bridge(comp) -> TDBridge:
    return bridge_for(comp.path, {p.name: p.eval() for p in comp.customPars})


def on_frame_start(comp) -> None:
    """Execute DAT onFrameStart: send the input, force the Script TOP to cook, update the
    status readouts, (re)build the engine page, show what the daemon set."""
    bridge = _bridge(comp)
    bridge.frame_start(comp.op("resolution1"))
    comp.op("script1").cook(force=True)
    for name, value in bridge.status().items():
        setattr(comp.par, name, value)
    if bridge.page_built != bridge.page_version:
        sync_engine_page(comp, engine_page(bridge.schema, bridge.values))
        bridge.page_built = bridge.page_version
    if bridge.menu_shown != bridge.presets_version:
        names, labels = bridge.preset_menu()
        menu = getattr(comp.par, "Preset", None)
        if menu is not None:
            menu.menuNames, menu.menuLabels = names, labels
        bridge.menu_shown = bridge.presets_version
    for name, value in bridge.take_par_updates().items():
        _write_back(comp, name, value)


def on_cook(comp, script_op) -> None:
    _bridge(comp).cook(script_op)


def on_value_change(comp, par) -> None:
    _bridge(comp).par_change(par.name, par.eval())


def on_pulse(comp, par) -> None:
    _bridge(comp).pulse(par.name)
