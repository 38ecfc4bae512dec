"""Rings along the existing links of sparse graphs, where nearest neighbour and 2-opt (exo/topology/rings.py) miss rings that
exist: hamiltonian_cycle (a ring through given nodes), heavy_cycle (a short cycle of enough weight in a block) and
ring_holding (a ring of enough weight among ranked nodes), all bounded searches, and the blocks (biconnected components) that
prove most impossibilities at once. Graphs are neighbour bitmasks (bit j of adj[u]: u ~ j) or hop matrices with math.inf
where two nodes are not neighbours.
"""

import bisect
import math
from typing import Iterator

import numpy as np

from exo.topology.rings import canonical, is_ring, two_opt, two_opt_tour

__all__ = ["HAMILTON_BUDGET", "RING_BUDGET", "hamiltonian_cycle", "heavy_cycle", "linked_blocks", "ring_holding"]


def _bits(mask: int) -> Iterator[int]:
  while mask:
    low = mask & -mask
    yield low.bit_length() - 1
    mask ^= low


def _bitmasks(near: np.ndarray) -> list[int]:
  """Row i of a boolean matrix as the int whose bit j is near[i, j]."""
  return [int.from_bytes(np.packbits(row, bitorder="little").tobytes(), "little") for row in near]


def _blocks_at(x: int, adj: list[int], allowed: int, every: bool = False) -> list[int]:
  """The blocks (biconnected components, as node masks; a bridge is a block of two) containing x of the graph induced by the
  `allowed` nodes (adj[u] is u's neighbour mask); with `every`, all blocks of x's connected component. Every cycle through x
  lies in one of the first.

  Tarjan's low-points on a depth-first tree rooted at x, with masks for the edges: the next child is the lowest unseen
  neighbour, and a node's back edges reach its shallowest adjacent ancestor, found by bisecting the masks of the path's
  prefixes. O(V log V) mask operations, whatever the number of edges.
  """
  disc, low, found, below = {x: 0}, {x: 0}, [], []
  path, prefixes, seen = [x], [1 << x], 1 << x
  while path:
    u = path[-1]
    fresh = adj[u] & allowed & ~seen
    if fresh:
      w = (fresh & -fresh).bit_length() - 1
      disc[w] = low[w] = len(disc)
      seen |= 1 << w
      below.append(w)
      path.append(w)
      prefixes.append(prefixes[-1] | 1 << w)
      continue
    path.pop()
    prefixes.pop()
    if not path:
      break
    top = bisect.bisect_left(prefixes, True, key=lambda mask: mask & adj[u] != 0)
    low[u] = min(low[u], disc[path[top]])
    parent = path[-1]
    low[parent] = min(low[parent], low[u])
    if low[u] >= disc[parent]:
      block = 1 << parent
      while not block >> u & 1:
        block |= 1 << below.pop()
      if parent == x or every:
        found.append(block)
  return found


def linked_blocks(adj: list[int], allowed: int) -> list[int]:
  """Every block of three or more nodes (as masks) of the graph induced by the `allowed` nodes: every cycle of that graph
  lies in one of them. O(V log V) mask operations per connected component."""
  blocks, left = [], allowed
  while left:
    x = (left & -left).bit_length() - 1
    component = _blocks_at(x, adj, allowed, every=True)
    reached = 1 << x
    for block in component:
      reached |= block
    left &= ~reached
    blocks.extend(b for b in component if b.bit_count() >= 3)
  return blocks


def _unbalanced_bipartite(masks: list[int]) -> bool:
  """Whether the connected graph (neighbour masks) is bipartite with sides of different sizes, so that no cycle, which
  alternates sides, passes every node (an odd grid, K(a, b) with a != b). BFS 2-colouring from node 0, O(V) mask operations."""
  sides, frontier, colour = [1, 0], 1, 0
  while frontier:
    reach = 0
    for u in _bits(frontier):
      reach |= masks[u]
    if reach & sides[colour]:
      return False
    frontier = reach & ~sides[1 - colour]
    sides[1 - colour] |= frontier
    colour = 1 - colour
  return sides[0].bit_count() != sides[1].bit_count()


