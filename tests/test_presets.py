"""Named presets (daemon/presets.py): kept in a versioned file, saved from streams, recalled
through the protocol, the CLI and OSC; a corrupt or old file costs nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from livediffusion.daemon.presets import PresetError, PresetStore
from livediffusion.daemon.server import Daemon
from livediffusion.shared import Client
from livediffusion.shared.client import DaemonError


def test_a_store_saves_lists_recalls_and_deletes_across_restarts(tmp_path):
    path = tmp_path / "cfg" / "presets.json"
    store = PresetStore(path)
    store.save("night", {"prompt": "a city at night", "seed": 3})
    store.save("calm", {"noise_scale": 0.3})
    again = PresetStore(path)          # a daemon started later sees them
    assert list(again.list()) == ["calm", "night"]
    assert again.get("night") == {"prompt": "a city at night", "seed": 3}
    again.delete("calm")
    assert list(PresetStore(path).list()) == ["night"]
    assert not list(path.parent.glob("*.tmp"))   # written whole, renamed into place
    for bad in ("", "a/b", "x" * 65, "tab\there", "  ", 3):
        with pytest.raises(PresetError):
            store.save(bad, {"seed": 1})
    with pytest.raises(PresetError, match="one or more"):
        store.save("empty", {})
    with pytest.raises(PresetError, match="bytes"):
        store.save("huge", {"prompt": "x" * 70_000})
    with pytest.raises(PresetError, match="no preset"):
        store.get("nope")


def test_the_default_file_is_in_the_users_config_directory(monkeypatch):
    from livediffusion.daemon.presets import default_path
    from platformdirs import user_config_dir
    monkeypatch.delenv("LIVEDIFFUSION_PRESETS", raising=False)
    path = default_path()
    assert path.name == "presets.json" and path.parent == Path(user_config_dir("livediffusion"))
    monkeypatch.setenv("LIVEDIFFUSION_PRESETS", "/somewhere/else.json")
    assert default_path() == Path("/somewhere/else.json")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 0, "presets": {}}),
                                     json.dumps({"version": 1, "presets": {"a": 3}})])
def test_a_corrupt_or_old_file_is_kept_aside_and_the_daemon_starts_with_none(
        tmp_path, caplog, content):
    path = tmp_path / "presets.json"
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="livediffusion.presets"):
        store = PresetStore(path)
    assert store.list() == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot be read" in lines[0] and "kept as" in lines[0]
    aside = list(tmp_path.glob("presets.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_text() == content   # nothing lost
    store.save("fresh", {"seed": 1})   # and it works on
    assert PresetStore(path).get("fresh") == {"seed": 1}


@pytest.fixture()
def daemon(tmp_path):
    d = Daemon(port=0, engines=("passthrough", "image-tiny"),
               presets_path=tmp_path / "presets.json").start(timeout=60)
    yield d
    d.stop()


def test_presets_are_saved_from_a_stream_and_recalled_onto_any(daemon):
    with Client(daemon.endpoint, name="tool") as tool, \
            Client(daemon.endpoint, name="ctl") as ctl:
        img = tool.open_stream("img", 64, 64, engine="image-tiny", timeout=60)
        cam = tool.open_stream("cam", 64, 64, engine="passthrough")
        ctl.control("img", {"prompt": "a forest", "seed": 9, "strength": 0.6})
        saved = ctl.presets("save", "forest", source="img", params={"steps": 2})
        assert saved["forest"]["engine"] == "image-tiny"
        assert saved["forest"]["params"]["prompt"] == "a forest"
        ctl.control("img", {"prompt": "something else", "seed": 1, "steps": 1})
        # recalled: the preset's values, explicit ones winning over them
        back = ctl.control("img", {"seed": 5}, preset="forest")
        assert (back["prompt"], back["seed"], back["steps"], back["strength"]) == \
            ("a forest", 5, 2, 0.6)
        # the stream's owner recalls with params
        ctl.presets("save", "inv", params={"mode": "invert", "prompt": "only for others"})
        assert img.update(preset="inv", wait=5)["prompt"] == "only for others"
        # onto another engine: what it declares (passthrough has only mode)
        assert ctl.control("cam", preset="inv") == {"mode": "invert", "gain": 1.0}
        with pytest.raises(DaemonError, match="sets none of the parameters passthrough"):
            ctl.control("cam", preset="forest")
        with pytest.raises(DaemonError, match="no preset is named 'gone'"):
            ctl.control("cam", preset="gone")
        with pytest.raises(DaemonError, match="no open stream is named 'nobody'"):
            ctl.presets("save", "x", source="nobody")
        assert list(ctl.presets("delete", "inv")) == ["forest"]
        # params and control need one of params and preset (the protocol made params
        # optional beside preset)
        with pytest.raises(DaemonError, match="params, a preset, or both"):
            ctl._request({"type": "control", "name": "cam"}, 2.0)
        with pytest.raises(DaemonError, match="op must be list"):
            ctl._request({"type": "presets", "op": "rename"}, 2.0)
        assert cam.state == "open" and img.state == "open"   # nothing else changed


def test_the_preset_command(daemon, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "livediffusion.daemon", "preset", *args,
                               "--endpoint", daemon.endpoint], capture_output=True,
                              text=True, timeout=60)
    with Client(daemon.endpoint, name="tool") as tool:
        stream = tool.open_stream("cam", 64, 64, engine="passthrough")  # noqa: F841
        out = cli("save", "flip", "mode=invert")
        assert out.returncode == 0 and "flip: mode='invert'" in out.stdout, out.stderr
        out = cli("recall", "flip", "cam")
        assert out.returncode == 0 and "mode = 'invert'" in out.stdout, out.stderr
        out = cli("save", "plain", "--from", "cam", "--keys", "mode")
        assert out.returncode == 0 and "plain: mode='invert'" in out.stdout, out.stderr
        assert "flip" in cli("list").stdout
        out = cli("recall", "nope", "cam")
        assert out.returncode != 0 and "no preset is named 'nope'" in out.stderr
        assert cli("delete", "flip").returncode == 0
        assert "flip" not in cli("list").stdout


def test_status_prints_every_stream_of_a_running_daemon(daemon):
    from livediffusion.daemon.cli import status_rows
    with Client(daemon.endpoint, name="tool") as tool:
        stream = tool.open_stream("cam", 64, 64, engine="passthrough",  # noqa: F841
                                  params={"mode": "invert"})
        out = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "status",
                              "--once", "--endpoint", daemon.endpoint],
                             capture_output=True, text=True, timeout=60,
                             env={**__import__("os").environ, "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        assert "1 stream(s)" in out.stdout
        row = next(line for line in out.stdout.splitlines() if "cam" in line)
        assert "passthrough" in row and "invert" in row
        assert "worker passthrough on cpu: busy" in out.stdout
    # the delivered FPS is measured between polls
    streams = [{"name": "a", "engine": "e", "params": {}, "stats": {"frames_out": 10}}]
    seen: dict = {}
    status_rows(streams, seen, 100.0)
    streams[0]["stats"]["frames_out"] = 40
    assert status_rows(streams, seen, 101.0)[0][4] == "30.0"
    streams[0]["stats"].update(transition={"waiting": False, "progress": 0.25},
                               cues={"index": 1, "count": 3, "state": "paused"})
    assert status_rows(streams, seen, 102.0)[0][13] == "cue 2/3 || 25%"


def test_metrics_are_served_for_every_stream(daemon):
    """The Prometheus endpoint (daemon/metrics.py) as the daemon's --metrics runs it."""
    import socket
    import urllib.request

    from livediffusion.daemon.metrics import MetricsExporter
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = MetricsExporter(daemon.endpoint, port).start()
    try:
        with Client(daemon.endpoint, name="tool") as tool:
            stream = tool.open_stream("cam", 64, 64, engine="passthrough")
            import time

            import numpy as np
            for _ in range(3):
                stream.send(np.zeros((64, 64, 3), np.uint8))
                assert stream.wait(5.0) is not None
            for _ in range(8):   # 4 s idle between scrapes: the exporter stays connected
                time.sleep(0.5)
                tool.poll(0)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=10).read().decode()
    finally:
        exporter.stop()
    assert "livediffusion_up 1.0" in text and "livediffusion_streams 1.0" in text
    assert 'livediffusion_serve_fps{engine="passthrough",stream="cam"} 30.0' in text
    assert 'livediffusion_frames_out_total{engine="passthrough",stream="cam"} 3.0' in text
    # latency in the daemon and the worker's busy share: measured, so positive and small
    import re
    p99 = float(re.search(r'livediffusion_latency_p99_ms\{engine="passthrough",'
                          r'stream="cam"\} ([0-9.e+-]+)', text).group(1))
    assert 0 < p99 < 1000
    assert re.search(r'livediffusion_worker_busy\{device="cpu",engines="passthrough"\} ',
                     text)
    assert 'livediffusion_batch{engine="passthrough",stream="cam"} 1.0' in text
