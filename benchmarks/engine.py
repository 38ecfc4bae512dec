"""Real-model benchmark: SmolLM2-135M on each engine, alone and on 2- and 3-node local rings under each strategy.

Every node is a real Node with its own engine and a gRPC server on loopback (manual discovery). The declared devices differ
(memory 96 MB, 160 MB, 4 GB) so the strategies disagree: ring-memory-weighted spreads layers by memory, flops-latency (latency
objective) keeps them where the cost model says a token is fastest. Prints time to first token and decode tokens/s (tokens
after the first over their time), median of the repeats.

  python benchmarks/engine.py [--tokens 24] [--repeats 2] [--engines tinygrad,mlx]
"""

import argparse
import asyncio
import json
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from exo.inference.mlx_inference_engine import MLXInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from exo.models import model_spec
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.orchestration.node import Node, PlannerConfig
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

MODEL = model_spec("smollm2-135m")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ENGINES = {"tinygrad": TinygradInferenceEngine, "mlx": MLXInferenceEngine}
DEVICES = {
  "big": DeviceCapabilities("Bench", "big", 4096, DeviceFlops(2.0, 4.0, 8.0), 40.0),
  "mid": DeviceCapabilities("Bench", "mid", 160, DeviceFlops(1.0, 2.0, 4.0), 20.0),
  "small": DeviceCapabilities("Bench", "small", 96, DeviceFlops(0.5, 1.0, 2.0), 10.0),
}
RINGS = {1: ["big"], 2: ["big", "mid"], 3: ["big", "mid", "small"]}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def measure(engine_class, names: list[str], strategy: str, tokens: int, folder: Path) -> tuple[float, float, str]:
  """(TTFT s, decode tokens/s, ring) for one generation on a fresh ring of `names`."""
  ports = {n: free_port() for n in names}
  peers_file = folder / f"peers-{'-'.join(names)}-{strategy}.json"
  peers_file.write_text(
    json.dumps({"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": DEVICES[n].to_dict()} for n in names}})
  )
  nodes = []
  for n in names:
    node = Node(
      n, engine_class(), ManualDiscovery(n, peers_file, GRPCPeerHandle, poll_interval=0.2), DEVICES[n], MODEL, PlannerConfig(strategy), tokens, 300
    )
    node.server = GRPCServer(node, "127.0.0.1", ports[n])
    nodes.append(node)
  try:
    await asyncio.gather(*(node.start(wait_for_peers=len(names) - 1) for node in nodes))
    origin = nodes[0]
    prompt = await origin.engine.apply_chat_template(Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers), MESSAGES)
    await origin.generate(prompt, max_tokens=2)  # load every shard's weights before timing
    stamps = []
    started = time.perf_counter()
    generation = await origin.generate(prompt, max_tokens=tokens, on_token=lambda t: stamps.append(time.perf_counter()))
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    ring = " > ".join(f"{n}:{k}" for n, k in generation.plan.ring())
    return stamps[0] - started, decode, ring
  finally:
    for node in nodes:
      await node.stop()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--engines", default="tinygrad,mlx")
  args = parser.parse_args()
  console = Console(width=140)
  console.print(
    f"exo engine benchmark: {MODEL.id}, {args.tokens} tokens, median of {args.repeats}; Python {platform.python_version()}, {platform.machine()}"
  )
  table = Table(box=box.MARKDOWN)
  for column in ("engine", "nodes", "strategy", "ring (node:layers)", "TTFT ms", "decode tokens/s"):
    table.add_column(column)
  with tempfile.TemporaryDirectory() as folder:
    for engine in args.engines.split(","):
      for size, names in RINGS.items():
        for strategy in ("flops-latency", "ring-memory-weighted") if size > 1 else ("flops-latency",):
          runs = [asyncio.run(measure(ENGINES[engine], names, strategy, args.tokens, Path(folder))) for _ in range(args.repeats)]
          ttft, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
          table.add_row(engine, str(size), strategy if size > 1 else "-", runs[0][2], f"{ttft * 1000:.0f}", f"{decode:.1f}")
  console.print(table)


if __name__ == "__main__":
  main()
