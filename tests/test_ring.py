"""Frame rings in real shared memory: seqlocked slots, header checks, life cycle."""

from __future__ import annotations

import os
import secrets
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np
import pytest

from livediffusion.shared import ring as R
from livediffusion.shared.protocol import FrameSpec
from livediffusion.shared.ring import FrameRing, RingError, TornRead, stale_segments

SPEC = FrameSpec(64, 48, "rgb", "uint8", "top")


def pixels(spec: FrameSpec, seed: int = 0) -> np.ndarray:
    """A random frame matching ``spec``."""
    rng = np.random.default_rng(seed)
    if spec.np_dtype.kind == "f":
        return rng.random(spec.shape).astype(spec.np_dtype)
    info = np.iinfo(spec.np_dtype)
    return rng.integers(0, info.max, spec.shape, dtype=spec.np_dtype, endpoint=True)


@pytest.fixture
def make_ring():
    """Create owner rings that are closed (and unlinked) after the test."""
    rings: list[FrameRing] = []

    def make(slots: int = 3, capacity: int = SPEC.nbytes) -> FrameRing:
        ring = FrameRing.create(slots, capacity, tag="t")
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()


@pytest.fixture
def ring(make_ring) -> FrameRing:
    return make_ring()


@contextmanager
def attached(name: str):
    ring = FrameRing.attach(name)
    try:
        yield ring
    finally:
        ring.close()


@contextmanager
def raw_segment(name: str):
    """The segment's bytes, mapped without going through FrameRing (to corrupt them)."""
    shm = shared_memory.SharedMemory(name=name)
    try:
        yield shm.buf
    finally:
        shm.close()


def slot_base(ring: FrameRing, slot: int) -> int:
    return R.RING_HEADER_SIZE + slot * ring.slot_stride


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


# --- writing and reading ------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    FrameSpec(64, 48, "rgb", "uint8", "top"),
    FrameSpec(33, 17, "bgra", "uint8", "bottom"),
    FrameSpec(40, 30, "gray", "uint16", "bottom"),
    FrameSpec(32, 24, "rgba", "float32", "top"),
    FrameSpec(32, 24, "bgr", "float16", "top"),
], ids=lambda s: f"{s.format}-{s.dtype}-{s.origin}")
def test_write_then_read_returns_the_same_pixels_and_header(make_ring, spec):
    ring = make_ring(capacity=spec.nbytes)
    frame = pixels(spec, seed=1)
    ring.write(1, 5, frame, spec, ts=-123456789, ref_seq=4, t_write_ns=987654321)

    hdr, out = ring.read(1, expected_seq=5)

    np.testing.assert_array_equal(out, frame)
    assert out.dtype == frame.dtype
    assert (hdr.seq, hdr.ts, hdr.ref_seq, hdr.t_write_ns) == (5, -123456789, 4, 987654321)
    assert (hdr.width, hdr.height, hdr.channels) == (spec.width, spec.height, spec.channels)
    assert (hdr.format, hdr.dtype, hdr.origin) == (spec.format, spec.dtype, spec.origin)
    assert hdr.stride == spec.row_bytes
    assert hdr.nbytes == spec.nbytes
    assert hdr.spec == FrameSpec(spec.width, spec.height, spec.format, spec.dtype, spec.origin,
                                 spec.row_bytes)


def test_read_without_expected_seq_returns_whatever_is_published(ring):
    ring.write(0, 9, pixels(SPEC), SPEC)
    hdr, _ = ring.read(0)
    assert hdr.seq == 9


def test_read_returns_a_copy_that_outlives_the_slot(ring):
    first, second = pixels(SPEC, 1), pixels(SPEC, 2)
    ring.write(0, 1, first, SPEC)
    _, out = ring.read(0, 1)
    ring.write(0, 2, second, SPEC)
    np.testing.assert_array_equal(out, first)


def test_read_fills_a_matching_out_array_in_place(ring):
    frame = pixels(SPEC)
    ring.write(0, 1, frame, SPEC)
    out = np.zeros(SPEC.shape, SPEC.np_dtype)
    _, got = ring.read(0, 1, out=out)
    assert got is out
    np.testing.assert_array_equal(out, frame)


def test_view_is_zero_copy_and_intact_while_the_slot_is_untouched(ring):
    frame = pixels(SPEC)
    ring.write(2, 3, frame, SPEC)
    hdr, view = ring.view(2, 3)
    np.testing.assert_array_equal(view, frame)
    assert ring.is_intact(2, 3)
    assert hdr.seq == 3
    del view


