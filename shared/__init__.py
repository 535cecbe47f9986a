"""livediffusion.shared: wire protocol, shared-memory frame rings and the client library.

Imports only the standard library, pyzmq, msgpack and numpy (it runs inside
TouchDesigner's and OBS's Python).
"""

from .client import Client, DaemonError, Frame, Stream
from .protocol import DEFAULT_ENDPOINT, DEFAULT_PORT, PROTOCOL_VERSION, FrameSpec, ProtocolError
from .ring import FrameRing

__all__ = ["Client", "DaemonError", "Frame", "Stream", "FrameRing", "FrameSpec", "ProtocolError",
           "DEFAULT_ENDPOINT", "DEFAULT_PORT", "PROTOCOL_VERSION"]
