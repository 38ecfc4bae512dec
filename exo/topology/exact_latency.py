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
   reads C_S(f, l) off a table of paths from l (exo/topology/path_tables.py): over the subsets of S alone when S is small,
   else over every covered subset, built once per node.

Complexity: O(2^n n) for the bounds; O(2^n n^2) per Held-Karp table in the worst case, over the covered subsets only (the
anchored one, and the rare tables from another node); O(k^2) splits of O(k) per subset solved. Memory O(2^n n) at most per
table, 8 MB at n = 16. Ties (equal TPOT) go to throughput, then node ids: every cheapest ring of every tied (S, f, l) is
planned, within budgets that only ever cut the exploration of ties, never the optimum itself.
"""

import math
from typing import Iterator

import numpy as np

from exo.topology.bounds import best_small_plan
from exo.topology.cycles import hamiltonian_cycle
from exo.topology.path_tables import CoveredSubsets
from exo.topology.rings import cheapest_rings, members
from exo.topology.search_problem import Candidate, SearchProblem, better, within_tolerance

__all__ = ["MAX_NODES", "exact_latency"]

MAX_NODES = 16  # the most nodes the search takes: its bounds span all 2^n subsets
TOUR_BUDGET = 200_000  # rings planned at most when breaking ties; beyond, the best found is kept
TIE_PAIRS = 20_000  # (f, l) pairs solved at most when they can only tie the best TPOT
TIE_CELLS = 1 << 21  # table cells built at most for pairs or rings that can only tie the best TPOT
CEILING_SUBSETS = 8  # subsets tried on heuristic rings for an upper bound before any table is built
CEILING_EFFORT = 2_000  # path extensions per heuristic ring
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
  if problem.size == 0:
    return None
  assert problem.size <= MAX_NODES, f"exact latency search is for at most {MAX_NODES} nodes, got {problem.size}"
  search = _LatencySearch(problem)
  ranked = search.rank()
  if ranked is None:
    return None
  for mask in ranked:
    if not within_tolerance(float(search.bound[mask]), search.best_tpot):
      break
    search.solve(mask)
  return search.plan_ties()


class _LatencySearch:
  """One run of the search (steps 1 to 3 of the module docstring) on the problem's nodes, indexed fastest first: position p
  holds problem node order[p]. `tied`: every (TPOT, subset, first, last) found within the tolerance of the best TPOT so far."""

  def __init__(self, problem: SearchProblem):
    self.problem, self.n, self.n_layers, self.eta = problem, problem.size, problem.n_layers, problem.eta
    self.order = sorted(range(self.n), key=lambda i: (problem.t1[i], i))
    self.t = [problem.t1[i] for i in self.order]
    self.hop = problem.hop[np.ix_(self.order, self.order)]
    cap = problem.costs.capacity
    self.middle = [cap(i) for i in self.order]
    self.first = [cap(i, first=True) for i in self.order]
    self.last = [cap(i, last=True) for i in self.order]
    self.alone = [cap(i, first=True, last=True) for i in self.order]
    self.best_tpot, self.tied = math.inf, []
    self.spent = {"pairs": 0, "cells": 0}
    self.cycle_edges: dict[int, set[frozenset]] = {}

  def _bounds(self) -> tuple[np.ndarray, ...]:
    """Per subset, without any table: (size, fastest member, fill + eta t_fastest, that plus half of each member's two cheapest
    links or a pair's one link, whether every member holds a layer and the fill holds the model)."""
    n, t, middle = self.n, self.t, self.middle
    masks = np.arange(1 << n)
    size = _over_subsets([1] * n, n, np.int64)
    ok = _over_subsets([int(c < 1) for c in middle], n, np.int64) == 0  # every member holds a layer in the middle of a ring
    compute = _over_subsets(t, n)
    links = np.sort(np.concatenate([self.hop, np.full((n, 2), math.inf)], axis=1), axis=1)  # each node's cheapest links, inf if none
    one_link, two_links = _over_subsets(links[:, 0], n), _over_subsets((links[:, 0] + links[:, 1]) / 2, n)
    low = np.zeros(1 << n, dtype=np.int64)  # the fastest member
    for p in range(n):
      low[1 << p : 2 << p] = low[: 1 << p]
      low[1 << p] = p
    self.fastest = np.array(t)[low]
    left = self.n_layers - size
    ok &= (size >= 1) & (left >= 0)
    for p in range(n):  # the fastest members fill up to their capacity, every other member keeps one layer
      extra = np.where((masks >> p) & 1 == 1, np.clip(np.minimum(middle[p] - 1, left), 0, None), 0)
      compute += extra * t[p]
      left -= extra
    ok &= left == 0
    base = compute + self.eta * self.fastest
    weak = base + np.where(size == 1, 0.0, np.where(size == 2, one_link, two_links))
    return size, low, base, weak, ok

  def rank(self) -> list[int] | None:
    """The subsets that can beat the ceiling, in the order of their bound (fill + eta t_a + C_S), once the Held-Karp tables over
    them are built; None if no subset can hold the model."""
    size, low, self.base, weak, ok = self._bounds()
    small = best_small_plan(self.problem)
    ceiling = math.inf if small is None else small.tpot
    masks = np.arange(1 << self.n)
    candidates = ok & _within(weak, ceiling)
    if not candidates.any():
      return None
    caps = (self.first, self.middle, self.last)
    ceiling = min(ceiling, _ring_ceiling(masks[candidates], weak[candidates], self.hop, self.t, caps, self.n_layers, self.eta))
    candidates &= _within(weak, ceiling)
    self.subsets = CoveredSubsets(self.hop, size, low, candidates)
    self.bound = self.base + self.subsets.cycle
    candidates &= (size <= self.subsets.kmax) & np.isfinite(self.bound)
    candidates[candidates] &= _within(self.bound[candidates], ceiling)
    return masks[candidates][np.lexsort((masks[candidates], self.bound[candidates]))].tolist()

  def _affordable(self, cells: int) -> bool:
    return self.spent["pairs"] < TIE_PAIRS and self.spent["cells"] + cells <= TIE_CELLS

  def _keep(self, tpot: float, mask: int, f: int, z: int) -> None:
    if within_tolerance(tpot, self.best_tpot):
      self.best_tpot = min(self.best_tpot, tpot)
      self.tied.append((tpot, mask, f, z))

  def solve(self, mask: int) -> None:
    """Every (f, l) of one subset whose own bound can still reach the best TPOT, kept in `tied` when it does."""
    nodes = members(mask)
    if len(nodes) == 1:
      if self.alone[nodes[0]] >= self.n_layers:
        self._keep((self.n_layers + self.eta) * self.t[nodes[0]], mask, nodes[0], nodes[0])
      return
    cycle, eta = float(self.subsets.cycle[mask]), self.eta
    for z in nodes:
      if not within_tolerance(float(self.base[mask]) - eta * float(self.fastest[mask]) + eta * self.t[z] + cycle, self.best_tpot):
        break  # t grows along nodes: no later last node can do better
      for f in nodes:
        if f != z:
          self._solve_pair(mask, nodes, f, z, cycle)

  def _solve_pair(self, mask: int, nodes: list[int], f: int, z: int, cycle: float) -> None:
    caps = [self.first[p] if p == f else self.last[p] if p == z else self.middle[p] for p in nodes]
    split = _fill(nodes, self.t, caps, self.n_layers)
    if split is None:
      return
    own = split + self.eta * self.t[z]
    if not within_tolerance(own + cycle, self.best_tpot):
      return
    tie_only = _close(own + cycle, self.best_tpot)
    if tie_only and not self._affordable(0):
      return
    self.spent["pairs"] += tie_only
    hops = self._ring_cost(mask, f, z, cycle, tie_only)
    if hops is not None:
      self._keep(own + hops, mask, f, z)

  def _ring_cost(self, mask: int, f: int, z: int, cycle: float, tie_only: bool) -> float | None:
    """C_S(f, z): off a table already built, the cheapest cycle when it holds the edge z - f, else off a new table; None when
    only a tie is at stake and the tie budget cannot pay for that table."""
    subsets = self.subsets
    hops = subsets.known_ring_cost(mask, f, z)
    if hops is not None:
      return hops
    if mask not in self.cycle_edges:
      self.cycle_edges[mask] = subsets.cheapest_cycle_edges(mask)
    if frozenset((f, z)) in self.cycle_edges[mask]:
      return cycle
    if tie_only and not self._affordable(subsets.cells(mask)):
      return None
    self.spent["cells"] += subsets.cells(mask) * tie_only
    return subsets.ring_cost(mask, f, z)

  def plan_ties(self) -> Candidate | None:
    """The best plan over every cheapest ring of every tied (S, f, l) at the best TPOT, within TOUR_BUDGET rings; a table
    needed for a tie-break only is built while the tie budget lasts."""
    problem, subsets, order = self.problem, self.subsets, self.order
    best, rings_left = None, TOUR_BUDGET
    for tpot, mask, f, z in sorted(self.tied):
      if not within_tolerance(tpot, self.best_tpot) or rings_left <= 0:
        continue
      needs_table = int(subsets.low[mask]) != z and not subsets.built(z, mask)
      if needs_table and best is not None:  # only a tie-break is at stake
        if not self._affordable(subsets.cells(mask)):
          continue
        self.spent["cells"] += subsets.cells(mask)
      free = problem.order_free([order[p] for p in members(mask)])
      for ring in self._cheapest_rings(mask, f, z):
        candidate = problem.plan_ring([order[p] for p in ring])
        best = candidate if better(candidate, best, "latency") else best
        rings_left -= 1
        if free or rings_left <= 0:
          break
    return best

  def _cheapest_rings(self, mask: int, f: int, last: int) -> Iterator[list[int]]:
    """Every cheapest ring through `mask` from f to `last` (within a relative 1e-9), in lexicographic order of the node ids the
    positions stand for: rings.cheapest_rings completed by a table of paths from `last`, each ring in O(k^2)."""
    if f == last:
      yield [f]
      return
    hop = self.subsets.hop
    table = self.subsets.table_towards(mask, last)
    target = float(table[mask, f] + hop[f, last]) * (1 + _TOL) + 1e-15
    fits = lambda spent, left, y: spent + table[left, y] + hop[last, f] <= target  # noqa: E731
    yield from cheapest_rings(f, mask, hop, fits, last, key=lambda p: self.order[p])
