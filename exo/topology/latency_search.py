"""Exact latency search up to MAX_NODES (16) usable nodes: the subset, ring, first node and split of least TPOT under cost model v2.

Problem. A plan's TPOT is compute(S, f, l) + eta t_l + hops: the split fills the fastest nodes first and depends only on the
subset S, its first node f (it holds the embedding) and its last node l (the head, which also costs eta layers of time); the
hops are those of a cycle through S that uses the edge l -> f, at best C_S(f, l), the cheapest Hamiltonian cycle of S through
that edge (hops are symmetric). So the optimum is min over (S, f, l) of compute(S, f, l) + eta t_l + C_S(f, l).

Idea: branch and bound over subsets, nodes indexed fastest first.
1. Bounds without any Held-Karp table, vectorised over all 2^n subsets: the fill of each subset's fastest nodes with
   middle-of-ring capacities (no embedding or head held), plus eta times its fastest node's time, plus half of each member's two
   cheapest links (a ring leaves and enters every node). The best single node and pair (closed form) and the CEILING_SUBSETS
   subsets of least bound on heuristic rings give a plan, whose TPOT is a ceiling: only subsets whose bound stays under it (tens
   to hundreds of 65536 at n = 16), and their subsets, enter the tables.
2. One Held-Karp table over those subsets, paths starting at each subset's fastest node a, gives each one's cheapest cycle C_S,
   and C_S(a, j) exactly for every pair with a as an end: the head usually runs best on the fastest node.
3. Subsets are solved in the order of fill + eta t_a + C_S until that passes the best TPOT found. Solving one tries every
   (f, l) whose own bound (its split plus C_S) can still win; a pair with neither end at a and off the cheapest cycle found
   reads C_S(f, l) off a table of paths from l: over the subsets of S alone when S is small (LOCAL_MAX), else over every
   covered subset, built once per node.

Complexity: O(2^n n) for the bounds; O(2^n n^2) per Held-Karp table in the worst case, over the covered subsets only (the
anchored one, and the rare tables from another node); O(k^2) splits of O(k) per subset solved. Memory O(2^n n) at most per
table, 8 MB at n = 16. Ties (equal TPOT) go to throughput, then node ids: every cheapest ring of every tied (S, f, l) is
planned, within budgets that only ever cut the exploration of ties, never the optimum itself.
"""

import math
from typing import Iterator

import numpy as np

from exo.topology.bounds import best_small_plan
from exo.topology.ring_search import hamiltonian_cycle, members
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

MAX_NODES = 16
TOUR_BUDGET = 200_000  # rings planned at most when breaking ties; beyond, the best found is kept
TIE_PAIRS = 20_000  # (f, l) pairs solved at most when they can only tie the best TPOT
TIE_CELLS = 1 << 21  # table cells built at most for pairs or rings that can only tie the best TPOT
CEILING_SUBSETS = 8  # subsets tried on heuristic rings for an upper bound before any table is built
CEILING_EFFORT = 2_000  # path extensions per heuristic ring
LOCAL_MAX = 10  # a subset of at most this many nodes gets its own small table of paths rather than one over every subset
_TOL = 1e-9


def _within(values: np.ndarray, best: float) -> np.ndarray:
  """within_tolerance, vectorised."""
  if math.isinf(best):
    return values <= best
  return values <= best + np.maximum(_TOL * np.maximum(np.abs(values), abs(best)), 1e-15)


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=_TOL, abs_tol=1e-15)


def _over_subsets(values: list, n: int, dtype=float) -> np.ndarray:
  """out[S] = the sum of values[p] over the members p of every subset S, in O(2^n): each block of masks whose highest bit is p
  repeats the block below it plus values[p]."""
  out = np.zeros(1 << n, dtype=dtype)
  for p in range(n):
    out[1 << p : 2 << p] = out[: 1 << p] + values[p]
  return out


class _Paths:
  """A Held-Karp table over the subsets a _Subsets covers, stored compactly: table[S, j] for global masks S."""

  def __init__(self, path: np.ndarray, row: np.ndarray):
    self.path, self.row = path, row

  def __getitem__(self, key: tuple[int, int]) -> float:
    mask, j = key
    return self.path[self.row[mask], j]


