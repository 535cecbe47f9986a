"""A camera sink that serves frames as raw video over loopback TCP: the plugin-free way into
OBS (a Media Source with input ``tcp://127.0.0.1:PORT``, input format ``rawvideo``, options
``video_size=WxH pixel_format=rgb24 framerate=FPS``; OBS reconnects by itself) and into any
ffmpeg-based tool.

Same calls as a pyvirtualcam Camera (``send``, ``sleep_until_next_frame``, ``close``), so the
webcam bridge can use either.  Never blocks the bridge: connections are accepted between
frames, and a reader that cannot keep up is dropped rather than waited for.
"""

from __future__ import annotations

import socket
import time

import numpy as np


def media_source_settings(port: int, width: int, height: int, fps: float) -> dict:
    """The settings of an OBS Media Source (ffmpeg_source) reading rgb24 raw video of this
    size from tcp://127.0.0.1:PORT (OBS reconnects by itself when the sender restarts)."""
    return {"is_local_file": False, "input": f"tcp://127.0.0.1:{port}",
            "input_format": "rawvideo", "buffering_mb": 0,
            "ffmpeg_options": f"video_size={width}x{height} pixel_format=rgb24 "
                              f"framerate={fps:g}",
            "reconnect_delay_sec": 1, "restart_on_activate": True}


class RawVideoSink:
    def __init__(self, width: int, height: int, fps: float = 30.0, port: int = 0,
                 host: str = "127.0.0.1", send_timeout: float = 0.2) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._listener = socket.create_server((host, port))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.readers: list[socket.socket] = []
        self.send_timeout = send_timeout
        self.dropped_readers = 0
        self._next = time.monotonic()

    def obs_media_source_settings(self) -> dict:
        """The settings of an OBS Media Source (ffmpeg_source) that reads this sink."""
        return media_source_settings(self.port, self.width, self.height, self.fps)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.settimeout(self.send_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.readers.append(conn)

    def send(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"raw video frames are {self.height}x{self.width}x3 uint8, not "
                             f"{frame.shape} {frame.dtype}.")
        self._accept()
        data = np.ascontiguousarray(frame).data
        for conn in list(self.readers):
            try:
                conn.sendall(data)
            except OSError:  # gone, or too slow to take a frame in time
                self.readers.remove(conn)
                conn.close()
                self.dropped_readers += 1

    def sleep_until_next_frame(self) -> None:
        self._next += 1.0 / self.fps
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            self._next = time.monotonic()  # behind: do not try to catch up in a burst

    def close(self) -> None:
        for conn in self.readers:
            conn.close()
        self.readers.clear()
        self._listener.close()
