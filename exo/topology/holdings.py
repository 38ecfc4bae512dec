"""What a plan makes each node fetch, given the layers each node already holds (its announced `holdings`), and the choice among
plans of equal predicted speed of the one whose nodes fetch the least.

Bytes a node still needs for its stage (layers s..e of model M): none if it holds them all; else, for a model served from one
file (M.file_bytes > 0: a GGUF file, fetched whole), the whole file; else the weights of the stage's layers it lacks, with the
embedding (first stage) and the head (last stage) when it lacks the first or last layer. The transfer takes bytes * 8 /
(w * 1e6) seconds at the best measured bandwidth w (Mbit/s) of a link to the node from a node that holds the stage's layers;
unknown (None) when no such link has a measured bandwidth (the bytes come from the hub, or from a link never measured).

Plans of equal predicted speed: the found ring with interchangeable nodes permuted (the same device figures, memory, and links
to every other node: swapping two changes no prediction). `prefer_holders` picks, among those, one whose nodes lack the fewest
of their stage's layers.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology

__all__ = ["Download", "downloads", "needed_bytes", "prefer_holders"]


@dataclass(frozen=True)
class Download:
  """What a ring node still needs for its stage: bytes, and seconds at the best measured link from a holder (None: unknown)."""

  node_id: str
  bytes: float
  seconds: float | None

  def to_dict(self) -> dict:
    return {"node_id": self.node_id, "bytes": self.bytes, "seconds": self.seconds}


def needed_bytes(model: ModelSpec, held: frozenset[int], start: int, end: int) -> float:
  """Bytes a node holding layers `held` fetches to run layers start..end (module docstring)."""
  lacking = [layer for layer in range(start, end + 1) if layer not in held]
  if not lacking:
    return 0.0
  if model.file_bytes > 0:
    return model.file_bytes
  extra = (model.embed_bytes if start == 0 and 0 in lacking else 0.0) + (model.head_bytes if end == model.n_layers - 1 and end in lacking else 0.0)
  return len(lacking) * model.layer_bytes + extra


def downloads(topology: Topology, model: ModelSpec, stages: list[tuple[str, int]]) -> list[Download]:
  """Each ring node's Download, in ring order, for `stages` ((node id, layers) in execution order)."""
  out, start = [], 0
  for node_id, layers in stages:
    end = start + layers - 1
    need = needed_bytes(model, topology.nodes[node_id].held_layers(model.id), start, end)
    rates = [
      topology.pair_bandwidth_mbps(other, node_id)
      for other, caps in topology.nodes.items()
      if other != node_id and set(range(start, end + 1)) <= caps.held_layers(model.id)
    ]
    best = max((w for w in rates if w), default=None)
    out.append(Download(node_id, need, 0.0 if not need else None if best is None else need * 8 / (best * 1e6)))
    start = end + 1
  return out


def prefer_holders(held: list[frozenset[int]], ring: list[int], layers: list[int], same: Callable[[int, int], bool]) -> list[int]:
  """The ring (node indices) with the nodes of each class of interchangeable ones (`same(i, j)`: swapping nodes i and j in any
  ring changes no prediction) assigned to that class's stages so that the layers lacking are fewest; `held[i]`: the layers node
  i holds. Exact over such permutations: one assignment problem per class (Hungarian method, O(k^2 m) for k stages, m nodes)."""
  starts = [sum(layers[:k]) for k in range(len(layers))]

  def lacking(i: int, k: int) -> int:
    return sum(layer not in held[i] for layer in range(starts[k], starts[k] + layers[k]))

  best = list(ring)
  if not any(held):
    return best
  classes: list[list[int]] = []
  for i in range(len(held)):
    home = next((c for c in classes if same(c[0], i)), None)
    home.append(i) if home is not None else classes.append([i])
  for members in classes:
    stages = [k for k, i in enumerate(ring) if i in members]
    if stages:
      chosen = _assignment([[lacking(i, k) for i in members] for k in stages])
      for k, column in zip(stages, chosen):
        best[k] = members[column]
  return best


def _assignment(cost: list[list[float]]) -> list[int]:
  """The column of each row minimising the total cost, every row a distinct column (rows <= columns): the Hungarian method with
  potentials, O(rows^2 * columns)."""
  rows, cols = len(cost), len(cost[0])
  u, v, match, way = [0.0] * (rows + 1), [0.0] * (cols + 1), [0] * (cols + 1), [0] * (cols + 1)
  for r in range(1, rows + 1):
    match[0], j0 = r, 0
    least, used = [math.inf] * (cols + 1), [False] * (cols + 1)
    while match[j0]:
      used[j0] = True
      i0, delta, j1 = match[j0], math.inf, 0
      for j in range(1, cols + 1):
        if not used[j]:
          reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
          if reduced < least[j]:
            least[j], way[j] = reduced, j0
          if least[j] < delta:
            delta, j1 = least[j], j
      for j in range(cols + 1):
        if used[j]:
          u[match[j]] += delta
          v[j] -= delta
        else:
          least[j] -= delta
      j0 = j1
    while j0:
      j1 = way[j0]
      match[j0], j0 = match[j1], j1
  column = [0] * rows
  for j in range(1, cols + 1):
    if match[j]:
      column[match[j] - 1] = j - 1
  return column
