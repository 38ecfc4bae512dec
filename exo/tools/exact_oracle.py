"""Exact optima for clusters of up to 16 usable nodes, by Held-Karp over every subset: a reference for the planner beyond the
reach of exo/tools/plan_oracle.py's enumeration of every plan. It reads the topology and model-spec dicts through
exo/tools/oracle_cost_model.py (docs/DESIGN.md section 2 written out again) and shares no code with exo/topology.

Latency: a plan's TPOT is the compute of its layer split, which depends only on the subset S, its first node f and its last
node l (capacities by role, the head on l), plus the hops of its ring, a cycle through S that contains the edge l -> f. So the
best TPOT is the minimum over (S, f, l) of compute(S, f, l) + eta t_l(1) + path(S, f, l) + hop(l, f), with path(S, f, l) the
cheapest path from f through every node of S ending at l: a single-start Held-Karp from every f, O(2^n n^3) in all, and the
split filled fastest first, vectorised over the subsets for each (f, l).

Throughput, for clusters whose links have no bandwidth (no transfer term, so a stage depends on the subset and the two ends,
not on the order): the least busiest-stage time T is the smallest candidate value m t_i(b) or (m + eta) t_i(b) for which some
(S, f, l) with a ring through the edge l -> f lets every node hold at least one layer and all of them together n_layers, each
node holding at most min(cap, floor(T / t(b))) layers (less eta on the last). Binary search on T, each probe vectorised over
subsets for each (f, l).
"""

import math

import numpy as np

from exo.tools.oracle_cost_model import LEAST_CONTEXT, OracleCostModel, planned_context

__all__ = ["MAX_NODES", "OracleCluster", "feasible", "optimum"]

MAX_NODES = 16
_EPS = 1e-9  # slack when a time budget turns into a whole number of layers


class OracleCluster:
  """The usable nodes (they hold a layer in the middle of a ring at the least context v2.1 plans) of one case, indexed 0..n-1,
  with their figures; `cm.context` sets the context the capacities are counted at."""

  def __init__(self, topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0, batch: int = 1, need_speed: bool = True):
    self.cm = OracleCostModel(topology, model, memory_headroom, default_rtt_ms, batch)
    assert self.cm.any_known_speed() or not need_speed, "the exact oracle does not model the memory-weighted fallback"
    planned, self.cm.context = self.cm.context, min(LEAST_CONTEXT, self.cm.context)  # usable at some context v2.1 may plan
    self.ids = sorted(i for i in self.cm.nodes if self.cm.cap(i, False, False, 1, "latency") >= 1)
    self.cm.context = planned
    self.n = len(self.ids)
    assert self.n <= MAX_NODES, f"{self.n} usable nodes: the exact oracle stops at {MAX_NODES}"
    self.n_layers, self.eta, self.batch = self.cm.n_layers, self.cm.eta, batch
    n = self.n
    self.hop = np.full((n, n), math.inf)
    for a, u in enumerate(self.ids):
      for b, v in enumerate(self.ids):
        if a != b and self.cm.adjacent(u, v):
          self.hop[a, b] = self.cm.hop(u, v, 1)
    self.masks = np.arange(1 << n)
    self.bits = [(self.masks >> i) & 1 for i in range(n)]
    self.size = sum(self.bits)
    self._paths = {}

  def cap(self, i: int, first: bool, last: bool, k: int, objective: str) -> int:
    return self.cm.cap(self.ids[i], first, last, k, objective)

  def paths_from(self, f: int) -> np.ndarray:
    """path[S, j]: the cheapest path that starts at f, visits every node of S once and ends at j (inf if none)."""
    if f not in self._paths:
      n = self.n
      path = np.full((1 << n, n), math.inf)
      path[1 << f, f] = 0.0
      for k in range(2, n + 1):
        for j in range(n):
          if j == f:
            continue
          sel = self.masks[(self.size == k) & (self.bits[f] == 1) & (self.bits[j] == 1)]
          path[sel, j] = (path[sel ^ (1 << j)] + self.hop[:, j]).min(axis=1)
      self._paths[f] = path
    return self._paths[f]

  def ring_masks(self, f: int, h: int) -> np.ndarray:
    """Subsets with a ring whose first node is f and whose last node (it runs the head) is h (h = f: the subset {f})."""
    if f == h:
      return np.array([1 << f])
    closing = self.paths_from(f)[:, h] + self.hop[h, f]
    return self.masks[np.isfinite(closing)]

  def best_tpot(self) -> float:
    """The least TPOT (seconds) of any feasible plan under the latency objective; inf if none."""
    t = [self.cm.t(i, 1) for i in self.ids]
    speed = sorted(range(self.n), key=lambda i: t[i])
    best = math.inf
    for f in range(self.n):
      for h in range(self.n):
        masks = self.ring_masks(f, h)
        k = self.size[masks]
        caps = [self.cap(i, i == f, i == h, 1, "latency") for i in range(self.n)]
        compute = np.zeros(len(masks))
        ok = k <= self.n_layers
        for i in range(self.n):
          member = ((masks >> i) & 1) == 1
          ok &= ~member | (caps[i] >= 1)
          compute += member * t[i]
        left = self.n_layers - k
        for i in speed:  # the fastest nodes fill up to their capacity, every other node keeps one layer
          extra = np.where(((masks >> i) & 1) == 1, np.clip(np.minimum(caps[i] - 1, left), 0, None), 0)
          compute += extra * t[i]
          left = left - extra
        ok &= left == 0
        if not ok.any():
          continue
        hops = 0.0 if f == h else self.paths_from(f)[masks, h] + self.hop[h, f]
        tpot = compute + self.eta * t[h] + hops
        best = min(best, float(np.min(np.where(ok, tpot, math.inf))))
    return best

  def best_throughput(self) -> float | None:
    """The most tokens/s of any feasible plan under the throughput objective (links without bandwidth); None if none."""
    for e in self.cm.edges:
      assert not e.get("bandwidth_mbps"), "the exact throughput oracle is for links without bandwidth"
    tb = [self.cm.t(i, self.batch) for i in self.ids]
    if not tb:
      return None
    m = np.arange(1, self.n_layers + 1)
    values = np.unique(np.concatenate([m * x for x in tb] + [(m + self.eta) * x for x in tb]))
    rings = {(f, h): self.ring_masks(f, h) for f in range(self.n) for h in range(self.n)}
    lo, hi = 0, len(values)
    while lo < hi:
      mid = (lo + hi) // 2
      if self._holds(float(values[mid]), tb, rings):
        hi = mid
      else:
        lo = mid + 1
    return None if lo == len(values) else self.batch / float(values[lo])

  def _holds(self, stage: float, tb: list[float], rings: dict) -> bool:
    """Can some plan keep every stage within `stage` seconds per batch?"""
    n, kmax = self.n, min(self.n, self.n_layers)

    def most(i: int, first: bool, last: bool, k: int) -> int:
      fits = math.floor(stage / tb[i] - (self.eta if last else 0.0) + _EPS)
      return min(self.cap(i, first, last, k, "throughput"), fits)

    # per ring size k: what each node holds in the middle, as the first, as the last, and alone
    middle = np.array([[most(i, False, False, k) for k in range(n + 1)] for i in range(n)])
    first = np.array([[most(i, True, False, k) for k in range(n + 1)] for i in range(n)])
    last = np.array([[most(i, False, True, k) for k in range(n + 1)] for i in range(n)])
    if any(most(i, True, True, 1) >= self.n_layers for i in range(n)):
      return True
    total = np.zeros(1 << n, dtype=np.int64)
    short = np.zeros(1 << n, dtype=bool)  # some member holds no layer in the middle
    for i in range(n):
      member = self.bits[i] == 1
      total += np.where(member, middle[i, self.size], 0)
      short |= member & (middle[i, self.size] < 1)
    for (f, h), masks in rings.items():
      if f == h:
        continue
      k = self.size[masks]
      keep = (k <= kmax) & ~short[masks] & (first[f, k] >= 1) & (last[h, k] >= 1)
      held = total[masks] - middle[f, k] + first[f, k] - middle[h, k] + last[h, k]
      if np.any(keep & (held >= self.n_layers)):
        return True
    return False


