"""Scenario files (tests/scenarios/*.json): hand-computed expected plans, checked against make_plan and a brute-force optimum.

Each scenario is a topology file (tests/scenarios/NAME.json, usable as `exo plan --topology`) and its expectations
(tests/scenarios/expected/NAME.json): a model (built-in id or spec), an objective, planner params (memory_headroom, default_rtt_ms,
batch) and `expected`, written by hand from docs/DESIGN.md section 2, cost model v2 (the arithmetic is in the scenario's "why"):
either {"error": substring} or the ring, layers per node (or a list of splits that tie on both objectives) and predicted
tpot_ms / throughput_tps (and ttft_ms where given), plus optional property checks (max_ring_nodes, min_layers_per_node,
max_layer_spread, sites + site_crossings, warnings_contain) and the planned context (`context_tokens`, v2.1; default 8192).

The brute force below reads only the topology and model-spec dicts; nothing from exo.topology. It enumerates every node subset,
every ring order and every rotation (the first node holds the embedding and the last the head, so rotations are different plans,
with different capacities and stage times). Per ring it enumerates every integer split when there are few (C(L - 1, k - 1)
compositions), and otherwise computes the ring's optimal split directly: latency fills the fastest nodes (by t(1)) first within
their capacities in their roles, breaking ties among TPOT-optimal splits by the least bottleneck; throughput takes the smallest
candidate bottleneck L_i t_i(b) + x_i that admits L layers, then the least TPOT among the splits within it.
"""

import copy
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest

from exo.base.errors import ExoError
from exo.base.models import MODELS
from exo.topology.planner import make_plan

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
SCENARIOS = sorted(SCENARIO_DIR.glob("*.json"))
REL = 1e-6
TIE = 1e-9  # objective values closer than this (relative) are ties, decided by the other objective
PROMPT_TOKENS = 128  # the prompt length behind the reported TTFT
BRUTE_MAX_NODES = 7
CONTEXT = 8192  # v2.1: the context planned unless the cluster cannot hold it (the model's, if shorter)
ENUMERATE_MAX = 5000  # compositions per ring up to which every integer split is enumerated


def load(path: Path) -> dict:
  """A scenario: the topology file itself (usable as `exo plan --topology`) joined with its expectations in expected/."""
  return {"topology": json.loads(path.read_text()), **json.loads((path.parent / "expected" / path.name).read_text())}


def model_dict(model) -> dict:
  """The model-spec JSON dict: given inline, or the built-in model's spec as data."""
  return MODELS[model].to_dict() if isinstance(model, str) else model


def close(a: float, b: float, rel: float = REL) -> bool:
  return abs(a - b) <= rel * max(abs(a), abs(b))


def plan_for(scenario: dict, strategy: str = "flops-latency") -> dict:
  return make_plan(scenario["topology"], scenario["model"], strategy, scenario["objective"], **scenario.get("params", {}))


def ring_of(plan: dict) -> list[tuple[str, int]]:
  return [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]


def same_ring(got: list[str], want: list[str], match: str) -> bool:
  if match == "exact":
    return got == want
  if len(got) != len(want):
    return False
  rotations = [want[i:] + want[:i] for i in range(len(want))]
  if match == "rotation":
    return got in rotations
  assert match == "rotation_or_reversal", f"unknown ring_match {match!r}"
  return got in rotations or got[::-1] in rotations


# ---------- the cost model v2, read straight off the JSON dicts (docs/DESIGN.md section 2) ----------