class _Subsets:
  """The subsets of n nodes (bit p = node p, fastest first) whose cycles are needed, with every subset of theirs, and Held-Karp
  tables over them: one anchored at each subset's fastest node, others from one node, built on demand."""

  def __init__(self, hop: np.ndarray, size: np.ndarray, low: np.ndarray, wanted: np.ndarray):
    n = len(hop)
    self.hop, self.n, self.size, self.low = hop, n, size, low
    self.kmax = int(size[wanted].max())
    closure = wanted.copy()
    for p in range(n):  # down-closure: a mask without p is in if the same mask with p is
      blocks = closure.reshape(-1, 2, 1 << p)
      blocks[:, 0, :] |= blocks[:, 1, :]
    self.covered = np.flatnonzero(closure)
    self.row = np.full(1 << n, -1, dtype=np.int64)
    self.row[self.covered] = np.arange(len(self.covered))
    covered_size = size[self.covered]
    self.by_size = [self.covered[covered_size == k] for k in range(self.kmax + 1)]
    self.anchored = self._table(None)
    self.cycle = np.full(1 << n, math.inf)
    self.cycle[size == 1] = 0.0
    for k in range(2, self.kmax + 1):
      sel = self.by_size[k]
      self.cycle[sel] = (self.anchored.path[self.row[sel]] + hop[:, low[sel]].T).min(axis=1)
    self._from: dict[int, _Paths] = {}
    self._local: dict[tuple[int, int], _LocalPaths] = {}

  def _table(self, start: int | None) -> _Paths:
    """table[S, j]: the cheapest path from `start` (None: from S's fastest node) through every node of S, ending at j."""
    n, hop, row = self.n, self.hop, self.row
    path = np.full((len(self.covered), n), math.inf)
    singles = self.by_size[1] if start is None else np.array([1 << start])
    path[row[singles], self.low[singles]] = 0.0
    for k in range(2, self.kmax + 1):
      layer = self.by_size[k]
      if start is not None:
        layer = layer[(layer >> start) & 1 == 1]
      for j in range(n):
        if j == start:
          continue
        sel = layer[(layer >> j) & 1 == 1]
        if start is None:
          sel = sel[self.low[sel] != j]
        if sel.size:
          path[row[sel], j] = (path[row[sel ^ (1 << j)]] + hop[:, j]).min(axis=1)
    return _Paths(path, row)

  def cells(self, mask: int) -> int:
    """Cells of the table that paths_from(v, mask) would build."""
    k = int(self.size[mask])
    return (1 << k) * k if k <= LOCAL_MAX else len(self.covered) * self.n

  def built(self, v: int, mask: int) -> bool:
    return v in self._from or (mask, v) in self._local

  def paths_from(self, v: int, mask: int) -> "_Paths | _LocalPaths":
    """A table of paths from v valid on every subset of `mask` that holds v: local to `mask` when it is small, else global."""
    if int(self.size[mask]) <= LOCAL_MAX and v not in self._from:
      if (mask, v) not in self._local:
        self._local[mask, v] = _LocalPaths(self.hop, mask, v)
      return self._local[mask, v]
    if v not in self._from:
      self._from[v] = self._table(v)
    return self._from[v]

  def known_ring_cost(self, mask: int, f: int, last: int) -> float | None:
    """C_S(f, last) if a table already built answers it, else None."""
    a = int(self.low[mask])
    if a in (f, last):
      other = last if a == f else f
      return float(self.anchored[mask, other] + self.hop[other, a])
    for v, w in ((last, f), (f, last)):
      if self.built(v, mask):
        return float(self.paths_from(v, mask)[mask, w] + self.hop[w, v])
    return None

  def ring_cost(self, mask: int, f: int, last: int) -> float:
    known = self.known_ring_cost(mask, f, last)
    return known if known is not None else float(self.paths_from(last, mask)[mask, f] + self.hop[f, last])

  def cheapest_cycle_edges(self, mask: int) -> set[frozenset]:
    """The edges of one cheapest cycle of the subset, read back from the anchored table."""
    a, hop, path = int(self.low[mask]), self.hop, self.anchored
    nodes = members(mask)
    if len(nodes) < 2:
      return set()
    j = min(nodes[1:], key=lambda x: path[mask, x] + hop[x, a])
    edges, rest = {frozenset((j, a))}, mask
    while j != a:
      prev = rest ^ (1 << j)
      i = a if prev == 1 << a else min(members(prev), key=lambda x: path[prev, x] + hop[x, j])
      edges.add(frozenset((i, j)))
      rest, j = prev, i
    return edges

  def table_towards(self, mask: int, last: int) -> "_Paths | _LocalPaths":
    """A table of paths from `last` valid on every subset of `mask` that holds it."""
    return self.anchored if int(self.low[mask]) == last else self.paths_from(last, mask)


