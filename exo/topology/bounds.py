"""Closed-form facts about a planning problem: the best plan of one or two nodes, which every search checks, and bounds on the
optimum, against which a plan that no search proved optimal is reported.

- best_small_plan: every node alone and every linked ordered pair (first, last), each in closed form, vectorised: O(n^2).
- least_tpot: no plan has a lower TPOT. The best single node, or for rings of k >= 2 nodes: the fill of the fastest nodes
  within their capacities (any number of them), eta times the fastest node's time, and the k0 cheapest of the nodes' cheapest
  links, k0 the fewest nodes whose capacities hold the model (a ring of k nodes crosses k links, one leaving each node). O(n log n).
- least_stage: no plan has a less busy busiest stage (throughput = batch / it). For a ring of k nodes at stage time T, node i
  holds at most g_i = min(cap_i(k), floor((T - b x_i) / t_i(b))) layers, x_i its cheapest transfer; the k largest g_i, less the
  least a first and a last node lose to the embedding, the head and eta, must reach n_layers: the balanced split on every
  usable node in whole layers, without ring constraints. The least such T by binary search over the values a stage can take
  (without the ends' losses, which keeps the test monotone), then a scan upwards (with them); every k at once, O(n K log n)
  per probe, K = min(n, n_layers). It also names the k nodes that reach it, for the search to try as a ring.
"""

import math

import numpy as np

from exo.topology.layer_split import layers_within
from exo.topology.search_problem import Candidate, SearchProblem, better

__all__ = ["KEEP", "SCAN", "best_small_plan", "least_stage", "least_tpot"]

KEEP = 8  # small plans of the best value planned in full to break ties
SCAN = 64  # stage values tried upwards from the ends-free bound with the ends' losses
_EPS = 1e-9


