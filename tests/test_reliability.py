"""Issue 18's defects, each proved fixed by a test that failed before the fix: parameters a
client got can be sent back (every engine, across a daemon restart), non-finite input and
parameters, a client shrinking its own ring, client strings in logs, secret key files."""

from __future__ import annotations

import logging
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from livediffusion.daemon.engines.base import ParamError, StreamConfig
from livediffusion.daemon.server import Daemon, free_port
from livediffusion.shared import Client
from livediffusion.shared.protocol import FrameSpec

from helpers import Raw, round_trip, send_until_back, wait_until


# --- 1. what the daemon returned can be re-sent ------------------------------------------------

@pytest.mark.parametrize("name", ["passthrough", "image-tiny", "video-tiny"])
def test_the_effective_parameters_can_be_sent_back_to_every_engine(name):
    from livediffusion.daemon.engines import REGISTRY
    engine = REGISTRY[name][0]("cpu")
    spec = FrameSpec(64, 64)
    try:
        effective = engine.open_stream(StreamConfig(1, spec, spec, 30.0, {}))
        engine.settle()
        again = engine.update_params(1, dict(effective))     # all of it, derived keys too
        assert again == effective
        changed = engine.update_params(1, {**effective, **({"strength": 0.7}
                                                           if name == "image-tiny" else {})})
        assert engine.update_params(1, changed) == changed
    finally:
        engine.close_stream(1)
        engine.shutdown()


def test_an_image_stream_comes_back_after_the_daemon_restarts():
    port = free_port()
    first = Daemon(port=port, engines=("image-tiny",)).start()
    c = Client(f"tcp://127.0.0.1:{port}").connect()
    try:
        stream = c.open_stream("img", 64, 64, engine="image-tiny", timeout=60)
        stream.update(strength=0.6, wait=10.0)   # its params now hold t_index_list_effective
        assert "t_index_list_effective" in stream.params
        first.stop()
        second = Daemon(port=port, engines=("image-tiny",)).start()
        try:
            got = send_until_back(stream, np.zeros((64, 64, 3), np.uint8), timeout=30.0)
            assert got is not None and stream.state == "open", stream.last_error
            assert c.reconnects >= 1 and stream.counters["reopened"] >= 1
        finally:
            second.stop()
    finally:
        c.close()


# --- 3. non-finite input and parameters ---------------------------------------------------------

def test_a_nan_pixel_does_not_poison_a_video_stream():
    import torch

    from livediffusion.daemon.engines.base import InputFrame, StreamInput
    from livediffusion.daemon.engines.video.factory import build_video_engine
    engine = build_video_engine("tiny")
    spec = FrameSpec(64, 48, "rgb", "float32")
    engine.open_stream(StreamConfig(1, spec, FrameSpec(64, 48, "rgb", "float32"), 30.0, {}))
    engine.settle()
    rng = np.random.default_rng(0)
    seq, outs = 0, []
    try:
        for chunk in range(6):
            frames = []
            for _ in range(engine.frames_per_step(1)):
                seq += 1
                pixels = rng.random(spec.shape, dtype=np.float32)
                if seq == 3:
                    pixels[5, 7, 1] = np.nan      # one NaN pixel
                    pixels[0, 0, 0] = np.inf
                frames.append(InputFrame(seq, pixels, spec, seq))
            outs += [f.pixels for f in engine.submit([StreamInput(1, frames)])[0].frames]
        assert len(outs) >= 13
        assert all(bool(torch.isfinite(torch.as_tensor(o)).all()) for o in outs)
    finally:
        engine.close_stream(1)


@pytest.mark.parametrize("change", [{"prompts": [["a", math.inf]]},
                                    {"prompts": [["a", math.nan]]},
                                    {"seeds": [[1, math.inf]]},
                                    {"noise_scale": math.nan}])
def test_non_finite_parameters_are_refused(change):
    from livediffusion.daemon.engines.video import params as P
    with pytest.raises(ParamError):
        P.apply(P.VideoParams(), change)


