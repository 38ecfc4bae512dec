"""Random clusters for benchmarks/planner.py, drawn from a seeded random.Random: real chips (exo/base/chips.py) with the memory
sizes they ship with, on a full mesh (random_cluster) or a network missing some links with RTTs by access regime
(sparse_cluster)."""

import math
import random

from exo.base.chips import CHIPS, chip_spec

HEADROOM = 0.1  # the strategy's default memory headroom, used to check that a drawn cluster can hold the model
RTT_MS = (0.5, 20.0)
RTT_REGIMES = {"lan": (0.1, 0.6), "wifi": (1.5, 6.0), "slow wifi": (8.0, 30.0)}  # ms of delay each end adds to a link's RTT
BANDWIDTHS_MBPS = (100, 1000, 10000)

# Memory sizes [GB] each chip ships with: Apple unified memory configurations, GPU VRAM. Chips missing here are not drawn.
MEMORY_GB = {
  "Apple M1": (8, 16),
  "Apple M1 Pro": (16, 32),
  "Apple M1 Max": (32, 64),
  "Apple M1 Ultra": (64, 128),
  "Apple M2": (8, 16, 24),
  "Apple M2 Pro": (16, 32),
  "Apple M2 Max": (32, 64, 96),
  "Apple M2 Ultra": (64, 128, 192),
  "Apple M3": (8, 16, 24),
  "Apple M3 Pro": (18, 36),
  "Apple M3 Max": (36, 48, 64, 96, 128),
  "Apple M3 Ultra": (96, 256),
  "Apple M4": (16, 24, 32),
  "Apple M4 Pro": (24, 48, 64),
  "Apple M4 Max": (36, 48, 64, 128),
  "Apple A15 Bionic": (6,),
  "Apple A16 Bionic": (6,),
  "Apple A17 Pro": (8,),
  "Apple A18": (8,),
  "Apple A18 Pro": (8,),
  "NVIDIA GeForce RTX 4090": (24,),
  "NVIDIA GeForce RTX 4080 SUPER": (16,),
  "NVIDIA GeForce RTX 4080": (16,),
  "NVIDIA GeForce RTX 4070 Ti SUPER": (16,),
  "NVIDIA GeForce RTX 4070 Ti": (12,),
  "NVIDIA GeForce RTX 4070 SUPER": (12,),
  "NVIDIA GeForce RTX 4070": (12,),
  "NVIDIA GeForce RTX 4060 Ti": (8, 16),
  "NVIDIA GeForce RTX 4060": (8,),
  "NVIDIA GeForce RTX 3090 Ti": (24,),
  "NVIDIA GeForce RTX 3090": (24,),
  "NVIDIA GeForce RTX 3080 Ti": (12,),
  "NVIDIA GeForce RTX 3080": (10,),
  "NVIDIA GeForce RTX 3070": (8,),
  "NVIDIA GeForce RTX 3060 Ti": (8,),
  "NVIDIA GeForce RTX 3060": (12,),
  "NVIDIA A100-PCIE-40GB": (40,),
  "NVIDIA A100-SXM4-40GB": (40,),
  "NVIDIA A100 80GB PCIe": (80,),
  "NVIDIA A100-SXM4-80GB": (80,),
  "NVIDIA H100 PCIe": (80,),
  "NVIDIA H100 80GB HBM3": (80,),
  "NVIDIA H200": (141,),
  "NVIDIA L40S": (48,),
  "NVIDIA A10": (24,),
  "NVIDIA L4": (24,),
  "Tesla T4": (16,),
  "NVIDIA T4": (16,),
  "NVIDIA Jetson AGX Orin": (32, 64),
  "AMD Radeon RX 7900 XTX": (24,),
  "AMD Radeon RX 7900 XT": (20,),
  "AMD Radeon RX 7800 XT": (16,),
  "AMD Radeon RX 6900 XT": (16,),
  "AMD Radeon RX 6800 XT": (16,),
  "AMD Radeon RX 6800": (16,),
  "AMD Instinct MI325X": (256,),
  "AMD Instinct MI300X": (192,),
  "AMD Instinct MI250X": (128,),
  "AMD Instinct MI250": (128,),
  "AMD Instinct MI210": (64,),
}
DRAWN_CHIPS = sorted(chip for chip in CHIPS if chip in MEMORY_GB)


