"""Camera (or file) -> daemon -> virtual camera, at the camera's cadence.

Every tick: read the newest camera frame, send it to the daemon (never blocking), and give
the virtual camera the newest restyled frame.  If the engine falls behind, the virtual camera
gets the newest output again rather than waiting, so a call never freezes; before the first
output arrives it gets the camera picture itself.  The stream is processed at a size the
engine takes (``process``) and the daemon scales its output to the camera's size.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from livediffusion.shared import Client

log = logging.getLogger("livediffusion.webcam")

@dataclass
class WebcamSettings:
    width: int = 1280
    height: int = 720
    fps: float = 30.0
    engine: str = "auto"
    process: tuple[int, int] | None = None   # (w, h) the engine works at; None: chosen
    params: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None               # pyvirtualcam backend; None: the OS default
    device: str | None = None
    stream_name: str = "webcam"


def open_source(spec: str | int):
    """``webcam:N`` / ``N`` opens camera N, anything else a video file (played in a loop).
    Returns an object with ``read() -> (ok, BGR frame)`` and ``release()``."""
    import cv2

    text = str(spec)
    index = text.split(":", 1)[1] if text.startswith("webcam:") else text
    if index.isdigit():
        cap = cv2.VideoCapture(int(index))
        if not cap.isOpened():
            raise RuntimeError(f"camera {index} could not be opened (is it in use by another "
                               f"app?).")
        return cap
    cap = cv2.VideoCapture(text)
    if not cap.isOpened():
        raise RuntimeError(f"{text} could not be opened as a video.")
    return _Looping(cap)


class _Looping:
    """A video file that starts over at its end."""

    def __init__(self, cap) -> None:
        self.cap = cap

    def read(self):
        ok, frame = self.cap.read()
        if not ok:
            import cv2
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        return ok, frame

    def release(self) -> None:
        self.cap.release()


def camera_error_advice(platform: str = sys.platform) -> str:
    """One sentence on what to install for a virtual camera on this OS."""
    if platform.startswith("linux"):
        return ("no virtual camera device: install v4l2loopback and load it with "
                "'sudo modprobe v4l2loopback exclusive_caps=1 card_label=livediffusion' "
                "(exclusive_caps=1 lets browsers and Zoom see it).")
    if platform == "darwin":
        return ("no virtual camera: install OBS Studio 30 or newer and start its Virtual "
                "Camera once, which installs the camera extension pyvirtualcam uses.")
    return ("no virtual camera: install OBS Studio and start its Virtual Camera once (or "
            "install Unity Capture), then run this again.")


def fit(width: int, height: int, sizes: dict[str, int]) -> tuple[int, int]:
    """The largest size of the camera's aspect that the engine takes: sides within
    [min, max] and multiples of ``multiple``."""
    lo, hi, m = sizes.get("min", 1), sizes.get("max", 1 << 14), sizes.get("multiple", 1)
    scale = min(1.0, hi / max(width, height))
    scale = max(scale, lo / min(width, height))
    w = max(lo, min(hi, int(width * scale) // m * m))
    h = max(lo, min(hi, int(height * scale) // m * m))
    return w, h


class WebcamBridge:
    def __init__(self, client: Client, source, settings: WebcamSettings,
                 camera_factory: Callable[..., Any] | None = None) -> None:
        self.client = client
        self.source = source
        self.settings = settings
        self.camera_factory = camera_factory or _pyvirtualcam_camera
        self.prompts: queue.Queue[str] = queue.Queue()
        self.stream = None
        self.camera = None
        self.engine = ""
        self.process: tuple[int, int] = (settings.width, settings.height)
        self._last: np.ndarray | None = None
        self.counters = {"ticks": 0, "camera_frames": 0, "sent": 0, "outputs": 0,
                         "repeats": 0, "passthrough": 0}

    # --- set-up ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> WebcamBridge:
        s = self.settings
        engines = self.client.capabilities.get("engines", {})
        self.engine = self.client.choose_engine(s.engine)
        if self.engine not in engines:
            raise RuntimeError(f"the daemon has no engine {s.engine!r}; it has "
                               f"{', '.join(engines) or 'none'}.")
        self.process = s.process or fit(s.width, s.height,
                                        engines[self.engine].get("sizes", {}))
        pw, ph = self.process
        self.stream = self.client.open_stream(
            s.stream_name, pw, ph, engine=self.engine, params=dict(s.params),
            output={"width": s.width, "height": s.height, "format": "rgb", "dtype": "uint8"},
            timeout=timeout)
        self.camera = self.camera_factory(width=s.width, height=s.height, fps=s.fps,
                                          backend=s.backend, device=s.device)
        return self

    def close(self) -> None:
        if self.camera is not None:
            self.camera.close()
            self.camera = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    # --- running -----------------------------------------------------------------------

    def tick(self) -> np.ndarray:
        """One frame of the virtual camera; returns what it was given."""
        import cv2

        self.counters["ticks"] += 1
        while not self.prompts.empty():
            text = self.prompts.get_nowait()
            self.stream.update(prompt=text)
            log.info("prompt: %s", text)
        ok, bgr = self.source.read()
        if ok and bgr is not None:
            self.counters["camera_frames"] += 1
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            pw, ph = self.process
            if rgb.shape[1] != pw or rgb.shape[0] != ph:
                rgb = cv2.resize(rgb, (pw, ph), interpolation=cv2.INTER_AREA)
            if self.stream.send(rgb):
                self.counters["sent"] += 1
        self.client.poll(0)
        out = self.stream.new_frame()
        if out is not None:
            self._last = np.ascontiguousarray(out.pixels)
            self.counters["outputs"] += 1
        elif self._last is not None:
            self.counters["repeats"] += 1
        if self._last is None:  # nothing restyled yet: show the camera rather than black
            self.counters["passthrough"] += 1
            frame = cv2.resize(rgb, (self.settings.width, self.settings.height)) if ok else \
                np.zeros((self.settings.height, self.settings.width, 3), np.uint8)
        else:
            frame = self._last
        self.camera.send(frame)
        return frame

    def run(self, seconds: float | None = None, report_every: float = 2.0,
            report: Callable[[str], None] = print) -> None:
        started = last_report = time.monotonic()
        outputs_then = 0
        while seconds is None or time.monotonic() - started < seconds:
            self.tick()
            self.camera.sleep_until_next_frame()
            now = time.monotonic()
            if report_every and now - last_report >= report_every:
                stats = self.stream.stats()
                fps = (self.counters["outputs"] - outputs_then) / (now - last_report)
                report(f"new frames {fps:.1f} FPS into a {self.settings.fps:g} FPS camera, "
                       f"latency p50 {stats['latency_p50_ms']:.0f} ms, repeats "
                       f"{self.counters['repeats']}, engine {self.engine} at "
                       f"{self.process[0]}x{self.process[1]}")
                last_report, outputs_then = now, self.counters["outputs"]


def _pyvirtualcam_camera(*, width: int, height: int, fps: float, backend: str | None,
                         device: str | None):
    try:
        import pyvirtualcam
    except ImportError:
        raise RuntimeError("the virtual camera needs pyvirtualcam: "
                           "pip install 'livediffusion[virtualcam]'.") from None
    try:
        return pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                   backend=backend, device=device)
    except RuntimeError as exc:
        raise RuntimeError(f"{camera_error_advice()} ({exc})") from None
