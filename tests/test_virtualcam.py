"""The virtual webcam bridge: a fake camera source and a fake pyvirtualcam backend (registered
with pyvirtualcam.register_backend, so pyvirtualcam's own Camera checks shape and dtype),
against a real daemon over the real transport."""

from __future__ import annotations

import time

import numpy as np
import pytest

pyvirtualcam = pytest.importorskip("pyvirtualcam")

from livediffusion.daemon.server import Daemon  # noqa: E402
from livediffusion.plugins.virtualcam.bridge import (WebcamBridge, WebcamSettings,  # noqa: E402
                                                     camera_error_advice, fit)
from livediffusion.shared import Client  # noqa: E402
from helpers import engine_of  # noqa: E402


class FakeBackend:
    """What pyvirtualcam hands frames to (RGB arrives as a flat uint8 array)."""

    instances: list["FakeBackend"] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height = width, height
        self.frames: list[np.ndarray] = []
        self.closed = False
        FakeBackend.instances.append(self)

    def close(self):
        self.closed = True

    def send(self, frame):
        self.frames.append(frame.reshape(self.height, self.width, 3).copy())

    def device(self):
        return "fake-cam"

    def native_fourcc(self):
        return None


pyvirtualcam.register_backend("livediffusion-test", FakeBackend)


class FakeSource:
    """A camera giving BGR frames (as OpenCV does): blue-ish, a white band on top."""

    def __init__(self, width: int, height: int) -> None:
        frame = np.zeros((height, width, 3), np.uint8)
        frame[...] = (200, 20, 10)          # B, G, R
        frame[: height // 8] = 255       # a white band on top
        self.frame = frame
        self.reads = 0
        self.dead = False

    def read(self):
        self.reads += 1
        return (False, None) if self.dead else (True, self.frame)

    def release(self):
        pass


def camera(**kw):
    return pyvirtualcam.Camera(kw["width"], kw["height"], kw["fps"],
                               fmt=pyvirtualcam.PixelFormat.RGB, backend="livediffusion-test")


@pytest.fixture()
def daemon():
    d = Daemon(port=0, engines=("passthrough", "video-tiny")).start()
    yield d
    d.stop()


def test_camera_frames_come_out_restyled_at_the_camera_size_and_colour_order(daemon):
    FakeBackend.instances.clear()
    with Client(daemon.endpoint) as client:
        settings = WebcamSettings(320, 240, fps=60, engine="passthrough",
                                  process=(160, 120), params={"mode": "invert"})
        bridge = WebcamBridge(client, FakeSource(640, 480), settings, camera_factory=camera)
        bridge.start()
        try:
            bridge.run(seconds=1.5, report_every=0)
        finally:
            bridge.close()
    cam = FakeBackend.instances[-1]
    assert cam.closed and len(cam.frames) > 30
    last = cam.frames[-1]
    assert last.shape == (240, 320, 3) and last.dtype == np.uint8
    # source BGR (200, 20, 10) is RGB (10, 20, 200); inverted by the engine: (245, 235, 55)
    assert np.abs(last[120, 160].astype(int) - (245, 235, 55)).max() <= 2
    assert last[:4].mean() < 10 and last[120].mean() > 100  # the white band stays on top
    assert bridge.counters["outputs"] > 10 and bridge.counters["passthrough"] < 10


def test_the_camera_keeps_its_cadence_when_the_engine_stops(daemon):
    """No new output (here: the daemon is gone): the last output is repeated every tick."""
    FakeBackend.instances.clear()
    client = Client(daemon.endpoint).connect(timeout=5)
    settings = WebcamSettings(64, 48, fps=50, engine="passthrough", process=(64, 48))
    bridge = WebcamBridge(client, FakeSource(64, 48), settings, camera_factory=camera)
    bridge.start()
    try:
        bridge.run(seconds=0.6, report_every=0)
        assert bridge.counters["outputs"] > 0
        daemon.stop()
        before = bridge.counters["ticks"]
        started = time.monotonic()
        bridge.run(seconds=1.0, report_every=0)
        ticks = bridge.counters["ticks"] - before
        assert ticks >= 40 * (time.monotonic() - started)  # ~50 FPS kept, not stalled
        cam = FakeBackend.instances[-1]
        assert np.array_equal(cam.frames[-1], cam.frames[-2])  # the newest output, repeated
        assert bridge.counters["repeats"] >= ticks - 5
    finally:
        bridge.close()
        client.close()


def test_prompts_typed_in_the_terminal_reach_the_stream(daemon):
    FakeBackend.instances.clear()
    with Client(daemon.endpoint) as client:
        settings = WebcamSettings(64, 48, fps=60, engine="video-tiny")
        bridge = WebcamBridge(client, FakeSource(64, 48), settings, camera_factory=camera)
        bridge.start()
        try:
            assert bridge.engine == "video-tiny" and bridge.process == (64, 48)
            bridge.prompts.put("a lighthouse in a storm")
            bridge.run(seconds=0.3, report_every=0)
            assert bridge.stream.params["prompt"] == "a lighthouse in a storm"
            reply = bridge.stream.update(seed=7, wait=10)
            assert reply["prompt"] == "a lighthouse in a storm" and reply["seed"] == 7
        finally:
            bridge.close()


def test_auto_engine_and_processing_size(daemon):
    with Client(daemon.endpoint) as client:
        bridge = WebcamBridge(client, FakeSource(64, 48), WebcamSettings(1280, 720, fps=30),
                              camera_factory=camera)
        bridge.start()
        try:
            assert bridge.engine == "video-tiny"          # the best this daemon has
            assert bridge.process == (1280, 720)          # video-tiny takes up to 1280
        finally:
            bridge.close()
    assert fit(1280, 720, {"min": 256, "max": 1024, "multiple": 8}) == (1024, 576)
    assert fit(1280, 720, {"min": 32, "max": 1280, "multiple": 16}) == (1280, 720)
    assert fit(320, 180, {"min": 256, "max": 1024, "multiple": 8}) == (448, 256)


def test_no_virtual_camera_device_gets_one_sentence_per_system():
    assert "modprobe v4l2loopback exclusive_caps=1" in camera_error_advice("linux")
    assert "OBS Studio 30" in camera_error_advice("darwin")
    assert "Virtual Camera" in camera_error_advice("win32")
    from livediffusion.plugins.virtualcam.bridge import _pyvirtualcam_camera

    import sys
    if sys.platform.startswith("linux"):  # no v4l2loopback device on a CI machine
        with pytest.raises(RuntimeError, match="v4l2loopback"):
            _pyvirtualcam_camera(width=64, height=48, fps=30, backend="v4l2loopback",
                                 device="/dev/video-livediffusion-absent")


def test_another_tool_changes_the_webcam_prompt_through_the_protocol(daemon):
    import subprocess
    import sys

    from livediffusion.shared import DaemonError

    FakeBackend.instances.clear()
    with Client(daemon.endpoint) as client:
        settings = WebcamSettings(64, 48, fps=60, engine="video-tiny")
        bridge = WebcamBridge(client, FakeSource(64, 48), settings, camera_factory=camera)
        bridge.start()
        try:
            bridge.run(seconds=0.3, report_every=0)
            with Client(daemon.endpoint, name="prompt-box") as other:
                got = other.control("webcam", prompt="a city at dawn", seed=3)
                assert got["prompt"] == "a city at dawn" and got["seed"] == 3
                with pytest.raises(DaemonError, match="no open stream is named 'nobody'"):
                    other.control("nobody", prompt="x")
            engine = engine_of(daemon, "video-tiny")
            assert engine.streams[bridge.stream.id].params.prompt == "a city at dawn"
            cmd = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "params",
                                  "webcam", "prompt=a harbour", "--endpoint", daemon.endpoint],
                                 capture_output=True, text=True, timeout=60)
            assert cmd.returncode == 0, cmd.stderr
            assert "prompt = 'a harbour'" in cmd.stdout
            bridge.run(seconds=0.3, report_every=0)   # the webcam keeps running
            assert engine.streams[bridge.stream.id].params.prompt == "a harbour"
        finally:
            bridge.close()


