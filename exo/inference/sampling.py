"""Choosing the next token from a shard's logits, shared by every engine.

Greedy (argmax) at temperature 0. Otherwise one draw from softmax(logits / temperature) restricted to the `top_k` most likely
tokens (0: all of them) and, among those, to the top-p nucleus: the smallest set of most likely tokens whose probability mass
reaches `top_p`; what is kept is renormalised. Probabilities are float64. A cut between tokens of equal probability keeps the
lower ids, so a draw depends only on the logits and the generator. O(V) for V tokens, but for a top-p cut whose nucleus is not
among the few thousand likeliest tokens, which sorts them all (O(V log V)).
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

from exo.base.errors import BadInput

__all__ = ["GREEDY", "MAX_SEED", "MAX_TOP_K", "Sampling", "sample_last"]

MAX_SEED = 2**63 - 1  # seeds travel as int64
MAX_TOP_K = 2**31 - 1  # top_k travels as int32


@dataclass(frozen=True)
class Sampling:
  """How a request chooses its tokens; `seed` None draws from fresh entropy. Raises BadInput naming a bad value."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None

  def __post_init__(self):
    def real(value) -> bool:
      return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value) -> bool:
      return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not (real(self.temperature) and self.temperature >= 0):
      raise BadInput(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
    if not (real(self.top_p) and 0 < self.top_p <= 1):
      raise BadInput(f"top_p must be a number above 0 and at most 1, got {self.top_p!r}")
    if not (whole(self.top_k) and 0 <= self.top_k <= MAX_TOP_K):
      raise BadInput(f"top_k must be a whole number from 0 (every token) to {MAX_TOP_K}, got {self.top_k!r}")
    if self.seed is not None and not (whole(self.seed) and 0 <= self.seed <= MAX_SEED):
      raise BadInput(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")
    object.__setattr__(self, "temperature", float(self.temperature))  # numpy scalars become plain numbers
    object.__setattr__(self, "top_p", float(self.top_p))
    object.__setattr__(self, "top_k", int(self.top_k))
    object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def generator(self) -> np.random.Generator:
    """A fresh generator for one request: seeded with `seed`, or from the operating system's entropy if None."""
    return np.random.default_rng(self.seed)


GREEDY = Sampling()


def _heaviest(weights: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
  """The k heaviest of `ids` (ascending), ties to the lower ids, in ascending order: O(len(ids)), no sort of them all."""
  w = weights[ids]
  kth = np.partition(w, len(w) - k)[len(w) - k]
  above, tied = ids[w > kth], ids[w == kth]
  return np.sort(np.concatenate([above, tied[: k - len(above)]]))


def _candidates(last: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, their probabilities, summing to 1) that a draw chooses among."""
  weights = np.exp((last - last.max()) / sampling.temperature)  # the max first: a tiny temperature leaves 1 there, not inf / inf
  ids = np.arange(len(weights))
  if 0 < sampling.top_k < len(ids):
    ids = _heaviest(weights, ids, sampling.top_k)
  if sampling.top_p < 1:
    target, head, m = sampling.top_p * weights[ids].sum(), ids, 64
    while m < len(ids):  # the nucleus is most often among a few of the heaviest tokens: sort only those
      head = _heaviest(weights, ids, m)
      if weights[head].sum() >= target:
        break
      head, m = ids, m * 8
    ids = head[np.argsort(-weights[head], kind="stable")]
    mass = np.cumsum(weights[ids])
    ids = ids[: min(int(np.searchsorted(mass, target)) + 1, len(ids))]
  kept = weights[ids]
  return ids, kept / kept.sum()


def sample_last(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
  """The next token from the last position's logits, drawn with `rng` as `sampling` says (see the module)."""
  last = np.asarray(logits, dtype=np.float64).reshape(-1, np.shape(logits)[-1])[-1]
  if sampling.greedy:
    return int(np.argmax(last))
  ids, p = _candidates(last, sampling)
  return int(ids[rng.choice(len(ids), p=p)])
