"""Shared helpers of the benchmark commands: percentiles, tables, JSON, provenance."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import env


def moving_pattern(height: int, width: int, period: int = 48) -> list[np.ndarray]:
    """``period`` frames of a moving RGB u8 pattern, made once and then cycled by the
    benchmarks, so drawing stays out of the timings (4 frames at 480x832 take ~16 ms on a
    CPU core)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(period):
        t = 2 * math.pi * i / period
        img = np.stack([np.sin(xx / 40 + t), np.sin(yy / 50 + 2 * t),
                        np.sin((xx + yy) / 70 - t)], -1)
        frames.append(((img * 0.5 + 0.5) * 255).astype(np.uint8))
    return frames


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


def provenance() -> dict[str, Any]:
    """Date, machine and commit, printed beside every result."""
    # a copy of the tree (a remote GPU machine, say) may carry stale git metadata: the
    # variable, when set, names the commit that was copied
    commit = env("LIVEDIFFUSION_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=5,
                                    cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}"
                       .strip(),
            "commit": commit or "unknown"}


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); a missing value prints as "-"."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], f) if f else str(row[k])
                      for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps({"meta": meta, "records": records}, indent=2))
        print(f"JSON written to {path}")
