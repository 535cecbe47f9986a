"""The TouchDesigner component's logic with small fakes of the TD objects it touches, against
a real daemon over the real transport."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client
from livediffusion.plugins.touchdesigner import livediffusion_td as ld
from livediffusion.plugins.touchdesigner.livediffusion_td import (PAGES, TD_NAME, TDBridge,
                                                                  parse_prompts)


class FakeTOP:
    """numpyArray(delayed=True) as TD does it: float32 RGBA, row 0 at the BOTTOM, and the
    previous call's download (None on the first call)."""

    def __init__(self, width: int, height: int) -> None:
        image = np.zeros((height, width, 4), np.float32)  # top-first, as a person sees it
        image[...] = (0.1, 0.2, 0.8, 1.0)
        image[: height // 4] = (1.0, 1.0, 1.0, 1.0)         # white band at the top
        self.bottom_up = image[::-1].copy()
        self.pending = None
        self.calls = 0

    def numpyArray(self, delayed=False):
        self.calls += 1
        assert delayed, "the component must never stall TD with a synchronous download"
        previous, self.pending = self.pending, self.bottom_up.copy()
        return previous


class FakeScriptTOP:
    def __init__(self) -> None:
        self.copied = []

    def copyNumpyArray(self, arr):
        assert arr.ndim == 3 and 1 <= arr.shape[2] <= 4
        assert arr.dtype in (np.uint8, np.uint16, np.float32)
        assert arr.flags["C_CONTIGUOUS"]
        self.copied.append(arr.copy())


def frames(bridge, top, script, seconds: float, fps: float = 60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        bridge.frame_start(top)
        bridge.cook(script)
        time.sleep(1 / fps)


@pytest.fixture()
def daemon():
    d = Daemon(port=0, engines=("passthrough", "video-tiny")).start()
    yield d
    d.stop()


def test_input_top_to_script_top_through_the_daemon(daemon):
    bridge = TDBridge({"Endpoint": daemon.endpoint, "Engine": "passthrough"})
    top, script = FakeTOP(64, 48), FakeScriptTOP()
    bridge.frame_start(top)          # the first delayed download is None: nothing happens
    assert bridge.client is None and not script.copied
    frames(bridge, top, script, 1.5)
    bridge.stream.update(mode="invert", wait=5)
    frames(bridge, top, script, 0.8)
    try:
        out = script.copied[-1]
        assert out.shape == (48, 64, 4) and out.dtype == np.uint8
        top_rows, body = out[-4:], out[10]            # bottom-up: the image's top is last
        assert top_rows[..., :3].max() <= 2           # white band, inverted, still on top
        assert np.abs(body[20].astype(int) - (230, 204, 51, 255)).max() <= 2
        status = bridge.status()
        assert status["State"] == "streaming passthrough 64x48"
        assert status["Fpsout"] > 5 and status["Lasterror"] == ""
    finally:
        bridge.disconnect()


def test_a_missing_daemon_never_blocks_and_shows_a_status():
    bridge = TDBridge({"Endpoint": "tcp://127.0.0.1:1"})
    top, script = FakeTOP(32, 32), FakeScriptTOP()
    started = time.monotonic()
    for _ in range(20):
        t0 = time.monotonic()
        bridge.frame_start(top)
        bridge.cook(script)
        assert time.monotonic() - t0 < 0.05     # one TD frame's worth, at most
    assert "no daemon at tcp://127.0.0.1:1" in bridge.status()["State"]
    assert script.copied and script.copied[-1].dtype == np.float32  # the input, meanwhile
    assert time.monotonic() - started < 1.0
    bridge.disconnect()


def test_the_component_finds_a_daemon_that_starts_later():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge = TDBridge({"Endpoint": f"tcp://127.0.0.1:{port}", "Engine": "passthrough"})
    top, script = FakeTOP(32, 32), FakeScriptTOP()
    frames(bridge, top, script, 0.3)
    assert "no daemon" in bridge.status()["State"]
    daemon = Daemon(port=port, engines=("passthrough",)).start()
    try:
        frames(bridge, top, script, 2.5)
        assert bridge.status()["State"].startswith("streaming")
        assert script.copied[-1].dtype == np.uint8   # outputs, not the input any more
    finally:
        bridge.disconnect()
        daemon.stop()


def test_parameters_map_onto_the_engine_live(daemon):
    bridge = TDBridge({"Endpoint": daemon.endpoint, "Engine": "video-tiny", "Width": 64,
                       "Height": 48})
    top, script = FakeTOP(64, 48), FakeScriptTOP()
    try:
        frames(bridge, top, script, 1.0)
        assert bridge.stream.state == "open"
        bridge.par_change("Strength", 0.7)     # the video engine calls it noise_scale
        bridge.par_change("Guidance", 3.0)     # and has no guidance: not sent
        bridge.par_change("Prompts", "a forest:1; a city:0.5")
        bridge.par_change("Seed", 9)
        frames(bridge, top, script, 0.5)
        params = bridge.stream.update(wait=5)
        assert params["noise_scale"] == 0.7 and params["seed"] == 9
        assert params["prompts"] == [["a forest", 1.0], ["a city", 0.5]]
        assert bridge.status()["Lasterror"] == ""
        bridge.pulse("Reset")
        bridge.par_change("Active", False)
        calls = top.calls
        bridge.frame_start(top)
        assert top.calls == calls               # inactive: TD's TOP is not even read
    finally:
        bridge.disconnect()


def test_fixed_pages_and_prompt_lists():
    names = [n for page in PAGES.values() for n, *_ in page]
    assert len(names) == len(set(names)) and all(TD_NAME.match(n) for n in names)
    assert set(PAGES) == {"Daemon", "Stream", "Presets", "Status"}   # Generation: generated
    assert parse_prompts("a:1; b : 0.5 ;c") == [["a", 1.0], ["b", 0.5], ["c", 1.0]]
    assert parse_prompts("") == []


class TDPar:
    """A custom parameter as TD's Par class has it (the members the component sets), and
    what TD does with a value: clamps numbers when clampMin/clampMax are on, and queues a
    value change for the Parameter Execute DAT (scripts' changes too, as in TD)."""

    START = {"Float": 0.0, "Int": 0, "Toggle": False, "Menu": "", "Str": "", "Pulse": None}

    def __init__(self, page, name, style, label):
        self.page, self.name, self.style, self.label = page, name, style, label
        self._val = self.default = self.START[style]
        self.min = self.normMin = 0
        self.max = self.normMax = 1
        self.clampMin = self.clampMax = self.readOnly = False
        self.help = ""
        self.menuNames, self.menuLabels = [], []
        self.mode = "ParMode.CONSTANT"

    @property
    def val(self):
        return self._val

    @val.setter
    def val(self, value):
        if self.style in ("Float", "Int"):
            value = (float if self.style == "Float" else int)(value)
            if self.clampMin:
                value = max(value, self.min)
            if self.clampMax:
                value = min(value, self.max)
        if value != self._val:
            self._val = value
            self.page.comp.changed.append(self)

    def eval(self):
        return self._val

    @property
    def valid(self):
        return self in self.page._pars and self.page in self.page.comp.customPages

    def destroy(self):
        self.page._pars.remove(self)
        self.page.comp.calls.append(("destroy", self.name))


class TDPage:
    """TD's Page class: append<Style>(name, label=None, ...) returns a ParGroup (a list
    here), sort, destroy; TD's naming rule is enforced."""

    def __init__(self, comp, name):
        self.comp, self.name, self._pars = comp, name, []

    @property
    def pars(self):
        return list(self._pars)

    def _append(self, style, name, label=None, size=1, order=None, replace=True):
        assert TD_NAME.match(name), f"TD refuses the name {name!r}"
        assert size == 1 and order is None
        for page in self.comp.customPages:
            for par in page.pars:
                if par.name == name:
                    assert replace, name
                    par.destroy()      # replace=True: fresh attributes, value reset
        par = TDPar(self, name, style, label or name)
        self._pars.append(par)
        self.comp.calls.append(("append" + style, name, label))
        return [par]

    def appendFloat(self, name, label=None, size=1, order=None, replace=True):
        return self._append("Float", name, label, size, order, replace)

    def appendInt(self, name, label=None, size=1, order=None, replace=True):
        return self._append("Int", name, label, size, order, replace)

    def appendStr(self, name, label=None, order=None, replace=True):
        return self._append("Str", name, label, 1, order, replace)

    def appendToggle(self, name, label=None, order=None, replace=True):
        return self._append("Toggle", name, label, 1, order, replace)

    def appendMenu(self, name, label=None, order=None, replace=True):
        return self._append("Menu", name, label, 1, order, replace)

    def appendPulse(self, name, label=None, order=None, replace=True):
        return self._append("Pulse", name, label, 1, order, replace)

    def sort(self, *names):
        assert sorted(names) == sorted(p.name for p in self._pars)
        self._pars.sort(key=lambda p: names.index(p.name))

    def destroy(self):
        self.comp.customPages.remove(self)


class TDParCollection:
    """comp.par: ``comp.par.Name`` is the Par (None if missing, as getattr with a default
    reads it), ``comp.par.Name = v`` sets its value."""

    def __init__(self, comp):
        object.__setattr__(self, "_comp", comp)

    def __getattr__(self, name):
        for par in self._comp.customPars:
            if par.name == name:
                return par
        raise AttributeError(name)

    def __setattr__(self, name, value):
        getattr(self, name).val = value


class TDComp:
    """A Base COMP with custom pages (appendCustomPage makes a page even when one of that
    name exists, as TD does), customPars, par, op(name), and every call recorded."""

    def __init__(self, top, **values):
        self.path = f"/project1/livediffusion{id(self)}"
        self.customPages, self.calls, self.changed = [], [], []
        self.par = TDParCollection(self)
        self.top, self.script = top, FakeScriptTOP()
        self.script.cooked = 0
        self.script.cook = lambda force=False: setattr(self.script, "cooked",
                                                       self.script.cooked + 1)
        ld.build_fixed_pages(self)
        for name, value in values.items():
            setattr(self.par, name, value)
        self.changed.clear()   # the values it was saved with, before any callback ran

    def appendCustomPage(self, name):
        page = TDPage(self, name)
        self.customPages.append(page)
        self.calls.append(("appendCustomPage", name))
        return page

    def sortCustomPages(self, *names):
        self.customPages.sort(key=lambda p: names.index(p.name))

    @property
    def customPars(self):
        return [par for page in self.customPages for par in page.pars]

    def page(self, name):
        (page,) = [p for p in self.customPages if p.name == name]
        return page

    def op(self, name):
        return {"resolution1": self.top, "script1": self.script}[name]

    def td_frames(self, seconds, fps=60.0):
        """TD's frame loop: Execute DAT, Script TOP, then the Parameter Execute DAT for
        every value that changed (by the user or by the component itself)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ld.on_frame_start(self)
            ld.on_cook(self, self.script)
            changed, self.changed = self.changed, []
            for par in changed:
                if par.valid:
                    ld.on_value_change(self, par)
            time.sleep(1 / fps)


def test_the_one_line_shims_drive_the_component(daemon):
    import ast
    from pathlib import Path

    comp = TDComp(FakeTOP(32, 32), Endpoint=daemon.endpoint, Engine="passthrough")
    try:
        for _ in range(60):
            ld.on_frame_start(comp)
            ld.on_cook(comp, comp.script)
            time.sleep(1 / 60)
        assert comp.script.cooked == 60 and comp.script.copied[-1].dtype == np.uint8
        assert comp.par.State.eval() == "streaming passthrough 32x32"
        assert comp.par.Fpsout.eval() > 0
        schema = ld._BRIDGES[comp.path].client.capabilities["engines"]["passthrough"]["schema"]
        assert [p.name for p in comp.page("Generation").pars] == \
            [ld.td_name(e["name"]) for e in schema] and schema[0]["name"] == "mode"
        ld.on_value_change(comp, comp.par.Mode)   # the page made from passthrough's schema
        ld.on_pulse(comp, comp.par.Reset)
    finally:
        ld._BRIDGES.pop(comp.path).disconnect()
    # every shim function is one statement calling this module
    folder = Path(ld.__file__).parent / "callbacks"
    for path in folder.glob("*.py"):
        for fn in [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]:
            assert len(fn.body) == 1, (path.name, fn.name)
            call = fn.body[0].value
            assert call.func.value.id == "ld" and hasattr(ld, call.func.attr)


def test_the_td_folder_is_self_contained(tmp_path):
    """What `livediffusion touchdesigner install` copies runs with only pyzmq, msgpack and
    numpy: no torch, no daemon (TD's Python has none of them)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "touchdesigner",
                             "install", str(tmp_path / "td"), "--no-pip"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Python 64-bit Module Path" in result.stdout
    folder = tmp_path / "td" / "livediffusion"
    assert (folder / "plugins" / "touchdesigner" / "build_component.py").exists()
    assert (folder / "plugins" / "touchdesigner" / "callbacks" / "frame_execute.py").exists()
    probe = ("import sys; sys.modules['torch'] = None; "
             "from livediffusion.plugins.touchdesigner import livediffusion_td as ld; "
             "import livediffusion.shared.client as c; "
             "print(ld.__file__, c.__file__)")
    run = subprocess.run([sys.executable, "-I", "-c",
                          f"import sys; sys.path.insert(0, {str(tmp_path / 'td')!r}); " + probe],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert str(tmp_path / "td") in run.stdout.split()[0]


# --- issue 16: the engine page from the schema, presets ---------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A daemon with three engines of different schemas, and a presets file of its own."""
    d = Daemon(port=0, engines=("passthrough", "image-tiny", "video-tiny"),
               presets_path=tmp_path_factory.mktemp("td") / "presets.json").start(timeout=120)
    yield d
    d.stop()


class RecordingClient(Client):
    """The real client, keeping what it sends to the daemon."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def _send(self, msg, payload=None):
        if msg.get("type") in ("params", "presets", "open"):
            self.sent.append(dict(msg))
        return super()._send(msg, payload)

    def params_sent(self):
        return [m for m in self.sent if m["type"] == "params"]


def td_comp(daemon, engine, top=None, **values):
    comp = TDComp(top or FakeTOP(64, 48), Endpoint=daemon.endpoint, Engine=engine, **values)
    ld._BRIDGES[comp.path] = TDBridge({p.name: p.eval() for p in comp.customPars},
                                      client_factory=RecordingClient)
    return comp, ld._BRIDGES[comp.path]


def until(comp, pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        comp.td_frames(0.05)
        if pred():
            return True
    return pred()


def daemon_params(daemon, name="touchdesigner"):
    """The stream's effective parameters as any controller sees them (streams message)."""
    with Client(daemon.endpoint, name="observer") as ctl:
        (stream,) = [s for s in ctl.streams() if s["name"] == name]
        return stream["engine"], stream["params"]


def streaming(bridge):
    return bridge.status()["State"].startswith("streaming")


def test_the_generation_page_is_made_from_the_engines_schema(live):
    comp, bridge = td_comp(live, "image-tiny")
    try:
        # before the engine is known there is no engine parameter (a fixed page only)
        assert comp.page("Generation").pars == []
        assert until(comp, lambda: streaming(bridge))
        schema = bridge.client.capabilities["engines"]["image-tiny"]["schema"]
        page = comp.page("Generation")
        assert [p.name for p in comp.customPages] == list(ld.PAGE_ORDER)
        assert [p.name for p in page.pars] == [ld.td_name(e["name"]) for e in schema]
        styles = {"float": "Float", "int": "Int", "bool": "Toggle", "choice": "Menu"}
        for entry, par in zip(schema, page.pars):
            assert par.style == styles.get(entry["kind"], "Str"), entry
            assert par.help.startswith(entry["description"])
            if entry["kind"] in ("float", "int"):
                # MIDI: a CHOP export maps 0..1 over normMin..normMax, inside the range
                assert par.normMin < par.normMax <= par.max and par.normMin >= par.min
                assert par.normMax - par.normMin <= 100_000 and par.clampMin and par.clampMax
            if entry["kind"] == "choice":
                assert par.menuNames == entry["choices"] and par.val == entry["default"]
        pars = {p.name: p for p in page.pars}
        assert (pars["Strength"].min, pars["Strength"].max, pars["Strength"].normMin,
                pars["Strength"].normMax) == (0.0, 1.0, 0.0, 1.0)
        assert (pars["Steps"].min, pars["Steps"].max, pars["Steps"].val) == (1, 4, 1)
        assert pars["Seed"].max == 2**31 - 1 and (pars["Seed"].normMin,
                                                  pars["Seed"].normMax) == (0, 1000)
        assert pars["Maxskip"].label == "Max skip (frames)"
        assert pars["Similarityfilter"].val is False and pars["Prompts"].val == ""
        assert pars["Negativeprompt"].label == "Negative prompt"

        # the user's values; then another engine: the page follows, values stay where the
        # parameter still exists (the same Par, so an export on it would stay too)
        comp.par.Prompt = "a harbour at night"
        comp.par.Strength = 0.7
        prompt_par = comp.par.Prompt
        assert until(comp, lambda: daemon_params(live)[1]["prompt"] == "a harbour at night")
        comp.par.Engine = "video-tiny"
        assert until(comp, lambda: streaming(bridge) and bridge.engine == "video-tiny", 40)
        comp.td_frames(0.1)
        video = bridge.client.capabilities["engines"]["video-tiny"]["schema"]
        assert [p.name for p in page.pars] == [ld.td_name(e["name"]) for e in video]
        assert comp.par.Prompt is prompt_par and prompt_par.val == "a harbour at night"
        assert getattr(comp.par, "Cfg", None) is None                 # image-only: gone
        assert comp.par.Noisescale.val == 0.7      # carried by its alias, strength
        assert comp.par.Cacheframes.label == "Cache frames (latent frames)"
        engine, params = daemon_params(live)
        assert engine == "video-tiny" and params["prompt"] == "a harbour at night"
        assert params["noise_scale"] == 0.7
        comp.par.Engine = "passthrough"
        assert until(comp, lambda: streaming(bridge) and bridge.engine == "passthrough")
        comp.td_frames(0.1)
        assert [p.name for p in page.pars][0] == "Mode" and comp.par.Mode.menuNames == \
            ["identity", "invert"]
        assert getattr(comp.par, "Prompt", None) is None
        assert bridge.status()["Lasterror"] == ""
    finally:
        ld._BRIDGES.pop(comp.path).disconnect()


def test_td_names_map_back_to_the_schema(live):
    with Client(live.endpoint, name="probe") as client:
        engines = client.capabilities["engines"]
    for engine, caps in engines.items():
        schema = caps["schema"]
        names = ld.td_names(schema)
        assert len(set(names.values())) == len(schema)
        assert all(TD_NAME.match(n) and n not in ld.FIXED_NAMES for n in names.values())
        bridge = TDBridge()
        bridge.adopt_schema(schema)
        for entry in schema:    # round trip: TD name -> the schema entry
            assert bridge.by_td[bridge.td_of[entry["name"]]]["name"] == entry["name"]
    assert ld.td_names([{"name": "noise_scale"}, {"name": "noisescale"}, {"name": "2d"},
                        {"name": "state"}, {"name": "x-y"}]) == \
        {"noise_scale": "Noisescale", "noisescale": "Noisescale2", "2d": "P2d",
         "state": "State2", "x-y": "Xy"}   # distinct, and never a fixed parameter (State)


def test_values_convert_to_the_schema_kinds():
    conv = ld.to_daemon
    assert conv({"kind": "float"}, 1) == 1.0 and isinstance(conv({"kind": "float"}, 1), float)
    assert conv({"kind": "int"}, 3.0) == 3 and isinstance(conv({"kind": "int"}, 3.0), int)
    assert conv({"kind": "bool"}, 1) is True and conv({"kind": "bool"}, 0) is False
    assert conv({"kind": "choice"}, "slerp") == "slerp"
    assert conv({"kind": "prompts"}, "a forest:1; a city:0.5") == [["a forest", 1.0],
                                                                   ["a city", 0.5]]
    assert conv({"kind": "seeds"}, "42; 7:0.5") == [[42, 1.0], [7, 0.5]]
    assert conv({"kind": "indices"}, "1, 5 9") == [1, 5, 9] and conv({"kind": "indices"},
                                                                     "") == []
    assert conv({"kind": "mystery"}, '{"a": 1}') == {"a": 1}     # opaque: JSON, or as typed
    assert conv({"kind": "mystery"}, "as typed") == "as typed"
    for kind, text in (("seeds", "x:1"), ("indices", "1, two")):
        with pytest.raises(ValueError):
            conv({"kind": kind}, text)
    # and back, as TD shows them: each round-trips
    for entry, value in (({"kind": "prompts"}, [["time: 10pm", 1.0], ["b", 0.25]]),
                         ({"kind": "seeds"}, [[42, 1.0], [7, 0.5]]),
                         ({"kind": "indices"}, [10, 30, 45]), ({"kind": "float"}, 0.7),
                         ({"kind": "int"}, 3), ({"kind": "bool"}, True),
                         ({"kind": "text"}, "a: b; c")):
        if entry["kind"] != "text":
            assert conv(entry, ld.to_td(entry, value)) == value, (entry, value)
    assert ld.to_td({"kind": "indices"}, [1, 5, 9]) == "1, 5, 9"
    assert ld.to_td({"kind": "int"}, 2**63 - 1) == 2**31 - 1      # TD's int parameters


def test_a_change_sends_that_parameter_alone_and_a_refusal_shows(live):
    comp, bridge = td_comp(live, "image-tiny")
    try:
        assert until(comp, lambda: streaming(bridge))
        client = bridge.client
        client.sent.clear()
        comp.par.Steps = 3
        comp.par.Strength = 5.0            # TD clamps it to the schema's hi
        comp.par.Tindexlist = "10, 30, 45"
        assert until(comp, lambda: daemon_params(live)[1]["t_index_list"] == [10, 30, 45])
        assert [m["params"] for m in client.params_sent()] == \
            [{"steps": 3}, {"strength": 1.0}, {"t_index_list": [10, 30, 45]}]
        _, params = daemon_params(live)
        assert params["steps"] == 3 and params["strength"] == 1.0
        # values the component writes itself or that the daemon has are not sent again
        comp.td_frames(0.3)
        assert len(client.params_sent()) == 3
        # refused by the daemon: shown, the stream goes on, the old value stays in force
        comp.par.Prompt = "x" * 2001
        assert until(comp, lambda: bridge.status()["Lasterror"].startswith("Prompt: "))
        assert "2000" in bridge.status()["Lasterror"]
        frames_before = len(comp.script.copied)
        comp.td_frames(0.5)
        assert streaming(bridge) and len(comp.script.copied) > frames_before
        assert daemon_params(live)[1]["prompt"] == "a painting in vivid colours"
        # a text that does not parse is not sent at all
        sent = len(client.params_sent())
        comp.par.Seeds = "forty-two"
        comp.td_frames(0.2)
        assert bridge.status()["Lasterror"].startswith("Seeds: ")
        assert len(client.params_sent()) == sent
        # an accepted change clears the error
        comp.par.Seeds = "42:1; 7:0.5"
        assert until(comp, lambda: bridge.status()["Lasterror"] == "")
        assert daemon_params(live)[1]["seeds"] == [[42, 1.0], [7, 0.5]]
        # a reopen (a new input size) sends the accepted values, not the refused prompt
        comp.top = FakeTOP(48, 32)
        assert until(comp, lambda: bridge.status()["State"] == "streaming image-tiny 48x32")
        opened = [m for m in client.sent if m["type"] == "open"][-1]["params"]
        assert "prompt" not in opened and opened["steps"] == 3
        _, params = daemon_params(live)
        assert params["steps"] == 3 and params["seeds"] == [[42, 1.0], [7, 0.5]]
        assert bridge.status()["Lasterror"] == ""
    finally:
        ld._BRIDGES.pop(comp.path).disconnect()


def presets(daemon, *args, **kwargs):
    with Client(daemon.endpoint, name="ctl") as ctl:
        return ctl.presets(*args, **kwargs)


def test_presets_refresh_recall_with_a_transition_and_save(live):
    if True:
        presets(live, "save", "forest", params={"prompt": "a forest", "steps": 3})
        comp, bridge = td_comp(live, "image-tiny")
        try:
            assert until(comp, lambda: streaming(bridge) and "forest" in
                         comp.par.Preset.menuNames)     # filled once connected
            assert comp.par.Preset.val == "forest"
            presets(live, "save", "city", params={"prompt": "a city", "guidance": 2.0})
            comp.td_frames(0.2)
            assert "city" not in comp.par.Preset.menuNames   # until Refresh
            ld.on_pulse(comp, comp.par.Refresh)
            assert until(comp, lambda: "city" in comp.par.Preset.menuNames)

            bridge.client.sent.clear()
            comp.par.Transition = 1.0
            comp.par.Preset = "forest"
            comp.td_frames(0.1)
            ld.on_pulse(comp, comp.par.Recall)
            assert until(comp, lambda: comp.par.Prompt.val == "a forest")
            (recall,) = bridge.client.params_sent()
            assert recall == {"type": "params", "stream": bridge.stream.id, "params": {},
                              "preset": "forest", "transition": {"seconds": 1.0},
                              "id": recall["id"]}
            assert comp.par.Steps.val == 3        # the recalled values are shown in TD
            comp.td_frames(0.3)
            assert len(bridge.client.params_sent()) == 1    # and not echoed back
            # the daemon gets there over the transition (params_ok answered with its target)
            assert until(comp, lambda: daemon_params(live)[1]["steps"] == 3, 10)
            assert daemon_params(live)[1]["prompt"] == "a forest"

            # a parameter driven by an export keeps its driver
            comp.par.Guidance.mode = "ParMode.EXPORT"
            comp.par.Transition = 0.0
            comp.par.Preset = "city"
            comp.td_frames(0.1)
            ld.on_pulse(comp, comp.par.Recall)
            assert until(comp, lambda: comp.par.Prompt.val == "a city")
            assert comp.par.Guidance.val == 1.0 and daemon_params(live)[1]["guidance"] == 2.0

            # save the stream's current parameters under a name
            comp.par.Steps = 2
            comp.par.Presetname = "mine"
            comp.td_frames(0.2)
            ld.on_pulse(comp, comp.par.Save)
            assert until(comp, lambda: "mine" in comp.par.Preset.menuNames)
            assert comp.par.Preset.val == "mine"
            saved = presets(live)["mine"]
            assert saved["engine"] == "image-tiny"
            assert saved["params"]["prompt"] == "a city" and saved["params"]["steps"] == 2
            assert "mine (image-tiny)" in comp.par.Preset.menuLabels

            # a recall the daemon refuses: shown, the stream goes on
            presets(live, "delete", "forest")
            comp.par.Preset = "forest"
            comp.td_frames(0.1)
            ld.on_pulse(comp, comp.par.Recall)
            assert until(comp, lambda: "no preset is named" in bridge.status()["Lasterror"])
            assert bridge.status()["Lasterror"].startswith("Recall forest: ")
            comp.td_frames(0.3)
            assert streaming(bridge) and daemon_params(live)[1]["prompt"] == "a city"
        finally:
            ld._BRIDGES.pop(comp.path).disconnect()
