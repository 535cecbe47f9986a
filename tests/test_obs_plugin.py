"""The OBS plugin's C code (plugins/obs/src) against the Python implementation and a real
daemon, through its test driver ld_selftest: msgpack bytes both ways, frame rings both ways,
and the C client core streaming through a daemon over shared memory and inline, with a
parameter change, a daemon that starts late and a daemon that restarts. Built with CMake
once per session (conftest.obs_build); .ci/run installs what the build needs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from livediffusion.daemon.server import Daemon, free_port
from livediffusion.plugins.obs.build import selftest_path
from livediffusion.shared import Client
from livediffusion.shared.client import PREFERRED_ENGINES
from livediffusion.shared.protocol import FrameSpec
from livediffusion.shared.ring import FrameRing

from helpers import Raw

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX build only")


@pytest.fixture(scope="module")
def selftest(obs_build) -> Path:
    return selftest_path(obs_build[0])


def run(selftest: Path, *args: str, stdin: bytes | None = None, env=None,
        timeout: float = 60) -> str:
    result = subprocess.run([str(selftest), *args], input=stdin, capture_output=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    return result.stdout.decode()


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- msgpack ---------------------------------------------------------------------------------

def test_encoder_writes_the_bytes_msgpack_python_writes(selftest):
    lines = dict(line.split(" ", 1) for line in run(selftest, "encode").splitlines())
    expected = {
        "hello": {"v": 1, "type": "hello", "id": 1, "client": "obs"},
        "heartbeat": {"v": 1, "type": "heartbeat"},
        "frame": {"v": 1, "type": "frame", "stream": 1, "seq": 7, "slot": 1, "ts": 123456789},
        "params": {"v": 1, "type": "params", "id": 3, "stream": 300, "params": {
            "prompt": "a watercolour forest, \u00e9t\u00e9 \u2014 long enough to need str8",
            "seed": 4294967296, "strength": 0.35, "enabled": True,
            "offsets": [-1, -32, -33, -128, -129, -32768, -32769, -2147483649]}},
        "numbers": {"v": 1, "type": "numbers",
                    "u": [0, 127, 128, 255, 256, 65535, 65536, 4294967295, 2**64 - 1]},
        "sizes": {"v": 1, "type": "sizes", "s": "x" * 299, "a": [None] * 16,
                  "m": {f"k{i:02d}": i for i in range(16)}},
    }
    assert set(lines) == set(expected)
    for name, msg in expected.items():
        assert bytes.fromhex(lines[name]) == pack(msg), name
    # and the specification's own example bytes (docs/protocol.md section 2.4)
    doc = DOCS.read_text()
    for name in ("hello", "heartbeat", "frame"):
        spaced = " ".join(lines[name][i:i + 2] for i in range(0, len(lines[name]), 2))
        assert spaced in doc, name


def canon(v) -> bytes:
    """The same canonical text ld_selftest prints for a decoded value."""
    if v is None:
        return b"null"
    if v is True or v is False:
        return b"true" if v else b"false"
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, float):
        return ("%.17g" % v).encode()
    if isinstance(v, str):
        out = bytearray(b'"')
        for ch in v.encode():
            if ch in b'"\\':
                out += b"\\" + bytes([ch])
            elif ch < 0x20:
                out += b"\\u%04x" % ch
            else:
                out.append(ch)
        return bytes(out + b'"')
    if isinstance(v, bytes):
        return b"bin:" + v.hex().encode()
    if isinstance(v, msgpack.ExtType):
        return b"ext:" + v.data.hex().encode()
    if isinstance(v, (list, tuple)):
        return b"[" + b",".join(canon(x) for x in v) + b"]"
    if isinstance(v, dict):
        return b"{" + b",".join(canon(k) + b":" + canon(x) for k, x in v.items()) + b"}"
    raise TypeError(type(v))


def daemon_messages(daemon) -> list[bytes]:
    """Real daemon messages: welcome (capabilities), opened, params_ok, stats, error."""
    raw = Raw(daemon.endpoint)
    got = []
    try:
        def recv_bytes():
            assert raw.sock.poll(3000)
            return raw.sock.recv_multipart()[0]
        raw.send({"type": "hello", "id": 1, "client": "decode-test"})
        got.append(recv_bytes())
        raw.send({"type": "open", "id": 2, "name": "d", "width": 64, "height": 48,
                  "format": "bgra", "engine": "passthrough", "params": {"mode": "invert"}})
        got.append(recv_bytes())
        sid = msgpack.unpackb(got[-1])["stream"]
        raw.send({"type": "params", "id": 3, "stream": sid, "params": {"mode": "identity"}})
        got.append(recv_bytes())
        raw.send({"type": "stats", "id": 4})
        got.append(recv_bytes())
        raw.send({"type": "params", "id": 5, "stream": sid, "params": {"mode": "sepia"}})
        got.append(recv_bytes())
    finally:
        raw.close()
    types = [msgpack.unpackb(m)["type"] for m in got]
    assert types == ["welcome", "opened", "params_ok", "stats", "error"], types
    return got


def test_decoder_reads_what_msgpack_python_writes(selftest, daemon):
    values = [
        {"small": [0, 1, 127, -1, -32], "ints": [128, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                                                 2**64 - 1, -33, -128, -129, -32768, -32769,
                                                 -2**31, -2**31 - 1, -2**63]},
        {"floats": [0.0, -1.5, 1e300, 0.1, 2.5e-308], "bools": [True, False], "nil": None},
        {"text": "caf\u00e9 \u2603 \U0001F600 \"quoted\" back\\slash\nnewline\ttab",
         "long": "y" * 70000, "medium": "z" * 300, "empty": ""},
        {"bin": b"\x00\x01\xff" * 100, "big bin": bytes(70000), "ext": msgpack.ExtType(5, b"ab")},
        {"array16": list(range(20)), "array32": [None] * 70000,
         "map16": {f"k{i}": i for i in range(20)}, "map32": {f"m{i}": i for i in range(70000)}},
        {"nested": [[[[{"deep": [1, {"x": [2, 3]}]}]]]], "int key map": {1: "one", -2: "two"}},
    ]
    encoded = [pack(v) for v in values]
    encoded += [msgpack.packb(1.25, use_single_float=True),
                msgpack.packb({"f32": [3.5, -0.1]}, use_single_float=True)]
    encoded += daemon_messages(daemon)
    out = run(selftest, "decode", stdin=b"".join(e.hex().encode() + b"\n" for e in encoded))
    lines = out.encode().split(b"\n")[:-1]
    assert len(lines) == len(encoded)
    for e, line in zip(encoded, lines):
        want = canon(msgpack.unpackb(e, raw=False, strict_map_key=False))
        assert line == want, (line[:200], want[:200])


def test_decoder_refuses_malformed_bytes(selftest):
    good = pack({"v": 1, "type": "heartbeat"})
    bad = [
        good[:-1],                          # truncated
        good + b"\x00",                     # trailing byte
        b"\xc1",                            # never-used type byte
        b"\x91" * 65 + b"\x00",             # nested deeper than 64
        b"\xdd\xff\xff\xff\xff",            # array32 claiming 4 billion items
        b"\xdb\xff\xff\xff\xff" + b"ab",    # str32 longer than the buffer
        b"\xde\x00\x02\xa1a\x01",           # map16 of 2 pairs holding one
        b"",
    ]
    out = run(selftest, "decode", stdin=b"".join(b.hex().encode() + b"\n" for b in bad))
    assert out.splitlines() == ["ERROR"] * len(bad)


# --- frame rings ---------------------------------------------------------------------------

def pattern(w: int, h: int, seq: int) -> np.ndarray:
    """ld_selftest.c's test pattern: B = x + y + seq, G = 3x, R = 5y, A = 255 (mod 256)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x + y + seq) % 256, (3 * x) % 256, (5 * y) % 256,
                     np.full_like(x, 255)], axis=-1).astype(np.uint8)


