"""The brute force behind the planner's tests and benchmarks: every plan of cost model v2 (exo/tools/oracle_cost_model.py,
written from docs/DESIGN.md alone; nothing here imports `exo.topology`), and the best one by each objective and its tie-break.

BruteForce enumerates every non-empty subset of nodes, every ring order of it (every permutation: rotations and reflections
included, so every choice of first and last node) and, per ring, every integer layer split within the capacities of the
nodes' roles, or, where those are too many (more than ENUMERATE_MAX), the ring's optimal split computed directly: latency
fills the fastest nodes (by t(1)) first within their capacities, breaking ties among TPOT-optimal splits by the least
bottleneck; throughput takes the smallest candidate bottleneck L_i t_i(b) + x_i that admits L layers, then the least TPOT
among the splits within it. With N nodes and L layers that is O(sum_{k <= min(N, L)} N! / (N - k)! * C(L - 1, k - 1)) plans
per objective (the splits generated within the caps, so small caps prune the count), each evaluated in O(k).

`oracle` sums every plan up: the best value of each objective and the tie-break's range, for the property tests' tiny cases.
"""

import copy
import itertools
import math

from exo.tools.oracle_cost_model import DEFAULT_PROMPT_TOKENS, OracleCostModel, close, plan_ring, planned_context

__all__ = ["ENUMERATE_MAX", "REL_TIE", "TIE_BAND", "BruteForce", "best_of", "compositions", "oracle"]

REL_TIE = 1e-9  # plans whose primary objective is within this relative distance of the best count as tied
TIE_BAND = (1e-12, 1e-6)  # tie tolerances between which a planner's own 1e-9 may fall, its floats rounded differently
ENUMERATE_MAX = 5000  # splits per ring up to which every integer split is enumerated


def compositions(total: int, caps: list[int]):
  """Every tuple of len(caps) integers x_p with 1 <= x_p <= caps[p] summing to `total`, in lexicographic order."""
  if len(caps) == 1:
    if 1 <= total <= caps[0]:
      yield (total,)
    return
  rest = len(caps) - 1  # every later position needs at least one layer
  for x in range(1, min(caps[0], total - rest) + 1):
    for tail in compositions(total - x, caps[1:]):
      yield (x, *tail)


def best_of(scored: list) -> tuple | None:
  """The best (score, plan) of a list, scores (objective, tie-break) to be minimised: the least objective, then among those
  within REL_TIE of it the least tie-break."""
  if not scored:
    return None
  top = min(s[0] for s, _ in scored)
  return min((entry for entry in scored if close(entry[0][0], top, REL_TIE)), key=lambda entry: entry[0][1])


