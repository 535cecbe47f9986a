"""Receive frames from a named Spout sender, stream them through the daemon, publish the
result as a Spout sender, so Resolume, Unity, TouchDesigner's Spout TOPs and OBS's Spout plugin
can use the daemon.

SpoutGL (Windows wheels only) is imported lazily; everything here talks to it through the
few calls below, which the tests fake:
  receiver: setReceiverName, receiveImage(buf, GL_RGBA, invert, 0), isUpdated,
            getSenderWidth, getSenderHeight, releaseReceiver
  sender:   setSenderName, sendImage(buf, w, h, GL_RGBA, invert, 0), releaseSender
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
                "use Syphon, elsewhere send frames with the client library or NDI.")
    try:
        import SpoutGL  # noqa: F401
    except ImportError:
        return "Spout needs SpoutGL: pip install \"livediffusion[spout]\"."
    return None


@dataclass
class SpoutSettings:
    receive_from: str                    # name of the Spout sender to read
    send_as: str = "livediffusion"       # name of the Spout sender we publish
    engine: str = "passthrough"
    params: dict[str, Any] = field(default_factory=dict)
    invert: bool = False                 # flip vertically on the way in and out
    stream_name: str = "spout"


class SpoutBridge:
    def __init__(self, client: Client, settings: SpoutSettings, spout=None) -> None:
        if spout is None:
            import SpoutGL as spout  # noqa: N813 - the module's own name
        self.spout = spout
        self.client = client
        self.settings = settings
        self.receiver = spout.SpoutReceiver()
        self.receiver.setReceiverName(settings.receive_from)
        self.sender = spout.SpoutSender()
        self.sender.setSenderName(settings.send_as)
        self.stream = None
        self.size: tuple[int, int] | None = None
        self._buf: np.ndarray | None = None
        self.counters = {"received": 0, "sent_to_daemon": 0, "published": 0, "resizes": 0}

    def _open(self, width: int, height: int) -> None:
        """(Re)open the daemon stream at the sender's size."""
        if self.stream is not None:
            self.stream.close()
        s = self.settings
        self.stream = self.client.open_stream(
            s.stream_name, width, height, format="rgba", dtype="uint8", engine=s.engine,
            params=dict(s.params), output={"format": "rgba", "dtype": "uint8"}, timeout=60)
        self.size = (width, height)
        self._buf = np.zeros((height, width, 4), np.uint8)
        self.counters["resizes"] += 1

    def tick(self) -> bool:
        """Take the sender's newest frame (if any) to the daemon and publish the newest
        output; returns True when a frame was published."""
        sp, s = self.spout, self.settings
        buf = self._buf if self._buf is not None else np.zeros((1, 1, 4), np.uint8)
        got = self.receiver.receiveImage(buf, GL_RGBA, s.invert, 0)
        if self.receiver.isUpdated():  # first frame, or the sender changed size
            w, h = self.receiver.getSenderWidth(), self.receiver.getSenderHeight()
            if w > 0 and h > 0 and (w, h) != self.size:
                self._open(w, h)
            return False  # the buffer had the old size: read again next tick
        if got and self.stream is not None:
            self.counters["received"] += 1
            if self.stream.send(self._buf):
                self.counters["sent_to_daemon"] += 1
        self.client.poll(0)
        out = self.stream.new_frame() if self.stream is not None else None
        if out is None:
            return False
        pixels = np.ascontiguousarray(out.pixels)
        h, w = pixels.shape[:2]
        sp_ok = self.sender.sendImage(pixels, w, h, GL_RGBA, s.invert, 0)
        self.counters["published"] += bool(sp_ok)
        return bool(sp_ok)

    def run(self, seconds: float | None = None, idle_sleep: float = 0.002) -> None:
        started = time.monotonic()
        while seconds is None or time.monotonic() - started < seconds:
            if not self.tick():
                time.sleep(idle_sleep)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.receiver.releaseReceiver()
        self.sender.releaseSender()