def test_c_writes_a_ring_python_reads(selftest):
    ring = FrameRing.create(4, 64 * 48 * 4, tag="t")
    try:
        out = run(selftest, "ring-write", ring.name, "2", "9", "64", "48", "123456789")
        assert out.split()[:4] == ["slots", "4", "capacity", str(64 * 48 * 4)]
        hdr, frame = ring.read(2, 9)
        assert (hdr.width, hdr.height, hdr.format, hdr.dtype, hdr.origin, hdr.ts) == \
            (64, 48, "bgra", "uint8", "top", 123456789)
        np.testing.assert_array_equal(frame, pattern(64, 48, 9))
        # a frame that does not fit the slot is refused, and the slot keeps seq 9
        result = subprocess.run([str(selftest), "ring-write", ring.name, "2", "10", "65", "48",
                                 "1"], capture_output=True)
        assert result.returncode == 1
        assert ring.slot_seq(2) == (9, 9)
    finally:
        ring.close()


def test_python_writes_a_ring_c_reads(selftest, tmp_path):
    ring = FrameRing.create(3, 32 * 20 * 3 + 64, tag="t")
    try:
        spec = FrameSpec(32, 20, "rgb", "uint8", "bottom", stride=32 * 3 + 3)
        frame = np.random.default_rng(1).integers(0, 256, (20, 32, 3), dtype=np.uint8)
        ring.write(1, 4, frame, spec, ts=-5, ref_seq=77)
        out = run(selftest, "ring-read", ring.name, "1", "4", str(tmp_path / "f"))
        assert out.split() == ["ok", "32", "20", str(32 * 3 + 3), "1", "1", "1", "-5", "77"]
        np.testing.assert_array_equal(
            np.fromfile(tmp_path / "f", np.uint8).reshape(20, 32, 3), frame)
        # a seq the slot does not hold, and a withdrawn slot, are torn reads
        assert run(selftest, "ring-read", ring.name, "1", "5", str(tmp_path / "g")) \
            .startswith("torn")
        ring.abandon_write(1)
        assert run(selftest, "ring-read", ring.name, "1", "4", str(tmp_path / "g")) \
            .startswith("torn")
    finally:
        ring.close()