class BruteForce:
  """Every plan of one topology, model, objective and parameters. Nodes are ids; a ring is a tuple of ids in execution order
  (the first embeds, the last runs the head); capacities depend on a node's role (first, last) and, under throughput, on the
  ring's size. `cm.context` is the context the capacities are counted at (`optimum` sets v2.1's)."""

  def __init__(
    self,
    topology: dict,
    model: dict,
    objective: str = "latency",
    memory_headroom: float = 0.1,
    default_rtt_ms: float = 5.0,
    batch: int = 1,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
  ):
    self.cm = OracleCostModel(topology, model, memory_headroom, default_rtt_ms, batch)
    assert self.cm.any_known_speed(), "the brute force does not model the memory-weighted fallback"
    self.model, self.objective, self.batch, self.prompt_tokens = model, objective, batch, prompt_tokens
    self.ids = sorted(self.cm.nodes)
    self.n_layers = self.cm.n_layers
    self.max_cap = None  # shrunk copies clip every capacity to this

  @property
  def context(self) -> int:
    return self.cm.context

  def shrunk(self, n_layers: int, max_cap: int) -> "BruteForce":
    """The same nodes and links with fewer layers and every capacity clipped to max_cap, so that caps bind and every split can
    be enumerated."""
    small = copy.copy(self)
    small.n_layers, small.max_cap = n_layers, max_cap
    return small

  def cap(self, i: str, first: bool, last: bool, k: int) -> int:
    cap = self.cm.cap(i, first, last, k, self.objective)
    return cap if self.max_cap is None else min(cap, self.max_cap)

  def ring_caps(self, ring) -> list[int]:
    k = len(ring)
    return [self.cap(i, j == 0, j == k - 1, k) for j, i in enumerate(ring)]

  def links(self, ring) -> list[tuple[str, str]]:
    """Each stage's link to the next node (the last one's back to the first); none for a ring of one."""
    return [] if len(ring) < 2 else list(zip(ring, ring[1:] + ring[:1]))

  def rings(self):
    """Every ring of at most n_layers nodes with neighbours adjacent: every subset, every order, every rotation (the first node
    embeds and the last runs the head, so rotations differ), both directions."""
    for k in range(1, min(len(self.ids), self.n_layers) + 1):
      for ring in itertools.permutations(self.ids, k):
        if all(self.cm.adjacent(u, v) for u, v in self.links(ring)):
          yield ring

  def splittable(self, ring) -> bool:
    caps = self.ring_caps(ring)
    return len(ring) <= self.n_layers and min(caps) >= 1 and sum(caps) >= self.n_layers

  def feasible_at(self, tokens: int) -> bool:
    """Whether some plan is feasible with KV reserved for a context of `tokens` (the context stays set)."""
    self.cm.context = tokens
    return any(self.splittable(ring) for ring in self.rings())

  def splits(self, ring):
    """Every integer split of the layers over the ring, each node 1..its cap in its role, in lexicographic order."""
    return compositions(self.n_layers, self.ring_caps(ring))

  def plans(self):
    """Every feasible plan, as [(node id, layer count), ...] in ring order: every ring, every split."""
    for ring in self.rings():
      for layers in self.splits(ring):
        yield list(zip(ring, layers))

  def stage_constants(self, ring) -> list[float]:
    """Per stage, the part of its batch time that does not depend on its layer count: the batch's transfer to the next node
    (b A 8 / w), and on the last stage the head (eta t_last(b))."""
    out = [self.cm.transfer(u, v, self.batch) for u, v in self.links(ring)] or [0.0]
    out[-1] += self.cm.eta * self.cm.t(ring[-1], self.batch)
    return out

  def bottleneck(self, ring, layers) -> float:
    return max(m * self.cm.t(i, self.batch) + x for i, m, x in zip(ring, layers, self.stage_constants(ring)))

  def evaluate(self, ring, layers) -> tuple[float, float, float]:
    """(TPOT s, throughput tokens/s at batch b, TTFT s for prompt_tokens) of a ring with the given layer counts."""
    plan = list(zip(ring, layers))
    return self.cm.tpot(plan), self.cm.throughput(plan), self.cm.ttft(plan, self.prompt_tokens)

  def score(self, ring, layers) -> tuple[float, float]:
    """(objective, tie-break), both to be minimised: (TPOT, -throughput) under latency, (-throughput, TPOT) under throughput."""
    return self.scorer(ring)(layers)

  def scorer(self, ring):
    """score() for one ring, its per-node figures worked out once (enumerating splits calls it thousands of times)."""
    t1, tb, x = [self.cm.t(i, 1) for i in ring], [self.cm.t(i, self.batch) for i in ring], self.stage_constants(ring)
    fixed = self.cm.eta * self.cm.t(ring[-1], 1) + self.cm.hops(ring, 1)  # TPOT's part that no split changes
    latency = self.objective == "latency"

    def score(layers):
      tpot = sum(n * t for n, t in zip(layers, t1)) + fixed
      throughput = self.batch / max(n * t + c for n, t, c in zip(layers, tb, x))
      return (tpot, -throughput) if latency else (-throughput, tpot)

    return score

  def min_bottleneck_split(self, ring, lo: list[int], hi: list[int]) -> list[int]:
    """Least max_i (L_i t_i(b) + x_i) over splits with lo_i <= L_i <= hi_i summing to n_layers: binary search over the candidate
    stage times for the smallest that admits n_layers layers, then drop the surplus anywhere down to lo (no stage grows)."""
    tb, x = [self.cm.t(i, self.batch) for i in ring], self.stage_constants(ring)

    def most(T):  # per node, the most layers in lo..hi whose stage time stays within T (lo - 1 if even lo does not)
      return [max([n for n in range(lo[j], hi[j] + 1) if n * tb[j] + x[j] <= T], default=lo[j] - 1) for j in range(len(ring))]

    def fits(T):
      counts = most(T)
      return all(m >= low for m, low in zip(counts, lo)) and sum(counts) >= self.n_layers

    candidates = sorted({n * tb[j] + x[j] for j in range(len(ring)) for n in range(lo[j], hi[j] + 1)})
    first, last = 0, len(candidates) - 1  # fits(candidates[-1]): every node may take hi
    while first < last:
      mid = (first + last) // 2
      if fits(candidates[mid]):
        last = mid
      else:
        first = mid + 1
    counts = most(candidates[first])
    over = sum(counts) - self.n_layers
    for j in range(len(ring)):
      drop = min(over, counts[j] - lo[j])
      counts[j] -= drop
      over -= drop
    return counts

  def best_latency_split(self, ring) -> list[int] | None:
    """Least sum L_i t_i(1) (the head and hops are fixed by the ring): one layer each, then the rest to the fastest nodes (by t(1))
    first, up to their caps. Only nodes tied in t(1) where the layers run out leave a choice: among those splits, the least
    bottleneck (the throughput tie-break)."""
    if not self.splittable(ring):
      return None
    caps, t1 = self.ring_caps(ring), [self.cm.t(i, 1) for i in ring]
    lo, hi = [1] * len(ring), [1] * len(ring)
    left = self.n_layers - len(ring)
    order = sorted(range(len(ring)), key=lambda j: t1[j])
    g = 0
    while g < len(order) and left > 0:
      group = [j for j in order[g:] if math.isclose(t1[j], t1[order[g]], rel_tol=1e-12)]
      room = sum(caps[j] - 1 for j in group)
      for j in group:
        if room <= left:
          lo[j] = hi[j] = caps[j]
        else:
          hi[j] = caps[j]  # lo stays 1: the group shares what is left
      left -= min(room, left)
      g += len(group)
    return self.min_bottleneck_split(ring, lo, hi)

  def best_throughput_split(self, ring) -> list[int] | None:
    """Least bottleneck T over 1..cap splits; then, among splits within T, the least TPOT: one layer each, then the fastest nodes
    by t(1) first, each up to the most layers that keep its stage within T."""
    if not self.splittable(ring):
      return None
    caps, t1 = self.ring_caps(ring), [self.cm.t(i, 1) for i in ring]
    T = self.bottleneck(ring, self.min_bottleneck_split(ring, [1] * len(ring), caps)) * (1 + REL_TIE)
    tb, x = [self.cm.t(i, self.batch) for i in ring], self.stage_constants(ring)
    limit = [max(n for n in range(1, caps[j] + 1) if n * tb[j] + x[j] <= T) for j in range(len(ring))]
    layers, left = [1] * len(ring), self.n_layers - len(ring)
    for j in sorted(range(len(ring)), key=lambda j: t1[j]):
      take = min(left, limit[j] - 1)
      layers[j] += take
      left -= take
    assert left == 0
    return layers

  def few_splits(self, ring) -> bool:
    return math.comb(self.n_layers - 1, len(ring) - 1) <= ENUMERATE_MAX

  def ring_best(self, ring, enumerate_splits: bool) -> tuple[tuple[float, float], list[int]] | None:
    """The ring's best (score, layers) under the objective and its tie-break; None if no split fits."""
    if enumerate_splits:
      score = self.scorer(ring)
      return best_of([(score(layers), list(layers)) for layers in self.splits(ring)])
    layers = self.best_latency_split(ring) if self.objective == "latency" else self.best_throughput_split(ring)
    return None if layers is None else (self.score(ring, layers), layers)

  def optimum(self) -> tuple[tuple[float, float], tuple, list[int]] | None:
    """The best (score, ring, layers) over every feasible plan at v2.1's context (self.context after the call: the cap if any
    plan is feasible there, else the largest multiple of 256 from 512 at which one is); None if none is feasible."""
    context = planned_context(self.model, self.feasible_at)
    if context is None:
      return None
    self.cm.context = context
    found = []
    for ring in self.rings():
      best = self.ring_best(ring, self.few_splits(ring))
      if best is not None:
        found.append((best[0], (ring, best[1])))
    top = best_of(found)
    return None if top is None else (top[0], *top[1])

  def plan_problems(self, plan: dict) -> list[str]:
    """Why a plan is not a valid one: shards must tile the layers in order, each node hold 1..its cap in its role (first, last,
    ring size), ring neighbours share an edge."""
    shards, problems = plan["shards"], []
    if shards[0]["start_layer"] != 0 or shards[-1]["end_layer"] != self.n_layers - 1:
      problems.append(f"shards do not cover layers 0..{self.n_layers - 1}")
    problems += [f"shards {a} and {b} do not tile" for a, b in zip(shards, shards[1:]) if b["start_layer"] != a["end_layer"] + 1]
    ring = [i for i, _ in plan_ring(plan)]
    if len(set(ring)) != len(ring):
      problems.append(f"a node appears twice in {ring}")
    problems += [f"{i} holds {n} layers, cap {c}" for (i, n), c in zip(plan_ring(plan), self.ring_caps(ring)) if not 1 <= n <= c]
    problems += [f"{sorted((u, v))} share no edge" for u, v in self.links(ring) if not self.cm.adjacent(u, v)]
    return problems