def time_model(n: int) -> str:
  """A model that needs several nodes of an n-node cluster: 70B 4-bit (~41 GB) for small n, 405B beyond, bf16 (~807 GB) for hundreds."""
  return "llama-3.1-70b" if n <= 8 else "llama-3.1-405b" if n <= 16 else "llama-3.1-405b-bf16"


def layer_capacity(memory_mb: float, model, requests: int = 1) -> int:
  """Layers a node holds with KV for `requests` requests (the throughput objective keeps one per ring stage in flight)."""
  return math.floor(memory_mb * 2**20 * (1 - HEADROOM) / (model.layer_bytes + requests * model.kv_bytes_per_layer))


def chip_nodes(chips: list[str], memory: list[float]) -> dict:
  """Topology nodes n000, n001, ... with the given chips (their exo/base/chips.py figures) and memory [MB]."""
  nodes = {}
  for i, (chip, mem) in enumerate(zip(chips, memory)):
    spec = chip_spec(chip)
    flops = {"fp32": spec.flops.fp32, "fp16": spec.flops.fp16, "int8": spec.flops.int8}
    nodes[f"n{i:03d}"] = {"model": "bench", "chip": chip, "memory": mem, "flops": flops, "memory_bandwidth": spec.memory_bandwidth}
  return nodes


def random_cluster(rng: random.Random, n: int, model, with_bandwidth: bool) -> dict:
  """A topology dict of n random devices on a full mesh, redrawn until the model fits in the cluster but in no single node."""
  while True:
    chips = [rng.choice(DRAWN_CHIPS) for _ in range(n)]
    memory = [rng.choice(MEMORY_GB[chip]) * 1024 for chip in chips]
    caps = [layer_capacity(m, model, n) for m in memory]  # enough for the throughput objective's KV on a ring of every node
    per_layer = model.layer_bytes + n * model.kv_bytes_per_layer
    ends = math.ceil(model.embed_bytes / per_layer) + math.ceil(model.head_bytes / per_layer)  # the first and last stage hold these
    if sum(caps) >= model.n_layers + ends and max(layer_capacity(m, model) for m in memory) < model.n_layers:
      break
  nodes = chip_nodes(chips, memory)
  ids = list(nodes)
  edges = []
  for a in range(n):
    for b in range(a + 1, n):
      edge = {"from": ids[a], "to": ids[b], "rtt_ms": round(rng.uniform(*RTT_MS), 3)}
      if with_bandwidth:
        edge["bandwidth_mbps"] = rng.choice(BANDWIDTHS_MBPS)
      edges.append(edge)
  return {"nodes": nodes, "edges": edges}


def sparse_cluster(rng: random.Random, n: int, model, regime: str, with_bandwidth: bool = False) -> dict:
  """n uneven devices, each with 15% to 120% of the model's bytes, on a network missing some links (each pair joined with one
  probability per cluster, 0.5 to 0.9); a link's RTT is the sum of its two ends' access delays, drawn per node by `regime`,
  times a little jitter. Redrawn until the model fits the cluster."""
  model_mb = (model.n_layers * model.layer_bytes + model.embed_bytes + model.head_bytes) / 2**20
  while True:
    chips = [rng.choice(DRAWN_CHIPS) for _ in range(n)]
    memory = [round(model_mb * rng.uniform(0.15, 1.2)) for _ in range(n)]
    if sum(layer_capacity(m, model) for m in memory) >= model.n_layers + 2:
      break
  access = [rng.uniform(*RTT_REGIMES[regime if regime != "mixed" else rng.choice(("lan", "wifi", "slow wifi"))]) for _ in range(n)]
  nodes = chip_nodes(chips, memory)
  ids, density, edges = list(nodes), rng.uniform(0.5, 0.9), []
  for a in range(n):
    for b in range(a + 1, n):
      if rng.random() < density:
        edge = {"from": ids[a], "to": ids[b], "rtt_ms": round((access[a] + access[b]) * rng.uniform(0.9, 1.2), 3)}
        if with_bandwidth:
          edge["bandwidth_mbps"] = rng.choice(BANDWIDTHS_MBPS)
        edges.append(edge)
  return {"nodes": nodes, "edges": edges}