class _LocalPaths:
  """Held-Karp from `start` over the subsets of one small subset `mask` only, O(2^k k^2), read with the global masks:
  table[sub, j] for sub a subset of `mask` holding start and j."""

  def __init__(self, hop: np.ndarray, mask: int, start: int):
    self.nodes = members(mask)
    self.index = {p: i for i, p in enumerate(self.nodes)}
    k, s = len(self.nodes), self.index[start]
    local = hop[np.ix_(self.nodes, self.nodes)]
    masks = np.arange(1 << k)
    size = sum((masks >> i) & 1 for i in range(k))
    path = np.full((1 << k, k), math.inf)
    path[1 << s, s] = 0.0
    for n in range(2, k + 1):
      layer = masks[(size == n) & ((masks >> s) & 1 == 1)]
      for j in range(k):
        if j != s:
          sel = layer[(layer >> j) & 1 == 1]
          path[sel, j] = (path[sel ^ (1 << j)] + local[:, j]).min(axis=1)
    self.path = path

  def __getitem__(self, key: tuple[int, int]) -> float:
    sub, j = key
    return self.path[sum(1 << i for i, p in enumerate(self.nodes) if sub >> p & 1), self.index[j]]


def _fill(nodes: list[int], t: list[float], caps: list[int], n_layers: int) -> float | None:
  """Least compute sum L_i t_i of a split of n_layers over `nodes` (fastest first), 1 <= L_i <= caps[i]; None if none."""
  left = n_layers - len(nodes)
  if left < 0 or min(caps) < 1:
    return None
  total = sum(t[p] for p in nodes)
  for p, cap in zip(nodes, caps):
    extra = min(cap - 1, left)
    total += extra * t[p]
    left -= extra
    if not left:
      break
  return total if left == 0 else None


def _ring_ceiling(masks: np.ndarray, weak: np.ndarray, hop: np.ndarray, t: list[float], caps: tuple, n_layers: int, eta: float) -> float:
  """An upper bound on the optimum from the CEILING_SUBSETS subsets of least DP-free bound, each on a heuristic ring with its
  best ends: a close ceiling keeps the Held-Karp tables to the few subsets that can beat it."""
  first, middle, last = caps
  best = math.inf
  for mask in masks[np.argsort(weak, kind="stable")[:CEILING_SUBSETS]].tolist():
    nodes = members(mask)
    ring = hamiltonian_cycle(nodes, hop, CEILING_EFFORT) if len(nodes) > 1 else None
    if ring is None:
      continue
    hops = sum(hop[a, b] for a, b in zip(ring, ring[1:] + ring[:1]))
    for f, z in [(a, b) for a, b in zip(ring, ring[1:] + ring[:1])] + [(b, a) for a, b in zip(ring, ring[1:] + ring[:1])]:
      split = _fill(nodes, t, [first[p] if p == f else last[p] if p == z else middle[p] for p in nodes], n_layers)
      if split is not None:
        best = min(best, split + eta * t[z] + hops)
  return best


