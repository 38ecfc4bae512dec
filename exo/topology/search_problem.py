"""The planning problem in index form, a candidate plan, and the objective's ordering of candidates."""

import math
from dataclasses import dataclass

import numpy as np

from exo.topology.ring_search import tour_cost

OBJECTIVES = ("latency", "throughput")
_REL_TOL = 1e-9  # plans whose objective values differ by less than this are ties


@dataclass(frozen=True)
class SearchProblem:
  """Nodes 0..n-1 in sorted-id order (so index order is id order): per-layer time, layer capacity, symmetric hop matrix
  (inf where there is no edge) and per-token transfer matrix; plus the number of layers to place."""

  times: list[float]
  caps: list[int]
  hop: np.ndarray
  transfer: np.ndarray
  n_layers: int

  @property
  def size(self) -> int:
    return len(self.times)

  def ring_transfer(self, ring: list[int]) -> list[float]:
    if len(ring) < 2:
      return [0.0]
    return [float(self.transfer[i, ring[(k + 1) % len(ring)]]) for k, i in enumerate(ring)]

  def candidate(self, ring: list[int], layers: list[int], ring_cost: float | None = None) -> "Candidate":
    compute = sum(n * self.times[i] for i, n in zip(ring, layers))
    hops = tour_cost(ring, self.hop) if ring_cost is None else ring_cost
    bottleneck = max(n * self.times[i] + c for i, n, c in zip(ring, layers, self.ring_transfer(ring)))
    return Candidate(tuple(ring), tuple(layers), compute + hops, bottleneck)


@dataclass(frozen=True)
class Candidate:
  ring: tuple[int, ...]
  layers: tuple[int, ...]
  tpot: float
  bottleneck: float


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-15)


def within_tolerance(value: float, best: float) -> bool:
  """True if `value` (to be minimised) is no worse than `best` beyond the tie tolerance."""
  return value <= best or _close(value, best)


def better(a: Candidate, b: Candidate | None, objective: str) -> bool:
  """Is `a` strictly preferred to `b`? Primary objective, then the other one, then node ids in ring order, then layer counts."""
  if b is None:
    return True
  pairs = [(a.tpot, b.tpot), (a.bottleneck, b.bottleneck)]
  if objective == "throughput":
    pairs.reverse()
  for x, y in pairs:
    if not _close(x, y):
      return x < y
  return (a.ring, a.layers) < (b.ring, b.layers)