# --- 4. a client shrinking its own ring ---------------------------------------------------------

def test_a_truncated_input_ring_is_an_error_not_a_crash():
    d = Daemon(port=0, engines=("passthrough",)).start()
    try:
        with Client(d.endpoint, name="hostile") as bad, \
                Client(d.endpoint, name="bystander") as good:
            victim = bad.open_stream("victim", 64, 48)
            other = good.open_stream("other", 64, 48)
            frame = np.full((48, 64, 3), 9, np.uint8)
            round_trip(victim, frame)
            ring = d.streams[victim.id].ring_in.name
            os.truncate(os.path.join("/dev/shm", ring), 64)   # the client breaks its ring
            # ... and announces a frame in it anyway (its own library would refuse to write)
            bad._send({"type": "frame", "stream": victim.id, "seq": 99, "slot": 1})
            assert wait_until(lambda: (bad.poll(0.05), good.poll(0),
                                       victim.last_error)[2] is not None, 10)
            assert "truncated" in victim.last_error.message
            for _ in range(5):   # the daemon is alive and the other stream untouched
                assert np.array_equal(round_trip(other, frame).pixels, frame)
    finally:
        d.stop()


# --- 5. client strings in logs and errors -------------------------------------------------------

def test_client_strings_are_escaped_and_shortened(caplog):
    d = Daemon(port=0, engines=("passthrough",)).start()
    raw = Raw(d.endpoint)
    try:
        with caplog.at_level(logging.INFO, logger="livediffusion.daemon"):
            raw.send({"type": "hello", "id": 1, "client": "evil\nFAKE daemon line " + "x" * 500})
            raw.recv_type("welcome")
            raw.send({"type": "control", "id": 2, "name": "n\n" * 200000,
                      "params": {"mode": "invert"}})
            reply = raw.recv_type("error")
        assert reply["re"] == 2 and len(reply["message"]) < 300
        lines = [r.getMessage() for r in caplog.records]
        assert not any(line.startswith("FAKE") for m in lines for line in m.splitlines()[1:])
        assert all("\n" not in m for m in lines if "hello from" in m)
        assert max(len(m) for m in lines) < 400
    finally:
        raw.close()
        d.stop()