def exact_latency(problem: SearchProblem) -> Candidate | None:
  """The least-TPOT plan of a problem with at most MAX_NODES nodes (ties: most throughput, then node ids); None if none."""
  n, n_layers, eta = problem.size, problem.n_layers, problem.eta
  if n == 0:
    return None
  assert n <= MAX_NODES, f"exact latency search is for at most {MAX_NODES} nodes, got {n}"
  order = sorted(range(n), key=lambda i: (problem.t1[i], i))  # position p holds problem node order[p]
  t = [problem.t1[i] for i in order]
  hop = problem.hop[np.ix_(order, order)]
  cap = problem.costs.capacity
  middle = [cap(i) for i in order]
  first = [cap(i, first=True) for i in order]
  last = [cap(i, last=True) for i in order]
  alone = [cap(i, first=True, last=True) for i in order]

  # bounds without any table: the best one- or two-node plan, and per subset its split plus each member's cheapest links
  small = best_small_plan(problem)
  ceiling = math.inf if small is None else small.tpot
  masks = np.arange(1 << n)
  size = _over_subsets([1] * n, n, np.int64)
  ok = _over_subsets([int(c < 1) for c in middle], n, np.int64) == 0  # every member holds a layer in the middle of a ring
  compute = _over_subsets(t, n)
  links = np.sort(np.concatenate([hop, np.full((n, 2), math.inf)], axis=1), axis=1)  # each node's cheapest links, inf if none
  one_link, two_links = _over_subsets(links[:, 0], n), _over_subsets((links[:, 0] + links[:, 1]) / 2, n)
  low = np.zeros(1 << n, dtype=np.int64)  # the fastest member
  for p in range(n):
    low[1 << p : 2 << p] = low[: 1 << p]
    low[1 << p] = p
  fastest = np.array(t)[low]
  left = n_layers - size
  ok &= (size >= 1) & (left >= 0)
  for p in range(n):  # the fastest members fill up to their capacity, every other member keeps one layer
    extra = np.where((masks >> p) & 1 == 1, np.clip(np.minimum(middle[p] - 1, left), 0, None), 0)
    compute += extra * t[p]
    left -= extra
  ok &= left == 0
  base = compute + eta * fastest
  weak = base + np.where(size == 1, 0.0, np.where(size == 2, one_link, two_links))
  candidates = ok & _within(weak, ceiling)
  if not candidates.any():
    return None
  ceiling = min(ceiling, _ring_ceiling(masks[candidates], weak[candidates], hop, t, (first, middle, last), n_layers, eta))
  candidates &= _within(weak, ceiling)
  subsets = _Subsets(hop, size, low, candidates)
  bound = base + subsets.cycle
  candidates &= (size <= subsets.kmax) & np.isfinite(bound)
  candidates[candidates] &= _within(bound[candidates], ceiling)
  ranked = masks[candidates][np.lexsort((masks[candidates], bound[candidates]))].tolist()

  best_tpot, tied = math.inf, []
  spent = {"pairs": 0, "cells": 0}

  def affordable(cells: int) -> bool:
    return spent["pairs"] < TIE_PAIRS and spent["cells"] + cells <= TIE_CELLS

  for mask in ranked:
    if not within_tolerance(float(bound[mask]), best_tpot):
      break
    nodes = members(mask)
    if len(nodes) == 1:
      p = nodes[0]
      if alone[p] >= n_layers:
        tpot = (n_layers + eta) * t[p]
        if within_tolerance(tpot, best_tpot):
          best_tpot = min(best_tpot, tpot)
          tied.append((tpot, mask, p, p))
      continue
    cycle, on_cycle = float(subsets.cycle[mask]), None
    for z in nodes:
      if not within_tolerance(float(base[mask]) - eta * float(fastest[mask]) + eta * t[z] + cycle, best_tpot):
        break  # t grows along nodes: no later last node can do better
      for f in nodes:
        if f == z:
          continue
        caps = [first[p] if p == f else last[p] if p == z else middle[p] for p in nodes]
        split = _fill(nodes, t, caps, n_layers)
        if split is None:
          continue
        own = split + eta * t[z]
        if not within_tolerance(own + cycle, best_tpot):
          continue
        tie_only = _close(own + cycle, best_tpot)
        if tie_only and not affordable(0):
          continue
        spent["pairs"] += tie_only
        hops = subsets.known_ring_cost(mask, f, z)
        if hops is None:
          on_cycle = subsets.cheapest_cycle_edges(mask) if on_cycle is None else on_cycle
          if frozenset((f, z)) in on_cycle:
            hops = cycle
          elif tie_only and not affordable(subsets.cells(mask)):
            continue
          else:
            spent["cells"] += subsets.cells(mask) * tie_only
            hops = subsets.ring_cost(mask, f, z)
        tpot = own + hops
        if within_tolerance(tpot, best_tpot):
          best_tpot = min(best_tpot, tpot)
          tied.append((tpot, mask, f, z))

  best, rings_left = None, TOUR_BUDGET
  for tpot, mask, f, z in sorted(tied):
    if not within_tolerance(tpot, best_tpot) or rings_left <= 0:
      continue
    needs_table = int(subsets.low[mask]) != z and not subsets.built(z, mask)
    if needs_table and best is not None:  # only a tie-break is at stake
      if not affordable(subsets.cells(mask)):
        continue
      spent["cells"] += subsets.cells(mask)
    free = problem.order_free([order[p] for p in members(mask)])
    for ring in _cheapest_rings(subsets, mask, f, z, order):
      candidate = problem.plan_ring([order[p] for p in ring])
      best = candidate if better(candidate, best, "latency") else best
      rings_left -= 1
      if free or rings_left <= 0:
        break
  return best


def _cheapest_rings(subsets: _Subsets, mask: int, f: int, last: int, order: list[int]) -> Iterator[list[int]]:
  """Every cheapest ring through `mask` from f to `last` (within a relative 1e-9), in lexicographic order of the node ids the
  positions stand for. A branch continues only while its hops plus the exact cheapest completion, read off a table of paths
  from `last`, reach the optimum, so each ring comes in O(k^2)."""
  if f == last:
    yield [f]
    return
  hop = subsets.hop
  table = subsets.table_towards(mask, last)
  target = float(table[mask, f] + hop[f, last]) * (1 + _TOL) + 1e-15

  def extend(ring: list[int], left: int, spent: float) -> Iterator[list[int]]:
    x = ring[-1]
    if left == 1 << last:
      yield ring + [last]
      return
    for y in sorted(members(left & ~(1 << last)), key=lambda p: order[p]):
      cost = spent + hop[x, y]
      if cost + table[left, y] + hop[last, f] <= target:
        ring.append(y)
        yield from extend(ring, left & ~(1 << y), cost)
        ring.pop()

  yield from extend([f], mask & ~(1 << f), 0.0)