def test_each_slot_keeps_its_own_frame(ring):
    frames = [pixels(SPEC, seed) for seed in range(ring.slots)]
    for slot, frame in enumerate(frames):
        ring.write(slot, slot + 1, frame, SPEC)
    for slot, frame in enumerate(frames):
        np.testing.assert_array_equal(ring.read(slot, slot + 1)[1], frame)


def test_padded_stride_round_trips(make_ring):
    spec = FrameSpec(30, 20, "rgb", "uint8", "top", stride=30 * 3 + 38)
    assert spec.row_stride > spec.row_bytes
    ring = make_ring(capacity=spec.nbytes)
    frame = pixels(spec, seed=3)
    ring.write(0, 1, frame, spec)

    hdr, out = ring.read(0, 1)

    np.testing.assert_array_equal(out, frame)
    assert hdr.stride == spec.row_stride
    assert hdr.spec == spec


def test_padded_stride_float_frame_round_trips(make_ring):
    spec = FrameSpec(16, 8, "rgba", "float32", "bottom", stride=16 * 16 + 64)
    ring = make_ring(capacity=spec.nbytes)
    frame = pixels(spec, seed=4)
    ring.write(0, 1, frame, spec)
    np.testing.assert_array_equal(ring.read(0, 1)[1], frame)


def test_smaller_frame_than_capacity_round_trips(make_ring):
    ring = make_ring(capacity=SPEC.nbytes)
    small = FrameSpec(16, 8, "gray")
    frame = pixels(small)
    ring.write(0, 1, frame, small)
    hdr, out = ring.read(0, 1)
    assert (hdr.width, hdr.height, hdr.format) == (16, 8, "gray")
    np.testing.assert_array_equal(out, frame)


# --- torn and stale reads -----------------------------------------------------------------

def test_read_with_a_different_expected_seq_is_torn(ring):
    ring.write(0, 4, pixels(SPEC), SPEC)
    with pytest.raises(TornRead):
        ring.read(0, expected_seq=3)
    with pytest.raises(TornRead):
        ring.view(0, expected_seq=5)


def test_never_written_slot_is_unreadable(ring):
    with pytest.raises(TornRead):
        ring.read(0)


def test_slot_being_written_for_the_first_time_is_torn(ring):
    view = ring.begin_write(0, 1, SPEC)
    view[...] = 7
    with pytest.raises(TornRead):
        ring.read(0)
    with pytest.raises(TornRead):
        ring.read(0, expected_seq=1)
    del view


def test_slot_being_rewritten_is_torn_for_the_old_and_the_new_seq(ring):
    ring.write(0, 1, pixels(SPEC), SPEC)
    view = ring.begin_write(0, 2, SPEC)
    assert not ring.is_intact(0, 1)
    with pytest.raises(TornRead):
        ring.read(0, expected_seq=1)
    with pytest.raises(TornRead):
        ring.read(0, expected_seq=2)
    with pytest.raises(TornRead):
        ring.read(0)
    del view


def test_end_write_publishes_the_slot(ring):
    frame = pixels(SPEC)
    view = ring.begin_write(0, 1, SPEC, ts=11)
    view[...] = frame
    del view
    ring.end_write(0, 1)
    hdr, out = ring.read(0, 1)
    assert hdr.ts == 11
    np.testing.assert_array_equal(out, frame)


def test_rewrite_after_view_is_detected_by_is_intact(ring):
    ring.write(0, 1, pixels(SPEC, 1), SPEC)
    _, view = ring.view(0, 1)
    assert ring.is_intact(0, 1)

    ring.write(0, 2, pixels(SPEC, 2), SPEC)

    assert not ring.is_intact(0, 1)
    del view


def test_rewrite_in_progress_after_view_is_detected_by_is_intact(ring):
    ring.write(0, 1, pixels(SPEC, 1), SPEC)
    _, view = ring.view(0, 1)
    writing = ring.begin_write(0, 2, SPEC)
    assert not ring.is_intact(0, 1)
    assert not ring.is_intact(0, 2)
    del view, writing


def test_abandoned_write_leaves_the_slot_unreadable(ring):
    ring.write(0, 1, pixels(SPEC), SPEC)
    view = ring.begin_write(0, 2, SPEC)
    del view
    ring.abandon_write(0)
    with pytest.raises(TornRead):
        ring.read(0)
    with pytest.raises(TornRead):
        ring.read(0, expected_seq=1)
    assert ring.newest() is None


def test_abandoning_a_published_slot_makes_it_unreadable(ring):
    ring.write(0, 1, pixels(SPEC), SPEC)
    ring.abandon_write(0)
    with pytest.raises(TornRead):
        ring.read(0)


