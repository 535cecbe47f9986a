"""The livediffusion wire protocol: versioned msgpack control messages.

Every control message is one ZeroMQ frame holding a msgpack map with at least
``v`` (protocol version) and ``type``.  Inline frames (remote mode) carry a
second ZeroMQ frame with the raw pixels.  docs/protocol.md is the normative
description; this module is its reference implementation.  Only the standard
library, msgpack and numpy may be imported here (see ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_PORT = 5570
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_PORT}"

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 3.0

# Largest control message the daemon accepts (inline pixels travel in a second part).
MAX_CONTROL_BYTES = 1 << 20
MIN_SIDE, MAX_SIDE = 8, 8192
MAX_SLOTS = 16

# --- pixel formats -----------------------------------------------------------------

#: pixel format -> number of channels
FORMATS: dict[str, int] = {"rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4, "gray": 1}
FORMAT_CODES: dict[str, int] = {"rgb": 1, "bgr": 2, "rgba": 3, "bgra": 4, "gray": 5}
DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
DTYPE_CODES: dict[str, int] = {"uint8": 1, "uint16": 2, "float16": 3, "float32": 4}
ORIGINS: dict[str, int] = {"top": 0, "bottom": 1}

FORMAT_BY_CODE = {v: k for k, v in FORMAT_CODES.items()}
DTYPE_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}
ORIGIN_BY_CODE = {v: k for k, v in ORIGINS.items()}


# --- error codes -------------------------------------------------------------------

class ErrorCode:
    """Codes carried by ERROR messages; the sentence beside them is for humans."""

    BAD_MESSAGE = "bad_message"            # not msgpack, not a map, missing/ill-typed fields
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    NO_SESSION = "no_session"              # message before hello, or the session expired
    UNKNOWN_STREAM = "unknown_stream"
    STREAM_EXISTS = "stream_exists"
    BAD_SPEC = "bad_spec"                  # impossible width/height/format/dtype/...
    UNKNOWN_ENGINE = "unknown_engine"
    BAD_PARAMS = "bad_params"
    BAD_FRAME = "bad_frame"                # wrong size, dtype, format, slot or torn
    ENGINE_ERROR = "engine_error"
    OUT_OF_MEMORY = "out_of_memory"
    LIMIT = "limit"                        # too many streams
    OVERLOADED = "overloaded"              # the device cannot serve one more stream
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request that cannot be served; becomes an ERROR reply."""

    def __init__(self, code: str, message: str, *, stream: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream = stream


# --- message schema ----------------------------------------------------------------

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_MAP = (dict,)
_BOOL = (bool,)
_LIST = (list,)
_BIN = (bytes,)

#: type -> {field: (allowed python types, required)}
CLIENT_MESSAGES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"client": (_STR, False), "token": (_STR, False), "transport": (_STR, False)},
    "open": {
        "name": (_STR, True),
        "width": (_INT, True),
        "height": (_INT, True),
        "fps": (_NUM, False),
        "format": (_STR, False),
        "channels": (_INT, False),
        "dtype": (_STR, False),
        "origin": (_STR, False),
        "stride": (_INT, False),
        "engine": (_STR, False),
        "params": (_MAP, False),
        "output": (_MAP, False),
        "slots": (_INT, False),
        "transport": (_STR, False),
        "min_fps": (_NUM, False),
        "paced": (_BOOL, False),
    },
    # params and/or a saved preset's (the explicit params win over the preset's)
    # ("transition": seconds, or {seconds, curve, blend}: move there over time)
    "params": {"stream": (_INT, True), "params": (_MAP, False), "preset": (_STR, False),
               "transition": (_NUM + _MAP, False)},
    # change the parameters of any open stream by its name (another tool's stream, say)
    "control": {"name": (_STR, True), "params": (_MAP, False), "preset": (_STR, False),
                "transition": (_NUM + _MAP, False)},
    # a stream's cue list (own stream, or any by name): op play (cues, loop), pause,
    # resume, next, jump (index), stop, status
    "cues": {"stream": (_INT, False), "name": (_STR, False), "op": (_STR, True),
             "cues": (_LIST, False), "loop": (_BOOL, False), "index": (_INT, False)},
    # the daemon's named presets: op "list", "save" (name, and params or from: a stream's
    # name whose current parameters are saved) or "delete" (name)
    "presets": {"op": (_STR, True), "name": (_STR, False), "params": (_MAP, False),
                "from": (_STR, False)},
    "frame": {
        "stream": (_INT, True),
        "seq": (_INT, True),
        "slot": (_INT, False),
        "ts": (_INT, False),
        "stride": (_INT, False),
    },
    "stats": {"stream": (_INT, False)},
    # every open stream of every session: names, engines, parameters, statistics (for
    # controllers: OSC, a control page)
    "streams": {},
    # the newest output of a stream by name as a small RGB picture (a control page)
    "thumbnail": {"name": (_STR, True), "width": (_INT, False)},
    "heartbeat": {},
    "close": {"stream": (_INT, True)},
    "bye": {},
}

SERVER_MESSAGES = ("welcome", "opened", "params_ok", "frame", "stats", "streams", "presets",
                   "cues", "thumbnail", "heartbeat", "error", "closed")


def pack(msg: Mapping[str, Any]) -> bytes:
    """Encode one control message; adds the protocol version."""
    body = dict(msg)
    body.setdefault("v", PROTOCOL_VERSION)
    return msgpack.packb(body, use_bin_type=True)


