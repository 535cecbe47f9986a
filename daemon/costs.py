"""An online cost model of engine steps: measured time per (batch key, batch size).

Every finished step reports its wall time; the model keeps a moving average per (key, n)
and predicts unmeasured batch sizes from the measured ones (a straight line through them:
step time = fixed part + per-stream part, which is what batching amortises).  No tensor
math, no engine knowledge: the scheduler asks it how long a step would take and how many
frames per second a group of streams can have.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Entry:
    ms: float
    count: int = 1


@dataclass
class CostModel:
    #: weight of the newest measurement in the moving average
    alpha: float = 0.2
    _table: dict[tuple, dict[int, _Entry]] = field(default_factory=dict)

    def observe(self, key: tuple, n: int, ms: float) -> None:
        if ms <= 0 or n < 1:
            return
        sizes = self._table.setdefault(key, {})
        entry = sizes.get(n)
        if entry is None:
            sizes[n] = _Entry(ms)
        else:
            # the first steps of a shape include compilation: they are replaced, not averaged
            a = 0.5 if entry.count < 3 else self.alpha
            if entry.count < 3 and ms < entry.ms * 0.5:
                entry.ms = ms
            else:
                entry.ms += a * (ms - entry.ms)
            entry.count += 1

    def known(self, key: tuple) -> bool:
        return bool(self._table.get(key))

    def measured(self, key: tuple) -> dict[int, float]:
        return {n: e.ms for n, e in sorted(self._table.get(key, {}).items())}

    def predict(self, key: tuple, n: int) -> float:
        """Predicted ms of a step of ``n`` streams of ``key`` (0.0 if nothing is known)."""
        sizes = self._table.get(key)
        if not sizes:
            return 0.0
        if n in sizes:
            return sizes[n].ms
        points = sorted((k, e.ms) for k, e in sizes.items())
        if len(points) == 1:
            k, ms = points[0]
            return ms * n / k  # nothing known about amortisation: assume none
        # a line through the two measured sizes nearest to n
        points.sort(key=lambda p: (abs(p[0] - n), p[0]))
        (n1, t1), (n2, t2) = sorted(points[:2])
        slope = max((t2 - t1) / (n2 - n1), 0.0)
        return max(t1 + slope * (n - n1), t1 * 0.5)

    def per_stream_ms(self, key: tuple, n: int) -> float:
        """GPU time one stream costs per step when ``n`` streams of ``key`` share it."""
        return self.predict(key, n) / max(n, 1)
