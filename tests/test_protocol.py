"""The wire protocol: message encoding, client message validation and frame specs."""

from __future__ import annotations

from contextlib import contextmanager

import msgpack
import pytest

from livediffusion.shared import protocol as P
from livediffusion.shared.protocol import ErrorCode, FrameSpec, ProtocolError


@contextmanager
def raises_code(code: str):
    """Expect a ProtocolError carrying ``code``."""
    with pytest.raises(ProtocolError) as info:
        yield info
    assert info.value.code == code, f"expected {code!r}, got {info.value.code!r}: {info.value}"


def msg(mtype: str, **fields):
    return {"v": P.PROTOCOL_VERSION, "type": mtype, **fields}


# --- pack / unpack -----------------------------------------------------------------

def test_pack_unpack_round_trip_adds_protocol_version():
    original = {"type": "frame", "stream": 3, "seq": 42, "ts": -5, "name": "cam",
                "params": {"strength": 0.5, "prompt": "a cat"}, "blob": b"\x00\x01"}
    decoded = P.unpack(P.pack(original))
    assert decoded == {**original, "v": P.PROTOCOL_VERSION}


def test_pack_keeps_an_explicit_version():
    assert P.unpack(P.pack({"type": "hello", "v": 99}))["v"] == 99


def test_pack_does_not_modify_its_argument():
    original = {"type": "hello"}
    P.pack(original)
    assert original == {"type": "hello"}


def test_unpack_rejects_bytes_that_are_not_msgpack():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.unpack(b"\xc1 this is not msgpack")


def test_unpack_rejects_truncated_msgpack():
    data = P.pack({"type": "hello", "client": "x" * 50})
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.unpack(data[:-10])


def test_unpack_rejects_a_list():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.unpack(msgpack.packb([1, "hello", 3]))


def test_unpack_rejects_a_scalar():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.unpack(msgpack.packb(17))


def test_unpack_accepts_a_message_of_exactly_the_maximum_size():
    overhead = len(P.pack({"type": "hello", "client": "x" * 100_000})) - 100_000
    data = P.pack({"type": "hello", "client": "x" * (P.MAX_CONTROL_BYTES - overhead)})
    assert len(data) == P.MAX_CONTROL_BYTES
    assert P.unpack(data)["type"] == "hello"


def test_unpack_rejects_an_oversize_message():
    data = P.pack({"type": "hello", "client": "x" * P.MAX_CONTROL_BYTES})
    assert len(data) > P.MAX_CONTROL_BYTES
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.unpack(data)


# --- validate_client_message ---------------------------------------------------------

VALID_CLIENT_MESSAGES = {
    "hello": msg("hello", client="obs", token="secret", transport="shm"),
    "open": msg("open", name="cam", width=64, height=48, fps=29.97, format="rgba", channels=4,
                dtype="uint8", origin="bottom", stride=256, engine="passthrough",
                params={"strength": 0.4}, output={"width": 32, "height": 24}, slots=3,
                transport="inline"),
    "params": msg("params", stream=1, params={"prompt": "a cat"}),
    "control": msg("control", name="webcam", params={"prompt": "a cat"}),
    "frame": msg("frame", stream=1, seq=2, slot=0, ts=123456, stride=192),
    "stats": msg("stats", stream=1),
    "streams": msg("streams"),
    "presets": msg("presets", op="list"),
    "cues": msg("cues", name="webcam", op="play", cues=[{"preset": "night", "transition": 2.0}]),
    "thumbnail": msg("thumbnail", name="webcam", width=160),
    "heartbeat": msg("heartbeat"),
    "close": msg("close", stream=1),
    "bye": msg("bye"),
}


def test_every_client_message_type_has_a_valid_example():
    assert set(VALID_CLIENT_MESSAGES) == set(P.CLIENT_MESSAGES)


@pytest.mark.parametrize("mtype", sorted(VALID_CLIENT_MESSAGES))
def test_valid_message_passes_and_returns_its_type(mtype):
    assert P.validate_client_message(VALID_CLIENT_MESSAGES[mtype]) == mtype


@pytest.mark.parametrize("mtype", sorted(VALID_CLIENT_MESSAGES))
def test_minimal_message_with_only_required_fields_passes(mtype):
    required = {f: VALID_CLIENT_MESSAGES[mtype][f]
                for f, (_, req) in P.CLIENT_MESSAGES[mtype].items() if req}
    assert P.validate_client_message(msg(mtype, **required)) == mtype


def test_valid_message_with_integer_id_passes():
    assert P.validate_client_message(msg("heartbeat", id=7)) == "heartbeat"


def test_integer_where_a_number_is_allowed_passes():
    assert P.validate_client_message(msg("open", name="cam", width=64, height=48, fps=30)) == "open"


def test_message_without_version_is_a_bad_message():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message({"type": "hello"})


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_non_integer_version_is_a_bad_message(version):
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message({"v": version, "type": "hello"})


@pytest.mark.parametrize("version", [0, 2, P.PROTOCOL_VERSION + 1])
def test_other_protocol_version_is_unsupported(version):
    with raises_code(ErrorCode.UNSUPPORTED_VERSION):
        P.validate_client_message({"v": version, "type": "hello"})


