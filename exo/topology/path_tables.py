"""Held-Karp tables over a down-closed family of subsets (those a search needs and all their subsets), built on demand: for the
exact latency search, which needs the cheapest ring of a few hundred of 2^16 subsets, and through some of them a ring with
given ends. Tables are O(covered subsets x n) floats; building one is O(covered subsets x n^2) (a subset of k nodes alone:
O(2^k k^2)).
"""

import math

import numpy as np

from exo.topology.rings import members

__all__ = ["LOCAL_MAX", "CoveredSubsets", "LocalPaths", "PathTable"]

LOCAL_MAX = 10  # a subset of at most this many nodes gets its own small table of paths rather than one over every subset


class PathTable:
  """A Held-Karp table over the subsets a CoveredSubsets covers, stored compactly: table[S, j] for global masks S."""

  def __init__(self, path: np.ndarray, row: np.ndarray):
    self.path, self.row = path, row

  def __getitem__(self, key: tuple[int, int]) -> float:
    mask, j = key
    return self.path[self.row[mask], j]


class CoveredSubsets:
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
    self._from: dict[int, PathTable] = {}
    self._local: dict[tuple[int, int], LocalPaths] = {}

  def _table(self, start: int | None) -> PathTable:
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
    return PathTable(path, row)

  def cells(self, mask: int) -> int:
    """Cells of the table that paths_from(v, mask) would build."""
    k = int(self.size[mask])
    return (1 << k) * k if k <= LOCAL_MAX else len(self.covered) * self.n

  def built(self, v: int, mask: int) -> bool:
    return v in self._from or (mask, v) in self._local

  def paths_from(self, v: int, mask: int) -> "PathTable | LocalPaths":
    """A table of paths from v valid on every subset of `mask` that holds v: local to `mask` when it is small, else global."""
    if int(self.size[mask]) <= LOCAL_MAX and v not in self._from:
      if (mask, v) not in self._local:
        self._local[mask, v] = LocalPaths(self.hop, mask, v)
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

  def table_towards(self, mask: int, last: int) -> "PathTable | LocalPaths":
    """A table of paths from `last` valid on every subset of `mask` that holds it."""
    return self.anchored if int(self.low[mask]) == last else self.paths_from(last, mask)


class LocalPaths:
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
