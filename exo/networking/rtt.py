"""Round-trip time to a peer: timed health checks, smoothed by a sliding median."""

import statistics
from collections import deque


class RttEstimator:
  """The median of the last `window` RTT samples, in ms.

  A median rather than a mean: one slow outlier (a GC pause, a retransmit) among the window cannot move the
  estimate beyond the range of the other samples, so the planner does not re-plan on a single hiccup.
  """

  def __init__(self, window: int = 5):
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window!r}")
    self._samples: deque[float] = deque(maxlen=window)

  def add(self, sample_ms: float) -> None:
    self._samples.append(float(sample_ms))

  def value(self) -> float | None:
    """The median of the window, or None before the first sample."""
    return statistics.median(self._samples) if self._samples else None

  @property
  def samples(self) -> list[float]:
    """The samples in the window, oldest first."""
    return list(self._samples)