class _PathSearch:
  """A Hamiltonian cycle of the graph (3+ nodes; adjacency lists and masks, hops d): a depth-first search that grows a path
  from `start` at either end, whichever has fewer unvisited neighbours (fail first: from a band's end both ends have one move
  each, so its cycle comes without backtracking, where growing one end only must back out of dead-end chains).

  Moves, best first: the unvisited neighbour with the fewest unvisited neighbours (Warnsdorff), then the cheaper hop, then the
  lower index; ties between the ends go to the end just grown, so on a complete graph the first path is nearest neighbour's.
  A state is dropped when it strands a node: every unvisited node needs two cycle neighbours among the unvisited nodes and
  the two ends (not both ends while others remain), and an end's neighbour left with just that end and one more must come
  next there (two such: dead end). O(degree) updates and checks per extension.
  """

  def __init__(self, adj: list[list[int]], masks: list[int], d: np.ndarray, start: int):
    self.adj, self.masks, self.start, self.k = adj, masks, start, len(adj)
    self.hops = [dict(zip(a, d[u, a].tolist())) for u, a in enumerate(adj)]
    self.free = [len(a) for a in adj]  # unvisited neighbours of each node
    self.seen = [False] * self.k
    self.unvisited = (1 << self.k) - 1
    self.grown: tuple[list[int], list[int]] = ([], [])  # nodes added at each end of the path, which starts as `start`

  def end(self, side: int) -> int:
    return self.grown[side][-1] if self.grown[side] else self.start

  def enter(self, v: int) -> bool:
    """Marks v visited; True if that leaves one of its unvisited neighbours without unvisited neighbours."""
    self.seen[v], self.unvisited = True, self.unvisited ^ 1 << v
    stranded = False
    for u in self.adj[v]:
      self.free[u] -= 1
      stranded |= self.free[u] == 0 and not self.seen[u]
    return stranded

  def leave(self, v: int) -> None:
    self.seen[v], self.unvisited = False, self.unvisited | 1 << v
    for u in self.adj[v]:
      self.free[u] += 1

  def options(self, side: int, old: int, stranded: bool) -> tuple[int, list[int]]:
    """(the end to grow next, its moves) once end `side` has moved on from `old`; no moves if the state is a dead end."""
    free, masks = self.free, self.masks
    v, f = self.end(side), self.end(1 - side)
    if stranded or old != f and any(free[u] + (masks[u] >> f & 1) < 2 for u in _bits(masks[old] & self.unvisited & ~masks[v])):
      return side, []
    if free[f] < free[v]:
      side, v, f = 1 - side, f, v
    forced, rest = [], []
    for u in self.adj[v]:
      if not self.seen[u]:
        (forced if free[u] + (masks[u] >> f & 1) == 1 else rest).append(u)
    return side, (forced if len(forced) == 1 else []) if forced else rest

  def run(self, budget: int) -> list[int] | None:
    """The cycle, from `start` round, or None if none is found within `budget` path extensions."""
    grown, start = self.grown, self.start
    self.enter(start)
    stack = [(1, list(self.adj[start]), -1)]
    while stack:
      side, todo, came = stack[-1]
      if not todo:
        stack.pop()
        if came >= 0:
          self.leave(grown[came].pop())
        continue
      if budget <= 0:
        return None
      budget -= 1
      old = self.end(side)
      v = min(todo, key=lambda u: (self.free[u], self.hops[old][u], u))
      todo.remove(v)
      stranded = self.enter(v)
      grown[side].append(v)
      left = self.k - 1 - len(grown[0]) - len(grown[1])
      if left == 0 and self.masks[v] >> self.end(1 - side) & 1:
        return grown[0][::-1] + [start] + grown[1]
      stack.append((*self.options(side, old, stranded and left > 1), side) if left else (side, [], side))
    return None


HAMILTON_BUDGET = 100_000  # path extensions. The search meets each sequence of distinct nodes containing its start at most
# once, and 8 nodes have 95,901 (the sum over lengths m of m * 7! / (8 - m)!): exhaustive up to 8 nodes


