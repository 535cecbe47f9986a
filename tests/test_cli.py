"""The command line: help everywhere, one-sentence errors, demo, doctor, bench, shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from livediffusion.daemon.server import free_port
from livediffusion.shared import Client

from helpers import rgb, round_trip, shm_names, wait_until

CLI = [sys.executable, "-m", "livediffusion.daemon"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [[], ["daemon"], ["demo"], ["bench"], ["doctor"], ["keys"],
                                  ["models"]])
def test_help_everywhere(args):
    result = run(*args, "--help")
    assert result.returncode == 0 and "usage: livediffusion" in result.stdout


def test_errors_are_one_sentence_not_a_traceback():
    result = run("daemon", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CURVE authentication" in lines[0]


def test_port_in_use_is_one_sentence(daemon):
    result = run("daemon", "--port", str(daemon.port))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{daemon.port}" in result.stderr


def test_doctor_prints_one_screen():
    result = run("doctor", "--port", str(free_port()))
    assert result.returncode == 0
    for section in ("python", "packages:", "extras:", "devices:", "control port", "weights"):
        assert section in result.stdout
    assert "free" in result.stdout and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in result.stdout
    assert "wan-1.3b" in result.stdout and "absent" in result.stdout


def test_demo_writes_a_video_and_prints_fps_and_latency(tmp_path):
    out = tmp_path / "demo.mp4"
    result = run("demo", "--engine", "passthrough", "--frames", "24", "--size", "64x48",
                 "--output", str(out), "--param", "mode=invert")
    assert result.returncode == 0, result.stderr
    assert "output FPS" in result.stdout and "latency p50" in result.stdout
    cap = cv2.VideoCapture(str(out))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (48, 128, 3)  # input | output side by side
    left, right = frame[:, :64].astype(int), frame[:, 64:].astype(int)
    assert np.abs((255 - left) - right).mean() < 12  # the output is the inverted input


def test_demo_reads_a_video_file(tmp_path):
    src = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 30, (80, 60))
    for i in range(12):
        writer.write(np.full((60, 80, 3), 20 * i, np.uint8))
    writer.release()
    result = run("demo", str(src), "--engine", "passthrough", "--size", "64x48",
                 "--frames", "12", "--output", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    assert "frames sent 12" in result.stdout


def test_demo_with_a_missing_file_is_one_sentence(tmp_path):
    result = run("demo", str(tmp_path / "nope.mp4"), "--frames", "5",
                 "--output", str(tmp_path / "o.mp4"))
    assert result.returncode == 2 and "cannot open video source" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_transport_writes_json_records(tmp_path):
    path = tmp_path / "t.json"
    result = run("bench", "transport", "--iterations", "5", "--json", str(path), timeout=300)
    assert result.returncode == 0, result.stderr
    records = json.loads(path.read_text())["records"]
    assert [r["case"] for r in records] == ["512x512 rgb u8", "1280x720 rgb u8",
                                            "1280x720 rgba f32"]
    for r in records:
        assert {"case", "p50_ms", "p99_ms", "fps", "memcpy_ms", "inline_p50_ms"} <= set(r)
        assert r["p50_ms"] > 0 and r["memcpy_ms"] > 0 and r["inline_p50_ms"] > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_shuts_down_cleanly_on_signals(sig):
    port = free_port()
    proc = subprocess.Popen([*CLI, "daemon", "--port", str(port), "--engines", "passthrough"],
                            stderr=subprocess.PIPE, text=True)
    try:
        c = Client(f"tcp://127.0.0.1:{port}", reconnect=False)
        assert wait_until(lambda: _try_connect(c), timeout=60)
        streams = [c.open_stream(f"s{i}", 64, 48) for i in range(2)]
        round_trip(streams[0], rgb())
        names = {r.name for s in streams for r in (s._ring_in, s._ring_out)}
        assert names <= shm_names()
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert not (names & shm_names())
        assert "all frame rings unlinked" in proc.stderr.read()
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def _try_connect(c: Client) -> bool:
    try:
        c.connect(timeout=0.5)
        return True
    except ConnectionError:
        return False


def test_curve_keys_admit_only_authorised_clients(tmp_path):
    from livediffusion.daemon.auth import client_keys, init_keys
    from livediffusion.daemon.server import Daemon

    init_keys(tmp_path)
    d = Daemon(port=0, keys_dir=tmp_path).start()
    try:
        with Client(d.endpoint, keys=client_keys(tmp_path)) as c:
            frame = rgb()
            assert np.array_equal(round_trip(c.open_stream("k", 64, 48), frame).pixels, frame)
        with pytest.raises(ConnectionError):
            Client(d.endpoint).connect(timeout=1.0)
    finally:
        d.stop()


def test_models_list_names_every_model_and_its_state():
    result = run("models", "list")
    assert result.returncode == 0
    for name in ("wan-1.3b", "wan-14b", "sdv2-1.3b", "sdv2-14b"):
        assert name in result.stdout
    assert "jerryfeng/StreamDiffusionV2" in result.stdout


def test_missing_weights_name_the_command_that_fetches_them():
    result = run("daemon", "--engines", "video", "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "livediffusion models pull wan-1.3b" in result.stderr


def test_pull_without_network_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("models", "pull", "sdv2-1.3b")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not download sdv2-1.3b" in result.stderr


def test_bench_video_runs_the_tiny_architecture(tmp_path):
    path = tmp_path / "v.json"
    result = run("bench", "video", "--model", "tiny", "--steps", "1,2", "--iterations", "2",
                 "--json", str(path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    records = json.loads(path.read_text())["records"]
    assert [(r["steps"], r["decoder"]) for r in records] == [(1, "vae"), (2, "vae"), (1, "tiny"),
                                                              (2, "tiny")]
    for r in records:
        assert r["fps"] > 0 and r["ttff_s"] > 0 and r["dit_ms"] > 0 and r["encode_ms"] > 0


def test_bench_image_runs_the_tiny_architecture(tmp_path):
    path = tmp_path / "i.json"
    result = run("bench", "image", "--model", "tiny", "--steps", "1,2", "--cfg", "self,full",
                 "--iterations", "3", "--json", str(path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    records = json.loads(path.read_text())["records"]
    assert [(r["steps"], r["cfg"]) for r in records] == [(1, "self"), (1, "full"), (2, "self"),
                                                          (2, "full")]
    for r in records:
        assert r["fps"] > 0 and r["latency_p50_ms"] > 0 and r["unet_ms"] > 0
    bad = run("bench", "image", "--model", "sd99", timeout=120)
    assert bad.returncode == 2 and "image models" in bad.stderr and "Traceback" not in bad.stderr
