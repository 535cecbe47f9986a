"""``livediffusion bench stream`` end to end on the CPU: a real daemon process, a real host
process, the table and the JSON with the table's keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_stream_measures_what_a_host_sees(tmp_path):
    out = tmp_path / "stream.json"
    cmd = [sys.executable, "-m", "livediffusion.daemon", "bench", "stream", "--clients", "1",
           "--seconds", "2", "--policies", "edf", "--no-engine-bench", "--device", "cpu",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "distinct FPS" in run.stdout and "longest gap" in run.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["bench"] == "stream" and data["meta"]["weights"] == "random"
    (record,) = data["records"]
    for key in ("fps_mean", "fps_min", "fps_max", "aggregate_fps", "latency_p50_ms",
                "latency_p99_ms", "ttff_s", "drops", "late", "open_gap_ms", "close_gap_ms",
                "prompt_self_gap_ms", "joiner_ttff_s", "timeline", "daemon_stats"):
        assert key in record, key
    assert record["policy"] == "edf" and record["streams"] == 1 and not record["errors"]
    assert record["fps_mean"] > 5.0          # a host saw frames, paced
    assert record["timeline"]["s0"] and record["daemon_stats"]["s0"]["paced"]