def hamiltonian_cycle(nodes: list[int], hop: np.ndarray, budget: int = HAMILTON_BUDGET) -> list[int] | None:
  """A ring through exactly `nodes` along finite hops (one node; two joined by an edge; else a Hamiltonian cycle of the induced
  graph), canonical as two_opt_tour's, or None if none exists or none is found within `budget` path extensions.

  Nearest neighbour + 2-opt with penalised missing edges misses the cycles of sparse graphs (a band i ~ i+1, i+2 has 0, 2, 4,
  ..., 1). Here: necessary conditions first, O(V + E): every node has two neighbours and, unless Dirac's degree >= k/2
  already guarantees a cycle, the graph is one block (no articulation point: stars, sites joined by one link and disconnected
  sets fail at once) and not bipartite with unequal sides. On a graph that dense, two_opt_tour's ring when it uses only
  existing edges (vectorised, O(k^2) per pass). Otherwise the depth-first search of _PathSearch from a node of least degree,
  O(budget * degree) at worst, then 2-opt moves along existing edges only, O(k^2) per pass.
  """
  k = len(nodes)
  if k <= 2:
    return None if not nodes or k == 2 and not math.isfinite(hop[nodes[0], nodes[1]]) else sorted(nodes)
  d = hop[np.ix_(nodes, nodes)].astype(float)
  np.fill_diagonal(d, math.inf)
  near = np.isfinite(d)
  degrees = near.sum(axis=1)
  degree, start, everyone = int(degrees.min()), int(np.argmin(degrees)), (1 << k) - 1
  if degree < 2:
    return None
  if 2 * degree >= k:
    ring = two_opt_tour(nodes, hop, 1.0 + k * float(d[near].max()))  # a missing edge costs more than any ring
    if is_ring(ring, hop):
      return ring
  adj = [np.flatnonzero(row).tolist() for row in near]
  masks = _bitmasks(near)
  if 2 * degree < k and (_blocks_at(0, masks, everyone) != [everyone] or _unbalanced_bipartite(masks)):
    return None
  tour = _PathSearch(adj, masks, d, start).run(budget)
  if tour is None:
    return None
  order = np.array(tour)
  two_opt(order, d)
  return canonical([nodes[i] for i in order])


class _HeavyCycle:
  """A ring through x within the `block` mask of weight >= need and at most `max_len` nodes: depth-first path extension from x.

  adj[u] is u's neighbour mask; weights are >= 0. Each state floods the nodes reachable from the head through unvisited ones
  (O(V) bit operations) and is pruned unless that region touches x and the path's weight plus the region's (its heaviest
  nodes that still fit in the length) reaches `need`, and the nearest way back to x fits in the length; once the path holds
  `need`, the shortest way back to x through the region closes the ring. Heavier nodes, then earlier ones, are tried first,
  so rings stay small. Work: one per state plus the region's size; exhaustive (exact) when it finishes within its budget.
  """

  def __init__(self, x: int, block: int, adj: list[int], weight: list[float], need: float, max_len: int | None = None):
    self.x, self.block, self.adj, self.weight, self.need = x, block, adj, weight, need
    self.path, self.held, self.seen, self.work = [x], [weight[x]], 1 << x, 0
    self.longest = block.bit_count() if max_len is None else max_len

  def flood(self, mask: int, free: int) -> tuple[int, list[float], int]:
    """(the region reachable from `mask` through `free` nodes, its weights, the fewest of its nodes on a way back to x)."""
    region, weights, depth, back = 0, [], 0, 0
    while mask:
      region |= mask
      depth += 1
      grown = 0
      for u in _bits(mask):
        weights.append(self.weight[u])
        grown |= self.adj[u]
        if not back and self.adj[u] >> self.x & 1:
          back = depth
      mask = grown & free & ~region
    return region, weights, back

  def way_back(self, h: int, free: int) -> list[int]:
    """The fewest `free` nodes on a way from h back to x, in path order (breadth first)."""
    adj, x = self.adj, self.x
    parent, frontier, reached = {}, [h], 1 << h
    while True:
      nxt = []
      for u in frontier:
        for v in _bits(adj[u] & free & ~reached):
          parent[v], reached = u, reached | 1 << v
          if adj[v] >> x & 1:
            back = [v]
            while parent[back[-1]] != h:
              back.append(parent[back[-1]])
            return back[::-1]
          nxt.append(v)
      frontier = nxt

  def assess(self) -> tuple[list[int] | None, list[int]]:
    """(the ring, if this path closes into one; else the moves to try, best last)."""
    path, held, adj = self.path, self.held, self.adj
    h, free, slots = path[-1], self.block & ~self.seen, self.longest - len(path)
    if held[-1] >= self.need and len(path) >= 2 and adj[h] >> self.x & 1:
      return path, []
    region, weights, back = self.flood(adj[h] & free, free)
    self.work += 1 + region.bit_count()
    if not back or back > slots:
      return None, []
    reachable = sum(weights) if slots >= len(weights) else sum(sorted(weights)[-slots:])
    if held[-1] + reachable < self.need:
      return None, []
    if held[-1] >= self.need:
      return path + self.way_back(h, free), []
    return None, sorted(_bits(adj[h] & free), key=lambda u: (self.weight[u], -u))

  def run(self, budget: int) -> tuple[list[int] | None, int]:
    """(the ring, or None; the work spent), stopping once the work reaches `budget`."""
    path, held = self.path, self.held
    ring, moves = self.assess()
    stack = [moves]
    while stack and ring is None:
      if not stack[-1]:
        stack.pop()
        self.seen ^= 1 << path.pop()
        held.pop()
        continue
      if self.work >= budget:
        break
      v = stack[-1].pop()
      path.append(v)
      held.append(held[-1] + self.weight[v])
      self.seen |= 1 << v
      ring, moves = self.assess()
      stack.append(moves)
    return ring, self.work


