"""The TouchDesigner component's logic with small fakes of the TD objects it touches, against
a real daemon over the real transport."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon
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
