"""GPU texture sharing in and out of the daemon: a named Spout sender (Windows) or Syphon
server (macOS) in, the daemon, a Spout sender / Syphon server of our own out, so Resolume,
Unity, TouchDesigner's Spout/Syphon TOPs, MadMapper and OBS can use the daemon.

The loop (``TextureBridge``) is the same for both; a backend does the host-specific part:
``receive()`` returns the newest incoming frame as RGBA uint8 (or None when there is no new
one), ``publish(rgba)`` sends one out, ``close()``.  The host libraries are imported lazily
and the tests fake exactly the calls used:

* SpoutGL (Windows wheels only): receiver ``setReceiverName``, ``receiveImage(buf, GL_RGBA,
  invert, 0)``, ``isUpdated``, ``getSenderWidth``/``getSenderHeight``, ``releaseReceiver``;
  sender ``setSenderName``, ``sendImage(buf, w, h, GL_RGBA, invert, 0)``, ``releaseSender``.
* syphon-python (macOS 11+, Metal): ``SyphonServerDirectory().servers``,
  ``SyphonMetalClient(description)`` with ``has_new_frame`` / ``new_frame_image`` /
  ``stop()``, ``SyphonMetalServer(name)`` with ``device`` / ``publish_frame_texture`` /
  ``stop()``, and ``syphon.utils``' ``copy_mtl_texture_to_image``, ``create_mtl_texture``,
  ``copy_image_to_mtl_texture``.

Frames cross as RGBA uint8; the daemon converts to and from what the engine wants.  Engines
work on RGB, so what is published is opaque whatever alpha came in.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livediffusion.shared import Client

GL_RGBA = 0x1908


def spout_unavailable_reason(platform: str = sys.platform) -> str | None:
    """None when Spout can work here, else one sentence on why not and what instead."""
    if platform != "win32":
        return ("Spout is a Windows technology (SpoutGL has Windows wheels only); on macOS "
                "use 'livediffusion syphon', elsewhere the client library or NDI.")
    try:
        import SpoutGL  # noqa: F401
    except ImportError:
        return "Spout needs SpoutGL: pip install \"livediffusion[spout]\"."
    return None


def syphon_unavailable_reason(platform: str = sys.platform) -> str | None:
    if platform != "darwin":
        return ("Syphon is a macOS technology; on Windows use 'livediffusion spout', "
                "elsewhere the client library or NDI.")
    try:
        import syphon  # noqa: F401
    except ImportError:
        return "Syphon needs syphon-python (macOS 11+): pip install \"livediffusion[syphon]\"."
    return None


@dataclass
class SpoutSettings:
    receive_from: str                    # name of the Spout sender / Syphon server to read
    send_as: str = "livediffusion"       # name of the sender / server we publish
    engine: str = "passthrough"
    params: dict[str, Any] = field(default_factory=dict)
    invert: bool = False                 # flip vertically on the way in and out
    stream_name: str = "spout"


class TextureBridge:
    """The host-independent loop: incoming frames to the daemon, newest output out."""

    def __init__(self, client: Client, settings: SpoutSettings) -> None:
        self.client = client
        self.settings = settings
        self.stream = None
        self.size: tuple[int, int] | None = None
        self.counters = {"received": 0, "sent_to_daemon": 0, "published": 0, "resizes": 0}

    # the backend's part
    def receive(self) -> np.ndarray | None:
        raise NotImplementedError

    def publish(self, rgba: np.ndarray) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def _open(self, width: int, height: int) -> None:
        """(Re)open the daemon stream at the incoming size."""
        if self.stream is not None:
            self.stream.close()
        s = self.settings
        self.stream = self.client.open_stream(
            s.stream_name, width, height, format="rgba", dtype="uint8", engine=s.engine,
            params=dict(s.params), output={"format": "rgba", "dtype": "uint8"}, timeout=60)
        self.size = (width, height)
        self.counters["resizes"] += 1

    def tick(self) -> bool:
        """Take the newest incoming frame (if any) to the daemon and publish the newest
        output; returns True when a frame was published."""
        frame = self.receive()
        if frame is not None:
            h, w = frame.shape[:2]
            if (w, h) != self.size:
                self._open(w, h)
            self.counters["received"] += 1
            if self.stream.send(np.ascontiguousarray(frame)):
                self.counters["sent_to_daemon"] += 1
        if self.stream is None:
            return False
        self.client.poll(0)
        out = self.stream.new_frame()
        if out is None:
            return False
        ok = bool(self.publish(np.ascontiguousarray(out.pixels)))
        self.counters["published"] += ok
        return ok

    def run(self, seconds: float | None = None, idle_sleep: float = 0.002) -> None:
        started = time.monotonic()
        while seconds is None or time.monotonic() - started < seconds:
            if not self.tick():
                time.sleep(idle_sleep)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.release()


class SpoutBridge(TextureBridge):
    def __init__(self, client: Client, settings: SpoutSettings, spout=None) -> None:
        super().__init__(client, settings)
        if spout is None:
            import SpoutGL as spout  # noqa: N813 - the module's own name
        self.receiver = spout.SpoutReceiver()
        self.receiver.setReceiverName(settings.receive_from)
        self.sender = spout.SpoutSender()
        self.sender.setSenderName(settings.send_as)
        self._buf = np.zeros((1, 1, 4), np.uint8)

    def receive(self) -> np.ndarray | None:
        got = self.receiver.receiveImage(self._buf, GL_RGBA, self.settings.invert, 0)
        if self.receiver.isUpdated():  # first frame, or the sender changed size
            w, h = self.receiver.getSenderWidth(), self.receiver.getSenderHeight()
            if w > 0 and h > 0 and self._buf.shape[:2] != (h, w):
                self._buf = np.zeros((h, w, 4), np.uint8)
            return None  # the buffer had the old size: read again next tick
        return self._buf if got and self._buf.shape[:2] != (1, 1) else None

    def publish(self, rgba: np.ndarray) -> bool:
        h, w = rgba.shape[:2]
        return self.sender.sendImage(rgba, w, h, GL_RGBA, self.settings.invert, 0)

    def release(self) -> None:
        self.receiver.releaseReceiver()
        self.sender.releaseSender()


class SyphonBridge(TextureBridge):
    """Not run on a Mac: written against syphon-python's documented calls (module docstring)
    and tested with a fake of them."""

    def __init__(self, client: Client, settings: SpoutSettings, syphon=None) -> None:
        super().__init__(client, settings)
        if syphon is None:
            import syphon
        self.syphon = syphon
        self.client_tex = None
        self.server = syphon.SyphonMetalServer(settings.send_as)
        self._texture = None
        self._texture_size: tuple[int, int] | None = None

    def _find(self):
        for desc in self.syphon.SyphonServerDirectory().servers:
            names = {getattr(desc, "name", ""), getattr(desc, "app_name", "")}
            if self.settings.receive_from in names:
                return desc
        return None

    def receive(self) -> np.ndarray | None:
        if self.client_tex is None:
            desc = self._find()
            if desc is None:
                return None
            self.client_tex = self.syphon.SyphonMetalClient(desc)
        if not self.client_tex.has_new_frame:
            return None
        image = self.syphon.utils.numpy.copy_mtl_texture_to_image(
            self.client_tex.new_frame_image)
        return image[::-1] if self.settings.invert else image

    def publish(self, rgba: np.ndarray) -> bool:
        h, w = rgba.shape[:2]
        utils = self.syphon.utils
        if self._texture_size != (w, h):
            self._texture = utils.raw.create_mtl_texture(self.server.device, w, h)
            self._texture_size = (w, h)
        utils.numpy.copy_image_to_mtl_texture(
            np.ascontiguousarray(rgba[::-1]) if self.settings.invert else rgba, self._texture)
        self.server.publish_frame_texture(self._texture)
        return True

    def release(self) -> None:
        if self.client_tex is not None:
            self.client_tex.stop()
        self.server.stop()
