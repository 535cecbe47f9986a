"""Property tests (hypothesis): the protocol codec, the parameter validation and the ring
header parser never fail any way but their own error, whatever they are given."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livediffusion.daemon.engines.base import ParamError
from livediffusion.shared import protocol as P
from livediffusion.shared.ring import SLOT_HEADER, FrameRing, RingError, TornRead

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20)


@FAST
@given(st.dictionaries(st.text(max_size=12), values, max_size=8),
       st.sampled_from(list(P.CLIENT_MESSAGES) + ["nonsense", ""]))
def test_any_map_is_a_valid_message_or_a_protocol_error(fields, mtype):
    msg = {**fields, "type": mtype, "v": 1}
    data = msgpack.packb(msg, use_bin_type=True)
    back = P.unpack(data)
    assert msgpack.packb(back, use_bin_type=True) == data   # (NaN != NaN: compare bytes)
    try:
        assert P.validate_client_message(back) == mtype
    except P.ProtocolError as exc:
        assert exc.code in (P.ErrorCode.BAD_MESSAGE, P.ErrorCode.UNKNOWN_TYPE)


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_map_or_a_protocol_error(data):
    try:
        assert isinstance(P.unpack(data), dict)
    except P.ProtocolError as exc:
        assert exc.code == P.ErrorCode.BAD_MESSAGE
    assert P.request_id(data) is None or isinstance(P.request_id(data), int)


def _schemas():
    from livediffusion.daemon.engines.image import params as I
    from livediffusion.daemon.engines.passthrough import SCHEMA as PS
    from livediffusion.daemon.engines.passthrough import PassthroughParams
    from livediffusion.daemon.engines.video import params as V
    return [(V.SCHEMA, V.VideoParams()), (I.SCHEMA, I.ImageParams()),
            (PS, PassthroughParams())]


@FAST
@given(st.integers(0, 2), st.dictionaries(st.sampled_from(
    ["prompt", "prompts", "seed", "seeds", "noise_scale", "steps", "strength", "guidance",
     "cache_frames", "sinks", "rope_max", "decoder", "mode", "gain", "t_index_list", "cfg",
     "loras", "reset", "prompt_blend", "unknown"]), values, max_size=4))
def test_parameter_validation_accepts_or_refuses_and_what_it_accepts_is_stable(which, changes):
    schema, current = _schemas()[which]
    try:
        new, _ = schema.apply(current, changes)
    except ParamError:
        return
    # what was accepted holds finite numbers only and validates again unchanged
    for name in schema.params:
        value = getattr(new, name)
        if isinstance(value, float):
            assert math.isfinite(value)
    again, _ = schema.apply(new, {})
    assert again == new


@pytest.fixture(scope="module")
def ring():
    r = FrameRing.create(2, 4096, tag="p")
    yield r
    r.close()


@FAST
@given(st.binary(min_size=SLOT_HEADER.size, max_size=SLOT_HEADER.size))
def test_any_slot_header_parses_or_is_refused(ring, raw):
    base = ring._slot_offset(0)   # noqa: SLF001 - the test writes the header bytes by hand
    ring._buf[base:base + SLOT_HEADER.size] = raw   # noqa: SLF001
    try:
        hdr = ring.header(0)
    except RingError:
        return
    assert hdr.stride * hdr.height <= ring.capacity and hdr.width > 0 and hdr.height > 0
    try:
        got, pixels = ring.view(0)
    except (TornRead, RingError):
        return
    assert pixels.nbytes <= ring.capacity
