"""Benchmark of the running ring: measured decode speed against the cost model's prediction, for both strategies, on a local
cluster that emulates a heterogeneous one.

Usage: python benchmarks/cluster.py [--tokens N] [--scenario FILE] [--model ID] [--objective latency|throughput]

One `exo` node process per scenario node (default: tests/scenarios/mac_trio_iphone_70b.json, the README's headline cluster: Mac
Studio M2 Ultra, MacBook Pro M3 Max, MacBook Air M2, iPhone 15 Pro, serving llama-3.1-70b), each declaring its device figures
(--memory-mb, --tflops, --memory-bandwidth) and paced to them (--emulate); every link with an RTT in the scenario runs through a
pair of LatencyProxy processes adding that round trip (the mean of the two directions, as the cost model takes it). Bandwidths
are not emulated (the activations are a few KB). An origin in this process, holding no layers, generates the same N tokens under
each strategy and timestamps each token as it arrives; decode speed counts tokens 2..n of each request over their time, so the
prompt (time to first token) is left out. The prediction is the plan's, computed by the origin on its live, measured topology.

Then the per-hop overhead of the runtime: the same nodes with no pacing and no injected delay, time per token / hops.
Everything runs on 127.0.0.1.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from exo.base.models import model_spec  # noqa: E402
from exo.base.shard import Shard  # noqa: E402
from exo.base.topology import Topology  # noqa: E402
from exo.inference.dummy_inference_engine import DummyInferenceEngine  # noqa: E402
from exo.orchestration.planner_driver import PlannerConfig  # noqa: E402
from exo.tools.local_cluster import CLIENT, Cluster, Device, edge_rtts  # noqa: E402
from exo.topology.plan_request import PlanRequest  # noqa: E402

DEFAULT_SCENARIO = ROOT / "tests" / "scenarios" / "mac_trio_iphone_70b.json"
DEFAULT_MODEL = "llama-3.1-70b"
STRATEGIES = ("ring-memory-weighted", "flops-latency")
ORIGIN = "bench"
SETTLE_S = 6.0  # refresh intervals for every RTT median (five samples) to hold only samples taken on warm channels
WARMUP_TOKENS = 4
LOOPBACK_FACTOR = 4  # the loopback rings generate this many times --tokens: their tokens take milliseconds


def load_scenario(path: Path) -> tuple[dict[str, Device], dict[tuple[str, str], float]]:
  """Devices by node id, and the round trip of every linked pair (u < v): the mean of the directed RTTs given."""
  topology = Topology.from_dict(json.loads(path.read_text()))
  devices = {n: Device(c.memory, c.flops.fp16, c.memory_bandwidth) for n, c in topology.nodes.items()}
  links = {}
  for u in sorted(devices):
    for v in sorted(devices):
      if u < v and topology.pair_rtt_ms(u, v) is not None:
        links[(u, v)] = topology.pair_rtt_ms(u, v)
  return devices, links


def ring_text(plan) -> str:
  return " -> ".join(f"{node_id} {s.start_layer}-{s.end_layer}" for node_id, s in plan.node_shards())


def start_cluster(workdir: Path, devices: dict[str, Device], links: dict, model_id: str, paced: bool) -> Cluster:
  cluster = Cluster(workdir)
  for node_id, device in devices.items():
    cluster.declare(node_id, device)
  cluster.declare(ORIGIN, CLIENT)
  for (u, v), rtt in links.items():
    cluster.delay(u, v, rtt)
  for node_id in devices:
    cluster.start(node_id, "--run-model", model_id, *(["--emulate"] if paced else []))
  cluster.wait_for_mesh()
  return cluster


async def generate_timed(origin, prompts: list[str], tokens: int) -> tuple[list[int], float, int, object]:
  """Generate `tokens` tokens over as many requests as EOS needs. Returns (tokens, decode seconds, decode tokens, last plan)."""
  out, decode_s, decode_n, plan = [], 0.0, 0, None
  for prompt in prompts:
    if len(out) >= tokens:
      break
    stamps: list[float] = []
    generation = await origin.generate(prompt, max_tokens=tokens - len(out), on_token=lambda _, stamps=stamps: stamps.append(time.perf_counter()))
    out += generation.tokens
    if len(stamps) >= 2:
      decode_s += stamps[-1] - stamps[0]
      decode_n += len(stamps) - 1
    plan = generation.plan
  return out, decode_s, decode_n, plan


async def measure(cluster: Cluster, model_id: str, objective: str, tokens: int, strategies, prompts) -> tuple[dict, dict]:
  """({strategy: (plan, tokens, measured tokens/s, predicted tokens/s)}, the origin's live topology) from an origin in this process."""
  origin = cluster.local_node(ORIGIN, "--run-model", model_id, "--request-timeout", "600")
  results = {}
  try:
    await origin.start(wait_for_peers=len(cluster.nodes))
    await asyncio.sleep(SETTLE_S)
    for strategy in strategies:
      origin.planner.config = PlannerConfig(PlanRequest.of(strategy, objective))
      origin.planner.current_plan = None  # plan afresh: hysteresis would keep the other strategy's ring
      await origin.generate("warm-up", max_tokens=WARMUP_TOKENS)  # channels, the dummy layers' weights, pacing locks
      out, decode_s, decode_n, plan = await generate_timed(origin, prompts, tokens)
      if ORIGIN in [n for n, _ in plan.ring()]:
        raise RuntimeError(f"the origin is in the {strategy} ring; it should hold no layers")
      results[strategy] = (plan, out, decode_n / decode_s, 1.0 / plan.prediction.tpot_s)
    topology = origin.planning_topology().to_dict()
  finally:
    await origin.stop()
  return results, topology


async def engine_ms_per_token(model, prompt: str, tokens: int) -> float:
  """The dummy engine's own time per decoded token with every layer in one shard (its layers built beforehand, as on a warm node)."""
  engine, shard = DummyInferenceEngine(), Shard(model.id, 0, model.n_layers - 1, model.n_layers)
  for request_id in ("warm-up", "timed"):
    out = await engine.infer_tensor(request_id, shard, (await engine.encode(shard, prompt))[None, :])
    position = out.shape[1]
    started = time.perf_counter()
    for _ in range(tokens):
      token = await engine.sample(out)
      out = await engine.infer_tensor(request_id, shard, np.array([[token]], dtype=np.int64), position)
      position += 1
  return (time.perf_counter() - started) * 1000 / tokens


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=64, help="tokens generated under each strategy (default 64)")
  parser.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO, help="topology JSON: nodes' devices, links' rtt_ms")
  parser.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in model (default {DEFAULT_MODEL})")
  parser.add_argument("--objective", default="latency", choices=("latency", "throughput"))
  args = parser.parse_args(argv)
  if args.tokens < 2:
    parser.error("--tokens must be at least 2 (decode speed is measured from the second token on)")
  model = model_spec(args.model)
  devices, links = load_scenario(args.scenario)
  prompts = [f"benchmark prompt {i}" for i in range(LOOPBACK_FACTOR * args.tokens)]  # each yields at least one token: enough for any N
  print(f"cluster benchmark: {args.scenario.name} ({len(devices)} nodes), {model.id}, objective {args.objective}, {args.tokens} tokens per strategy")

  with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
    cluster = start_cluster(Path(tmp) / "paced", devices, links, model.id, paced=True)
    try:
      results, topology = asyncio.run(measure(cluster, model.id, args.objective, args.tokens, STRATEGIES, prompts))
    finally:
      cluster.close()
    live = edge_rtts(topology)
    pairs = [
      f"{u}-{v} {statistics.mean(r for r in (live.get((u, v)), live.get((v, u))) if r is not None):.1f}/{rtt:g}" for (u, v), rtt in links.items()
    ]
    print(f"link RTT ms, measured/injected: {', '.join(pairs)}")
    for strategy in STRATEGIES:
      plan, _, measured, predicted = results[strategy]
      print(f"{strategy}: ring {ring_text(plan)}")
      print(
        f"  measured {measured:.2f} tokens/s ({1000 / measured:.1f} ms/token), predicted {predicted:.2f} tokens/s "
        f"({1000 / predicted:.1f} ms/token), measured/predicted {measured / predicted:.3f}"
      )
    tokens = {strategy: results[strategy][1] for strategy in STRATEGIES}
    if len({tuple(t) for t in tokens.values()}) != 1:
      print("warning: the strategies generated different tokens")

    # per-hop overhead: the 4-node ring against the same nodes' one-node ring (no hop), more tokens since each is short
    loopback = start_cluster(Path(tmp) / "loopback", devices, {}, model.id, paced=False)
    try:
      plain, _ = asyncio.run(measure(loopback, model.id, args.objective, LOOPBACK_FACTOR * args.tokens, STRATEGIES, prompts))
    finally:
      loopback.close()
    ring_plan, _, ring_tps, _ = plain["ring-memory-weighted"]
    _, _, solo_tps, _ = plain["flops-latency"]
    hops = len(ring_plan.ring())  # a ring of k >= 2 nodes has k hops, last to first included
    compute_ms = asyncio.run(engine_ms_per_token(model, prompts[0], args.tokens))
    ring_ms, solo_ms = 1000 / ring_tps, 1000 / solo_tps
    if hops < 2:
      print(f"loopback: the memory-weighted ring has one node, no hop to measure ({ring_ms:.2f} ms/token)")
    else:
      print(
        f"loopback, no pacing, no injected delay: ring of {hops} nodes: {ring_ms:.2f} ms/token / {hops} hops = {ring_ms / hops:.2f} ms per hop, "
        f"of which the dummy engine's compute {compute_ms / hops:.2f} ({compute_ms:.2f} ms/token): runtime overhead "
        f"{(ring_ms - compute_ms) / hops:.2f} ms per hop (one node, no hop: {solo_ms:.2f} ms/token)"
      )

  flops, weighted = results["flops-latency"], results["ring-memory-weighted"]
  print(f"flops-latency vs ring-memory-weighted: measured speed-up {flops[2] / weighted[2]:.2f}, predicted {flops[3] / weighted[3]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