class Cluster:
  """The cost model of one topology, model, objective and parameters. Nodes are ids; a ring is a tuple of ids in execution order
  (the first embeds, the last runs the head); caps depend on a node's role (first, last) and, under throughput, on the ring size."""

  def __init__(
    self,
    topology: dict,
    model: dict,
    objective: str = "latency",
    memory_headroom: float = 0.1,
    default_rtt_ms: float = 5.0,
    batch: int = 1,
    prompt_tokens: int = PROMPT_TOKENS,
  ):
    nodes = topology["nodes"]
    self.ids = sorted(nodes)
    self.objective, self.batch, self.prompt_tokens = objective, batch, prompt_tokens
    self.n_layers = model["n_layers"]
    B, F, A = model["layer_bytes"], model["layer_flops"], model["activation_bytes"]
    self.B, self.full_K, self.N = B, model.get("kv_bytes_per_layer", 0), model.get("context_tokens", CONTEXT)
    self.set_context(min(self.N, CONTEXT))
    self.E, self.H, self.tied = model.get("embed_bytes", 0), model.get("head_bytes", 0), model.get("tied_embeddings", False)
    self.eta = self.H / B if self.H > 0 else 0.0
    self.speed = {}  # node -> (d, c) seconds: t(n) = max(d, n c)
    for i, node in nodes.items():
      measured = node.get("layer_times", {}).get(model["id"])
      f, b = node.get("flops", {}).get("fp16", 0), node.get("memory_bandwidth", 0)
      if measured is not None:
        self.speed[i] = (measured["decode_ms"] / 1000, measured["token_ms"] / 1000)
      elif f > 0 or b > 0:
        compute = F / (f * 1e12) if f > 0 else 0.0
        self.speed[i] = (max(compute, B / (b * 1e9) if b > 0 else 0.0), compute)
    assert self.speed, "the brute force does not model the memory-weighted fallback"
    self.usable = {i: nodes[i].get("memory", 0) * 2**20 * (1 - memory_headroom) for i in self.ids}
    self.max_cap = None  # shrunk copies clip every capacity to this
    self._t = {}
    rtts, bandwidths = defaultdict(list), defaultdict(list)
    for e in topology.get("edges", []):
      measured = rtts[frozenset((e["from"], e["to"]))]  # an edge makes its ends neighbours even with no measurement
      if e.get("rtt_ms") is not None:
        measured.append(e["rtt_ms"])
      if e.get("bandwidth_mbps"):
        bandwidths[frozenset((e["from"], e["to"]))].append(e["bandwidth_mbps"])
    self.half_rtt, self.transfer = {}, {}
    for pair, measured in rtts.items():
      w = sum(bandwidths[pair]) / len(bandwidths[pair]) if bandwidths[pair] else None
      self.transfer[pair] = A * 8 / (w * 1e6) if w else 0.0  # seconds per token's activation
      self.half_rtt[pair] = (sum(measured) / len(measured) if measured else default_rtt_ms) / 2 / 1000

  def set_context(self, tokens: int) -> None:
    """v2.1: plans reserve KV for `tokens` per request, K C / N."""
    self.context, self.K = tokens, self.full_K * tokens / self.N

  def t(self, i: str, n: int) -> float:
    """t_i(n) = max(d_i, n c_i); a node of unknown speed: the largest t_j(n) over the nodes whose speed is known."""
    if (i, n) not in self._t:
      if i in self.speed:
        d, c = self.speed[i]
        self._t[i, n] = max(d, n * c)
      else:
        self._t[i, n] = max(self.t(j, n) for j in self.speed)
    return self._t[i, n]

  def cap(self, i: str, first: bool, last: bool, k: int) -> int:
    """floor((M 2^20 (1 - h) - E [first] - H [last]) / (B + c K)), c = 1 (latency) or k b (throughput); tied and both: max(E, H)."""
    reserved = max(self.E, self.H) if first and last and self.tied else self.E * first + self.H * last
    resident = 1 if self.objective == "latency" else k * self.batch
    cap = math.floor((self.usable[i] - reserved) / (self.B + resident * self.K))
    return cap if self.max_cap is None else min(cap, self.max_cap)

  def ring_caps(self, ring) -> list[int]:
    k = len(ring)
    return [self.cap(i, j == 0, j == k - 1, k) for j, i in enumerate(ring)]

  def pairs(self, ring) -> list[frozenset]:
    """Each stage's link to the next node (the last one's back to the first); none for a ring of one."""
    return [] if len(ring) < 2 else [frozenset((ring[j], ring[(j + 1) % len(ring)])) for j in range(len(ring))]

  def rings(self):
    """Every ring of at most n_layers nodes with neighbours adjacent: every subset, every order, every rotation (the first node
    embeds and the last runs the head, so rotations differ), both directions."""
    for k in range(1, min(len(self.ids), self.n_layers) + 1):
      for ring in itertools.permutations(self.ids, k):
        if all(pair in self.half_rtt for pair in self.pairs(ring)):
          yield ring

  def hops(self, ring, n: int) -> float:
    """Every hop of the ring for n tokens: r / 2 + n A 8 / w."""
    return sum(self.half_rtt[p] + n * self.transfer[p] for p in self.pairs(ring))

  def stage_constants(self, ring) -> list[float]:
    """Per stage, the part of its batch time that does not depend on its layer count: the batch's transfer to the next node
    (b A 8 / w), and on the last stage the head (eta t_last(b))."""
    b = self.batch
    out = [b * self.transfer[p] for p in self.pairs(ring)] or [0.0]
    out[-1] += self.eta * self.t(ring[-1], b)
    return out

  def pass_time(self, ring, layers, n: int) -> float:
    """sum L_i t_i(n) + eta t_last(n) + every hop with n tokens: TPOT for n = 1, TTFT for n = P."""
    return sum(m * self.t(i, n) for i, m in zip(ring, layers)) + self.eta * self.t(ring[-1], n) + self.hops(ring, n)

  def bottleneck(self, ring, layers) -> float:
    return max(m * self.t(i, self.batch) + x for i, m, x in zip(ring, layers, self.stage_constants(ring)))

  def evaluate(self, ring, layers) -> tuple[float, float, float]:
    """(TPOT s, throughput tokens/s at batch b, TTFT s for prompt_tokens) of a ring with the given layer counts."""
    return self.pass_time(ring, layers, 1), self.batch / self.bottleneck(ring, layers), self.pass_time(ring, layers, self.prompt_tokens)

  def score(self, ring, layers) -> tuple[float, float]:
    """(objective, tie-break), both to be minimised: (TPOT, -throughput) under latency, (-throughput, TPOT) under throughput."""
    return self.scorer(ring)(layers)

  def scorer(self, ring):
    """score() for one ring, its per-node figures worked out once (enumerating splits calls it thousands of times)."""
    t1, tb, x = [self.t(i, 1) for i in ring], [self.t(i, self.batch) for i in ring], self.stage_constants(ring)
    fixed = self.eta * self.t(ring[-1], 1) + self.hops(ring, 1)  # TPOT's part that no split changes
    latency = self.objective == "latency"

    def score(layers):
      tpot = sum(n * t for n, t in zip(layers, t1)) + fixed
      throughput = self.batch / max(n * t + c for n, t, c in zip(layers, tb, x))
      return (tpot, -throughput) if latency else (-throughput, tpot)

    return score

  def splittable(self, ring) -> bool:
    caps = self.ring_caps(ring)
    return len(ring) <= self.n_layers and min(caps) >= 1 and sum(caps) >= self.n_layers

  def splits(self, ring):
    """Every integer split of the layers over the ring, each node 1..its cap in its role."""
    caps = self.ring_caps(ring)
    for cuts in itertools.combinations(range(1, self.n_layers), len(ring) - 1):
      bounds = (0, *cuts, self.n_layers)
      layers = [bounds[j + 1] - bounds[j] for j in range(len(ring))]
      if all(n <= c for n, c in zip(layers, caps)):
        yield layers

  def min_bottleneck_split(self, ring, lo: list[int], hi: list[int]) -> list[int]:
    """Least max_i (L_i t_i(b) + x_i) over splits with lo_i <= L_i <= hi_i summing to n_layers: binary search over the candidate
    stage times for the smallest that admits n_layers layers, then drop the surplus anywhere down to lo (no stage grows)."""
    tb, x = [self.t(i, self.batch) for i in ring], self.stage_constants(ring)

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
    caps, t1 = self.ring_caps(ring), [self.t(i, 1) for i in ring]
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
    caps, t1 = self.ring_caps(ring), [self.t(i, 1) for i in ring]
    T = self.bottleneck(ring, self.min_bottleneck_split(ring, [1] * len(ring), caps)) * (1 + TIE)
    tb, x = [self.t(i, self.batch) for i in ring], self.stage_constants(ring)
    limit = [max(n for n in range(1, caps[j] + 1) if n * tb[j] + x[j] <= T) for j in range(len(ring))]
    layers, left = [1] * len(ring), self.n_layers - len(ring)
    for j in sorted(range(len(ring)), key=lambda j: t1[j]):
      take = min(left, limit[j] - 1)
      layers[j] += take
      left -= take
    assert left == 0
    return layers

  def ring_best(self, ring, enumerate_splits: bool) -> tuple[tuple[float, float], list[int]] | None:
    """The ring's best (score, layers) under the objective and its tie-break; None if no split fits."""
    if enumerate_splits:
      score = self.scorer(ring)
      scored = [(score(layers), layers) for layers in self.splits(ring)]
      return best_of(scored)
    layers = self.best_latency_split(ring) if self.objective == "latency" else self.best_throughput_split(ring)
    return None if layers is None else (self.score(ring, layers), layers)

  def few_splits(self, ring) -> bool:
    return math.comb(self.n_layers - 1, len(ring) - 1) <= ENUMERATE_MAX

  def optimum(self) -> tuple[tuple[float, float], tuple, list[int]] | None:
    """The best (score, ring, layers) over every feasible plan at v2.1's context (self.context after the call: the cap if any
    plan is feasible there, else the largest multiple of 256 from 512 at which one is); None if none is feasible."""
    contexts = range((self.context - 1) // 256 * 256, 511, -256) if self.full_K else []
    for tokens in [self.context, *contexts]:
      self.set_context(tokens)
      if any(self.splittable(ring) for ring in self.rings()):
        break
    else:
      return None
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
    ring = [i for i, _ in ring_of(plan)]
    if len(set(ring)) != len(ring):
      problems.append(f"a node appears twice in {ring}")
    problems += [f"{i} holds {n} layers, cap {c}" for (i, n), c in zip(ring_of(plan), self.ring_caps(ring)) if not 1 <= n <= c]
    problems += [f"{sorted(p)} share no edge" for p in self.pairs(ring) if p not in self.half_rtt]
    return problems


def best_of(scored: list) -> tuple | None:
  """The best (score, layers) of a list: the least objective, then among those within TIE of it the least tie-break."""
  if not scored:
    return None
  top = min(s[0] for s, _ in scored)
  return min((entry for entry in scored if close(entry[0][0], top, TIE)), key=lambda entry: entry[0][1])


def cluster_for(scenario: dict, objective: str | None = None) -> Cluster:
  """The scenario's cost model, under its own objective unless another is given (capacities depend on the objective)."""
  return Cluster(scenario["topology"], model_dict(scenario["model"]), objective or scenario["objective"], **scenario.get("params", {}))


def feasible_scenarios() -> list[Path]:
  return [p for p in SCENARIOS if "error" not in load(p)["expected"]]


def brute_scenarios() -> list[Path]:
  return [p for p in feasible_scenarios() if len(load(p)["topology"]["nodes"]) <= BRUTE_MAX_NODES]


# ---------- tests ----------


def test_required_scenarios_exist():
  names = {p.stem for p in SCENARIOS}
  required = {
    "mac_trio_iphone_70b",
    "llama_405b_must_spread",
    "mixed_nvidia_throughput",
    "two_sites_slow_link",
    "identical_nodes",
    "zero_tflops_node",
    "model_too_large",
    "more_nodes_than_layers",
    "single_node",
    "measured_slower_than_roofline",
    "batch_kv_drops_node",
  }
  assert required <= names, f"missing scenarios: {sorted(required - names)}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_expected(path: Path):
  scenario = load(path)
  expected = scenario["expected"]
  if "error" in expected:
    with pytest.raises(ExoError, match=re.escape(expected["error"])):
      plan_for(scenario)
    return
  plan = plan_for(scenario)
  ring = ring_of(plan)
  ids = [i for i, _ in ring]
  assert same_ring(ids, expected["ring"], expected["ring_match"]), f"ring {ids}, expected {expected['ring']} ({expected['ring_match']})"
  layers = expected["layers"]  # one split, or a list of splits that tie on both objectives (DESIGN breaks ties by node ids only)
  assert dict(ring) in (layers if isinstance(layers, list) else [layers]), f"layers {dict(ring)}, expected {layers}"
  predicted = plan["predicted"]
  assert predicted["feasible"] is True
  assert plan["context_tokens"] == expected.get("context_tokens", 8192), (
    f"context {plan['context_tokens']}, expected {expected.get('context_tokens')}"
  )
  assert close(predicted["tpot_ms"], expected["tpot_ms"]), f"tpot_ms {predicted['tpot_ms']!r}, expected {expected['tpot_ms']!r}"
  assert close(predicted["throughput_tps"], expected["throughput_tps"]), (
    f"throughput {predicted['throughput_tps']!r}, expected {expected['throughput_tps']!r}"
  )
  assert close(predicted["tokens_per_second"], 1000 / expected["tpot_ms"])
  if "ttft_ms" in expected:
    assert close(predicted["ttft_ms"], expected["ttft_ms"]), f"ttft_ms {predicted['ttft_ms']!r}, expected {expected['ttft_ms']!r}"
  if "max_ring_nodes" in expected:
    assert len(ring) <= expected["max_ring_nodes"]
  if "min_layers_per_node" in expected:
    assert min(n for _, n in ring) >= expected["min_layers_per_node"]
  if "max_layer_spread" in expected:
    assert max(n for _, n in ring) - min(n for _, n in ring) <= expected["max_layer_spread"]
  if "site_crossings" in expected:
    site = {node: name for name, members in expected["sites"].items() for node in members}
    crossings = sum(site[ids[j]] != site[ids[(j + 1) % len(ids)]] for j in range(len(ids)))
    assert crossings == expected["site_crossings"], f"ring {ids} crosses sites {crossings} times"
  for word in expected.get("warnings_contain", []):
    assert any(word.lower() in w.lower() for w in plan["warnings"]), f"no warning mentions {word!r}: {plan['warnings']}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_well_formed(path: Path):
  scenario = load(path)
  assert set(scenario) <= {"description", "topology", "model", "objective", "params", "expected", "why"}
  assert scenario["objective"] in ("latency", "throughput")
  assert scenario["description"].strip() and scenario["why"].strip()


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_planner_matches_brute_force(path: Path, objective: str):
  """The planner's plan is valid, its predictions are the cost model's for its own shards, and it reaches the brute-force optimum
  and tie-break, under the scenario's objective and under the other one (same topology, model and parameters)."""
  scenario = {**load(path), "objective": objective}
  cluster = cluster_for(scenario)
  best = cluster.optimum()
  if best is None:  # possible under the other objective: throughput reserves KV for k b requests per stage
    with pytest.raises(ExoError):
      plan_for(scenario)
    return
  plan = plan_for(scenario)
  assert plan["context_tokens"] == cluster.context
  assert cluster.plan_problems(plan) == []
  ring, layers = [i for i, _ in ring_of(plan)], [n for _, n in ring_of(plan)]
  tpot, throughput, ttft = cluster.evaluate(ring, layers)
  predicted = plan["predicted"]
  assert close(predicted["tpot_ms"], tpot * 1000), f"predicted tpot_ms {predicted['tpot_ms']} disagrees with the shards' {tpot * 1000}"
  assert close(predicted["throughput_tps"], throughput), f"predicted throughput {predicted['throughput_tps']} disagrees with {throughput}"
  assert close(predicted["ttft_ms"], ttft * 1000), f"predicted ttft_ms {predicted['ttft_ms']} disagrees with the shards' {ttft * 1000}"
  (want, want_tie), best_ring, best_layers = best
  got, got_tie = cluster.score(ring, layers)
  where = f"planner {list(zip(ring, layers))}, brute force {list(zip(best_ring, best_layers))}"
  assert close(got, want), f"{objective}: planner {abs(got)}, optimum {abs(want)} ({where})"
  assert close(got_tie, want_tie), f"{objective} tie-break: planner {abs(got_tie)}, best {abs(want_tie)} ({where})"


def shrunk(cluster: Cluster, n_layers: int, max_cap: int) -> Cluster:
  """The same nodes and links with fewer layers and every capacity clipped to max_cap, so that caps bind and every split can be
  enumerated."""
  small = copy.copy(cluster)
  small.n_layers, small.max_cap = n_layers, max_cap
  return small


@pytest.mark.parametrize("path", brute_scenarios(), ids=lambda p: p.stem)
def test_direct_split_matches_enumeration(path: Path):
  """The per-ring split shortcuts agree with enumerating every split, objective and tie-break: on the scenario's rings small enough
  to enumerate, and on every ring of shrunk copies of the scenario where the caps bind."""
  checked = 0
  for objective in ("latency", "throughput"):
    base = cluster_for(load(path), objective)
    for cluster in [base] + [shrunk(base, n_layers, max_cap) for n_layers, max_cap in ((3, 1), (5, 2), (8, 3), (10, 6))]:
      for ring in cluster.rings():
        if not cluster.few_splits(ring):
          continue
        enumerated = cluster.ring_best(ring, enumerate_splits=True)
        direct = cluster.ring_best(ring, enumerate_splits=False)
        assert (enumerated is None) == (direct is None), f"{ring} {objective}: {enumerated} vs {direct}"
        if enumerated is not None:
          (a, a_tie), (b, b_tie) = enumerated[0], direct[0]
          assert close(a, b, TIE) and close(a_tie, b_tie, TIE), f"{ring} {objective}: enumerated {enumerated}, direct {direct}"
          checked += 1
  assert checked > 0


@pytest.mark.parametrize("path", feasible_scenarios(), ids=lambda p: p.stem)
def test_flops_latency_at_least_as_good_as_memory_weighted(path: Path):
  scenario = load(path)
  cluster, objective = cluster_for(scenario), scenario["objective"]
  try:
    baseline = plan_for(scenario, "ring-memory-weighted")
  except ExoError:
    pytest.skip("ring-memory-weighted refuses this request")
  if cluster.plan_problems(baseline):
    pytest.skip(f"ring-memory-weighted's plan is infeasible: {cluster.plan_problems(baseline)[0]}")
  ours = cluster.evaluate(*zip(*ring_of(plan_for(scenario))))
  theirs = cluster.evaluate(*zip(*ring_of(baseline)))
  if objective == "latency":
    assert ours[0] <= theirs[0] * (1 + 1e-9), f"flops-latency TPOT {ours[0]} s, ring-memory-weighted {theirs[0]} s"
  else:
    assert ours[1] >= theirs[1] * (1 - 1e-9), f"flops-latency {ours[1]} tokens/s, ring-memory-weighted {theirs[1]}"
