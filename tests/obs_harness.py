"""A real OBS Studio for the end-to-end tests: Debian's obs-studio under Xvfb with software
GL, a private HOME holding our plugin and a websocket server on a loopback port."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from livediffusion.daemon.server import free_port


def obs_missing_reason() -> str | None:
    for tool in ("obs", "xvfb-run"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install obs-studio xvfb)"
    return None


class HeadlessObs:
    def __init__(self, home: Path, plugin_dir: Path | None, *, password: str = "ld-test",
                 width: int = 320, height: int = 240) -> None:
        self.home = home
        self.port = free_port()
        self.password = password
        config = home / ".config" / "obs-studio"
        config.mkdir(parents=True, exist_ok=True)
        # FirstRun=true: no auto-configuration wizard; the websocket server on our port
        (config / "global.ini").write_text(
            "[General]\nFirstRun=true\nEnableAutoUpdates=false\nLastVersion=486539265\n\n"
            "[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\n"
            f"ServerPort={self.port}\nAuthRequired=true\nServerPassword={password}\n"
            "AlertsEnabled=false\n")
        if plugin_dir is not None:  # OBS on Linux loads ~/.config/obs-studio/plugins/NAME
            shutil.copytree(plugin_dir, config / "plugins" / "livediffusion", dirs_exist_ok=True)
        self.width, self.height = width, height
        self.proc: subprocess.Popen | None = None
        self.cl = None

    def start(self, timeout: float = 90.0) -> HeadlessObs:
        env = {**os.environ, "HOME": str(self.home), "LIBGL_ALWAYS_SOFTWARE": "1",
               "QT_QPA_PLATFORM": "xcb"}
        env.pop("XDG_CONFIG_HOME", None)
        self.proc = subprocess.Popen(
            ["xvfb-run", "-a", "-s", "-screen 0 1024x768x24", "obs", "--minimize-to-tray",
             "--disable-shutdown-check", "--disable-updater", "--multi"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        from livediffusion.plugins.obs.websocket import ObsError, connect
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"OBS exited with status {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                self.cl = connect("127.0.0.1", self.port, self.password, timeout=10)
                break
            except (OSError, ObsError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"OBS's websocket did not come up in {timeout:g} s:\n"
                                       f"{self.log()[-3000:]}")
                time.sleep(0.5)
        # a small canvas keeps software rendering cheap on two cores
        self.cl.set_video_settings(15, 1, self.width, self.height, self.width, self.height)
        return self

    def log(self) -> str:
        logs = sorted((self.home / ".config" / "obs-studio" / "logs").glob("*.txt"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def screenshot(self, source: str, width: int, height: int) -> np.ndarray:
        """The source as OBS renders it (filters included), RGB uint8."""
        from PIL import Image
        data = self.cl.get_source_screenshot(source, "png", width, height, -1).image_data
        png = base64.b64decode(data.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def stop(self) -> None:
        if self.cl is not None:
            try:
                self.cl.disconnect()
            except Exception:  # noqa: BLE001 - best effort
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
