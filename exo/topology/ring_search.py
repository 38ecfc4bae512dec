"""Ring orders: the cheapest closed tour through a set of nodes under symmetric hop times (a travelling-salesman problem).

Exact: Held-Karp over every subset at once, O(2^n n^2) time and O(2^n n) memory, practical to ~12 nodes; each subset's tour
starts at its lowest index, so one table answers every subset. Heuristic: nearest neighbour then 2-opt, O(n^2) per pass.
Hop matrices hold math.inf where two nodes are not neighbours.
"""

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

_TOL = 1e-9


def members(mask: int) -> list[int]:
  return [i for i in range(mask.bit_length()) if mask >> i & 1]


@dataclass(frozen=True)
class SubsetLayout:
  """Index arrays for Held-Karp over n nodes, built once and reused when the same search runs the DP many times."""

  size: np.ndarray  # popcount of every subset mask
  lowest: np.ndarray  # lowest member of every subset mask
  steps: list[tuple[int, np.ndarray]]  # (j, masks whose path ends at j), by growing subset size
  many: np.ndarray  # masks with two or more members


def subset_layout(n: int) -> SubsetLayout:
  masks = np.arange(1 << n)
  size = np.zeros(1 << n, dtype=np.int64)
  for i in range(n):
    size += (masks >> i) & 1
  lowest = np.zeros(1 << n, dtype=np.int64)
  for i in reversed(range(n)):
    lowest[(masks >> i) & 1 == 1] = i
  steps = []
  for k in range(2, n + 1):
    layer = masks[size == k]
    for j in range(n):
      sel = layer[((layer >> j) & 1 == 1) & (lowest[layer] != j)]
      if sel.size:
        steps.append((j, sel))
  return SubsetLayout(size, lowest, steps, masks[size >= 2])


def held_karp(hop: np.ndarray, layout: SubsetLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(cycle[S], path[S, j]) for every subset S: path is the cheapest path from min(S) through all of S ending at j, cycle closes it.

  Edges are directed (hop[i, j] is i -> j). cycle is 0 for one node, the out-and-back for two (a two-node ring crosses its
  link twice per token), inf if no ring exists.
  """
  n = len(hop)
  layout = layout or subset_layout(n)
  path = np.full((1 << n, n), math.inf)
  path[1 << np.arange(n), np.arange(n)] = 0.0
  for j, sel in layout.steps:
    path[sel, j] = (path[sel ^ (1 << j)] + hop[:, j]).min(axis=1)
  cycle = np.full(1 << n, math.inf)
  cycle[layout.size == 1] = 0.0
  many = layout.many
  cycle[many] = (path[many] + hop[:, layout.lowest[many]].T).min(axis=1)
  return cycle, path


def optimal_tours(mask: int, cycle: np.ndarray, path: np.ndarray, hop: np.ndarray) -> Iterator[list[int]]:
  """Every cheapest tour of subset `mask` (within a relative 1e-9), in lexicographic order, starting at its lowest node.

  A branch continues only if its cost plus the exact cheapest completion (read off the Held-Karp table, hops being symmetric)
  still reaches the optimum, so the first tour comes in O(k^2) and each next one in O(k^2) more.
  """
  nodes = members(mask)
  start = nodes[0]
  if len(nodes) == 1:
    yield [start]
    return
  if not math.isfinite(cycle[mask]):
    return
  target = cycle[mask] * (1 + _TOL) + 1e-15

  def extend(tour: list[int], left: int, cost: float):
    x = tour[-1]
    if not left:
      if cost + hop[x, start] <= target:
        yield list(tour)
      return
    for y in members(left):
      spent = cost + hop[x, y]
      if spent + path[left | (1 << start), y] <= target:
        tour.append(y)
        yield from extend(tour, left & ~(1 << y), spent)
        tour.pop()

  yield from extend([start], mask & ~(1 << start), 0.0)


def all_tours(mask: int, hop: np.ndarray, keep=lambda tour: True) -> Iterator[list[int]]:
  """Every ring through subset `mask` along existing edges, both directions, starting at its lowest node, in lexicographic order.

  `keep(partial_tour)` may prune a branch. Up to (k-1)! tours for k nodes.
  """
  nodes = members(mask)
  start = nodes[0]

  def extend(tour: list[int], left: int):
    x = tour[-1]
    if not left:
      if len(tour) == 1 or math.isfinite(hop[x, start]):
        yield list(tour)
      return
    for y in members(left):
      if math.isfinite(hop[x, y]):
        tour.append(y)
        if keep(tour):
          yield from extend(tour, left & ~(1 << y))
        tour.pop()

  yield from extend([start], mask & ~(1 << start))


def tour_cost(tour: list[int], hop: np.ndarray) -> float:
  if len(tour) < 2:
    return 0.0
  return float(sum(hop[tour[k], tour[(k + 1) % len(tour)]] for k in range(len(tour))))


def two_opt_tour(nodes: list[int], hop: np.ndarray, missing_edge_cost: float) -> list[int]:
  """A good (not always cheapest) tour: nearest neighbour from the lowest node, then 2-opt until no reversal helps.

  Missing edges cost `missing_edge_cost`, so the result avoids them whenever the heuristic can; callers check the result.
  """
  if len(nodes) <= 3:
    return sorted(nodes)
  d = hop[np.ix_(nodes, nodes)].copy()
  d[~np.isfinite(d)] = missing_edge_cost
  np.fill_diagonal(d, 0.0)
  k = len(nodes)
  tour, seen = [0], np.zeros(k, dtype=bool)
  seen[0] = True
  for _ in range(k - 1):
    row = np.where(seen, np.inf, d[tour[-1]])
    nxt = int(np.argmin(row))
    tour.append(nxt)
    seen[nxt] = True
  order = np.array(tour)
  improved = True
  while improved:
    improved = False
    for i in range(k - 2):
      a, b = order[i], order[i + 1]
      c, e = order[i + 2 :], np.roll(order, -1)[i + 2 :]
      if i == 0:
        c, e = c[:-1], e[:-1]
      if not len(c):
        continue
      gain = d[a, b] + d[c, e] - d[a, c] - d[b, e]
      j = int(np.argmax(gain))
      if gain[j] > 1e-12:
        j += i + 2
        order[i + 1 : j + 1] = order[i + 1 : j + 1][::-1].copy()
        improved = True
  result = [nodes[i] for i in order]
  first = result.index(min(result))
  result = result[first:] + result[:first]
  return result if result[1] <= result[-1] else [result[0]] + result[1:][::-1]
