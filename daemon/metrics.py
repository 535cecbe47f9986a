"""A Prometheus text endpoint on loopback: ``livediffusion daemon --metrics PORT``.

Scraped at ``http://127.0.0.1:PORT/metrics``.  Like the OSC bridge it is a client of the
daemon (the ``streams`` message, once per scrape), so a scrape never touches the daemon's
own state.  Per stream, labelled ``stream`` and ``engine``:

| metric | kind | meaning |
| --- | --- | --- |
| ``livediffusion_frames_in_total`` | counter | input frames the engine took |
| ``livediffusion_frames_out_total`` | counter | output frames delivered |
| ``livediffusion_dropped_total`` | counter | input frames dropped (newest wins) |
| ``livediffusion_decimated_total`` | counter | frames skipped to keep the served rate |
| ``livediffusion_late_total`` | counter | output frames ready after their paced time |
| ``livediffusion_input_fps`` | gauge | the rate the host sends |
| ``livediffusion_serve_fps`` | gauge | the rate the scheduler gives the stream |
| ``livediffusion_delay_ms`` | gauge | playout delay |
| ``livediffusion_engine_ms`` | gauge | engine time per step (moving average) |

| ``livediffusion_latency_p50_ms`` / ``_p99_ms`` | gauge | input arrival to output publication in the daemon |
| ``livediffusion_batch`` | gauge | streams per engine step (mean of the last 64) |

plus ``livediffusion_streams`` (open streams), ``livediffusion_up`` (1 when the daemon
answered the scrape), ``livediffusion_worker_busy`` (labelled ``engines`` and ``device``: the
share of the last 5 s the worker spent in steps) and, per GPU (labelled ``gpu`` and ``name``),
``livediffusion_gpu_memory_used_gib``, ``livediffusion_gpu_memory_total_gib`` and
``livediffusion_gpu_utilization`` (NVML's %, only where nvidia-ml-py is installed).
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .telemetry import keep_alive

log = logging.getLogger("livediffusion.metrics")

COUNTERS = {"frames_in": "input frames the engine took",
            "frames_out": "output frames delivered",
            "dropped": "input frames dropped (newest wins)",
            "decimated": "frames skipped to keep the served rate",
            "late": "output frames ready after their paced time"}
GAUGES = {"input_fps": "the rate the host sends", "serve_fps": "the rate the stream is served",
          "delay_ms": "playout delay, ms", "engine_ms": "engine time per step, ms",
          "latency_p50_ms": "input arrival to output publication in the daemon, median, ms",
          "latency_p99_ms": "input arrival to output publication in the daemon, p99, ms",
          "batch": "streams per engine step (mean of the last 64)"}
GPU_GAUGES = {"memory_used_gib": "GPU memory in use (every process), GiB",
              "memory_total_gib": "GPU memory in all, GiB",
              "utilization": "GPU utilisation, % (NVML)"}


class _Collector:
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator:
        overview = self.exporter.overview()
        up = GaugeMetricFamily("livediffusion_up", "1 when the daemon answered this scrape")
        up.add_metric([], 0.0 if overview is None else 1.0)
        yield up
        overview = overview or {}
        streams = overview.get("streams", [])
        count = GaugeMetricFamily("livediffusion_streams", "open streams")
        count.add_metric([], float(len(streams)))
        yield count
        labels = ["stream", "engine"]
        for kind, table in ((CounterMetricFamily, COUNTERS), (GaugeMetricFamily, GAUGES)):
            for key, about in table.items():
                family = kind(f"livediffusion_{key}", about, labels=labels)
                for s in streams:
                    family.add_metric([s["name"], s["engine"]],
                                      float(s.get("stats", {}).get(key, 0)))
                yield family
        busy = GaugeMetricFamily("livediffusion_worker_busy", "share of the last 5 s an "
                                 "engine worker spent in steps", labels=["engines", "device"])
        for w in overview.get("workers", []):
            busy.add_metric([",".join(w.get("engines", [])), str(w.get("device", ""))],
                            float(w.get("busy", 0.0)))
        yield busy
        for key, about in GPU_GAUGES.items():
            family = GaugeMetricFamily(f"livediffusion_gpu_{key}", about,
                                       labels=["gpu", "name"])
            for g in overview.get("gpus", []):
                if g.get(key) is not None:
                    family.add_metric([str(g["index"]), str(g.get("name", ""))],
                                      float(g[key]))
            yield family


class MetricsExporter:
    def __init__(self, endpoint: str, port: int, *, host: str = "127.0.0.1",
                 keys: dict | None = None) -> None:
        from livediffusion.shared import Client
        self.client = Client(endpoint, name="metrics", **({"keys": keys} if keys else {}))
        self.host, self.port = host, port
        self._lock = threading.Lock()   # scrapes may come on several threads
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self.server = None
        self._stopped = threading.Event()

    def overview(self) -> dict | None:
        with self._lock:
            try:
                return self.client.overview(timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - a scrape says up 0 instead
                log.warning("metrics: the daemon did not answer (%s)", exc)
                return None

    def start(self) -> MetricsExporter:
        self.client.connect(timeout=10)
        # heartbeats between scrapes (a silent client is dropped after 3 s)
        threading.Thread(target=keep_alive, args=(self.client, self._lock, self._stopped,
                                                  "metrics"), name="metrics-keepalive",
                         daemon=True).start()
        result = start_http_server(self.port, addr=self.host, registry=self.registry)
        # prometheus-client >= 0.17 returns (server, thread); older ones return nothing
        self.server = result[0] if isinstance(result, tuple) else None
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        with self._lock:
            self.client.close()
