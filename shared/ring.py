"""Frame rings: N slots of pixels in one shared-memory segment, read without locks.

The daemon creates and owns every segment (it alone unlinks them); clients only attach.
Each slot is a seqlock: the writer stores the sequence number in the slot header *before*
the pixels and again in a trailer *after* them.  A reader loads the trailer, copies,
then loads the header number; if the two differ (or differ from the number a notice
announced) the slot was overwritten mid-read and the copy is discarded.

Segment layout (little-endian, every block 64-byte aligned; docs/protocol.md repeats it):

    ring header  64 bytes   magic "LDRING01", u32 version, u32 slots, u32 slot_stride,
                            u32 capacity (pixel bytes per slot), u32 slot header size
    slot i       at 64 + i * slot_stride:
        header   64 bytes   see SLOT_HEADER
        pixels   capacity bytes (rounded up to 64)
        trailer  u64 seq_end (then padding to 64)
"""

from __future__ import annotations

import os
import secrets
import struct
import sys
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from .protocol import (DTYPE_BY_CODE, DTYPE_CODES, DTYPES, FORMAT_BY_CODE, FORMAT_CODES, FORMATS,
                       ORIGIN_BY_CODE, ORIGINS, FrameSpec)

RING_MAGIC = b"LDRING01"
RING_VERSION = 1
RING_HEADER = struct.Struct("<8sIIIII")  # magic, version, slots, slot_stride, capacity, hdr size
RING_HEADER_SIZE = 64
#: seq_begin, width, height, stride, channels, dtype, format, origin, (pad), payload bytes,
#: ts (writer's opaque timestamp, echoed), t_write_ns (writer's clock), ref_seq, reserved
SLOT_HEADER = struct.Struct("<QIIIHBBB3xIqqQQ")
SLOT_HEADER_SIZE = 64
SEQ = struct.Struct("<Q")
ALIGN = 64

assert SLOT_HEADER.size == SLOT_HEADER_SIZE

# Segments created by this process: attaching to one of them must not touch the resource
# tracker registration that creating it made (same process, same tracker).
_CREATED_HERE: set[str] = set()


class RingError(Exception):
    """A slot cannot be read: torn, stale, or its header is impossible."""


class TornRead(RingError):
    """The writer overwrote the slot while it was being read, or has not finished it."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def new_segment_name(tag: str) -> str:
    """A short unique segment name (macOS allows 31 characters) carrying the owner's pid."""
    return f"ld{os.getpid():x}_{secrets.token_hex(3)}{tag}"[:30]


@dataclass(frozen=True)
class SlotHeader:
    seq: int
    width: int
    height: int
    stride: int
    channels: int
    dtype: str
    format: str
    origin: str
    nbytes: int
    ts: int
    t_write_ns: int
    ref_seq: int

    @property
    def spec(self) -> FrameSpec:
        return FrameSpec(self.width, self.height, self.format, self.dtype, self.origin,
                         self.stride)


