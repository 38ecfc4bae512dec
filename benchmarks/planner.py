"""Benchmark of the flops-latency planner: time to plan, quality against the exact optimum, and gain over upstream's strategy.

Usage: python benchmarks/planner.py [--quick] [--seed N] [--exact-bandwidth]

1. Planner time on random heterogeneous clusters (benchmarks/planner_clusters.py: real chip figures, full-mesh edges) of 4 to 256 nodes.
2. Plan quality against an exact optimum (exo/tools/exact_oracle.py) on sparse clusters of 11 to 16 nodes.
3. Every scenario in tests/scenarios: flops-latency against ring-memory-weighted under the v1 cost model.

Pure computation: no network, no clocks other than time.perf_counter around the planner, seeded randomness.
"""

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.planner_clusters import BANDWIDTHS_MBPS, RTT_MS, RTT_REGIMES, layer_capacity, random_cluster, sparse_cluster, time_model  # noqa: E402
from exo.base.errors import ExoError  # noqa: E402
from exo.tools.exact_oracle import optimum  # noqa: E402
from exo.topology.flops_latency_partitioning_strategy import FlopsLatencyPartitioningStrategy  # noqa: E402
from exo.topology.planner import as_model, as_topology, make_plan  # noqa: E402
from exo.topology.search import EXACT_LIMIT  # noqa: E402

OBJECTIVES = ("latency", "throughput")
TIME_SIZES = (4, 8, 16, 64, 256)
TARGET_MS = {8: 20, 16: 100, 64: 300, 256: 3000}
QUALITY_SIZES = (11, 12, 13, 14, 15, 16)
QUALITY_MODEL = "llama-3.1-70b"
REGIMES = ("lan", "wifi", "mixed")
OPTIMAL_TOL = 1e-9


def timed_plan(topology, model, objective: str, method: str = "auto"):
  strategy = FlopsLatencyPartitioningStrategy(model, objective, method=method)
  start = time.perf_counter()
  plan = strategy.plan(topology)
  return plan, time.perf_counter() - start


def show(console: Console, renderable) -> None:
  """Print through rich, minus trailing spaces and the blank top and bottom borders of box.MARKDOWN, so it pastes cleanly."""
  with console.capture() as capture:
    console.print(renderable)
  lines = [line.rstrip() for line in capture.get().splitlines()]
  print("\n".join(line for line in lines if line or not isinstance(renderable, Table)))


def heading(console: Console, text: str) -> None:
  show(console, f"[bold]{text}[/bold]")


def usable_nodes(topology: dict, model) -> int:
  return sum(layer_capacity(node["memory"], model) >= 1 for node in topology["nodes"].values())


def fmt(value: float | None, digits: int = 1) -> str:
  if value is None:
    return "n/a"
  return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def span(values: list[int]) -> str:
  lo, hi = min(values), max(values)
  return str(lo) if lo == hi else f"{lo}-{hi}"


def proven_ratio(plan, objective: str) -> float:
  """The plan's objective over its own bound (1.0: proven optimal; below 1: how far from the bound, at worst, it may be)."""
  p = plan.prediction
  return p.bound_tpot_s / p.tpot_s if objective == "latency" else p.throughput_tps / p.bound_throughput_tps


def search_kind(topology, model, objective: str) -> str:
  return "exact" if usable_nodes(topology, model) <= EXACT_LIMIT[objective] else "heuristic"


