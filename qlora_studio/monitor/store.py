"""A time series over a rolling window whose memory stays flat however long the session runs.

The sampler adds four samples a second per GPU; a GUI left open over a weekend would otherwise
grow without bound. :class:`RollingSeries` keeps at most ``max_points + 1`` buckets: the window is
cut into ``max_points`` equal slices and every sample that falls into the slice of the newest
bucket is merged into it. Merging keeps each field's *maximum*, because this is a memory monitor
and a decimated timeline must never hide a peak (the spike that causes an out-of-memory error is
exactly what a person comes here to see).

Plain Python, not thread-safe: the owner (the sampler, or a GUI page) holds the lock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_WINDOW_S = 600.0
DEFAULT_MAX_POINTS = 2400  # 10 minutes at 4 Hz: no decimation at the default window


class RollingSeries:
    """Samples ``(time, {field: value})`` kept for ``window_s`` seconds, decimated by max-merge.

    Times are seconds on any monotonic-enough clock (the sampler uses wall-clock time so that its
    samples line up with the worker's event times). A sample older than the newest bucket is merged
    into the newest bucket rather than inserted out of order (the wall clock may step back).
    """

    def __init__(self, fields: Sequence[str], window_s: float = DEFAULT_WINDOW_S, max_points: int = DEFAULT_MAX_POINTS):
        if max_points < 2:
            raise ValueError("max_points must be at least 2")
        self.fields = tuple(fields)
        self._index = {name: i for i, name in enumerate(self.fields)}
        self.max_points = max_points
        self._window_s = 0.0
        self._width = 0.0
        self._keys: deque[int] = deque()
        self._times: deque[float] = deque()
        self._rows: deque[list[float | None]] = deque()
        self.window_s = window_s

    # ---- window ---------------------------------------------------------------------------

    @property
    def window_s(self) -> float:
        return self._window_s

    @window_s.setter
    def window_s(self, window_s: float) -> None:
        """Change the window; existing buckets are merged to the new bucket width and pruned."""
        if not window_s > 0:
            raise ValueError("window_s must be greater than 0")
        self._window_s = float(window_s)
        self._width = self._window_s / self.max_points
        old = list(zip(self._times, self._rows, strict=True))
        self._keys.clear()
        self._times.clear()
        self._rows.clear()
        for t, row in old:
            self._merge(t, row)
        self._prune()

    @property
    def bucket_s(self) -> float:
        """The width of one bucket in seconds: the time resolution of what is kept."""
        return self._width

    # ---- writing --------------------------------------------------------------------------

    def add(self, t: float, values: Mapping[str, float | int | None]) -> None:
        row: list[float | None] = [None] * len(self.fields)
        for name, value in values.items():
            i = self._index.get(name)
            if i is not None and value is not None:
                row[i] = float(value)
        self._merge(float(t), row)
        self._prune()

    def clear(self) -> None:
        self._keys.clear()
        self._times.clear()
        self._rows.clear()

    def _merge(self, t: float, row: list[float | None]) -> None:
        key = math.floor(t / self._width)
        if self._keys and key <= self._keys[-1]:
            last = self._rows[-1]
            for i, value in enumerate(row):
                if value is not None and (last[i] is None or value > last[i]):
                    last[i] = value
            return
        self._keys.append(key)
        self._times.append(t)
        self._rows.append(list(row))

    def _prune(self) -> None:
        if not self._times:
            return
        oldest = self._times[-1] - self._window_s
        while self._times and self._times[0] < oldest:
            self._keys.popleft()
            self._times.popleft()
            self._rows.popleft()

    # ---- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._times)

    def times(self) -> list[float]:
        return list(self._times)

    def column(self, name: str) -> list[float]:
        """One field over time; a missing value is NaN, which plots as a gap."""
        i = self._index[name]
        return [math.nan if row[i] is None else row[i] for row in self._rows]

    def columns(self, names: Iterable[str] | None = None) -> dict[str, list[float]]:
        return {name: self.column(name) for name in (names or self.fields)}

    def latest(self, name: str) -> float | None:
        i = self._index[name]
        for row in reversed(self._rows):
            if row[i] is not None:
                return row[i]
        return None

    def maximum(self, name: str) -> float | None:
        i = self._index[name]
        values = [row[i] for row in self._rows if row[i] is not None]
        return max(values) if values else None