def feasible(topology: dict, model: dict, objective: str, context: int | None = None, **params) -> bool:
  """Whether any plan is feasible under `objective` at `context` tokens (default: the model's default context; no speeds
  needed): some node alone holds the
  model, or some subset S with a ring whose first node is f and last node h (a cycle through the edge h -> f) gives every node
  at least one layer in its role at capacities of ring size |S| <= n_layers, and all of them together n_layers."""
  cluster = OracleCluster(topology, model, need_speed=False, **params)
  cluster.cm.context = cluster.cm.context if context is None else context
  n, total = cluster.n, cluster.n_layers
  if any(cluster.cap(i, True, True, 1, objective) >= total for i in range(n)):
    return True
  caps = {role: np.array([[cluster.cap(i, *role, k, objective) for k in range(n + 1)] for i in range(n)]) for role in ((0, 0), (1, 0), (0, 1))}
  middle, first, last = caps[0, 0], caps[1, 0], caps[0, 1]
  for f in range(n):
    for h in range(n):
      if f == h:
        continue
      masks = cluster.ring_masks(f, h)
      k = cluster.size[masks]
      held = first[f, k] - middle[f, k] + last[h, k] - middle[h, k]
      short = np.zeros(len(masks), dtype=bool)
      for i in range(n):
        member = cluster.bits[i][masks] == 1
        held = held + np.where(member, middle[i, k], 0)
        short |= member & (middle[i, k] < 1)
      if np.any((k <= total) & ~short & (first[f, k] >= 1) & (last[h, k] >= 1) & (held >= total)):
        return True
  return False


def optimum(topology: dict, model: dict, objective: str, max_context: int | None = None, **params) -> float | None:
  """The optimal objective value at the planned context (v2.1): TPOT in seconds (latency) or tokens/s (throughput); None if no
  plan is feasible at any context."""
  cluster = OracleCluster(topology, model, **params)

  def best_at(tokens: int) -> float | None:
    cluster.cm.context = tokens
    if objective == "latency":
      best = cluster.best_tpot()
      return None if math.isinf(best) else best
    return cluster.best_throughput()

  context = planned_context(model, lambda tokens: best_at(tokens) is not None, max_context)
  return None if context is None else best_at(context)