def planner_time(console: Console, rng: random.Random, quick: bool) -> list[tuple[int, str, bool, float]]:
  heading(console, "1. Planner time: FlopsLatencyPartitioningStrategy.plan() on random full-mesh clusters")
  table = Table(box=box.MARKDOWN)
  columns = ("nodes", "model", "search", "objective", "bandwidth known?", "repeats", "median ms", "max ms", "ring size", "proven", "worst/bound")
  for name in (*columns, "target ms", "met?"):
    table.add_column(name, justify="left" if name in ("model", "search", "objective") else "right")
  results = []
  for n in TIME_SIZES:
    model = as_model(time_model(n))
    repeats = (5 if n <= 16 else 2 if n <= 64 else 1) if quick else (15 if n <= 16 else 5 if n <= 64 else 3)
    for with_bandwidth in (False, True):
      drawn = [random_cluster(rng, n, model, with_bandwidth) for _ in range(repeats)]
      clusters = [as_topology(t) for t in drawn]
      for objective in OBJECTIVES:
        modes = {search_kind(t, model, objective) for t in drawn}
        times, rings, ratios = [], [], []
        for topology in clusters:
          plan, seconds = timed_plan(topology, model, objective)
          times.append(seconds * 1000)
          rings.append(len(plan.ring()))
          ratios.append(proven_ratio(plan, objective))
        median, target = statistics.median(times), TARGET_MS.get(n)
        met = "-" if target is None else "yes" if median <= target else "no"
        search = next(iter(modes)) if len(modes) == 1 else "mixed"
        proven = f"{sum(r >= 1 - OPTIMAL_TOL for r in ratios)}/{len(ratios)}"
        row = (n, model.id, search, objective, "yes" if with_bandwidth else "no", repeats, fmt(median), fmt(max(times)), span(rings), proven)
        table.add_row(*map(str, row), f"{min(ratios):.3f}", "-" if target is None else str(target), met)
        if target is not None:
          results.append((n, objective, with_bandwidth, median))
  show(console, table)
  show(
    console,
    "Each repeat is a fresh cluster: chips drawn uniformly from exo/base/chips.py, memory from each chip's shipped sizes, RTT "
    f"uniform {RTT_MS[0]}-{RTT_MS[1]} ms, bandwidth (when known) from {'/'.join(map(str, BANDWIDTHS_MBPS))} Mbps, redrawn until the model "
    "fits the cluster but no single node. Timed: plan() on a parsed Topology (cost tables, search, bound, prediction); JSON validation is "
    f"not timed. search: exact up to {EXACT_LIMIT['latency']} usable nodes for latency, {EXACT_LIMIT['throughput']} for throughput. "
    "proven: plans equal to the bound the plan reports (bound_tpot_ms, bound_throughput_tps), so optimal; worst/bound: the least "
    "plan / bound ratio (latency: bound TPOT / TPOT; throughput: tokens/s / bound), a floor on how close to optimal the plan is. "
    "met?: median within target.\n",
  )
  return results


def rate(clusters: list[dict], model, objective: str, reference: str, exact_bandwidth: bool, summary: dict) -> tuple[list, list, list]:
  """(each plan's ratio to the reference, to its own bound, its planning ms) on `clusters`; a bound that is not one counts in
  summary["dishonest"]."""
  ratios, bounds, times = [], [], []
  for topology in clusters:
    try:
      plan, seconds = timed_plan(as_topology(topology), model, objective)
    except ExoError:
      plan, seconds = None, 0.0
    best = optimum(topology, model.to_dict(), objective) if reference == "exact" else None
    if plan is None:
      assert best is None, f"no plan, but the exact optimum is {best}"
      continue
    if reference == "bound" and exact_bandwidth:
      best = timed_plan(as_topology(topology), model, objective, method="exact")[0].prediction.throughput_tps
    times.append(seconds * 1000)
    bounds.append(proven_ratio(plan, objective))
    if best is not None:
      ratios.append(best / plan.prediction.tpot_s if objective == "latency" else plan.prediction.throughput_tps / best)
      bound = plan.prediction.bound_tpot_s if objective == "latency" else plan.prediction.bound_throughput_tps
      summary["dishonest"] += bound > best * (1 + OPTIMAL_TOL) if objective == "latency" else bound < best * (1 - OPTIMAL_TOL)
  return ratios, bounds, times


def quality_row(n: int, objective: str, reference: str, ratios: list, bounds: list, times: list, summary: dict) -> list[str]:
  """A row of section 2's table; the ratios are added up in `summary`."""
  cells = ["-"] * 4
  if ratios:
    optimal, within = sum(x >= 1 - OPTIMAL_TOL for x in ratios), sum(x >= 0.99 for x in ratios)
    cells = [f"{optimal}/{len(ratios)}", f"{within}/{len(ratios)}", f"{statistics.fmean(ratios):.3f}", f"{min(ratios):.3f}"]
    summary["cases"] += len(ratios)
    summary["optimal"] += optimal
    summary["within"] += within
    summary["worst"] = min(summary["worst"], *ratios)
    summary["beat_exact"] += sum(x > 1 + OPTIMAL_TOL for x in ratios)
  proven = f"{sum(r >= 1 - OPTIMAL_TOL for r in bounds)}/{len(bounds)}"
  return [str(n), objective, reference, str(len(bounds)), *cells, proven, f"{min(bounds):.3f}", fmt(statistics.median(times)), fmt(max(times))]