def _caps(problem: SearchProblem, ring_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(middle, first, last) capacities of every node in a ring of `ring_size` nodes, as floats."""
  return tuple(c.astype(float) for c in problem.costs.role_capacities(ring_size))


def best_small_plan(problem: SearchProblem) -> Candidate | None:
  """The best plan on one node or on two linked nodes (either first), for the problem's objective; None if none fits."""
  n, total, eta = problem.size, problem.n_layers, problem.eta
  latency = problem.objective == "latency"
  t = np.array(problem.t1 if latency else problem.tb)
  rings, values = [], []
  alone = np.array([problem.costs.capacity(i, True, True, 1) for i in range(n)])
  for i in np.flatnonzero(alone >= total).tolist():
    rings.append([i])
    values.append((total + eta) * t[i])
  if n >= 2 and total >= 2:
    _, first, last = _caps(problem, 2)
    f, z = np.nonzero(np.isfinite(problem.hop))  # z: the last node
    cf, cl, tf, tl = first[f], last[z], t[f], t[z]
    lo, hi = np.maximum(1, total - cl), np.minimum(cf, total - 1)
    fits = lo <= hi
    if latency:
      on_first = np.where(tf <= tl, hi, lo)  # the faster node takes all it can
      value = on_first * tf + (total - on_first) * tl + eta * tl + problem.hop[f, z] + problem.hop[z, f]
    else:
      xf, xl = problem.batch * problem.transfer[f, z], problem.batch * problem.transfer[z, f]
      cross = ((total + eta) * tl + xl - xf) / (tf + tl)  # where both stages take equally long

      def busiest(on_first):
        on_first = np.clip(on_first, lo, hi)
        return np.maximum(on_first * tf + xf, (total - on_first + eta) * tl + xl)

      value = np.minimum(busiest(np.floor(cross)), busiest(np.ceil(cross)))
    for a, b, v in zip(f[fits].tolist(), z[fits].tolist(), value[fits].tolist()):
      rings.append([a, b])
      values.append(v)
  if not rings:
    return None
  ranked = np.argsort(np.array(values), kind="stable")
  best = None
  for r in ranked[:KEEP].tolist():
    if values[r] > values[ranked[0]] * (1 + _EPS) + 1e-15:
      break
    candidate = problem.plan_ring(rings[r])
    best = candidate if better(candidate, best, problem.objective) else best
  return best


def _cheapest_links(problem: SearchProblem) -> np.ndarray:
  return np.sort(np.concatenate([problem.hop, np.full((problem.size, 1), math.inf)], axis=1), axis=1)[:, 0]


def least_tpot(problem: SearchProblem) -> float:
  """A lower bound on the TPOT (seconds) of every feasible plan; inf if no plan can fit."""
  n, total, eta = problem.size, problem.n_layers, problem.eta
  t = np.array(problem.t1)
  alone = np.array([problem.costs.capacity(i, True, True, 1) for i in range(n)])
  single = float(np.min(np.where(alone >= total, (total + eta) * t, math.inf), initial=math.inf))
  middle, _, _ = _caps(problem, 1)
  middle = np.maximum(middle, 0)
  if n < 2 or total < 2 or middle.sum() < total:
    return single
  compute, left = 0.0, total
  for i in np.argsort(t, kind="stable").tolist():
    take = min(middle[i], left)
    compute += take * t[i]
    left -= take
  fewest = int(np.searchsorted(np.cumsum(np.sort(middle)[::-1]), total) + 1)
  links = np.sort(_cheapest_links(problem))[: max(2, fewest)].sum()
  return min(single, compute + eta * float(t.min()) + float(links))


def least_stage(problem: SearchProblem) -> tuple[float, list[int]]:
  """A lower bound on the busiest-stage time (seconds per batch) of every feasible plan (inf if no plan can fit), and the nodes
  that reach it in the relaxation: the best single node, or the k nodes holding the most at that stage time."""
  n, total, eta, b = problem.size, problem.n_layers, problem.eta, problem.batch
  t = np.array(problem.tb)
  alone = np.array([problem.costs.capacity(i, True, True, 1) for i in range(n)])
  singles = np.where(alone >= total, (total + eta) * t, math.inf)
  single = float(np.min(singles, initial=math.inf))
  alone_best = [int(np.argmin(singles))] if math.isfinite(single) else []
  top = min(n, total)
  if top < 2:
    return single, alone_best
  sizes = np.arange(2, top + 1)
  caps = [_caps(problem, k) for k in sizes.tolist()]
  middle, first, last = (np.stack([c[r] for c in caps], axis=1) for r in range(3))  # (node, ring size)
  linked = np.isfinite(problem.hop)
  send = b * np.where(linked, problem.transfer, math.inf).min(axis=1, initial=math.inf)  # inf: no neighbour, in no ring
  m = np.arange(1, total + 1, dtype=float)
  values = np.unique(np.concatenate([np.outer(t, m), np.outer(t, m + eta)], axis=1) + send[:, None])
  values = values[np.isfinite(values) & (values < single)]

  def slack(stage: float, ends: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per ring size, the layers the relaxation holds beyond the model (negative: too few), and what each node holds."""
    with np.errstate(invalid="ignore"):
      fits = layers_within(stage, send, t)
    fits = np.where(np.isfinite(fits), fits, -1.0)[:, None]
    held = np.minimum(middle, fits)
    ranked = -np.sort(-held, axis=0)
    columns = np.arange(len(sizes))
    most = np.cumsum(ranked, axis=0)[sizes - 1, columns]
    if ends:
      as_first = np.minimum(first, fits)
      as_last = np.minimum(last, layers_within(stage, send + eta * t, t)[:, None])
      lose_first = np.where(as_first >= 1, held - as_first, math.inf)
      lose_last = np.where(as_last >= 1, held - as_last, math.inf)
      most = most - _least_pair(lose_first, lose_last)
    return np.where(ranked[sizes - 1, columns] >= 1, most - total, -math.inf), held

  lo, hi = 0, len(values)
  while lo < hi:
    mid = (lo + hi) // 2
    if slack(float(values[mid]), ends=False)[0].max() >= 0:
      hi = mid
    else:
      lo = mid + 1
  end = min(lo + SCAN, len(values))
  for v in range(lo, end):
    spare, held = slack(float(values[v]), ends=True)
    if spare.max() >= 0:
      column = int(np.argmax(spare))
      ranked = sorted(range(n), key=lambda i: (-held[i, column], t[i], i))
      return float(values[v]), sorted(ranked[: int(sizes[column])])
  return (min(single, float(values[end])) if end < len(values) else single), alone_best


def _least_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per column, the least a[i] + b[j] over rows i != j."""
  ia, ib = np.argmin(a, axis=0), np.argmin(b, axis=0)
  cols = np.arange(a.shape[1])
  best = a[ia, cols] + b[ib, cols]
  if a.shape[0] < 2:
    return np.full(a.shape[1], math.inf)
  second_a = np.partition(a, 1, axis=0)[1]
  second_b = np.partition(b, 1, axis=0)[1]
  return np.where(ia != ib, best, np.minimum(a[ia, cols] + second_b, second_a + b[ib, cols]))