def _best(values: list[tuple[float, float]], objective: str, tie: float = REL_TIE) -> tuple[float, float]:
  """(primary, secondary) optimum: the best primary, then the best secondary among plans tied on it within `tie`."""
  if objective == "latency":
    best = min(t for t, _ in values)
    return best, max(x for t, x in values if close(t, best, tie))
  best = max(x for _, x in values)
  return best, min(t for t, x in values if close(x, best, tie))


def _tie_band(values: list[tuple[float, float]], objective: str) -> tuple[float, float]:
  """(least, most) the tie-break's secondary value can be for a tie tolerance anywhere in TIE_BAND: plans whose primaries
  differ by about 1e-9 are tied for one rounding of the floats and not for another."""
  low, high = sorted(_best(values, objective, tie)[1] for tie in TIE_BAND)
  return low, high


def oracle(
  topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0, batch: int = 1, max_context: int | None = None
) -> dict | None:
  """Best values over every feasible plan (every ring and every split) at each objective's planned context (v2.1), or None
  when no plan is feasible under either objective.

  Returns {"best_tpot", "throughput_at_best_tpot", "n_plans", "context_latency"} over the latency-feasible plans (c = 1) and
  {"best_throughput", "tpot_at_best_throughput", "n_throughput_plans", "context_throughput"} over the throughput-feasible
  plans (c = k * b); the latter values are None when no plan is feasible under throughput. The secondary values are the best
  among plans whose primary is within REL_TIE of the best (the objective's tie-break); the `_band` entries give the range the
  secondary can take for any tie tolerance in TIE_BAND, which a planner's tie-break must fall in.
  """

  def plans_at(objective: str):
    every = BruteForce(topology, model, objective, memory_headroom, default_rtt_ms, batch)
    context = planned_context(model, every.feasible_at, max_context)
    if context is None:
      return None, []
    every.cm.context = context
    return context, [every.cm.evaluate(plan) for plan in every.plans()]

  context_latency, latency = plans_at("latency")
  if not latency:
    return None
  context_throughput, throughput = plans_at("throughput")
  best_tpot, throughput_at_best_tpot = _best(latency, "latency")
  best_throughput, tpot_at_best_throughput = _best(throughput, "throughput") if throughput else (None, None)
  return {
    "best_tpot": best_tpot,
    "throughput_at_best_tpot": throughput_at_best_tpot,
    "best_throughput": best_throughput,
    "tpot_at_best_throughput": tpot_at_best_throughput,
    "throughput_at_best_tpot_band": _tie_band(latency, "latency"),
    "tpot_at_best_throughput_band": _tie_band(throughput, "throughput") if throughput else None,
    "n_plans": len(latency),
    "n_throughput_plans": len(throughput),
    "context_latency": context_latency,
    "context_throughput": context_throughput,
  }
