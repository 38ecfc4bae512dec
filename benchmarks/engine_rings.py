"""Real-model benchmark: SmolLM2-135M on each engine, alone and on 2- and 3-node local rings under each strategy.

Every node is a real Node in its own process, with its own engine and a gRPC server on loopback (manual discovery). The declared
devices differ (memory 96 MB, 160 MB, 4 GB) so the strategies disagree: ring-memory-weighted spreads layers by memory,
flops-latency (latency objective) keeps them where the cost model says a token is fastest. Prints time to first token and decode
tokens/s (tokens after the first over their time), median of the repeats, and each node's peak resident memory (the process's
maximum RSS, Python and the engine's libraries included) next to the weight bytes its engine holds.

  python benchmarks/engine_rings.py [--tokens 24] [--repeats 2] [--engines ggml,tinygrad,mlx]
"""

import argparse
import asyncio
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.model_figures import served_model_spec
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest

MODEL = served_model_spec(model_spec("smollm2-135m"))  # the file's figures, as a node serving it plans with
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _ggml():
  from exo.inference.ggml_inference_engine import GGMLInferenceEngine

  return GGMLInferenceEngine()


def _tinygrad():
  from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine  # each node process imports only its engine

  return TinygradInferenceEngine()


def _mlx():
  from exo.inference.mlx_inference_engine import MLXInferenceEngine

  return MLXInferenceEngine()


ENGINES = {"ggml": _ggml, "tinygrad": _tinygrad, "mlx": _mlx}
DEVICES = {
  "big": DeviceCapabilities("Bench", "big", 4096, DeviceFlops(2.0, 4.0, 8.0), 40.0),
  "mid": DeviceCapabilities("Bench", "mid", 160, DeviceFlops(1.0, 2.0, 4.0), 20.0),
  "small": DeviceCapabilities("Bench", "small", 96, DeviceFlops(0.5, 1.0, 2.0), 10.0),
}
RINGS = {1: ["big"], 2: ["big", "mid"], 3: ["big", "mid", "small"]}


async def run_node(engine: str, name: str, names: list[str], peers_file: Path, strategy: str, tokens: int, done) -> dict:
  """One node of the ring; the first of `names` is the origin: it generates once to load every shard, then once timed, and
  sets `done`. The others serve until `done` is set."""
  node = Node(
    name,
    ENGINES[engine](),
    ManualDiscovery(name, peers_file, peer_handles(name), poll_interval=0.2),
    DEVICES[name],
    MODEL,
    PlannerConfig(PlanRequest.of(strategy)),
    tokens,
    300,
  )
  node.server = GRPCServer(node, "127.0.0.1", json.loads(peers_file.read_text())["peers"][name]["port"])
  result = {}
  try:
    await node.start(wait_for_peers=len(names) - 1)
    if name == names[0]:
      prompt = await node.engine.apply_chat_template(Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers), MESSAGES)
      await node.generate(prompt, max_tokens=4)  # load every shard's weights and capture its compiled steps before timing
      stamps = []
      started = time.perf_counter()
      generation = await node.generate(prompt, max_tokens=tokens, on_token=lambda t: stamps.append(time.perf_counter()))
      decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
      result = {"ttft": stamps[0] - started, "decode": decode, "ring": generation.plan.ring()}
      done.set()
    else:
      while not done.is_set():
        await asyncio.sleep(0.1)
    result["held_mb"] = node.engine.held_bytes() / 1e6
  finally:
    await node.stop()
    node.engine.close()
  result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
  return result


def node_process(engine: str, name: str, names: list[str], peers_file: Path, strategy: str, tokens: int, done, results) -> None:
  results[name] = asyncio.run(run_node(engine, name, names, peers_file, strategy, tokens, done))


def measure(engine: str, names: list[str], strategy: str, tokens: int, folder: Path) -> dict:
  """TTFT (s), decode tokens/s, the ring, and per node its peak RSS and held weight MB, for one generation on a fresh ring."""
  ports = {n: free_port() for n in names}
  peers_file = folder / f"peers-{'-'.join(names)}-{strategy}.json"
  peers_file.write_text(
    json.dumps({"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": DEVICES[n].to_dict()} for n in names}})
  )
  context = multiprocessing.get_context("spawn")
  with context.Manager() as manager:
    done, results = manager.Event(), manager.dict()
    processes = [context.Process(target=node_process, args=(engine, n, names, peers_file, strategy, tokens, done, results)) for n in names]
    for process in processes:
      process.start()
    for process in processes:
      process.join(600)
    if set(results.keys()) != set(names):
      raise RuntimeError(f"nodes {sorted(set(names) - set(results.keys()))} of ring {names} did not finish")
    return {**results[names[0]], "nodes": {n: (results[n]["peak_mb"], results[n]["held_mb"]) for n in names}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--engines", default="ggml,tinygrad,mlx")
  args = parser.parse_args()
  console = Console(width=140)
  console.print(
    f"exo engine benchmark: {MODEL.id}, {args.tokens} tokens, median of {args.repeats}; Python {platform.python_version()}, {platform.machine()}"
  )
  table = Table(box=box.MARKDOWN)
  for column in ("engine", "nodes", "strategy", "ring (node:layers)", "TTFT ms", "decode tokens/s", "peak RSS MB per node (weights held)"):
    table.add_column(column)
  with tempfile.TemporaryDirectory() as folder:
    for engine in args.engines.split(","):
      for size, names in RINGS.items():
        for strategy in ("flops-latency", "ring-memory-weighted") if size > 1 else ("flops-latency",):
          runs = [measure(engine, names, strategy, args.tokens, Path(folder)) for _ in range(args.repeats)]
          ttft, decode = statistics.median(r["ttft"] for r in runs), statistics.median(r["decode"] for r in runs)
          ring = " > ".join(f"{n}:{k}" for n, k in runs[0]["ring"])
          memory = ", ".join(f"{n} {max(r['nodes'][n][0] for r in runs):.0f} ({runs[0]['nodes'][n][1]:.0f})" for n in names)
          table.add_row(engine, str(size), strategy if size > 1 else "-", ring, f"{ttft * 1000:.0f}", f"{decode:.1f}", memory)
  console.print(table)


if __name__ == "__main__":
  main()