def test_raw_video_over_loopback_tcp_for_obs_media_sources(daemon):
    """The plugin-free path into OBS: the same bridge, frames served as rgb24 raw video."""
    import socket

    from livediffusion.plugins.virtualcam.rawvideo import RawVideoSink

    sinks = []

    def raw(**kw):
        sinks.append(RawVideoSink(kw["width"], kw["height"], kw["fps"]))
        return sinks[-1]

    with Client(daemon.endpoint) as client:
        settings = WebcamSettings(64, 48, fps=60, engine="passthrough",
                                  params={"mode": "invert"})
        bridge = WebcamBridge(client, FakeSource(64, 48), settings, camera_factory=raw)
        bridge.start()
        sink = sinks[0]
        settings_obs = sink.obs_media_source_settings()
        assert settings_obs["input"] == f"tcp://127.0.0.1:{sink.port}"
        assert "video_size=64x48 pixel_format=rgb24" in settings_obs["ffmpeg_options"]
        reader = socket.create_connection(("127.0.0.1", sink.port))
        try:
            bridge.run(seconds=0.8, report_every=0)
            reader.settimeout(0.3)
            frame_bytes = 64 * 48 * 3
            data = b""
            try:
                while True:
                    chunk = reader.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                pass
            count = len(data) // frame_bytes
            assert count > 20                            # ~60 FPS for 0.8 s, every frame whole
            last = np.frombuffer(data[(count - 1) * frame_bytes:count * frame_bytes],
                                 np.uint8).reshape(48, 64, 3)
            assert np.abs(last[30, 30].astype(int) - (245, 235, 55)).max() <= 2
            assert last[:3].mean() < 10                    # white band on top, inverted
        finally:
            reader.close()
            bridge.close()
        assert not sink.readers