# --- newest ---------------------------------------------------------------------------

def test_newest_of_an_empty_ring_is_none(ring):
    assert ring.newest() is None


def test_newest_is_the_slot_with_the_highest_complete_seq(make_ring):
    ring = make_ring(slots=4)
    for slot, seq in [(0, 5), (1, 8), (2, 6), (3, 7)]:
        ring.write(slot, seq, pixels(SPEC), SPEC)
    assert ring.newest() == 1


def test_newest_ignores_a_half_written_slot(make_ring):
    ring = make_ring(slots=3)
    ring.write(0, 1, pixels(SPEC), SPEC)
    ring.write(1, 2, pixels(SPEC), SPEC)
    view = ring.begin_write(2, 3, SPEC)
    assert ring.newest() == 1
    # a half-written rewrite of the newest slot takes it out of the running too
    rewrite = ring.begin_write(1, 4, SPEC)
    assert ring.newest() == 0
    ring.end_write(2, 3)
    assert ring.newest() == 2
    del view, rewrite


# --- invalid writes -------------------------------------------------------------------------

def test_frame_bigger_than_the_capacity_is_refused(make_ring):
    ring = make_ring(capacity=SPEC.nbytes)
    big = FrameSpec(SPEC.width, SPEC.height + 1)
    with pytest.raises(RingError):
        ring.write(0, 1, pixels(big), big)
    with pytest.raises(RingError):
        ring.begin_write(0, 1, big)
    assert ring.newest() is None


def test_padding_counts_towards_the_capacity(make_ring):
    ring = make_ring(capacity=SPEC.nbytes)
    padded = FrameSpec(SPEC.width, SPEC.height, stride=SPEC.row_bytes + 64)
    with pytest.raises(RingError):
        ring.begin_write(0, 1, padded)


def test_frame_not_matching_its_spec_is_refused(ring):
    with pytest.raises(ValueError):
        ring.write(0, 1, pixels(FrameSpec(32, 32)), SPEC)
    with pytest.raises(ValueError):
        ring.write(0, 1, pixels(SPEC).astype(np.uint16), SPEC)


def test_seq_zero_is_refused(ring):
    with pytest.raises(ValueError):
        ring.write(0, 0, pixels(SPEC), SPEC)


@pytest.mark.parametrize("slot", [-1, 3])
def test_slot_outside_the_ring_is_refused(ring, slot):
    with pytest.raises(RingError):
        ring.write(slot, 1, pixels(SPEC), SPEC)
    with pytest.raises(RingError):
        ring.read(slot)


def test_ring_needs_a_slot():
    with pytest.raises(ValueError):
        FrameRing.create(0, 1024)


# --- corrupted slot headers ------------------------------------------------------------------

# SLOT_HEADER "<QIIIHBBB3xIqqQQ": seq@0 width@8 height@12 stride@16 channels@20 dtype@22
# format@23 origin@24 nbytes@28 ts@32 t_write_ns@40 ref_seq@48
CORRUPTIONS = {
    "huge-width": (8, "<I", 0xFFFFFFFF),
    "zero-width": (8, "<I", 0),
    "zero-height": (12, "<I", 0),
    "stride-below-row": (16, "<I", SPEC.row_bytes - 1),
    "frame-beyond-capacity": (12, "<I", SPEC.height + 1),
    "channels-contradict-format": (20, "<H", 4),
    "unknown-dtype": (22, "<B", 99),
    "unknown-format": (23, "<B", 0),
    "unknown-origin": (24, "<B", 2),
}