def heavy_cycle(block: int, adj: list[int], weight: list[float], need: float, budget: int, max_len: int) -> tuple[list[int] | None, int, bool]:
  """(a cycle of at most `max_len` nodes within the `block` mask whose `weight` is at least `need`, or None; the work spent;
  whether the search was exhaustive): cycles through each node in turn, heaviest first, that node then left out of the
  later searches. Each node's search may spend half the work left. O(budget) work at most."""
  left, spent, exhaustive = block, 0, True
  for x in sorted(_bits(block), key=lambda u: (-weight[u], u)):
    if (left & adj[x]).bit_count() >= 2:
      share = max(1, (budget - spent) // 2)
      ring, work = _HeavyCycle(x, left, adj, weight, need, max_len).run(share)
      spent += work
      if ring is not None:
        return ring, spent, exhaustive
      exhaustive &= work < share
    left &= ~(1 << x)
  return None, spent, exhaustive


RING_BUDGET = 400_000  # work units (search states and flooded nodes, path extensions). Among 8 nodes a search from x meets
# at most 13,700 paths, each costing at most 8, well within half of it: exhaustive up to 8 nodes


def ring_holding(hop: np.ndarray, weight: list[float], need: float, order: list[int], budget: int = RING_BUDGET) -> list[int] | None:
  """A ring (one node, two joined by an edge, or a simple cycle along finite hops) of nodes from `order` whose total `weight`
  (>= 0 each) is at least `need`, canonical as two_opt_tour's; None if none is found within `budget` work.

  For when a chosen subset has no ring of its own (two sites joined by one link, a star around a router, a band): prefers
  the shortest prefix of `order` holding a ring (the ring's latest node as early as possible), then small rings. For each
  node x of `order` in turn, once the prefix up to x weighs `need`: x alone; else x and its earliest neighbour in the prefix
  if the two weigh enough; else, in each block of the prefix's graph containing x (_blocks_at) that weighs enough, from the
  smallest: a depth-first search for a ring through x (_HeavyCycle, exact when it finishes), and if it is cut off, a
  Hamiltonian cycle of the block (hamiltonian_cycle). Each search may spend half the work left, so one hard prefix cannot
  starve the later ones, and all together stay within `budget`; the default makes them exhaustive up to 8 nodes. Besides,
  O(n^2) set-up and O(n log n) mask operations per node of `order` (n of them) for its blocks.
  """
  sub = hop[np.ix_(order, order)]
  near = np.isfinite(sub)
  np.fill_diagonal(near, False)
  adj = _bitmasks(near)
  w = [float(weight[i]) for i in order]
  prefix = 0.0
  for x in range(len(order)):
    prefix += w[x]
    if w[x] >= need:
      return [order[x]]
    if prefix < need:
      continue
    allowed = (1 << (x + 1)) - 1
    pair = next((y for y in _bits(adj[x] & allowed) if w[x] + w[y] >= need), None)
    if pair is not None:
      return sorted([order[x], order[pair]])
    if (adj[x] & allowed).bit_count() < 2:
      continue  # a longer ring needs two links at x
    for block in sorted(_blocks_at(x, adj, allowed), key=int.bit_count):
      members = list(_bits(block))
      if len(members) < 3 or sum(w[i] for i in members) < need:
        continue
      share = budget // 2
      ring, work = _HeavyCycle(x, block, adj, w, need).run(share)
      budget -= work
      if ring is None and work >= share:
        share = budget // 2
        ring = hamiltonian_cycle(members, sub, share)
        budget -= share
      if ring is not None:
        return canonical([order[i] for i in ring])
  return None