def _attach(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    shm = shared_memory.SharedMemory(name=name)
    if os.name == "posix" and name not in _CREATED_HERE:
        # Python <= 3.12 registers attached segments with the resource tracker, which
        # would unlink the daemon's segment when this (client) process exits.
        from multiprocessing import resource_tracker
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    return shm


class FrameRing:
    """One direction of one stream: ``slots`` frames of up to ``capacity`` bytes each."""

    def __init__(self, shm: shared_memory.SharedMemory, *, owner: bool) -> None:
        self._shm = shm
        self.owner = owner
        self.name = shm.name
        buf = shm.buf
        if len(buf) < RING_HEADER_SIZE:
            raise RingError(f"segment {self.name} is too small to be a frame ring.")
        magic, version, slots, slot_stride, capacity, hdr = RING_HEADER.unpack_from(buf, 0)
        if magic != RING_MAGIC or version != RING_VERSION or hdr != SLOT_HEADER_SIZE:
            raise RingError(f"segment {self.name} is not a version {RING_VERSION} frame ring.")
        if slot_stride < SLOT_HEADER_SIZE + _align(capacity) + SEQ.size:
            raise RingError(f"segment {self.name} has slots too small for their capacity.")
        if len(buf) < RING_HEADER_SIZE + slots * slot_stride:
            raise RingError(f"segment {self.name} is shorter than its header says.")
        self.slots = slots
        self.slot_stride = slot_stride
        self.capacity = capacity
        self._buf = buf
        self._closed = False
        #: the bytes the mapping must keep; another process holding the segment open for
        #: writing could shrink it, and touching a page past the new end is SIGBUS, so on
        #: Linux every access checks the segment's size first (``check_size``)
        self._need = RING_HEADER_SIZE + slots * slot_stride
        self._size_fd: int | None = None
        if sys.platform.startswith("linux"):
            try:
                self._size_fd = os.open(os.path.join("/dev/shm", self.name.lstrip("/")),
                                        os.O_RDONLY)
            except OSError:
                self._size_fd = None

    # --- life cycle ----------------------------------------------------------------

    @classmethod
    def create(cls, slots: int, capacity: int, *, tag: str = "", name: str | None = None
               ) -> FrameRing:
        if slots < 1:
            raise ValueError("a frame ring needs at least one slot.")
        slot_stride = SLOT_HEADER_SIZE + _align(capacity) + ALIGN
        size = RING_HEADER_SIZE + slots * slot_stride
        shm = shared_memory.SharedMemory(name=name or new_segment_name(tag), create=True,
                                         size=size)
        if hasattr(os, "posix_fallocate") and getattr(shm, "_fd", -1) >= 0:
            # tmpfs only reserves pages when written: claim them now, so a full /dev/shm is
            # an error here instead of SIGBUS in whichever process writes the frame later
            try:
                os.posix_fallocate(shm._fd, 0, size)  # noqa: SLF001
            except OSError:
                shm.close()
                shm.unlink()
                raise
        _CREATED_HERE.add(shm.name)
        RING_HEADER.pack_into(shm.buf, 0, RING_MAGIC, RING_VERSION, slots, slot_stride, capacity,
                              SLOT_HEADER_SIZE)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        try:
            shm = _attach(name)
        except FileNotFoundError:
            raise RingError(f"frame ring {name!r} does not exist (daemon gone?).") from None
        try:
            return cls(shm, owner=False)
        except RingError:
            shm.close()
            raise

    def check_size(self) -> None:
        """RingError instead of SIGBUS when the segment was shrunk under the mapping."""
        if self._size_fd is not None and os.fstat(self._size_fd).st_size < self._need:
            raise RingError(f"segment {self.name} was truncated to "
                            f"{os.fstat(self._size_fd).st_size} bytes (it needs "
                            f"{self._need}); its other end broke it.")

    def close(self) -> None:
        """Unmap the segment; the owner also unlinks it so its memory is released."""
        if self._closed:
            return
        self._closed = True
        if self._size_fd is not None:
            os.close(self._size_fd)
            self._size_fd = None
        self._buf = None  # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:
            pass  # a numpy view is still alive somewhere; the mapping goes when it does
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            _CREATED_HERE.discard(self.name)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- slot geometry ----------------------------------------------------------------

    def _slot_offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise RingError(f"slot {slot} is outside 0..{self.slots - 1}.")
        self.check_size()
        return RING_HEADER_SIZE + slot * self.slot_stride

    def _trailer_offset(self, base: int) -> int:
        return base + SLOT_HEADER_SIZE + _align(self.capacity)

    def slot_seq(self, slot: int) -> tuple[int, int]:
        """(seq_begin, seq_end) of a slot."""
        base = self._slot_offset(slot)
        return (SEQ.unpack_from(self._buf, base)[0],
                SEQ.unpack_from(self._buf, self._trailer_offset(base))[0])

    # --- writing --------------------------------------------------------------------------

    def begin_write(self, slot: int, seq: int, spec: FrameSpec, *, ts: int = 0,
                    ref_seq: int = 0, t_write_ns: int = 0) -> np.ndarray:
        """Mark the slot as being written and return a writable view for its pixels.

        Call ``end_write`` with the same slot and seq to publish it.
        """
        if seq <= 0:
            raise ValueError("sequence numbers start at 1.")
        nbytes = spec.nbytes
        if nbytes > self.capacity:
            raise RingError(f"a {spec.width}x{spec.height} {spec.format} {spec.dtype} frame "
                            f"needs {nbytes} bytes; the ring's slots hold {self.capacity}.")
        base = self._slot_offset(slot)
        SEQ.pack_into(self._buf, base, seq)
        SLOT_HEADER.pack_into(self._buf, base, seq, spec.width, spec.height, spec.row_stride,
                              spec.channels, DTYPE_CODES[spec.dtype], FORMAT_CODES[spec.format],
                              ORIGINS[spec.origin], nbytes, ts, t_write_ns, ref_seq, 0)
        return self._pixels(base, spec)

    def end_write(self, slot: int, seq: int) -> None:
        base = self._slot_offset(slot)
        SEQ.pack_into(self._buf, self._trailer_offset(base), seq)

    def abandon_write(self, slot: int) -> None:
        """Leave a slot marked unreadable (used when its content turned out invalid)."""
        base = self._slot_offset(slot)
        SEQ.pack_into(self._buf, self._trailer_offset(base), 0)

    def write(self, slot: int, seq: int, frame: np.ndarray, spec: FrameSpec, *, ts: int = 0,
              ref_seq: int = 0, t_write_ns: int = 0) -> None:
        """Copy ``frame`` (shape spec.shape, dtype spec.dtype) into a slot and publish it."""
        if frame.shape != spec.shape or frame.dtype != spec.np_dtype:
            raise ValueError(f"frame of shape {frame.shape} {frame.dtype} does not match "
                             f"{spec.shape} {spec.dtype}.")
        view = self.begin_write(slot, seq, spec, ts=ts, ref_seq=ref_seq, t_write_ns=t_write_ns)
        np.copyto(view, frame)
        self.end_write(slot, seq)

    # --- reading --------------------------------------------------------------------------

    def _pixels(self, base: int, spec: FrameSpec) -> np.ndarray:
        itemsize = spec.np_dtype.itemsize
        return np.ndarray(spec.shape, dtype=spec.np_dtype, buffer=self._buf,
                          offset=base + SLOT_HEADER_SIZE,
                          strides=(spec.row_stride, spec.channels * itemsize, itemsize))

    def header(self, slot: int) -> SlotHeader:
        """Parse and sanity-check a slot header (it may be torn; check the seq around use)."""
        base = self._slot_offset(slot)
        (seq, width, height, stride, channels, dtype_code, format_code, origin_code, nbytes, ts,
         t_write, ref_seq, _) = SLOT_HEADER.unpack_from(self._buf, base)
        dtype = DTYPE_BY_CODE.get(dtype_code)
        fmt = FORMAT_BY_CODE.get(format_code)
        origin = ORIGIN_BY_CODE.get(origin_code)
        if dtype is None or fmt is None or origin is None:
            raise RingError(f"slot {slot} has an unknown dtype, format or origin code.")
        if FORMATS[fmt] != channels:
            raise RingError(f"slot {slot} says format {fmt} with {channels} channels.")
        row = width * channels * DTYPES[dtype].itemsize
        if width == 0 or height == 0 or stride < row or stride * height > self.capacity or \
                stride % DTYPES[dtype].itemsize:
            raise RingError(f"slot {slot} holds an impossible {width}x{height} frame "
                            f"(stride {stride}, capacity {self.capacity}).")
        return SlotHeader(seq, width, height, stride, channels, dtype, fmt, origin, nbytes, ts,
                          t_write, ref_seq)

    def view(self, slot: int, expected_seq: int | None = None) -> tuple[SlotHeader, np.ndarray]:
        """Zero-copy view of a published slot.  Check ``is_intact`` after using it."""
        base = self._slot_offset(slot)
        end = SEQ.unpack_from(self._buf, self._trailer_offset(base))[0]
        if end == 0 or (expected_seq is not None and end != expected_seq):
            raise TornRead(f"slot {slot} holds seq {end}, not {expected_seq}.")
        hdr = self.header(slot)
        if hdr.seq != end:
            raise TornRead(f"slot {slot} is being rewritten.")
        return hdr, self._pixels(base, hdr.spec)

    def is_intact(self, slot: int, seq: int) -> bool:
        """True while the slot still holds ``seq`` completely (seqlock check after a read)."""
        begin, end = self.slot_seq(slot)
        return begin == end == seq

    def read(self, slot: int, expected_seq: int | None = None, out: np.ndarray | None = None
             ) -> tuple[SlotHeader, np.ndarray]:
        """Copy a published slot out; raises TornRead if it changed during the copy."""
        hdr, view = self.view(slot, expected_seq)
        if out is None or out.shape != view.shape or out.dtype != view.dtype:
            out = np.empty(view.shape, view.dtype)
        np.copyto(out, view)
        del view
        if not self.is_intact(slot, hdr.seq):
            raise TornRead(f"slot {slot} was overwritten during the read.")
        return hdr, out

    def newest(self) -> int | None:
        """Index of the slot with the highest complete sequence number, if any."""
        best, best_seq = None, 0
        for slot in range(self.slots):
            begin, end = self.slot_seq(slot)
            if begin == end and end > best_seq:
                best, best_seq = slot, end
        return best


def stale_segments(prefix: str = "ld") -> list[str]:
    """Names of frame-ring segments in /dev/shm whose owning daemon process is gone (Linux)."""
    root = "/dev/shm"
    if not os.path.isdir(root):
        return []
    stale = []
    for entry in os.listdir(root):
        if not entry.startswith(prefix) or "_" not in entry:
            continue
        pid_hex = entry[len(prefix):entry.index("_")]
        try:
            pid = int(pid_hex, 16)
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(entry)
        except PermissionError:
            continue
    return stale
