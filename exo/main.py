"""The `exo` console script: wiring and argument handling only.

exo [flags]                         run a node (discovery, gRPC server, planner, engine, HTTP API and chat page) until interrupted
exo run MODEL --prompt TEXT [flags] run a node, wait for peers, generate one answer, print it and exit
exo plan ...                        plan a topology file (see `exo plan --help`)
exo topology --address HOST:PORT    print a running node's live topology as topology JSON (input for `exo plan`)
exo model-spec PATH [--id ID]       print the model-spec JSON of a model file (input for `exo plan --model-spec`)
"""

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import sys
import uuid

from exo.cli_args import positive_int, slowdown_factor
from exo.errors import BadInput, ExoError
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.inference_engine import InferenceEngine
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.inference.shard import Shard
from exo.inference.slowed_engine import SlowedEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.networking.udp_discovery import UDPDiscovery
from exo.orchestration.device_probe import detect_device_capabilities
from exo.orchestration.node import Node, PlannerConfig, RequestFailed
from exo.topology.cost_model import OBJECTIVES, PlannerParams
from exo.topology.models import DEFAULT_MODEL, MODELS, model_spec
from exo.topology.planner import STRATEGIES

log = logging.getLogger("exo")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="exo", description="Run one LLM across your devices, pipeline-parallel around a ring.")
  parser.add_argument("command", nargs="?", choices=["run"], help="run: generate one answer for --prompt and exit")
  parser.add_argument("model_name", nargs="?", help="model to run (with `run`)")
  node = parser.add_argument_group("node")
  node.add_argument("--node-id", default=None, help="this node's id (default: a random one)")
  node.add_argument("--node-host", default="0.0.0.0", help="address the gRPC server binds")
  node.add_argument("--node-port", type=int, default=None, help="gRPC port (default: a free one)")
  node.add_argument("--listen-port", type=int, default=5678, help="UDP port discovery listens on")
  node.add_argument("--broadcast-port", type=int, default=5678, help="UDP port discovery announces to")
  node.add_argument("--broadcast-address", action="append", default=None, help="announce to this address (repeatable; default: every interface)")
  node.add_argument(
    "--discovery-module", choices=["udp", "manual", "none"], default=None, help="default: udp; `exo run` without --wait-for-peers runs alone (none)"
  )
  node.add_argument("--discovery-config-path", default=None, help="peers file for --discovery-module manual")
  node.add_argument("--discovery-timeout", type=float, default=30.0, help="seconds before a silent peer is dropped")
  node.add_argument("--wait-for-peers", type=int, default=0, help="wait for this many peers before serving")
  node.add_argument("--inference-engine", choices=["tinygrad", "mlx", "dummy"], default=None, help=f"default: {default_engine()} on this machine")
  node.add_argument("--emulate", action="store_true", help="pace the engine to the cost model's time for this node's declared device")
  node.add_argument(
    "--engine-slowdown",
    type=slowdown_factor,
    default=1.0,
    metavar="FACTOR",
    help="make every engine step take FACTOR times as long, declared nowhere: for benchmarks of the planner's measurements",
  )
  node.add_argument("--run-model", default=None, help=f"model to serve (default {DEFAULT_MODEL}); one of {', '.join(sorted(MODELS))}")
  node.add_argument("--prompt", default=None, help="prompt for `exo run` (or with --run-model: generate once and exit)")
  node.add_argument("--max-generate-tokens", type=positive_int, default=1024)
  node.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take before it fails")
  node.add_argument("--max-requests", type=positive_int, default=64, help="requests this node takes at once from its clients; more get HTTP 429")
  node.add_argument("--show-plan", action="store_true", help="with --prompt: print the plan the request ran on (plan JSON, one line) on stderr")
  node.add_argument("--disable-tui", action="store_true", help="no terminal view of the ring")
  node.add_argument("--chatgpt-api-port", type=int, default=52415, help="port of the OpenAI-compatible HTTP API (0: a free one)")
  node.add_argument("--chatgpt-api-host", default="0.0.0.0", help="address the HTTP API binds")
  device = parser.add_argument_group("device (detected; override when misdetected)")
  device.add_argument("--memory-mb", type=float, default=None)
  device.add_argument("--tflops", type=float, default=None, help="fp16 TFLOPS")
  device.add_argument("--memory-bandwidth", type=float, default=None, help="GB/s")
  device.add_argument("--measure-device", action="store_true", help="measure TFLOPS and bandwidth even for a known chip")
  plan = parser.add_argument_group("planner")
  plan.add_argument("--partitioning-strategy", choices=STRATEGIES, default="flops-latency")
  plan.add_argument("--objective", choices=OBJECTIVES, default="latency")
  plan.add_argument("--memory-headroom", type=float, default=PlannerParams.memory_headroom)
  plan.add_argument("--default-rtt-ms", type=float, default=PlannerParams.default_rtt_ms)
  plan.add_argument(
    "--batch", type=positive_int, default=1, help="decode steps each stage runs as one engine call, and the throughput objective's batch"
  )
  plan.add_argument(
    "--ignore-layer-times", action="store_true", help="plan from the devices' TFLOPS and bandwidth alone, not the nodes' measured layer times"
  )
  plan.add_argument("--replan-threshold", type=float, default=0.1, help="re-plan for unchanged membership only if this much faster")
  return parser