def quality(console: Console, rng: random.Random, quick: bool, exact_bandwidth: bool) -> dict:
  """Plans against the exact optimum of exo/tools/exact_oracle.py (Held-Karp over every subset, no planner code) on sparse
  clusters of 11 to 16 nodes; throughput with link bandwidth against the plan's own bound (no independent exact reference
  there) and, with `exact_bandwidth`, against the planner's own exact search forced on every usable node (seconds per case)."""
  seeds = 3 if quick else 10
  model = as_model(QUALITY_MODEL)
  heading(console, f"2. Quality against the exact optimum, 11 to 16 nodes ({model.id}; ratio 1.000 = optimal, lower is worse)")
  table = Table(box=box.MARKDOWN)
  for name in ("nodes", "objective", "reference", "cases", "optimal", "within 1%", "mean", "worst", "proven", "worst/bound", "median ms", "max ms"):
    table.add_column(name, justify="left" if name in ("objective", "reference") else "right")
  summary = {"cases": 0, "optimal": 0, "within": 0, "worst": 1.0, "dishonest": 0, "beat_exact": 0}
  for n in QUALITY_SIZES:
    drawn = [sparse_cluster(rng, n, model, REGIMES[c % len(REGIMES)]) for c in range(seeds)]
    with_bandwidth = [sparse_cluster(rng, n, model, REGIMES[c % len(REGIMES)], with_bandwidth=True) for c in range(seeds)]
    for objective, reference, clusters in (
      ("latency", "exact", drawn + with_bandwidth),
      ("throughput", "exact", drawn),
      ("throughput", "bound", with_bandwidth),
    ):
      ratios, bounds, times = rate(clusters, model, objective, reference, exact_bandwidth, summary)
      table.add_row(*quality_row(n, objective, reference, ratios, bounds, times, summary))
  show(console, table)
  show(
    console,
    f"Per n: {seeds} clusters without link bandwidth and {seeds} with it, drawn by sparse_cluster: chips as in 1, each node with "
    f"15% to 120% of the model's bytes, each pair linked with one probability per cluster (0.5 to 0.9), RTTs from each end's delay, "
    f"by turns {', '.join(REGIMES)} ({', '.join(f'{k} {lo}-{hi} ms' for k, (lo, hi) in RTT_REGIMES.items())} per end). exact: "
    "exo/tools/exact_oracle.py (throughput only without bandwidth, where the order of a ring cannot change a stage); ratio: "
    "latency = exact TPOT / plan TPOT, throughput = plan tokens/s / exact tokens/s; bound: the plan's own bound instead (with "
    "--exact-bandwidth, ratios against the planner's exact search forced on every usable node). proven and "
    "worst/bound as in 1. ms: planning time.\n",
  )
  if summary["beat_exact"] or summary["dishonest"]:
    show(console, f"WARNING: {summary['beat_exact']} plans beat the exact optimum and {summary['dishonest']} bounds were not bounds.\n")
  return summary


def load_scenario(path: Path) -> dict:
  """A scenario: the topology file itself joined with its expectations in expected/<name>.json."""
  return {"topology": json.loads(path.read_text()), **json.loads((path.parent / "expected" / path.name).read_text())}


