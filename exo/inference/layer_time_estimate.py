"""A node's running estimate of its own layer times for one model, refined from the steps of real requests (docs/DESIGN.md
section 4) and robust to the odd slow step (a garbage collection, another process on the machine).

A step of n tokens over a stage of L layers, plus eta layers of head time on the last stage, that took s seconds is a sample of
one layer's time: decode_ms = s / (L + eta) when n = 1, token_ms = s / ((L + eta) n) when n >= PREFILL_MIN_TOKENS (a step of a
few tokens tells neither). A prompt at the last stage asks for its last row's logits only, so its head runs on one row: its
sample is token_ms = (s - eta d) / (L n), with d the decode estimate (while none is known, the head is charged n rows). Each figure is the calibration's until `min_samples` samples of it have arrived, then the median of
its last `window` samples: one outlier moves it by at most one rank, and a lasting change takes over once it fills half the
window.
"""

from collections import deque
from statistics import median

from exo.base.device_capabilities import LayerTimes

PREFILL_MIN_TOKENS = 8
DECODE_WINDOW, DECODE_MIN_SAMPLES = 24, 5  # one decode sample per token a stage runs
TOKEN_WINDOW, TOKEN_MIN_SAMPLES = 9, 3  # one prefill sample per request a stage runs


class MovingMedian:
  """`initial` (None: unknown) until `min_samples` samples have arrived, then the median of the last `window`."""

  def __init__(self, initial: float | None, window: int, min_samples: int):
    if not 1 <= min_samples <= window:
      raise ValueError(f"min_samples must lie in [1, window={window}], got {min_samples}")
    self.initial, self.min_samples = initial, min_samples
    self.samples: deque[float] = deque(maxlen=window)
    self.seen = 0

  def add(self, sample: float) -> None:
    self.samples.append(sample)
    self.seen += 1

  def value(self) -> float | None:
    return median(self.samples) if self.seen >= self.min_samples else self.initial


class LayerTimeEstimate:
  """Layer times from a calibration (`initial`; None if there was none) refined by step samples."""

  def __init__(self, initial: LayerTimes | None = None):
    self.decode_ms = MovingMedian(None if initial is None else initial.decode_ms, DECODE_WINDOW, DECODE_MIN_SAMPLES)
    self.token_ms = MovingMedian(None if initial is None else initial.token_ms, TOKEN_WINDOW, TOKEN_MIN_SAMPLES)

  def add_step(self, seconds: float, tokens: int, layers: float, head: float = 0.0, head_rows: int | None = None) -> bool:
    """Take a step of `tokens` tokens over `layers` layers and `head` layers of head time run on `head_rows` of its rows (None:
    all) that took `seconds`; True if the estimate changed."""
    if layers + head <= 0 or seconds <= 0:
      return False
    before = self.value()
    decode_ms = self.decode_ms.value()
    if tokens == 1:
      self.decode_ms.add(seconds * 1000 / (layers + head))
    elif tokens >= PREFILL_MIN_TOKENS and head and head_rows == 1 and decode_ms is not None and layers > 0:
      self.token_ms.add(max(0.0, seconds * 1000 - head * decode_ms) / (layers * tokens))
    elif tokens >= PREFILL_MIN_TOKENS:
      self.token_ms.add(seconds * 1000 / ((layers + head) * tokens))
    else:
      return False
    return self.value() != before

  def value(self) -> LayerTimes | None:
    """The estimate, once both figures are known (a step that took no time gives none)."""
    decode_ms, token_ms = self.decode_ms.value(), self.token_ms.value()
    if decode_ms is None or token_ms is None or decode_ms <= 0:
      return None
    return LayerTimes(decode_ms, token_ms)