def default_engine() -> str:
  """MLX on Apple Silicon, tinygrad everywhere else (as upstream)."""
  return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "tinygrad"


def make_engine(name: str) -> InferenceEngine:
  if name == "tinygrad":
    from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

    return TinygradInferenceEngine()
  if name == "mlx":
    from exo.inference.mlx_inference_engine import MLXInferenceEngine

    return MLXInferenceEngine()
  return DummyInferenceEngine()


def discovery_module(args) -> str:
  if args.discovery_module:
    return args.discovery_module
  return "none" if args.command == "run" and args.wait_for_peers == 0 else "udp"


def build_node(args) -> Node:
  node_id = args.node_id or str(uuid.uuid4())
  port = args.node_port or free_port()
  capabilities = detect_device_capabilities(args.measure_device, args.memory_mb, args.tflops, args.memory_bandwidth)
  engine_name = args.inference_engine or default_engine()
  model = model_spec(args.model_name or args.run_model or DEFAULT_MODEL)
  if engine_name != "dummy":  # a real engine serves the model's file: plan with the file's figures
    from exo.inference.model_figures import served_model_spec

    model = served_model_spec(model)
  engine = make_engine(engine_name)
  if args.emulate:
    engine = PacedInferenceEngine(engine, model, capabilities)
  if args.engine_slowdown != 1:
    engine = SlowedEngine(engine, args.engine_slowdown)
  module = discovery_module(args)
  if module == "none":
    discovery = NoDiscovery()
  elif module == "manual":
    if not args.discovery_config_path:
      raise BadInput("--discovery-module manual needs --discovery-config-path FILE (the peers file)")
    discovery = ManualDiscovery(node_id, args.discovery_config_path, GRPCPeerHandle, discovery_timeout=args.discovery_timeout)
  else:
    discovery = UDPDiscovery(
      node_id,
      port,
      args.listen_port,
      args.broadcast_port,
      GRPCPeerHandle,
      capabilities,
      discovery_timeout=args.discovery_timeout,
      broadcast_addresses=args.broadcast_address,
    )
  planner = PlannerConfig(
    args.partitioning_strategy, args.objective, args.memory_headroom, args.default_rtt_ms, args.replan_threshold, args.batch, args.ignore_layer_times
  )
  # A node measures its engine when the times stand for a device (a real engine, or one paced to the declared device), and when
  # it has peers to plan with or its plan is shown: the bare dummy engine's microseconds would override the declared devices of
  # a test cluster, and a lone `exo run` needs no plan but one.
  measure = (engine_name != "dummy" or args.emulate) and (module != "none" or args.show_plan)
  node = Node(
    node_id, engine, discovery, capabilities, model, planner, args.max_generate_tokens, args.request_timeout,
    measure_layer_times=measure, max_requests=args.max_requests,
  )  # fmt: skip
  node.server = GRPCServer(node, args.node_host, port)
  return node


