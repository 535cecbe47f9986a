"""The TouchDesigner component's logic, in plain Python (it imports no TD module).

TD calls three shims (``callbacks/``), each one line:
* Execute DAT ``onFrameStart``   -> ``bridge.frame_start(op('in1'))``, then force the Script TOP
  to cook;
* Script TOP ``onCook``          -> ``bridge.cook(scriptOp)``;
* Parameter Execute DAT          -> ``bridge.par_change(name, value)`` / ``bridge.pulse(name)``.

Nothing here blocks TD's main thread: the client polls with timeout 0, connects and opens its
stream without waiting, and reconnects by itself.  Input pixels are read with
``numpyArray(delayed=True)`` (float32 RGBA, row 0 at the bottom; the first call returns None)
and copied raw into the stream's ring: the daemon converts on its side.  The output comes back
as RGBA uint8, bottom row first, ready for ``copyNumpyArray``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from livediffusion.shared import Client

#: the component's custom parameters: page -> [(name, kind, default, label)]; the build script
#: creates them and ``par_change`` understands them
PAGES: dict[str, list[tuple[str, str, Any, str]]] = {
    "Daemon": [
        ("Endpoint", "str", "tcp://127.0.0.1:5570", "Daemon endpoint"),
        ("Engine", "str", "auto", "Engine"),
        ("Active", "toggle", True, "Active"),
        ("Connect", "pulse", None, "Connect"),
        ("Disconnect", "pulse", None, "Disconnect"),
    ],
    "Generation": [
        ("Prompt", "str", "a painting in vivid colours", "Prompt"),
        ("Negativeprompt", "str", "", "Negative prompt"),
        ("Prompts", "str", "", "Weighted prompts (text:weight; ...)"),
        ("Seed", "int", 2, "Seed"),
        ("Strength", "float", 0.5, "Strength"),
        ("Steps", "int", 2, "Steps"),
        ("Guidance", "float", 1.2, "Guidance"),
    ],
    "Stream": [
        ("Width", "int", 512, "Width"),
        ("Height", "int", 512, "Height"),
        ("Reset", "pulse", None, "Reset"),
    ],
    "Status": [
        ("State", "status", "", "State"),
        ("Fpsin", "status", 0.0, "FPS in"),
        ("Fpsout", "status", 0.0, "FPS out"),
        ("Latency", "status", 0.0, "Latency ms"),
        ("Drops", "status", 0, "Drops"),
        ("Lasterror", "status", "", "Last error"),
    ],
}

#: TD parameter -> engine parameter candidates (the first the engine knows is used)
ENGINE_PARAMS = {"Prompt": ("prompt",), "Negativeprompt": ("negative_prompt",),
                 "Prompts": ("prompts",), "Seed": ("seed",),
                 "Strength": ("strength", "noise_scale"), "Steps": ("steps",),
                 "Guidance": ("guidance",)}


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


class TDBridge:
    def __init__(self, values: dict[str, Any] | None = None, client_factory=Client,
                 clock=time.monotonic) -> None:
        self.values = {name: default for page in PAGES.values()
                       for name, kind, default, _ in page if kind != "pulse"}
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

    def _engine_caps(self) -> dict[str, Any]:
        return self.client.capabilities.get("engines", {}).get(self.engine, {})

    def _engine_params(self) -> dict[str, Any]:
        known = self._engine_caps().get("params", {})
        out = {}
        for td_name, candidates in ENGINE_PARAMS.items():
            value = self.values.get(td_name)
            if td_name == "Prompts":
                value = parse_prompts(value or "")
                if not value:
                    continue
            for key in candidates:
                if key in known:
                    out[key] = value
                    break
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
        self.stream = self.client.open_stream(
            "touchdesigner", width, height, format="rgba", dtype="float32", origin="bottom",
            output={"format": "rgba", "dtype": "uint8", "origin": "bottom"},
            engine=self.engine, params=self._engine_params(), timeout=0)
        self.size = (width, height)

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
        if self.stream is None or self.stream.state != "open":
            return
        if pixels.shape[2] == 4 and pixels.dtype == np.float32:
            frame = pixels
        else:  # a TOP of fewer channels: pad to RGBA float
            frame = np.zeros((h, w, 4), np.float32)
            frame[..., :pixels.shape[2]] = pixels
            frame[..., 3] = 1.0
        if self.stream.send(frame):
            self._sends.append(self.clock())
        self.client.poll(0)
        out = self.stream.new_frame()
        if out is not None:
            self._out = np.ascontiguousarray(out.pixels)
            self._outs.append(self.clock())
        if self.stream.last_error is not None:
            self.last_error = str(self.stream.last_error)

    def cook(self, script_op) -> None:
        """Script TOP onCook: the newest output (or, until there is one, the input)."""
        frame = self._out if self._out is not None else self._last_input
        if frame is not None:
            script_op.copyNumpyArray(frame)

    def par_change(self, name: str, value: Any) -> None:
        """Parameter Execute DAT onValueChange: live, non-blocking."""
        self.values[name] = value
        if name == "Endpoint":
            self.connect()
        elif name == "Engine" and self.stream is not None:
            self.size = None  # reopen with the new engine at the next frame
        elif name in ENGINE_PARAMS and self.stream is not None and self.stream.state == "open":
            params = self._engine_params()
            key = next((k for k in ENGINE_PARAMS[name] if k in params), None)
            if key is not None:
                self.stream.update({key: params[key]})

    def pulse(self, name: str) -> None:
        if name == "Connect":
            self.connect()
        elif name == "Disconnect":
            self.disconnect()
        elif name == "Reset" and self.stream is not None:
            self.stream.update(reset=True)

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
                "Lasterror": self.last_error or (str(self.client.last_error)
                                                 if self.client and self.client.last_error
                                                 else "")}


_BRIDGES: dict[str, TDBridge] = {}


def bridge_for(comp_path: str, values: dict[str, Any] | None = None) -> TDBridge:
    """One bridge per component instance (TD can hold several)."""
    bridge = _BRIDGES.get(comp_path)
    if bridge is None:
        bridge = _BRIDGES[comp_path] = TDBridge(values)
    return bridge


# --- what the one-line DAT shims call (TD objects come in as arguments, duck-typed) --------

def _bridge(comp) -> TDBridge:
    return bridge_for(comp.path, {p.name: p.eval() for p in comp.customPars})


def on_frame_start(comp) -> None:
    """Execute DAT onFrameStart: send the input, force the Script TOP to cook, update the
    status readouts."""
    bridge = _bridge(comp)
    bridge.frame_start(comp.op("resolution1"))
    comp.op("script1").cook(force=True)
    for name, value in bridge.status().items():
        setattr(comp.par, name, value)


def on_cook(comp, script_op) -> None:
    _bridge(comp).cook(script_op)


def on_value_change(comp, par) -> None:
    _bridge(comp).par_change(par.name, par.eval())


def on_pulse(comp, par) -> None:
    _bridge(comp).pulse(par.name)