def test_message_without_type_is_a_bad_message():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message({"v": P.PROTOCOL_VERSION})


def test_non_string_type_is_a_bad_message():
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message({"v": P.PROTOCOL_VERSION, "type": 5})


@pytest.mark.parametrize("mtype", ["launch", "welcome", "error", "HELLO", ""])
def test_unknown_type_is_rejected(mtype):
    # Server message types are not valid from a client either.
    with raises_code(ErrorCode.UNKNOWN_TYPE):
        P.validate_client_message(msg(mtype))


@pytest.mark.parametrize("mtype, missing", [
    ("open", "name"), ("open", "width"), ("open", "height"),
    ("params", "stream"), ("presets", "op"),
    ("frame", "stream"), ("frame", "seq"),
    ("close", "stream"),
])
def test_missing_required_field_is_a_bad_message(mtype, missing):
    bad = dict(VALID_CLIENT_MESSAGES[mtype])
    del bad[missing]
    with raises_code(ErrorCode.BAD_MESSAGE) as info:
        P.validate_client_message(bad)
    assert missing in info.value.message


@pytest.mark.parametrize("mtype, field, value", [
    ("open", "name", 5),
    ("open", "width", "64"),
    ("open", "height", 48.0),
    ("open", "fps", "30"),
    ("open", "params", [1, 2]),
    ("open", "output", "big"),
    ("params", "params", "strength=1"),
    ("frame", "seq", None),
    ("frame", "slot", 1.5),
    ("hello", "client", b"obs"),
    ("stats", "stream", "1"),
])
def test_wrongly_typed_field_is_a_bad_message(mtype, field, value):
    bad = {**VALID_CLIENT_MESSAGES[mtype], field: value}
    with raises_code(ErrorCode.BAD_MESSAGE) as info:
        P.validate_client_message(bad)
    assert field in info.value.message


@pytest.mark.parametrize("mtype, field", [
    ("open", "width"), ("open", "fps"), ("frame", "seq"), ("frame", "ts"), ("close", "stream"),
])
def test_bool_where_a_number_is_required_is_a_bad_message(mtype, field):
    bad = {**VALID_CLIENT_MESSAGES[mtype], field: True}
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message(bad)


@pytest.mark.parametrize("rid", ["1", 1.5, True, [1]])
def test_non_integer_id_is_a_bad_message(rid):
    with raises_code(ErrorCode.BAD_MESSAGE):
        P.validate_client_message(msg("heartbeat", id=rid))


def test_error_builder_carries_code_message_and_optional_references():
    assert P.error("limit", "too many") == {"type": "error", "code": "limit",
                                            "message": "too many"}
    assert P.error("unknown_stream", "gone", re=4, stream=9) == {
        "type": "error", "code": "unknown_stream", "message": "gone", "re": 4, "stream": 9}


# --- FrameSpec.from_msg ----------------------------------------------------------------

def test_from_msg_defaults_to_tight_top_down_rgb8():
    spec = FrameSpec.from_msg({"width": 64, "height": 48})
    assert spec == FrameSpec(64, 48, "rgb", "uint8", "top", 0)


def test_from_msg_keeps_every_given_field():
    spec = FrameSpec.from_msg({"width": 64, "height": 48, "format": "bgra", "dtype": "float16",
                               "origin": "bottom", "channels": 4})
    assert spec == FrameSpec(64, 48, "bgra", "float16", "bottom", 0)


@pytest.mark.parametrize("side", [P.MIN_SIDE, P.MAX_SIDE])
def test_from_msg_accepts_sides_at_the_bounds(side):
    spec = FrameSpec.from_msg({"width": side, "height": side})
    assert (spec.width, spec.height) == (side, side)


@pytest.mark.parametrize("key", ["width", "height"])
@pytest.mark.parametrize("value", [P.MIN_SIDE - 1, P.MAX_SIDE + 1, 0, -64])
def test_from_msg_rejects_sides_out_of_bounds(key, value):
    fields = {"width": 64, "height": 48, key: value}
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg(fields)


@pytest.mark.parametrize("key", ["width", "height"])
@pytest.mark.parametrize("value", [None, "64", 64.0, True])
def test_from_msg_rejects_non_integer_sides(key, value):
    fields = {"width": 64, "height": 48, key: value}
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg(fields)


def test_from_msg_requires_a_size():
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"format": "rgb"})


@pytest.mark.parametrize("key, value", [
    ("format", "yuv420"), ("format", "RGB"),
    ("dtype", "int8"), ("dtype", "float64"),
    ("origin", "left"), ("origin", "middle"),
])
def test_from_msg_rejects_unknown_format_dtype_or_origin(key, value):
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, key: value})


@pytest.mark.parametrize("key", ["format", "dtype", "origin"])
def test_from_msg_rejects_an_unhashable_format_dtype_or_origin(key):
    # The 'output' map of OPEN is only checked to be a map, so its values reach from_msg as is.
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({key: ["rgb"]}, default=FrameSpec(64, 48))