# --- 10. secret keys ------------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_secret_keys_are_private_and_a_readable_one_is_refused(tmp_path):
    from livediffusion.daemon.auth import init_keys
    keys = tmp_path / "keys"
    paths = init_keys(keys)
    for secret in (keys / "server.key_secret", paths["client_secret"]):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    os.chmod(keys / "server.key_secret", 0o644)
    out = subprocess.run([sys.executable, "-m", "livediffusion.daemon", "daemon", "--host",
                          "0.0.0.0", "--port", "0", "--keys", str(keys), "--engines",
                          "passthrough"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "can be read by other users" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# --- 2. parameter floods coalesce ---------------------------------------------------------------

def test_a_prompt_flood_is_coalesced_and_never_freezes_the_streams():
    import time
    d = Daemon(port=0, engines=("video-tiny",)).start()
    try:
        with Client(d.endpoint, name="host") as c:
            v = c.open_stream("v", 64, 48, engine="video-tiny", timeout=60)
            rng = np.random.default_rng(0)
            for i in range(1000):   # 1000 prompt changes as fast as a client can send them
                v.update(prompt=f"flood {i}")
                if i % 50 == 0:
                    v.send(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
                    c.poll(0)
            t0 = time.monotonic()
            final = v.update(prompt="the last word", wait=20.0)
            took = time.monotonic() - t0
            assert final["prompt"] == "the last word"
            assert took < 10.0, f"the flood held the last change back {took:.1f} s"
            got = send_until_back(v, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 30)
            assert got is not None
    finally:
        d.stop()


@pytest.fixture
def raw_stream():
    """A passthrough daemon and a bare socket that opened one stream on it: (raw, sid)."""
    d = Daemon(port=0, engines=("passthrough",)).start()
    raw = Raw(d.endpoint)
    try:
        raw.hello()
        raw.send({"type": "open", "id": 2, "name": "s", "width": 32, "height": 16})
        yield raw, raw.recv_type("opened")["stream"]
    finally:
        raw.close()
        d.stop()


def test_one_bad_value_among_coalesced_changes_costs_only_its_own_request(raw_stream):
    raw, sid = raw_stream
    for i in range(10, 20):   # (a bad value a later one replaces is simply superseded)
        raw.send({"type": "params", "id": i, "stream": sid,
                  "params": {"mode": "sepia"} if i == 15 else {"gain": i / 20}})
    got = {}
    while len(got) < 10:
        msg = raw.recv(5.0)
        if msg.get("re") in range(10, 20):
            got[msg["re"]] = msg
    assert got[15]["type"] == "error" and "mode" in got[15]["message"]
    assert all(got[i]["type"] == "params_ok" for i in got if i != 15)
    raw.send({"type": "params", "id": 30, "stream": sid, "params": {}})
    assert raw.recv_type("params_ok")["params"]["gain"] == pytest.approx(19 / 20)


# --- 6. every rejection answers the request it rejects --------------------------------------

def test_an_oversized_message_is_refused_with_its_request_id(raw_stream):
    import time

    import msgpack

    from livediffusion.shared.protocol import request_id
    raw, sid = raw_stream
    t0 = time.monotonic()
    raw.send({"type": "params", "stream": sid, "params": {"prompt": "x" * (1 << 20)},
              "id": 7})
    reply = raw.recv_type("error", 5.0)
    assert reply["re"] == 7 and "exceeds" in reply["message"]
    assert time.monotonic() - t0 < 2.0 and len(reply["message"]) < 200
    assert request_id(msgpack.packb({"v": 1, "big": b"x" * 10, "id": 3})) == 3
    assert request_id(b"\x93\x01\x02\x03") is None and request_id(b"") is None


# --- 9. a killed client's streams go at once ----------------------------------------------------

def test_a_killed_clients_stream_is_released_within_half_a_second():
    import signal
    import time
    d = Daemon(port=0, engines=("passthrough",)).start()
    code = ("import sys, time\n"
            "from livediffusion.shared import Client\n"
            f"c = Client({d.endpoint!r}, name='doomed').connect()\n"
            "c.open_stream('doomed', 32, 16)\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c.poll(0.1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert wait_until(lambda: "doomed" in d._names, 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        assert wait_until(lambda: "doomed" not in d._names, 3.0, step=0.01)
        assert time.monotonic() - t0 <= 0.5
    finally:
        if proc.poll() is None:
            proc.kill()
        d.stop()


# --- 7. validate first, then allocate -------------------------------------------------------

def test_a_refused_open_allocates_no_rings_and_shared_memory_is_capped(monkeypatch):
    import time

    from livediffusion.daemon import server as S
    from helpers import shm_names
    d = Daemon(port=0, engines=("passthrough", "image-tiny")).start()
    try:
        with Client(d.endpoint, name="big") as c:
            before = shm_names()
            t0 = time.monotonic()
            with pytest.raises(Exception, match="multiple of 8 from"):
                c.open_stream("huge", 4096, 4096, format="rgba", dtype="float32",
                              engine="image-tiny", timeout=10)
            assert time.monotonic() - t0 < 1.0 and shm_names() == before
            monkeypatch.setattr(S, "SHM_PER_CLIENT", 1 << 20)   # 1 MiB for this client
            c.open_stream("small", 64, 64, engine="passthrough")  # ~ 0.1 MiB: fits
            with pytest.raises(Exception, match="shared memory"):
                c.open_stream("second", 512, 512, format="rgba", engine="passthrough",
                              timeout=10)
        with Client(d.endpoint, name="inline", transport="inline") as c2:   # no rings at all
            assert c2.open_stream("inline", 512, 512, format="rgba",
                                  engine="passthrough").state == "open"
    finally:
        d.stop()

