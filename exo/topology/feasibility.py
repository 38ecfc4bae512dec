"""Does any plan exist? A feasible ring, or the most layers any ring can hold, for a cost model (v2) of the usable nodes.

Problem. A ring of k linked nodes (a node alone, a linked pair, or a cycle) is feasible when k <= n_layers and, with capacities
at its own size k (under throughput every node keeps KV for k micro-batches), every node holds at least one layer in its role
(the first holds the embedding, the last the head and is the first's predecessor) and the capacities add up to n_layers.

Exact, up to EXACT_NODES nodes: a subset dynamic programme over paths. ends[S, s] is the set (a bitmask) of nodes j such that
some path from s through exactly the nodes of S ends at j; a ring through S with first node f and last node l exists iff l is
in ends[S, f] and l -> f is an edge. The capacities depend on S only through its size and its two ends, so each subset's best
pair of ends is read off in one vectorised pass per first node. O(2^n n^2) time, O(2^n n) memory (8 MB at 16 nodes).

Beyond: for each ring size k whose k largest capacities could hold the model, a depth-first search for a cycle of at most k
nodes whose capacities at size k hold the model (cycles.heavy_cycle with a length bound; capacities only grow on shorter
rings, so such a cycle is feasible at its own size); one search, bounded by the longest such k, when capacities do not depend on
the ring's size. The sizes share the work budget. Within each block of the graph of nodes holding a layer, exhaustive when it
finishes within its share of the work budget, so a search that never ran out of budget proves that no plan exists.
"""

from dataclasses import dataclass

import numpy as np

from exo.topology.cost_model import CostModel
from exo.topology.cycles import heavy_cycle, linked_blocks

__all__ = ["EXACT_NODES", "SEARCH_BUDGET", "Feasibility", "feasibility"]

EXACT_NODES = 16  # usable nodes up to which feasibility is decided by the subset programme
SEARCH_BUDGET = 2_000_000  # work units (search states and flooded nodes) of the search beyond EXACT_NODES
ROLE_RETRIES = 4  # beyond EXACT_NODES: rings asked for per size, each needing one layer more, when the ends' roles cost layers


@dataclass(frozen=True)
class Feasibility:
  """ring: a feasible ring in execution order (indices of the cost model), or None. most_layers / widest: the most layers a ring found
  holds and that ring (None if no ring of linked nodes exists). proven: True when `ring is None` is a proof that no plan
  exists; False when the search beyond EXACT_NODES ran out of budget first."""

  ring: list[int] | None
  most_layers: int
  widest: list[int] | None
  proven: bool = True


def _alone(costs: CostModel) -> tuple[list[int] | None, int]:
  """The node that holds most alone, as a ring, and what it holds."""
  held = [costs.capacity(i, True, True, 1) for i in range(costs.size)]
  if not held:
    return None, 0
  i = max(range(costs.size), key=lambda i: (held[i], -i))
  return [i], max(held[i], 0)


def _neighbour_masks(costs: CostModel) -> list[int]:
  near = np.isfinite(costs.hop)
  np.fill_diagonal(near, False)
  return [sum(1 << j for j in np.flatnonzero(row).tolist()) for row in near]


def _path_ends(adj: list[int]) -> np.ndarray:
  """ends[S, s]: bitmask of every j such that a path from s visits exactly the nodes of S and ends at j. O(2^n n^2)."""
  n = len(adj)
  masks = np.arange(1 << n, dtype=np.int64)
  size = np.zeros(1 << n, dtype=np.int64)
  for i in range(n):
    size += (masks >> i) & 1
  ends = np.zeros((1 << n, n), dtype=np.int64)
  ends[1 << np.arange(n), np.arange(n)] = 1 << np.arange(n)
  for k in range(2, n + 1):
    layer = masks[size == k]
    for j in range(n):
      sel = layer[(layer >> j) & 1 == 1]
      ends[sel] |= ((ends[sel ^ (1 << j)] & adj[j]) != 0).astype(np.int64) << j
  return ends


def _trace(ends: np.ndarray, adj: list[int], mask: int, first: int, last: int) -> list[int]:
  """A path from `first` through exactly `mask` ending at `last`, read back from the table. O(k^2)."""
  path, node = [last], last
  while mask != 1 << first:
    mask ^= 1 << node
    node = next(p for p in range(len(adj)) if (int(ends[mask, first]) >> p) & 1 and (adj[node] >> p) & 1)
    path.append(node)
  return path[::-1]