def request_id(data: bytes) -> int | None:
    """The ``id`` of an encoded message without decoding the rest (the answer to a message
    refused for its size still names the request it refuses); None if it has none."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 16)
        unpacker.feed(data)
        for _ in range(min(unpacker.read_map_header(), 64)):
            key = unpacker.unpack()
            if key == "id":
                rid = unpacker.unpack()
                return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
            unpacker.skip()
    except Exception:  # noqa: BLE001 - not a map, truncated: no id to give
        return None
    return None


def unpack(data: bytes) -> dict[str, Any]:
    """Decode bytes into a message map without validating its fields.

    Raises ProtocolError(BAD_MESSAGE) for anything that is not a msgpack map.
    """
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"control message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}.")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"message is not valid msgpack ({type(exc).__name__}).") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"message must be a msgpack map, got {type(msg).__name__}.")
    return msg


def validate_client_message(msg: dict[str, Any]) -> str:
    """Check version, type and field types of a client message; return its type."""
    version = msg.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no integer protocol version 'v'.")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {version} is not supported; "
                            f"this daemon speaks version {PROTOCOL_VERSION}.")
    mtype = msg.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no string field 'type'.")
    schema = CLIENT_MESSAGES.get(mtype)
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype[:40]!r}.")
    rid = msg.get("id")
    if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'id' must be an integer.")
    for field, (types, required) in schema.items():
        if field not in msg:
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"{mtype} message is missing field {field!r}.")
            continue
        value = msg[field]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"field {field!r} of {mtype} must be {names}, "
                                f"got {type(value).__name__}.")
    return mtype


def error(code: str, message: str, *, re: int | None = None,
          stream: int | None = None) -> dict[str, Any]:
    """Build an ERROR message."""
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if re is not None:
        msg["re"] = re
    if stream is not None:
        msg["stream"] = stream
    return msg


# --- frame specifications -----------------------------------------------------------

@dataclass(frozen=True)
class FrameSpec:
    """Geometry and pixel layout of the frames of one stream direction."""

    width: int
    height: int
    format: str = "rgb"
    dtype: str = "uint8"
    origin: str = "top"
    stride: int = 0  # bytes per row; 0 means tightly packed

    @property
    def channels(self) -> int:
        return FORMATS[self.format]

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.width * self.channels * self.np_dtype.itemsize

    @property
    def row_stride(self) -> int:
        return self.stride or self.row_bytes

    @property
    def nbytes(self) -> int:
        """Bytes the frame occupies with its row stride."""
        return self.row_stride * self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def same_picture(self, other: FrameSpec) -> bool:
        """Same width, height, format, dtype and origin (the row stride may differ)."""
        return (self.width, self.height, self.format, self.dtype, self.origin) == \
            (other.width, other.height, other.format, other.dtype, other.origin)

    def to_msg(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "format": self.format,
                "channels": self.channels, "dtype": self.dtype, "origin": self.origin,
                "stride": self.row_stride}

    @classmethod
    def from_msg(cls, msg: Mapping[str, Any], *, default: FrameSpec | None = None) -> FrameSpec:
        """Build and validate a spec from the fields of an OPEN message (or its ``output``)."""
        def get(key: str, fallback: Any) -> Any:
            return msg.get(key, getattr(default, key) if default is not None else fallback)

        width, height = get("width", None), get("height", None)
        fmt, dtype, origin = get("format", "rgb"), get("dtype", "uint8"), get("origin", "top")
        for key, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(ErrorCode.BAD_SPEC, f"{key} must be an integer.")
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise ProtocolError(ErrorCode.BAD_SPEC,
                                    f"{key} {value} is outside {MIN_SIDE}..{MAX_SIDE}.")
        for key, value in (("format", fmt), ("dtype", dtype), ("origin", origin)):
            if not isinstance(value, str):
                raise ProtocolError(ErrorCode.BAD_SPEC, f"{key} must be a string.")
        if fmt not in FORMATS:
            raise ProtocolError(ErrorCode.BAD_SPEC,
                                f"pixel format {str(fmt)[:20]!r} is not one of "
                                f"{', '.join(FORMATS)}.")
        if dtype not in DTYPES:
            raise ProtocolError(ErrorCode.BAD_SPEC,
                                f"dtype {str(dtype)[:20]!r} is not one of {', '.join(DTYPES)}.")
        if origin not in ORIGINS:
            raise ProtocolError(ErrorCode.BAD_SPEC, "origin must be 'top' or 'bottom'.")
        channels = msg.get("channels")
        if channels is not None and channels != FORMATS[fmt]:
            raise ProtocolError(ErrorCode.BAD_SPEC,
                                f"format {fmt!r} has {FORMATS[fmt]} channels, not {channels}.")
        spec = cls(width, height, fmt, dtype, origin, 0)
        stride = msg.get("stride", 0)
        if stride:
            itemsize = spec.np_dtype.itemsize
            if not isinstance(stride, int) or stride < spec.row_bytes or \
                    stride > 4 * spec.row_bytes or stride % itemsize:
                raise ProtocolError(ErrorCode.BAD_SPEC,
                                    f"stride {stride} must be a multiple of {itemsize} between "
                                    f"{spec.row_bytes} and {4 * spec.row_bytes} bytes.")
            spec = cls(width, height, fmt, dtype, origin, stride)
        return spec