async def serve(args) -> int:
  node = build_node(args)
  await node.start(args.wait_for_peers)
  log.info("node %s listening; %d peers", node.id, len(node.peers))
  api = None
  try:
    if args.prompt is not None:
      shard = Shard(node.model.id, 0, node.model.n_layers - 1, node.model.n_layers)
      prompt = await node.engine.apply_chat_template(shard, [{"role": "user", "content": args.prompt}])
      result = await node.generate(prompt)
      if args.show_plan:
        print(json.dumps(result.plan.to_dict()), file=sys.stderr)
      print(result.text)
      return 0
    from exo.api import ChatGPTAPI  # imported here: `exo run` answers without the HTTP server and its libraries

    api = ChatGPTAPI(node, args.chatgpt_api_host, args.chatgpt_api_port)
    await api.start()
    log.info("ChatGPT API at %sv1/chat/completions", api.page_url)
    print(f"Chat page: {api.page_url}", flush=True)  # before the terminal view takes over the screen, which repeats it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    view = None
    if not args.disable_tui:
      from exo.viz.ring_view import RingView

      view = RingView(node, page_url=api.page_url)
      view.start()
    await stop.wait()
    if view:
      view.stop()
    return 0
  finally:
    if api:
      await api.stop()
    await node.stop()
    node.engine.close()


async def dump_topology(address: str) -> int:
  peer = GRPCPeerHandle("cli", address, None)
  try:
    topology = await peer.collect_topology(set(), max_depth=1)
  finally:
    await peer.disconnect()
  print(json.dumps(topology.to_dict(), indent=2))
  return 0


def print_model_spec(argv: list[str]) -> int:
  """`exo model-spec PATH [--id ID]`: the model-spec JSON of a model file, with its real tensor sizes."""
  parser = argparse.ArgumentParser(prog="exo model-spec", description="Print the model-spec JSON of a model file, from its real tensor sizes.")
  parser.add_argument("path", metavar="PATH", help="the model file")
  parser.add_argument("--id", default=None, help="the spec's model id (default: the file's name without its extension)")
  args = parser.parse_args(argv)
  from exo.inference.model_figures import model_spec_from_file  # imported here: only this command needs it

  print(json.dumps(model_spec_from_file(args.path, args.id).to_dict(), indent=2))
  return 0


def log_level(debug: str) -> int:
  """The logging level for upstream's DEBUG environment variable: 0 warnings and errors, 1 also what the node does (peers
  found and dropped, requests sent), 2 and up everything."""
  try:
    level = int(debug or "0")
  except ValueError:
    raise BadInput(f"DEBUG must be an integer (0 quiet, 1 what the node does, 2 everything), got {debug!r}") from None
  return logging.WARNING if level <= 0 else logging.INFO if level == 1 else logging.DEBUG


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["plan"]:
    from exo import plan_cli

    return plan_cli.main(argv[1:])
  try:
    logging.basicConfig(level=log_level(os.environ.get("DEBUG", "0")), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv[:1] == ["topology"]:
      parser = argparse.ArgumentParser(prog="exo topology", description="Print a running node's live topology as topology JSON.")
      parser.add_argument("--address", required=True, help="host:port of any node's gRPC server")
      return asyncio.run(dump_topology(parser.parse_args(argv[1:]).address))
    if argv[:1] == ["model-spec"]:
      return print_model_spec(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.prompt is None:
      raise BadInput("`exo run MODEL` needs --prompt TEXT")
    return asyncio.run(serve(args))
  except ExoError as e:
    print(f"exo: error: {e}", file=sys.stderr)
    return e.exit_status
  except (RequestFailed, OSError) as e:
    print(f"exo: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