@pytest.mark.parametrize("offset, fmt, value", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_impossible_slot_header_is_refused(ring, offset, fmt, value):
    ring.write(1, 1, pixels(SPEC), SPEC)
    with raw_segment(ring.name) as buf:
        struct.pack_into(fmt, buf, slot_base(ring, 1) + offset, value)

    for read in (lambda: ring.header(1), lambda: ring.view(1, 1), lambda: ring.read(1, 1)):
        with pytest.raises(RingError) as info:
            read()
        assert not isinstance(info.value, TornRead), "a corrupt header is not a torn read"


def test_intact_slot_header_is_accepted_after_a_harmless_edit(ring):
    """Control for the corruption tests: rewriting a field with its own value is fine."""
    ring.write(1, 1, pixels(SPEC), SPEC)
    with raw_segment(ring.name) as buf:
        struct.pack_into("<I", buf, slot_base(ring, 1) + 8, SPEC.width)
    assert ring.header(1).width == SPEC.width


# --- attaching and the segment life cycle -----------------------------------------------------

def test_attached_ring_reads_what_the_owner_wrote(ring):
    frame = pixels(SPEC)
    ring.write(2, 3, frame, SPEC, ts=99)
    with attached(ring.name) as other:
        assert not other.owner
        assert (other.slots, other.capacity, other.slot_stride) == (
            ring.slots, ring.capacity, ring.slot_stride)
        hdr, out = other.read(2, 3)
    assert hdr.ts == 99
    np.testing.assert_array_equal(out, frame)


def test_owner_close_unlinks_the_segment():
    ring = FrameRing.create(2, 1024, tag="t")
    name = ring.name
    try:
        assert shm_exists(name)
        ring.close()
        assert ring.closed
        assert not shm_exists(name)
        with pytest.raises(RingError):
            FrameRing.attach(name)
    finally:
        ring.close()  # a second close is harmless


def test_owner_close_with_a_live_view_still_unlinks():
    ring = FrameRing.create(2, SPEC.nbytes, tag="t")
    try:
        ring.write(0, 1, pixels(SPEC), SPEC)
        _, view = ring.view(0, 1)
        ring.close()
        assert not shm_exists(ring.name)
        del view
    finally:
        ring.close()


def test_non_owner_close_does_not_unlink(ring):
    frame = pixels(SPEC)
    ring.write(0, 1, frame, SPEC)
    other = FrameRing.attach(ring.name)
    other.close()
    assert other.closed
    assert shm_exists(ring.name)
    with attached(ring.name) as again:
        np.testing.assert_array_equal(again.read(0, 1)[1], frame)


def test_attaching_a_missing_segment_is_a_ring_error():
    with pytest.raises(RingError):
        FrameRing.attach(f"ld{os.getpid():x}_nosuch{secrets.token_hex(3)}")


@pytest.mark.parametrize("offset, fmt, value", [
    (0, "<8s", b"NOTARING"),            # magic
    (8, "<I", R.RING_VERSION + 1),      # version
    (24, "<I", 32),                     # slot header size
    (12, "<I", 1000),                   # slots: more than the segment holds
], ids=["magic", "version", "slot-header-size", "slot-count"])
def test_attaching_a_segment_that_is_not_a_valid_ring_is_a_ring_error(ring, offset, fmt, value):
    with raw_segment(ring.name) as buf:
        struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(RingError):
        FrameRing.attach(ring.name)


def test_attaching_a_ring_whose_capacity_overflows_its_slots_is_a_ring_error(ring):
    with raw_segment(ring.name) as buf:
        struct.pack_into("<I", buf, 20, 1 << 24)  # capacity
    with pytest.raises(RingError):
        FrameRing.attach(ring.name).close()


CHILD_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from livediffusion.shared.protocol import FrameSpec
    from livediffusion.shared.ring import FrameRing
    spec = FrameSpec(64, 48)
    frame = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(spec.shape)
    ring = FrameRing.attach(sys.argv[1])
    ring.write(1, 7, frame, spec, ts=1234)
    ring.close()
""")


def test_frame_written_by_another_process_survives_its_exit(ring):
    # stdout/stderr are pipes that the child's resource tracker (if any) inherits, so run()
    # returns only after that tracker is gone too: had it unlinked the segment, we would see.
    done = subprocess.run([sys.executable, "-c", CHILD_WRITER, ring.name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr

    assert shm_exists(ring.name)
    hdr, out = ring.read(1, expected_seq=7)
    assert hdr.ts == 1234
    expected = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(SPEC.shape)
    np.testing.assert_array_equal(out, expected)
    with attached(ring.name) as again:
        assert again.read(1, 7)[0].seq == 7


# --- stale segments -------------------------------------------------------------------------

def dead_pid() -> int:
    """A pid that no process has now (probed from the top of the pid range down)."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            top = int(f.read())
    except OSError:
        top = 1 << 22
    for pid in range(top - 1, 1, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="stale_segments scans /dev/shm")
def test_stale_segments_reports_a_segment_of_a_dead_process():
    name = f"ld{dead_pid():x}_test{secrets.token_hex(3)}"
    shm = shared_memory.SharedMemory(name=name, create=True, size=64)
    try:
        assert name in stale_segments()
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="stale_segments scans /dev/shm")
def test_stale_segments_does_not_report_a_segment_of_a_live_process(ring):
    assert ring.name.startswith(f"ld{os.getpid():x}_")
    assert ring.name not in stale_segments()


def test_segment_names_carry_the_pid_and_fit_macos(make_ring):
    a, b = make_ring(), make_ring()
    assert a.name != b.name
    for name in (a.name, b.name):
        assert name.startswith(f"ld{os.getpid():x}_")
        assert len(name) <= 30
