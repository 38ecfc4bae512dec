"""Ring orders: the cheapest closed tour through a set of nodes under symmetric hop times (a travelling-salesman problem).

Exact: Held-Karp tables, O(2^n n^2) time and O(2^n n) memory, practical to ~12 nodes: held_karp starts each subset's paths at
its lowest index, so one table answers every subset; paths_from_every_start keeps the start as an axis, O(2^n n^3) time and
O(2^n n^2) memory. Every cheapest ring is read back from such a table by cheapest_rings, the one enumeration of cheapest rings
the searches share.
Heuristic: nearest neighbour then 2-opt, O(n^2) per pass (sparse graphs: exo/topology/cycles.py).
Hop matrices hold math.inf where two nodes are not neighbours.
"""

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

__all__ = [
  "SubsetLayout",
  "canonical",
  "cheapest_rings",
  "held_karp",
  "is_ring",
  "members",
  "optimal_tours",
  "paths_from_every_start",
  "subset_layout",
  "two_opt",
  "two_opt_tour",
]

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


def paths_from_every_start(hop: np.ndarray) -> np.ndarray:
  """path[S, f, j]: the cheapest path from f through every node of subset S ending at j (inf if none; 0 for S = {f}, j = f).

  Held-Karp with the start as an extra axis, by growing subset size. O(2^n n^3) time, vectorised over subsets and starts."""
  n = len(hop)
  masks = np.arange(1 << n)
  size = np.zeros(1 << n, dtype=np.int64)
  for i in range(n):
    size += (masks >> i) & 1
  path = np.full((1 << n, n, n), math.inf)
  path[1 << np.arange(n), np.arange(n), np.arange(n)] = 0.0
  for k in range(2, n + 1):
    layer = masks[size == k]
    for j in range(n):
      sel = layer[(layer >> j) & 1 == 1]
      path[sel, :, j] = (path[sel ^ (1 << j)] + hop[:, j][None, None, :]).min(axis=2)
  return path


def cheapest_rings(
  first: int, mask: int, hop: np.ndarray, fits: Callable[[float, int, int], bool], last: int | None = None, key=None
) -> Iterator[list[int]]:
  """Every ring through exactly the nodes of `mask` that starts at `first` and ends at `last` (the hop last -> first closes
  it; without `last`, at any node, the closing hop then counted) and that `fits` admits, depth first in lexicographic order
  of `key` (default: node index).

  A branch that has spent `spent` on its hops up to and including the step to y, with the nodes `left` (y among them) not yet
  passed, continues only if fits(spent, left, y); without `last`, a closed ring of hops `spent` is kept if fits(spent, 0,
  first). Given the exact cheapest completion read off a Held-Karp table and the optimum as a target, only cheapest rings
  pass, and each comes in O(k^2)."""
  if mask == 1 << first:
    yield [first]
    return
  end = 0 if last is None else 1 << last

  def extend(ring: list[int], left: int, cost: float) -> Iterator[list[int]]:
    x = ring[-1]
    if last is None and not left:
      if fits(cost + hop[x, first], 0, first):
        yield list(ring)
      return
    if last is not None and left == end:
      yield ring + [last]
      return
    for y in sorted(members(left & ~end), key=key):
      spent = cost + hop[x, y]
      if fits(spent, left, y):
        ring.append(y)
        yield from extend(ring, left & ~(1 << y), spent)
        ring.pop()

  yield from extend([first], mask & ~(1 << first), 0.0)


def optimal_tours(mask: int, cycle: np.ndarray, path: np.ndarray, hop: np.ndarray) -> Iterator[list[int]]:
  """Every cheapest tour of subset `mask` (within a relative 1e-9), in lexicographic order, starting at its lowest node:
  cheapest_rings completed by held_karp's table (hops being symmetric, path[S, y] is also the cheapest way from y back to the
  start). The first tour comes in O(k^2), each next one in O(k^2) more."""
  if not math.isfinite(cycle[mask]):
    return
  start, target = members(mask)[0], cycle[mask] * (1 + _TOL) + 1e-15
  yield from cheapest_rings(start, mask, hop, lambda spent, left, y: spent + path[left | (1 << start), y] <= target)


def is_ring(ring: list[int], hop: np.ndarray) -> bool:
  """Whether consecutive nodes of `ring`, last -> first included, are joined by finite hops (one node needs none)."""
  return len(ring) == 1 or all(math.isfinite(hop[ring[k], ring[(k + 1) % len(ring)]]) for k in range(len(ring)))


def canonical(tour: list[int]) -> list[int]:
  """The tour rotated to start at its lowest node, turned so that its second node is at most its last."""
  first = tour.index(min(tour))
  tour = tour[first:] + tour[:first]
  return tour if len(tour) < 3 or tour[1] <= tour[-1] else [tour[0]] + tour[1:][::-1]


def two_opt(order: np.ndarray, d: np.ndarray) -> None:
  """Reverses segments of the tour `order` (positions into `d`, in place) until no reversal shortens it: O(k^2) per pass,
  the first improving reversal per position. A move adding an edge of cost math.inf never gains, so a tour along edges stays so."""
  k = len(order)
  improved = True
  while improved:
    improved = False
    following = np.roll(order, -1)
    for i in range(k - 2):
      a, b = order[i], order[i + 1]
      c, e = order[i + 2 :], following[i + 2 :]
      if i == 0:
        c, e = c[:-1], e[:-1]
      if not len(c):
        continue
      gain = d[a, b] + d[c, e] - d[a, c] - d[b, e]
      j = int(np.argmax(gain))
      if gain[j] > 1e-12:
        j += i + 2
        order[i + 1 : j + 1] = order[i + 1 : j + 1][::-1].copy()
        following = np.roll(order, -1)
        improved = True


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
  two_opt(order, d)
  return canonical([nodes[i] for i in order])
