"""The `exo` command line's parser: the node's flags, shared by `exo` and `exo run`, grouped by what they set."""

import argparse

from exo.base.models import DEFAULT_MODEL, MODELS
from exo.cli_args import add_planner_flags, gigabytes, positive_int, seed, slowdown_factor, temperature, top_k, top_p
from exo.networking.membership import SECRET_ENV, stored_secret_path
from exo.node_setup import SMALL_MODEL, default_engine

__all__ = ["COMMANDS", "MODEL_HELP", "add_cluster_flags", "build_parser"]

COMMANDS = {  # the commands besides `run`, each parsed by its own parser (main); listed in `exo --help`
  "download": "fetch a model from the Hugging Face Hub or a mirror",
  "plan": "plan a topology file: who holds which layers, how fast",
  "topology": "print a running node's live topology as JSON",
  "model-spec": "print a model file's model-spec JSON (for `exo plan`)",
}
MODEL_HELP = (
  f"a built-in id ({', '.join(sorted(MODELS))}), a Hugging Face repo id (owner/name or owner/name/FILE.gguf) or the path of a .gguf "
  "file or model directory"
)


class NodeParser(argparse.ArgumentParser):
  """`exo`'s parser: `exo run` without --prompt (before or after `run`) is a usage error of `exo run`, shown with its usage."""

  run: argparse.ArgumentParser

  def parse_known_args(self, args=None, namespace=None):
    namespace, extras = super().parse_known_args(args, namespace)
    if namespace.command == "run" and extras:
      self.run.error(f"unrecognized arguments: {' '.join(extras)} (exo run --help lists its flags)")
    if namespace.command == "run" and namespace.prompt is None:
      self.run.error(f"--prompt TEXT is required, e.g. exo run {namespace.model_name} --prompt 'What is the capital of France?'")
    return namespace, extras