def scenarios(console: Console) -> list[tuple[str, float | None, bool | None]]:
  heading(console, "3. Scenarios (tests/scenarios/*.json): flops-latency (FL) against upstream's ring-memory-weighted (RMW), same cost model")
  table = Table(box=box.MARKDOWN)
  table.add_column("scenario", no_wrap=True)
  table.add_column("objective")
  for name in ("FL TPOT ms", "FL tok/s", "FL thr", "RMW TPOT ms", "RMW tok/s", "RMW thr", "RMW fits?", "speed-up"):
    table.add_column(name, justify="right")
  results = []
  for path in sorted((ROOT / "tests" / "scenarios").glob("*.json")):
    scenario = load_scenario(path)
    if "error" in scenario.get("expected", {}):
      continue
    objective, params = scenario.get("objective", "latency"), scenario.get("params") or {}
    predicted = {}
    for strategy in ("flops-latency", "ring-memory-weighted"):
      try:
        predicted[strategy] = make_plan(scenario["topology"], scenario["model"], strategy, objective, **params)["predicted"]
      except ExoError as e:
        show(console, f"{path.stem}: {strategy} refused: {e}")
        predicted[strategy] = None
    flops, base = predicted["flops-latency"], predicted["ring-memory-weighted"]
    speedup = None
    if flops and base and base["feasible"]:  # an overfilled baseline's figures are for a plan that cannot run
      if objective == "latency" and flops["tpot_ms"] and base["tpot_ms"] is not None:
        speedup = base["tpot_ms"] / flops["tpot_ms"]
      elif objective == "throughput" and flops["throughput_tps"] is not None and base["throughput_tps"]:
        speedup = flops["throughput_tps"] / base["throughput_tps"]
    cells = []
    for p in (flops, base):
      cells += [fmt(p and p["tpot_ms"]), fmt(p and p["tokens_per_second"], 2), fmt(p and p["throughput_tps"], 2)]
    feasible = None if base is None else base["feasible"]
    table.add_row(
      path.stem, objective, *cells, "n/a" if feasible is None else "yes" if feasible else "NO", "n/a" if speedup is None else f"{speedup:.2f}x"
    )
    results.append((path.stem, speedup, feasible))
  show(console, table)
  show(
    console,
    "tok/s = single-stream tokens/s (1 / TPOT); thr = pipelined throughput in tokens/s (1 / busiest stage). speed-up on the scenario's "
    "objective: latency = RMW TPOT / FL TPOT, throughput = FL thr / RMW thr. RMW fits? NO = RMW gives some node more layers than its "
    "memory holds: its figures are what the model predicts had it fit, and no speed-up is claimed over it. Scenarios whose expected "
    "outcome is an error are skipped.\n",
  )
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (about a third of the run time)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random clusters (default 0)")
  parser.add_argument(
    "--exact-bandwidth", action="store_true", help="also rate throughput with link bandwidth against the exact search (minutes more)"
  )
  args = parser.parse_args()
  console = Console(width=140)
  processor = platform.processor() or platform.machine()
  show(
    console,
    f"exo planner benchmark ({'quick' if args.quick else 'full'}, seed {args.seed}): Python {platform.python_version()} "
    f"({platform.python_implementation()}), {platform.system()} {processor}, {os.cpu_count()} CPUs\n",
  )
  started = time.perf_counter()
  warmup = as_model("llama-3.1-70b")
  timed_plan(as_topology(random_cluster(random.Random(-1), 4, warmup, False)), warmup, "latency")  # first-call imports and allocations
  times = planner_time(console, random.Random(args.seed), args.quick)
  summary = quality(console, random.Random(args.seed + 1), args.quick, args.exact_bandwidth)
  results = scenarios(console)
  met = sum(median <= TARGET_MS[n] for n, _, _, median in times)
  closest = max(times, key=lambda r: r[3] / TARGET_MS[r[0]])
  gains = [s for _, s, _ in results if s is not None]
  faster, equal = sum(g > 1 + 1e-9 for g in gains), sum(abs(g - 1) <= 1e-9 for g in gains)
  infeasible = sum(feasible is False for _, _, feasible in results)
  show(
    console,
    f"Summary: {met}/{len(times)} time targets met (closest: {closest[0]} nodes, {closest[1]}, {closest[3]:.0f} of {TARGET_MS[closest[0]]} ms); "
    f"11-16 nodes: optimal in {summary['optimal']}/{summary['cases']} cases with an exact reference, within 1% in {summary['within']} "
    f"(worst {summary['worst']:.3f}); "
    f"flops-latency faster than ring-memory-weighted in {faster}/{len(gains)} scenarios, equal in {equal}, slower in {len(gains) - faster - equal} "
    f"(median {statistics.median(gains) if gains else 1:.2f}x, max {max(gains, default=1):.2f}x; RMW overfills memory in {infeasible}); "
    f"{time.perf_counter() - started:.0f} s.",
  )


if __name__ == "__main__":
  main()
