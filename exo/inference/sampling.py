"""Choosing the next token from a shard's logits, shared by every engine."""

import numpy as np


def sample_last(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
  """The next token from the last position's logits: argmax at temperature 0, else a softmax draw from `rng`."""
  last = np.asarray(logits, dtype=np.float64).reshape(-1, np.shape(logits)[-1])[-1]
  if temperature <= 0:
    return int(np.argmax(last))
  p = np.exp((last - last.max()) / temperature)
  return int(rng.choice(len(p), p=p / p.sum()))