def test_a_stride_that_is_not_whole_samples_is_refused_like_python_does(selftest, tmp_path):
    """A slot header whose stride splits a float32 sample: the Python ring refuses it, and so
    does the C reader (it copied rows at byte offsets before)."""
    import struct

    from livediffusion.shared.ring import RingError, SLOT_HEADER
    ring = FrameRing.create(2, 8 * 4 * 16 * 4 + 64, tag="t")
    try:
        spec = FrameSpec(8, 4, "rgba", "float32", "top", stride=8 * 16 + 16)
        ring.write(1, 3, np.zeros((4, 8, 4), np.float32), spec)
        base = 64 + 1 * ring.slot_stride   # ring header, then slot 1
        struct.pack_into("<I", ring._buf, base + 16, 8 * 16 + 2)   # the stride field
        assert SLOT_HEADER.unpack_from(ring._buf, base)[3] == 8 * 16 + 2
        with pytest.raises(RingError):
            ring.read(1, 3)
        assert run(selftest, "ring-read", ring.name, "1", "3", str(tmp_path / "f")) \
            .startswith("bad")
    finally:
        ring.close()


def test_attaching_something_that_is_not_a_ring_fails(selftest):
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        result = subprocess.run([str(selftest), "ring-read", shm.name, "0", "1", "/dev/null"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "not a livediffusion ring" in result.stderr
    finally:
        shm.close()
        shm.unlink()


# --- small pure functions ----------------------------------------------------------------------

def test_auto_engine_order_is_the_python_clients(selftest):
    assert run(selftest, "engines").split() == list(PREFERRED_ENGINES)


@pytest.mark.parametrize("args, want", [
    ((1920, 1080, 32, 1280, 16), (1280, 720)),     # video-tiny limits: fit the longer side
    ((640, 480, 0, 0, 0), (640, 480)),             # passthrough: as it is
    ((100, 50, 256, 1024, 8), (512, 256)),         # too small: the shorter side up to min
    ((333, 333, 32, 1280, 16), (336, 336)),        # rounded to the multiple
    ((1366, 768, 256, 1024, 8), (1024, 576)),
    ((3, 3, 0, 0, 0), (8, 8)),                     # the protocol's 8 pixel minimum
])
def test_processing_size_fits_the_engine(selftest, args, want):
    assert tuple(map(int, run(selftest, "fit", *map(str, args)).split())) == want


def test_extra_parameters_are_typed(selftest):
    out = run(selftest, "extra", "mode=invert; seed=3\nstrength = 0.25;flag=true;"
                                 "prompt=a cat = a dog;novalue;=x;neg=-4")
    assert out.splitlines() == ["mode str invert", "seed int 3", "strength float 0.25",
                                "flag bool true", "prompt str a cat = a dog", "neg int -4"]


# --- engine schema -> properties, presets, recall ------------------------------------------------

def schema_lines(selftest, schema) -> dict[str, list[str]]:
    out = run(selftest, "schema", stdin=pack(schema).hex().encode() + b"\n")
    rows = [line.split(" | ") for line in out.splitlines()]
    assert all(len(r) == 9 for r in rows), out
    return {r[0]: r[1:] for r in rows}


def daemon_schemas(engines=("passthrough", "image-tiny", "video-tiny")) -> dict:
    d = Daemon(port=0, engines=engines).start()
    try:
        with Client(d.endpoint, name="schema-test") as c:
            return {name: caps["schema"] for name, caps in c.capabilities["engines"].items()}
    finally:
        d.stop()


def test_the_engines_schema_becomes_property_descriptions(selftest):
    schemas = daemon_schemas()
    video = schema_lines(selftest, schemas["video-tiny"])
    image = schema_lines(selftest, schemas["image-tiny"])
    passthrough = schema_lines(selftest, schemas["passthrough"])
    # every schema entry, in the engine's order, under a stable "p_<name>" key
    assert list(video) == ["p_" + e["name"] for e in schemas["video-tiny"]]
    # kind, widget, label, "lo hi step", default, choices, aliases, tooltip
    assert video["p_noise_scale"][:6] == ["float", "float_slider", "Noise scale",
                                          "0.11 1 0.001", "0.80000000000000004", ""]
    assert video["p_noise_scale"][6] == "strength"
    assert video["p_noise_scale"][7].startswith("how much of the input is replaced")
    assert image["p_guidance"][:5] == ["float", "float_slider", "Guidance", "0 20 0.10000000000000001",
                                       "1"]
    assert image["p_strength"][3] == "0 1 0.01"
    assert video["p_steps"][:4] == ["int", "int_slider", "Steps", "1 4 1"]
    assert video["p_seed"][:5] == ["int", "int", "Seed", "0 2147483647 1", "42"]  # 32-bit OBS int
    assert video["p_rope_max"][1:3] == ["int", "Rope max (latent frames)"]  # too wide: a spinner
    assert video["p_stream_batch"][:2] == ["bool", "bool"] and video["p_stream_batch"][4] == "1"
    assert video["p_decoder"][1] == "list" and video["p_decoder"][4:6] == ["vae", "vae,tiny"]
    assert video["p_prompt"][1] == "text_multiline"
    assert video["p_prompt"][4] == "a painting in vivid colours"
    assert image["p_negative_prompt"][1] == "text"
    assert [k for k, r in image.items() if r[1] == "extra"] == ["p_prompts", "p_seeds",
                                                                 "p_t_index_list"]
    assert video["p_cache_frames"][7].endswith("A change rebuilds part of the stream's state.")
    assert video["p_encoder"][7].endswith("A change restarts the stream's history.")
    assert list(passthrough) == ["p_" + e["name"] for e in schemas["passthrough"]]
    assert passthrough["p_mode"][:6] == ["choice", "list", "Mode", "0 0 0", "identity",
                                         "identity,invert"]


def test_unusual_schema_entries(selftest):
    rows = schema_lines(selftest, [
        {"name": "free", "kind": "float", "default": 2, "description": "no bounds"},
        {"name": "half", "kind": "float", "default": 0.5, "lo": 0.0, "description": ""},
        {"name": "count", "kind": "int", "default": 3, "description": "no bounds"},
        {"name": "big", "kind": "int", "default": -5, "lo": -2**40, "hi": 2**40},
        {"name": "gizmo", "kind": "vector3", "default": [1, 2, 3], "description": "new kind"},
        {"kind": "int", "default": 1},                       # no name: skipped
        {"name": 7, "kind": "int"},                          # not a str: skipped
        {"name": "many", "kind": "choice", "default": "c3",
         "choices": [f"c{i}" for i in range(20)]},
        {"name": "flag", "kind": "bool", "default": 1},      # not a bool: false
    ])
    assert list(rows) == ["p_free", "p_half", "p_count", "p_big", "p_gizmo", "p_many", "p_flag"]
    assert rows["p_free"][1:5] == ["float", "Free", "-1000000000 1000000000 0.01", "2"]
    assert rows["p_half"][1:4] == ["float", "Half", "0 1000000000 0.01"]
    assert rows["p_count"][1:4] == ["int", "Count", "-2147483648 2147483647 1"]
    assert rows["p_big"][1:5] == ["int", "Big", "-2147483648 2147483647 1", "-5"]
    assert rows["p_gizmo"][1] == "extra"
    assert rows["p_many"][5] == ",".join(f"c{i}" for i in range(16))
    assert rows["p_flag"][4] == "0"
    # not an array: nothing
    assert run(selftest, "schema", stdin=pack({"name": "x"}).hex().encode() + b"\n") == ""


def test_preset_lists_are_read_from_the_daemons_answer(selftest, daemon):
    with Client(daemon.endpoint, name="presets-test") as c:
        c.presets("save", "warm look", params={"mode": "invert"})
        c.presets("save", "zé", params={"mode": "identity"})
    raw = Raw(daemon.endpoint)
    try:
        raw.send({"type": "hello", "id": 1, "client": "presets-test"})
        assert raw.sock.poll(3000)
        raw.sock.recv_multipart()
        raw.send({"type": "presets", "id": 2, "op": "list"})
        assert raw.sock.poll(3000)
        answer = raw.sock.recv_multipart()[0]
    finally:
        raw.close()
    names = list(msgpack.unpackb(answer)["presets"])
    assert set(names) >= {"warm look", "zé"}
    out = run(selftest, "presets", stdin=answer.hex().encode() + b"\n")
    assert out.splitlines() == [f"count {len(names)}", *names]
    for bad in ({"type": "presets"}, {"type": "streams", "presets": {}},
                {"type": "presets", "presets": []}):
        assert run(selftest, "presets", stdin=pack(bad).hex().encode() + b"\n") == "count -1\n"
    assert run(selftest, "presets", stdin=pack({"type": "presets", "presets": {}}).hex().encode()
               + b"\n") == "count 0\n"


def test_recall_message_bytes(selftest):
    for transition, extra in ((0, {}), (2.5, {"transition": {"seconds": 2.5}})):
        out = run(selftest, "recall", "5", "300", "warm look", str(transition))
        want = {"v": 1, "type": "params", "id": 5, "stream": 300, "preset": "warm look", **extra}
        assert bytes.fromhex(out.split()[1]) == pack(want)


def fake_daemon_params(selftest, tmp_path, params: str, then: str, schema: list,
                       env: dict) -> list[dict]:
    """The messages ld_selftest's client sends to a fake daemon (a ROUTER) that answers hello,
    open (inline) and echoes every frame as an output frame."""
    import zmq
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([str(selftest), "client", f"tcp://127.0.0.1:{port}", "fake",
                             "16", "8", "2", params, then, str(tmp_path / "p"), "15"],
                            stdout=subprocess.PIPE, text=True,
                            env={"LD_SELFTEST_TRANSPORT": "inline", **env})
    seen, out_seq = [], 0
    try:
        while proc.poll() is None:
            if not router.poll(100):
                continue
            parts = router.recv_multipart()
            peer, msg = parts[0], msgpack.unpackb(parts[1])
            seen.append(msg)
            if msg["type"] == "hello":
                router.send_multipart([peer, pack({
                    "v": 1, "type": "welcome", "re": msg["id"], "session": 1, "protocol": 1,
                    "heartbeat_interval": 1.0, "heartbeat_timeout": 3.0,
                    "capabilities": {"engines": {"fake": {
                        "params": {e["name"]: e["default"] for e in schema},
                        "schema": schema}}}})])
            elif msg["type"] == "open":
                spec = {"width": 16, "height": 8, "format": "bgra", "channels": 4,
                        "dtype": "uint8", "origin": "top", "stride": 64}
                router.send_multipart([peer, pack({
                    "v": 1, "type": "opened", "re": msg["id"], "stream": 9, "name": msg["name"],
                    "transport": "inline", "input": spec, "output": spec,
                    "params": msg["params"]})])
            elif msg["type"] == "frame":
                out_seq += 1
                router.send_multipart([peer, pack({"v": 1, "type": "frame", "stream": 9,
                                                   "seq": out_seq, "ts": msg["ts"]}), parts[2]])
        assert proc.wait(20) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        router.close()
    return [m for m in seen if m["type"] in ("open", "params", "presets")]


def test_c_client_sends_only_what_changed(selftest, tmp_path):
    schema = [{"name": "mode", "kind": "choice", "default": "identity",
               "choices": ["identity", "invert"]},
              {"name": "level", "kind": "int", "default": 1, "lo": 0, "hi": 9},
              {"name": "noise_scale", "kind": "float", "default": 0.8, "lo": 0.1, "hi": 1.0,
               "aliases": ["strength"]},
              {"name": "unused", "kind": "int", "default": 0}]
    msgs = fake_daemon_params(selftest, tmp_path, "mode=invert;level=2;strength=0.5",
                              "level=3;strength=0.5", schema,
                              {"LD_SELFTEST_TRANSITION": "1.5"})
    kinds = [m["type"] for m in msgs]
    assert kinds[:2] == ["presets", "open"], kinds          # the preset list, asked after welcome
    # open: everything set; an alias goes out under the parameter's name
    assert msgs[1]["params"] == {"mode": "invert", "level": 2, "noise_scale": 0.5}
    params = [m for m in msgs if m["type"] == "params"]
    # then only the changed level, and mode (no longer set) back to the engine's default,
    # with the transition the settings ask for
    assert len(params) == 1, params
    assert params[0]["params"] == {"level": 3, "mode": "identity"}
    assert params[0]["transition"] == {"seconds": 1.5} and params[0]["stream"] == 9
    # without a transition, no transition field
    msgs = fake_daemon_params(selftest, tmp_path, "level=2", "level=4", schema, {})
    params = [m for m in msgs if m["type"] == "params"]
    assert [p["params"] for p in params] == [{"level": 4}] and "transition" not in params[0]


def test_c_client_recalls_a_daemon_preset(selftest, daemon, tmp_path):
    with Client(daemon.endpoint, name="presets-test") as c:
        c.presets("save", "negative", params={"mode": "invert"})
    out = run(selftest, "client", daemon.endpoint, "passthrough", "32", "24", "6",
              "mode=identity", "mode=identity", str(tmp_path / "r"), "30",
              env={"LD_SELFTEST_RECALL": "negative"})
    assert "recall 0" in out, out
    first = np.fromfile(f"{tmp_path / 'r'}.1", np.uint8).reshape(24, 32, 4)
    np.testing.assert_array_equal(first, pattern(32, 24, int(first[0, 0, 0])))
    second = np.fromfile(f"{tmp_path / 'r'}.2", np.uint8).reshape(24, 32, 4)
    np.testing.assert_array_equal(second, inverted(pattern(32, 24, 255 - int(second[0, 0, 0]))))
    presets = next(line for line in out.splitlines() if line.startswith("presets "))
    assert "negative," in presets
    # with a transition: the daemon takes it (one that did not know the field would say
    # bad_message, shown in the status)
    out = run(selftest, "client", daemon.endpoint, "passthrough", "32", "24", "3",
              "mode=identity", "mode=identity", str(tmp_path / "t"), "30",
              env={"LD_SELFTEST_RECALL": "negative", "LD_SELFTEST_TRANSITION": "0.5"})
    assert "recall 0" in out and "final streaming passthrough" in out, out
    assert "bad_" not in out, out
    # an unknown preset: the daemon's bad_params shows in the status, the stream goes on
    out = run(selftest, "client", daemon.endpoint, "passthrough", "32", "24", "3",
              "mode=identity", "mode=identity", str(tmp_path / "u"), "30",
              env={"LD_SELFTEST_RECALL": "no such preset"})
    assert "final streaming passthrough" in out and "bad_params" in out, out


# --- the client core against a real daemon ------------------------------------------------------

def inverted(frame: np.ndarray) -> np.ndarray:
    out = 255 - frame
    out[..., 3] = 255
    return out


def check_client_outputs(prefix: Path, w: int, h: int) -> None:
    """Phase 1 ran with mode=invert, phase 2 with mode=identity: each output is the test
    pattern of some seq, inverted in phase 1 and unchanged in phase 2."""
    first = np.fromfile(f"{prefix}.1", np.uint8).reshape(h, w, 4)
    second = np.fromfile(f"{prefix}.2", np.uint8).reshape(h, w, 4)
    seq1 = 255 - int(first[0, 0, 0])
    np.testing.assert_array_equal(first, inverted(pattern(w, h, seq1)))
    seq2 = int(second[0, 0, 0])
    np.testing.assert_array_equal(second, pattern(w, h, seq2))


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_c_client_streams_through_a_daemon(selftest, daemon, tmp_path, transport):
    env = {"LD_SELFTEST_TRANSPORT": transport}
    out = run(selftest, "client", daemon.endpoint, "passthrough", "64", "48", "8",
              "mode=invert", "mode=identity", str(tmp_path / "out"), "30", env=env)
    assert "status streaming passthrough 64x48" in out, out
    check_client_outputs(tmp_path / "out", 64, 48)


def test_typed_text_is_sent_after_a_pause_not_per_keystroke(selftest, daemon, tmp_path,
                                                            caplog):
    # "identity" -> "i", "in", ... "invert", 50 ms apart: per keystroke, the daemon would
    # refuse "i" to "inver" (bad_params, which it logs); after the pause only "invert" goes out
    import logging
    with caplog.at_level(logging.DEBUG):
        out = run(selftest, "typing", daemon.endpoint, str(tmp_path / "t"))
    assert "streaming passthrough" in out, out
    assert not [r for r in caplog.records if "bad_params" in r.getMessage()], caplog.text
    frame = np.fromfile(tmp_path / "t", np.uint8).reshape(24, 32, 4)
    np.testing.assert_array_equal(frame, inverted(pattern(32, 24, 255 - int(frame[0, 0, 0]))))


def test_c_client_authenticates_with_curve_keys(selftest, tmp_path):
    from livediffusion.daemon.auth import init_keys
    init_keys(tmp_path / "keys")
    d = Daemon(port=0, keys_dir=tmp_path / "keys").start()
    try:
        env = {"LD_SELFTEST_KEYS": str(tmp_path / "keys"), "LD_SELFTEST_TRANSPORT": "inline"}
        out = run(selftest, "client", d.endpoint, "passthrough", "32", "24", "4", "mode=invert",
                  "mode=identity", str(tmp_path / "k"), "30", env=env)
        assert "streaming" in out
        check_client_outputs(tmp_path / "k", 32, 24)
        # without the keys the daemon never answers (CURVE refuses in silence, protocol 9)
        result = subprocess.run([str(selftest), "client", d.endpoint, "passthrough", "32", "24",
                                 "4", "", "", str(tmp_path / "n"), "3"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 1 and "streaming" not in result.stdout
        # a keys folder without the keys: one clear status, no connection
        (tmp_path / "empty").mkdir()
        result = subprocess.run([str(selftest), "client", d.endpoint, "passthrough", "32", "24",
                                 "4", "", "", str(tmp_path / "e"), "2"], capture_output=True,
                                text=True, timeout=30,
                                env={"LD_SELFTEST_KEYS": str(tmp_path / "empty")})
        assert "cannot read the daemon's public key" in result.stdout, result.stdout
    finally:
        d.stop()


def test_c_client_uses_the_engines_size_limits_and_leaves_unknown_params_out(selftest, tmp_path):
    d = Daemon(port=0, engines=("passthrough", "image-tiny")).start()
    try:
        # image-tiny takes 32..1024 in multiples of 8: a 30x20 source is processed at 48x32;
        # mode= is not an image-tiny parameter and must not be sent (it would be bad_params)
        out = run(selftest, "client", d.endpoint, "image-tiny", "30", "20", "3",
                  "mode=invert;strength=0.3", "seed=5", str(tmp_path / "o"), "60")
        assert "streaming image-tiny 48x32" in out, out
        assert "bad_params" not in out
    finally:
        d.stop()


def test_c_client_closes_a_stream_whose_rings_it_cannot_attach(selftest, tmp_path):
    """A daemon (here a bare ROUTER playing one) announcing rings that do not exist: the client
    says so, and closes the stream so that the daemon frees it, instead of leaving it open."""
    import zmq
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([str(selftest), "client", f"tcp://127.0.0.1:{port}", "passthrough",
                             "32", "24", "1", "", "", str(tmp_path / "x"), "4"],
                            stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "close" not in [m["type"] for m in seen]:
            if not router.poll(100):
                continue
            peer, body = router.recv_multipart()
            msg = msgpack.unpackb(body)
            seen.append(msg)
            reply = None
            if msg["type"] == "hello":
                reply = {"type": "welcome", "re": msg["id"], "session": 1, "protocol": 1,
                         "heartbeat_interval": 1.0, "heartbeat_timeout": 3.0,
                         "capabilities": {"engines": {"passthrough": {"params": {}}}}}
            elif msg["type"] == "open":
                spec = {"width": 32, "height": 24, "format": "bgra", "channels": 4,
                        "dtype": "uint8", "origin": "top", "stride": 128}
                reply = {"type": "opened", "re": msg["id"], "stream": 9, "name": msg["name"],
                         "transport": "shm", "input": spec, "output": spec,
                         "ring_in": {"name": "ld-absent-in", "slots": 4, "capacity": 3072},
                         "ring_out": {"name": "ld-absent-out", "slots": 3, "capacity": 3072}}
            if reply is not None:
                router.send_multipart([peer, pack({**reply, "v": 1})])
        out = proc.communicate(timeout=20)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        router.close()
    closes = [m for m in seen if m["type"] == "close"]
    assert closes and closes[0]["stream"] == 9, seen
    assert "shm: cannot open segment ld-absent-in" in out, out


def test_c_client_fixed_processing_size(selftest, tmp_path):
    d = Daemon(port=0, engines=("passthrough", "image-tiny")).start()
    try:
        # a fixed 100x60 for image-tiny (multiples of 8, halves round up): 104x64 whatever the
        # source's size
        out = run(selftest, "client", d.endpoint, "image-tiny", "640", "360", "2", "seed=1",
                  "seed=2", str(tmp_path / "f"), "60", env={"LD_SELFTEST_FIXED": "100x60"})
        assert "streaming image-tiny 104x64" in out, out
        assert "saved" in out and f"{tmp_path / 'f'}.2 104 64" in out
    finally:
        d.stop()


def test_c_client_finds_a_daemon_that_starts_later_and_survives_a_restart(selftest, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(selftest), "client", endpoint, "passthrough", "40", "30",
                             "10", "mode=invert", "mode=identity", str(tmp_path / "r"), "60"],
                            stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        time.sleep(1.5)
        assert any("no daemon" in line for line in lines), lines
        d = Daemon(port=port).start()
        try:
            deadline = time.monotonic() + 20
            while not any(line.startswith("saved") for line in lines):
                assert time.monotonic() < deadline, lines
                time.sleep(0.05)
        finally:
            d.stop()  # the daemon goes away between the two phases...
        time.sleep(0.5)
        d = Daemon(port=port).start()  # ...and a new one comes up on the same port
        try:
            assert proc.wait(30) == 0, lines
        finally:
            d.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    check_client_outputs(tmp_path / "r", 40, 30)
    states = [line.split()[1] for line in lines if line.startswith("status")]
    assert states[0] in ("no", "connecting") and "streaming" in states


def test_client_core_compiles_for_windows():
    """The Windows branches (OpenFileMappingW, QueryPerformanceCounter, Sleep) with MinGW's
    headers: syntax and types only, as there is no Windows libzmq to link here."""
    import shutil
    from conftest import skip_or_fail
    from livediffusion.plugins.obs.build import SOURCE_DIR
    gcc = shutil.which("x86_64-w64-mingw32-gcc")
    if gcc is None:
        skip_or_fail("x86_64-w64-mingw32-gcc is not installed (apt-get install "
                     "gcc-mingw-w64-x86-64)")
    zmq_h = Path("/usr/include/zmq.h")
    if not zmq_h.exists():
        skip_or_fail("zmq.h is not installed (libzmq3-dev)")
    for source in ("src/ld_msgpack.c", "src/ld_ring.c", "src/ld_schema.c", "src/ld_client.c",
                   "tests/ld_selftest.c"):
        result = subprocess.run([gcc, "-std=c11", "-Wall", "-Wextra", "-Werror",
                                 "-Wno-format-truncation", "-fsyntax-only",
                                 "-idirafter", str(zmq_h.parent), "-I", str(SOURCE_DIR / "src"),
                                 str(SOURCE_DIR / source)], capture_output=True, text=True)
        assert result.returncode == 0, f"{source}:\n{result.stderr}"


# --- the obs command line ------------------------------------------------------------------

def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livediffusion.daemon", "obs", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_obs_install_builds_the_plugin_into_a_folder(obs_build, tmp_path):
    if not obs_build[1]:
        pytest.skip("libobs is not installed")
    result = cli("install", "--build-dir", str(tmp_path / "b"), "--dest", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "bin" / "64bit" / "livediffusion.so").is_file()
    assert "Prompt=" in (tmp_path / "d" / "data" / "locale" / "en-US.ini").read_text()


def test_obs_commands_explain_what_is_missing():
    port = str(free_port())
    for args, words in [(("status", "--obs-port", port), "OBS is not answering on 127.0.0.1"),
                        (("setup",), "needs either --source NAME"),
                        (("prompt",), "obs prompt needs the prompt")]:
        result = cli(*args, timeout=60)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr


def test_setup_options_map_onto_the_filters_properties():
    from livediffusion.plugins.obs.websocket import FilterInfo, filter_settings
    settings = filter_settings(endpoint="tcp://127.0.0.1:1", engine="auto", prompt="a cat",
                               params={"seed": 7, "noise_scale": 0.3, "steps": 2,
                                       "mode": "invert", "stream_batch": False,
                                       "negative_prompt": "blur"})
    assert settings == {"endpoint": "tcp://127.0.0.1:1", "engine": "auto", "keys_dir": "",
                        "prompt": "a cat",
                        "seed": 7, "strength": 0.3, "steps": 2, "negative_prompt": "blur",
                        "extra": "mode=invert\nstream_batch=false"}
    assert FilterInfo("Cam", "livediffusion", True, {}).stream_name == "obs:Cam"
    assert FilterInfo("Cam", "second", True, {}).stream_name == "obs:Cam:second"