def build_parser() -> NodeParser:
  """`exo [node flags]` runs a node; `exo run MODEL` takes the same flags (after it); the other commands are listed only."""
  parser = NodeParser(
    prog="exo",
    usage="exo [flags]               run a node until interrupted\n       exo COMMAND [args]        (exo COMMAND --help)",
    description="Run one LLM across your devices, pipeline-parallel around a ring.",
  )
  commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=argparse.ArgumentParser)
  parser.run = run = commands.add_parser(
    "run",
    prog="exo run",  # else argparse makes it from the two-line usage above
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
  """Every flag of a node: how it joins the cluster, where its models come from, its engine, what it serves and how, its HTTP
  API, the sampling of `exo run`, its device and its planner."""
  node = parser.add_argument_group("node")
  for add in (add_network_flags, add_model_flags, add_engine_flags, add_serving_flags, add_api_flags):
    add(node)
  sampling = parser.add_argument_group("sampling (with --prompt; API requests carry their own)")
  sampling.add_argument("--temperature", type=temperature, default=0.0, help="0 (the default): greedy; higher: more varied")
  sampling.add_argument("--top-p", type=top_p, default=1.0, help="draw from the smallest set of likeliest tokens holding this mass")
  sampling.add_argument("--top-k", type=top_k, default=0, help="draw from the K likeliest tokens; 0: every token")
  sampling.add_argument("--seed", type=seed, default=None, help="the same seed gives the same answer (default: a fresh one each run)")
  device = parser.add_argument_group("device (detected; override when misdetected)")
  device.add_argument("--memory-mb", type=float, default=None, help="this device's memory in MB (default: detected)")
  device.add_argument("--tflops", type=float, default=None, help="this device's fp16 TFLOPS (default: the chip's, else measured)")
  device.add_argument(
    "--memory-bandwidth", type=float, default=None, help="this device's memory bandwidth in GB/s (default: the chip's, else measured)"
  )
  device.add_argument("--measure-device", action="store_true", help="measure TFLOPS and bandwidth even for a known chip")
  plan = parser.add_argument_group("planner")
  add_planner_flags(plan)
  plan.add_argument(
    "--ignore-layer-times", action="store_true", help="plan from the devices' TFLOPS and bandwidth alone, not the nodes' measured layer times"
  )
  plan.add_argument("--replan-threshold", type=float, default=0.1, help="re-plan for unchanged membership only if this much faster")
  show_defaults(parser)


def show_defaults(parser: argparse.ArgumentParser) -> None:
  """End each flag's help with its default where the help does not say it already: written out now, since `exo run` hides the
  defaults from argparse (build_parser). Switches (off unless given) and flags whose default is None say theirs in words."""
  for action in parser._actions:
    if action.option_strings and all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and "default" not in action.help:
      action.help = f"{action.help} (default: {str(action.default).replace('%', '%%')})"


def add_network_flags(node) -> None:
  """How the node is reached and finds its peers."""
  node.add_argument("--node-id", default=None, help="this node's id (default: a random one)")
  node.add_argument("--node-host", default="0.0.0.0", help="address the gRPC server binds")
  node.add_argument("--node-port", type=int, default=None, help="gRPC port (default: a free one)")
  node.add_argument("--listen-port", type=int, default=5678, help="UDP port discovery listens on")
  node.add_argument("--broadcast-port", type=int, default=5678, help="UDP port discovery announces to")
  node.add_argument("--broadcast-address", action="append", default=None, help="announce to this address (repeatable; default: every interface)")
  node.add_argument(
    "--discovery-module",
    choices=["udp", "manual", "none"],
    default=None,
    help="how peers are found: UDP broadcasts, a peers file (manual) or not at all (default: udp; `exo run` without --wait-for-peers: none)",
  )
  node.add_argument("--discovery-config-path", default=None, help="peers file for --discovery-module manual (no default: manual needs it)")
  node.add_argument("--discovery-timeout", type=float, default=30.0, help="seconds before a silent peer is dropped")
  add_cluster_flags(node)
  node.add_argument("--wait-for-peers", type=int, default=0, help="wait for this many peers before serving")
  node.add_argument("--wait-for-peers-timeout", type=float, default=120.0, metavar="S", help="give up waiting for peers after S seconds")


def add_model_flags(node) -> None:
  """Where the node's models are and what it may download."""
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


def add_engine_flags(node) -> None:
  """The engine that runs the layers, and the wrappers of benchmarks."""
  node.add_argument(
    "--inference-engine",
    choices=["ggml", "tinygrad", "mlx", "dummy"],
    default=None,
    help=f"the engine that runs the layers (default: {default_engine()} on this machine)",
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


def add_serving_flags(node) -> None:
  """What the node serves, and its limits."""
  node.add_argument(
    "--run-model",
    default=None,
    metavar="MODEL",
    help=f"model to serve: {MODEL_HELP} (default: {DEFAULT_MODEL} if its files are here, else {SMALL_MODEL})",
  )
  node.add_argument(
    "--prompt", default=None, help="prompt for `exo run` (or with --run-model: generate once and exit; default: serve until interrupted)"
  )
  node.add_argument(
    "--max-generate-tokens", type=positive_int, default=1024, metavar="N", help="the most tokens an answer has; API requests may ask for fewer"
  )
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


def add_api_flags(node) -> None:
  """The OpenAI-compatible HTTP API and who may call it."""
  node.add_argument("--chatgpt-api-port", type=int, default=52415, metavar="PORT", help="port of the OpenAI-compatible HTTP API; 0: a free one")
  node.add_argument(
    "--chatgpt-api-host", default="127.0.0.1", metavar="HOST", help="address the HTTP API binds; 0.0.0.0 (every interface) requires an API key"
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
    help="web origins (scheme://host[:port]) whose pages may call the HTTP API besides the node's own chat page (repeatable; default: none)",
  )


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
  secret.add_argument(
    "--cluster-secret-file", default=None, metavar="FILE", help="read the cluster's secret from FILE (default: as for --cluster-secret)"
  )
