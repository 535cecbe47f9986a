"""The figures the daemon reports beside its counters: latency percentiles, batch sizes, how
busy each engine worker is, GPU memory and utilisation, and stream thumbnails.

The same figures go everywhere (the ``stats`` and ``streams`` messages, ``livediffusion
status``, the Prometheus endpoint, OSC feedback, the control page), so they are computed
once, here, from what the front already sees: output frames published (their input's arrival
time), step results (batch size, start, duration).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from livediffusion.shared.protocol import FrameSpec


class Window:
    """The last ``size`` samples of one figure, for percentiles and means."""

    def __init__(self, size: int = 300) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.values, q)) if self.values else 0.0

    def mean(self) -> float:
        return float(sum(self.values) / len(self.values)) if self.values else 0.0


class Busy:
    """The share of the last ``span`` seconds a worker spent in engine steps."""

    def __init__(self, span: float = 5.0) -> None:
        self.span = span
        self.steps: deque[tuple[float, float]] = deque()   # (start, end), monotonic
        self.since = time.monotonic()

    def add(self, started: float, elapsed_ms: float) -> None:
        self.steps.append((started, started + elapsed_ms / 1000.0))
        self._trim(time.monotonic())

    def _trim(self, now: float) -> None:
        while self.steps and self.steps[0][1] < now - self.span:
            self.steps.popleft()

    def share(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        lo = max(now - self.span, self.since)
        if now <= lo:
            return 0.0
        inside = sum(min(end, now) - max(start, lo) for start, end in self.steps
                     if end > lo)
        return round(min(max(inside / (now - lo), 0.0), 1.0), 3)


_nvml_missing = False


def gpu_stats() -> list[dict[str, Any]]:
    """Each visible CUDA device's memory in use and in total (GiB, whole device, every
    process) and its utilisation in percent (NVML's, through ``torch.cuda.utilization``;
    ``None`` where nvidia-ml-py is not installed).  Empty without CUDA."""
    global _nvml_missing
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            util = None
            if not _nvml_missing:
                try:
                    util = int(torch.cuda.utilization(i))
                except Exception:  # noqa: BLE001 - pynvml absent or NVML refusing
                    _nvml_missing = True
            out.append({"index": i, "name": torch.cuda.get_device_name(i),
                        "memory_used_gib": round((total - free) / 2**30, 2),
                        "memory_total_gib": round(total / 2**30, 2),
                        "utilization": util})
        return out
    except Exception:  # noqa: BLE001 - telemetry never takes a reply down
        return []


def keep_alive(client, lock, stopped, what: str) -> None:
    """The loop of a companion's heartbeat thread (the OSC bridge, the metrics endpoint, the
    control page are clients of the daemon, which drops a client silent for 3 s): poll the
    client twice a second under its lock until ``stopped`` is set."""
    import logging
    while not stopped.wait(0.5):
        with lock:
            try:
                client.poll(0)
            except Exception as exc:  # noqa: BLE001 - the next request reports it
                logging.getLogger("livediffusion.telemetry").debug("%s keepalive: %s", what,
                                                                   exc)


THUMB_MAX = 320


def thumbnail(pixels: np.ndarray, spec: FrameSpec, width: int) -> tuple[int, int, bytes]:
    """A frame of ``spec`` as a small top-down RGB uint8 picture ``width`` wide (aspect
    kept, at most ``THUMB_MAX``): (width, height, bytes)."""
    from .frames import convert
    width = max(8, min(int(width), THUMB_MAX, spec.width))
    height = max(1, round(spec.height * width / spec.width))
    small = convert(np.ascontiguousarray(pixels), spec,
                    FrameSpec(width, height, "rgb", "uint8", "top"), "cpu")
    data = small.cpu().numpy() if hasattr(small, "cpu") else np.asarray(small)
    return width, height, np.ascontiguousarray(data, dtype=np.uint8).tobytes()
