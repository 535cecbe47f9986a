"""The TouchDesigner component's logic with small fakes of the TD objects it touches, against
a real daemon over the real transport."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.plugins.touchdesigner.livediffusion_td import (PAGES, TDBridge,
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


def test_parameter_pages_and_prompt_lists():
    names = [n for page in PAGES.values() for n, *_ in page]
    assert len(names) == len(set(names)) and all(n[0].isupper() and n[1:].islower()
                                                 for n in names)  # TD's naming rule
    assert set(PAGES) == {"Daemon", "Generation", "Stream", "Status"}
    assert parse_prompts("a:1; b : 0.5 ;c") == [["a", 1.0], ["b", 0.5], ["c", 1.0]]
    assert parse_prompts("") == []


class FakePar:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def eval(self):
        return self.value


class FakeComp:
    """The few things the shims touch: path, customPars, op(name), par.<Name> = value."""

    def __init__(self, values, top):
        self.path = f"/project1/livediffusion{id(self)}"
        self.customPars = [FakePar(k, v) for k, v in values.items()]
        self.top, self.script = top, FakeScriptTOP()
        self.script.cooked = 0
        self.script.cook = lambda force=False: setattr(self.script, "cooked",
                                                       self.script.cooked + 1)
        self.par = type("Pars", (), {})()

    def op(self, name):
        return {"resolution1": self.top, "script1": self.script}[name]


def test_the_one_line_shims_drive_the_component(daemon):
    import ast
    from pathlib import Path

    from livediffusion.plugins.touchdesigner import livediffusion_td as ld

    comp = FakeComp({"Endpoint": daemon.endpoint, "Engine": "passthrough"}, FakeTOP(32, 32))
    try:
        for _ in range(60):
            ld.on_frame_start(comp)
            ld.on_cook(comp, comp.script)
            time.sleep(1 / 60)
        assert comp.script.cooked == 60 and comp.script.copied[-1].dtype == np.uint8
        assert comp.par.State == "streaming passthrough 32x32" and comp.par.Fpsout > 0
        ld.on_value_change(comp, FakePar("Seed", 5))
        ld.on_pulse(comp, FakePar("Reset", None))
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
