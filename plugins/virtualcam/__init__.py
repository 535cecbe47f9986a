"""Virtual webcam: a real camera or a video file, restyled by the daemon, as a camera that
Zoom, Meet and OBS can pick (pyvirtualcam)."""

from .bridge import WebcamBridge, WebcamSettings, camera_error_advice, open_source

__all__ = ["WebcamBridge", "WebcamSettings", "camera_error_advice", "open_source"]