def _exact(costs: CostModel) -> Feasibility:
  n, total = costs.size, costs.model.n_layers
  widest, most = _alone(costs)
  if most >= total:
    return Feasibility(widest, most, widest)
  adj = _neighbour_masks(costs)
  ends = _path_ends(adj)
  masks = np.arange(1 << n, dtype=np.int64)
  bits = [(masks >> i) & 1 for i in range(n)]
  size = sum(bits)
  best = (most, None)  # (layers, (mask, first, last))
  for k in range(2, min(n, total) + 1):
    middle, first, last = costs.role_capacities(k)
    layer = masks[size == k]
    held = np.zeros(len(layer), dtype=np.int64)
    short = np.zeros(len(layer), dtype=bool)
    for i in range(n):
      member = bits[i][layer] == 1
      held += np.where(member, middle[i], 0)
      short |= member & (middle[i] < 1)
    room = last >= 1
    for f in range(n):
      if first[f] < 1:
        continue
      rows = np.flatnonzero((bits[f][layer] == 1) & ~short)
      if not rows.size:
        continue
      closes = (ends[layer[rows], f][:, None] >> np.arange(n)[None, :]) & 1 == 1  # [row, l]: a path f .. l through S
      closes &= np.array([room[z] and z != f and (adj[z] >> f) & 1 == 1 for z in range(n)])[None, :]
      value = np.where(closes, (held[rows] - middle[f] + first[f])[:, None] - (middle - last)[None, :], -1)
      r, z = np.unravel_index(int(np.argmax(value)), value.shape)  # z: the last node
      if closes[r, z] and value[r, z] > best[0]:
        best = (int(value[r, z]), (int(layer[rows[r]]), f, int(z)))
  if best[1] is None:
    return Feasibility(None, most, widest if most >= 1 else None)
  ring = _trace(ends, adj, *best[1])
  return Feasibility(ring if best[0] >= total else None, best[0], ring)


def _arranged(costs: CostModel, cycle: list[int]) -> tuple[list[int], int]:
  """The cycle's execution order (over every choice of first node and direction) whose role capacities hold most layers,
  and what they hold; -1 when some order gives a node no layer."""
  k, best = len(cycle), ([], -1)
  for start in range(k):
    for order in (cycle[start:] + cycle[:start], (cycle[start + 1 :] + cycle[: start + 1])[::-1]):
      caps = costs.ring_capacities(order)
      if min(caps) >= 1 and sum(caps) > best[1]:
        best = (order, sum(caps))
  return best


def _best_pair(costs: CostModel) -> tuple[list[int] | None, int]:
  """The linked pair, in the order whose role capacities hold most, and what it holds (-1: no pair gives both a layer)."""
  _, first, last = costs.role_capacities(2)
  best = (None, -1)
  for f, z in zip(*np.nonzero(np.isfinite(costs.hop))):
    if f != z and first[f] >= 1 and last[z] >= 1 and first[f] + last[z] > best[1]:
      best = ([int(f), int(z)], int(first[f] + last[z]))
  return best


def _search(costs: CostModel, budget: int) -> Feasibility:
  """Beyond EXACT_NODES: the best node alone and linked pair, then cycles of at most k nodes with capacities at k, k growing."""
  total = costs.model.n_layers
  widest, most = _alone(costs)
  pair, held = _best_pair(costs)
  if held > most:
    widest, most = pair, held
  if most >= total:
    return Feasibility(widest, most, widest)
  adj = _neighbour_masks(costs)
  weights = {k: [max(0, int(c)) for c in costs.role_capacities(k)[0]] for k in range(3, min(costs.size, total) + 1)}
  sizes = [k for k, weight in weights.items() if sum(sorted(weight)[-k:]) >= total]
  if sizes and all(weights[k] == weights[sizes[-1]] for k in sizes):
    sizes = sizes[-1:]  # capacities that do not shrink with the ring (latency, or no KV): one search, bounded by the longest ring
  proven = True
  for n, k in enumerate(sizes):
    weight, share = weights[k], max(1, budget // (len(sizes) - n))  # what is left, shared by the sizes still to try
    allowed = sum(1 << i for i, w in enumerate(weight) if w >= 1)
    need = total
    for _ in range(ROLE_RETRIES):
      found = None
      for block in linked_blocks(adj, allowed):
        if sum(weight[i] for i in range(costs.size) if block >> i & 1) < need:
          continue
        found, work, exhaustive = heavy_cycle(block, adj, weight, need, share, max_len=k)
        budget, share = budget - work, max(1, share - work)
        proven &= exhaustive
        if found is not None:
          break
      if found is None:
        break
      order, held = _arranged(costs, found)
      if held > most:
        widest, most = order, held
      if held >= total:
        return Feasibility(order, held, order)
      need += 1  # the ends' roles cost layers: ask for a heavier ring
      proven = False  # a heavier ring asked for may skip one that the ends' roles would still let hold the model
  return Feasibility(None, most, widest, proven)


def feasibility(costs: CostModel, budget: int = SEARCH_BUDGET) -> Feasibility:
  """Whether any plan exists on the nodes of `costs`, with a feasible ring when one does (exact up to EXACT_NODES nodes)."""
  if costs.size == 0:
    return Feasibility(None, 0, None)
  return _exact(costs) if costs.size <= EXACT_NODES else _search(costs, budget)