@pytest.mark.parametrize("fmt, channels", [("rgb", 4), ("rgba", 3), ("gray", 3), ("bgr", 1)])
def test_from_msg_rejects_channels_that_contradict_the_format(fmt, channels):
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, "format": fmt, "channels": channels})


@pytest.mark.parametrize("fmt", sorted(P.FORMATS))
def test_from_msg_accepts_channels_that_match_the_format(fmt):
    spec = FrameSpec.from_msg({"width": 64, "height": 48, "format": fmt,
                               "channels": P.FORMATS[fmt]})
    assert spec.channels == P.FORMATS[fmt]


def test_from_msg_rejects_stride_below_the_row_size():
    # 64 px * 3 channels * 1 byte = 192 bytes per row
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, "stride": 191})


def test_from_msg_rejects_stride_above_four_rows():
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, "stride": 4 * 192 + 1})


@pytest.mark.parametrize("stride", [-192, 200.0, "256"])
def test_from_msg_rejects_negative_or_non_integer_stride(stride):
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, "stride": stride})


@pytest.mark.parametrize("stride", [192, 256, 4 * 192])
def test_from_msg_keeps_a_valid_stride(stride):
    spec = FrameSpec.from_msg({"width": 64, "height": 48, "stride": stride})
    assert spec.stride == stride
    assert spec.row_stride == stride
    assert spec.nbytes == stride * 48


def test_from_msg_stride_bounds_account_for_dtype_size():
    # float32 rgba: 16 bytes per pixel, so 64 px = 1024 bytes per row
    spec = FrameSpec.from_msg({"width": 64, "height": 8, "format": "rgba", "dtype": "float32",
                               "stride": 1024 + 64})
    assert spec.row_stride == 1088
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 8, "format": "rgba", "dtype": "float32",
                            "stride": 1023})


def test_from_msg_zero_stride_means_tightly_packed():
    spec = FrameSpec.from_msg({"width": 64, "height": 48, "stride": 0})
    assert spec.stride == 0
    assert spec.row_stride == spec.row_bytes


# --- FrameSpec properties ----------------------------------------------------------------

@pytest.mark.parametrize("fmt, dtype, channels, row_bytes", [
    ("rgb", "uint8", 3, 64 * 3),
    ("bgr", "uint8", 3, 64 * 3),
    ("rgba", "uint8", 4, 64 * 4),
    ("bgra", "uint16", 4, 64 * 4 * 2),
    ("gray", "uint8", 1, 64),
    ("gray", "float16", 1, 64 * 2),
    ("rgb", "float32", 3, 64 * 3 * 4),
    ("rgba", "float32", 4, 64 * 4 * 4),
])
def test_spec_geometry(fmt, dtype, channels, row_bytes):
    spec = FrameSpec(64, 48, fmt, dtype)
    assert spec.channels == channels
    assert spec.row_bytes == row_bytes
    assert spec.row_stride == row_bytes
    assert spec.nbytes == row_bytes * 48
    assert spec.shape == (48, 64, channels)
    assert spec.np_dtype.name == dtype


def test_padded_spec_counts_the_padding_in_nbytes_but_not_row_bytes():
    spec = FrameSpec(10, 8, "rgb", stride=64)
    assert spec.row_bytes == 30
    assert spec.nbytes == 64 * 8


def test_to_msg_round_trips_through_from_msg():
    spec = FrameSpec(64, 48, "gray", "float32", "bottom", 512)
    assert FrameSpec.from_msg(spec.to_msg()) == spec


# --- output spec defaulting ----------------------------------------------------------------

def test_empty_output_takes_everything_from_the_default():
    inp = FrameSpec(64, 48, "rgba", "float16", "bottom")
    assert FrameSpec.from_msg({}, default=inp) == inp


def test_output_overrides_only_the_fields_it_names():
    inp = FrameSpec(64, 48, "rgba", "float16", "bottom")
    out = FrameSpec.from_msg({"width": 32, "format": "gray"}, default=inp)
    assert out == FrameSpec(32, 48, "gray", "float16", "bottom", 0)


def test_output_does_not_inherit_the_input_stride():
    inp = FrameSpec(64, 48, "rgb", stride=256)
    out = FrameSpec.from_msg({}, default=inp)
    assert out.stride == 0
    assert out.row_stride == out.row_bytes


def test_output_fields_are_validated_like_input_fields():
    inp = FrameSpec(64, 48)
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": P.MAX_SIDE + 1}, default=inp)
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"channels": 4}, default=inp)


def test_output_channels_are_checked_against_the_inherited_format():
    inp = FrameSpec(64, 48, "rgba")
    assert FrameSpec.from_msg({"channels": 4}, default=inp).format == "rgba"


def test_stride_must_be_a_multiple_of_the_sample_size():
    with raises_code(ErrorCode.BAD_SPEC):
        FrameSpec.from_msg({"width": 64, "height": 48, "dtype": "float32", "stride": 770})
    assert FrameSpec.from_msg({"width": 64, "height": 48, "dtype": "float32",
                               "stride": 772}).stride == 772
