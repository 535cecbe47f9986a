"""The Spout bridge's logic against a real daemon, with a fake of the SpoutGL calls it uses
(SpoutGL exists for Windows only)."""

from __future__ import annotations

import numpy as np
import pytest

from livediffusion.daemon.server import Daemon
from livediffusion.plugins.spout.bridge import (GL_RGBA, SpoutBridge, SpoutSettings,
                                                spout_unavailable_reason)
from livediffusion.shared import Client


class FakeSpout:
    """A Spout sender named 'cam' publishing RGBA frames, and a receiver of what we publish."""

    def __init__(self, width: int, height: int) -> None:
        self.frame = np.zeros((height, width, 4), np.uint8)
        self.frame[...] = (10, 20, 200, 255)
        self.frame[: height // 8] = (255, 255, 255, 255)   # a white band on top
        self.published: list[np.ndarray] = []
        self.fresh_size = True
        fake = self

        class SpoutReceiver:
            def setReceiverName(self, name):
                assert name == "cam"

            def receiveImage(self, buf, fmt, invert, fbo):
                assert fmt == GL_RGBA and buf.dtype == np.uint8
                if buf.shape != fake.frame.shape:
                    return True
                buf[...] = fake.frame[::-1] if invert else fake.frame
                return True

            def isUpdated(self):
                updated, fake.fresh_size = fake.fresh_size, False
                return updated

            def getSenderWidth(self):
                return fake.frame.shape[1]

            def getSenderHeight(self):
                return fake.frame.shape[0]

            def releaseReceiver(self):
                fake.released = True

        class SpoutSender:
            def setSenderName(self, name):
                fake.sender_name = name

            def sendImage(self, buf, w, h, fmt, invert, fbo):
                assert buf.shape == (h, w, 4) and buf.dtype == np.uint8 and fmt == GL_RGBA
                assert buf.flags["C_CONTIGUOUS"]
                fake.published.append((buf[::-1] if invert else buf).copy())
                return True

            def releaseSender(self):
                pass

        self.SpoutReceiver, self.SpoutSender = SpoutReceiver, SpoutSender

    def resize(self, width: int, height: int) -> None:
        self.frame = np.full((height, width, 4), 128, np.uint8)
        self.fresh_size = True


@pytest.fixture()
def daemon():
    d = Daemon(port=0, engines=("passthrough",)).start()
    yield d
    d.stop()


@pytest.mark.parametrize("invert", [False, True])
def test_frames_go_through_the_daemon_and_out_as_a_sender(daemon, invert):
    fake = FakeSpout(96, 64)
    with Client(daemon.endpoint) as client:
        bridge = SpoutBridge(client, SpoutSettings("cam", "ld-out", params={"mode": "invert"},
                                                   invert=invert), spout=fake)
        try:
            bridge.run(seconds=1.0)
            assert fake.sender_name == "ld-out" and bridge.size == (96, 64)
            assert bridge.counters["published"] > 5
            out = fake.published[-1]
            assert out.shape == (64, 96, 4)
            # RGBA (10, 20, 200) inverted by the engine, alpha kept
            assert np.abs(out[40, 50].astype(int) - (245, 235, 55, 255)).max() <= 1
            assert out[:4, :, :3].mean() < 5   # the white band is still on top
            fake.resize(48, 32)                 # the sender changes size: a new stream
            bridge.run(seconds=0.7)
            assert bridge.size == (48, 32) and bridge.counters["resizes"] == 2
            assert fake.published[-1].shape == (32, 48, 4)
            # engines work on RGB: what comes back is opaque whatever alpha went in
            assert np.abs(fake.published[-1][10, 10].astype(int) - (127, 127, 127, 255)) \
                .max() <= 1
        finally:
            bridge.close()
    assert fake.released


def test_other_systems_get_one_sentence():
    assert "Windows" in spout_unavailable_reason("linux")
    assert "livediffusion syphon" in spout_unavailable_reason("darwin")


def test_the_command_says_why_spout_cannot_run_here():
    import subprocess
    import sys

    if sys.platform == "win32":
        pytest.skip("Spout can run here")
    result = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "spout", "--from",
                             "cam"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Windows" in result.stderr
    assert "Traceback" not in result.stderr


class FakeSyphon:
    """syphon-python's calls used by the bridge: a server named 'cam' in the directory whose
    frames are RGBA images, and our server collecting what we publish."""

    def __init__(self, width: int, height: int) -> None:
        image = np.zeros((height, width, 4), np.uint8)
        image[...] = (10, 20, 200, 255)
        image[: height // 8] = 255
        self.image = image
        self.published: list[np.ndarray] = []
        self.stopped = []
        fake = self

        class Desc:
            name, app_name = "cam", "VJ tool"

        class SyphonServerDirectory:
            servers = [Desc()]

        class SyphonMetalClient:
            def __init__(self, desc):
                assert desc.name == "cam"

            has_new_frame = True

            @property
            def new_frame_image(self):
                return ("texture", fake.image)

            def stop(self):
                fake.stopped.append("client")

        class SyphonMetalServer:
            def __init__(self, name):
                fake.server_name = name
                self.device = "metal-device"

            def publish_frame_texture(self, texture):
                fake.published.append(texture["pixels"].copy())

            def stop(self):
                fake.stopped.append("server")

        def copy_mtl_texture_to_image(texture):
            assert texture[0] == "texture"
            return texture[1].copy()

        def create_mtl_texture(device, w, h):
            assert device == "metal-device"
            return {"size": (w, h), "pixels": None}

        def copy_image_to_mtl_texture(image, texture):
            assert image.shape[:2][::-1] == texture["size"] and image.dtype == np.uint8
            texture["pixels"] = image

        import types
        self.SyphonServerDirectory = SyphonServerDirectory
        self.SyphonMetalClient = SyphonMetalClient
        self.SyphonMetalServer = SyphonMetalServer
        self.utils = types.SimpleNamespace(
            numpy=types.SimpleNamespace(copy_mtl_texture_to_image=copy_mtl_texture_to_image,
                                        copy_image_to_mtl_texture=copy_image_to_mtl_texture),
            raw=types.SimpleNamespace(create_mtl_texture=create_mtl_texture))


def test_syphon_frames_go_through_the_daemon_and_out_as_a_server(daemon):
    from livediffusion.plugins.spout.bridge import SyphonBridge, syphon_unavailable_reason

    fake = FakeSyphon(80, 48)
    with Client(daemon.endpoint) as client:
        bridge = SyphonBridge(client, SpoutSettings("cam", "ld-out", params={"mode": "invert"},
                                                    stream_name="syphon"), syphon=fake)
        try:
            bridge.run(seconds=1.0)
        finally:
            bridge.close()
    assert fake.server_name == "ld-out" and sorted(fake.stopped) == ["client", "server"]
    assert bridge.size == (80, 48) and bridge.counters["published"] > 5
    out = fake.published[-1]
    assert out.shape == (48, 80, 4)
    assert np.abs(out[30, 40].astype(int) - (245, 235, 55, 255)).max() <= 1
    assert out[:4, :, :3].mean() < 5
    assert "macOS" in syphon_unavailable_reason("win32")
