"""The `exo` console script: wiring and argument handling only.

exo [flags]                         run a node (discovery, gRPC server, planner, engine, HTTP API and chat page) until interrupted
exo run MODEL --prompt TEXT [flags] run a node, wait for peers, stream one answer to stdout and exit
exo download MODEL                  fetch a model from the Hugging Face Hub (or the mirror HF_ENDPOINT names)
exo plan ...                        plan a topology file (see `exo plan --help`)
exo topology --address HOST:PORT    print a running node's live topology as topology JSON (input for `exo plan`)
exo model-spec PATH [--id ID]       print the model-spec JSON of a model file (input for `exo plan --model-spec`)

EXO_DEBUG (0 quiet, 1 what the node does, 2 everything; or upstream's DEBUG, which tinygrad must not see) sets what is logged on stderr.

A MODEL is a built-in id, a Hugging Face repo id (owner/name, or owner/name/FILE.gguf) or the path of a .gguf file or model
directory (exo.inference.model_sources).
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from exo.base.errors import BadInput, ExoError
from exo.base.models import MODELS
from exo.cli_args import gigabytes
from exo.inference.sampling import Sampling
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.membership import cluster_membership
from exo.node_flags import MODEL_HELP, add_cluster_flags, build_parser
from exo.node_setup import build_node, default_engine
from exo.orchestration.node import Node
from exo.orchestration.requests import RequestFailed

log = logging.getLogger("exo")


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
  print(f"loading {node.model.id} ...", file=sys.stderr, flush=True)  # the tokenizer now, the layers with the first token
  prompt = await node.text.apply_chat_template(node.model, [{"role": "user", "content": question}])
  updates: asyncio.Queue = asyncio.Queue()  # the tokens so far, at each new token; None once the generation is over
  task = asyncio.create_task(node.generate(prompt, sampling=sampling, on_token=updates.put_nowait))
  task.add_done_callback(lambda _: updates.put_nowait(None))
  shown = ""
  while (tokens := await updates.get()) is not None:
    while not updates.empty() and tokens is not None:  # behind: only the latest text matters
      tokens = updates.get_nowait()
    if tokens is None:
      break
    text = (await node.text.answer_text(node.model, tokens))[0].rstrip("\ufffd")
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
  parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
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
  print(ensure_model(args.model, formats=formats, progress=True, allow="any", command=True))  # the operator's own request: any repository
  return 0


DEBUG_ENV = "EXO_DEBUG"


def debug_setting(environ) -> tuple[str, str]:
  """(variable, value) of exo's log level: EXO_DEBUG, else upstream's DEBUG. DEBUG leaves `environ` either way: tinygrad reads
  it at import and prints its kernel log to stdout, into the answer of `exo run`."""
  upstream = environ.pop("DEBUG", None)
  if environ.get(DEBUG_ENV, "").strip():
    return DEBUG_ENV, environ[DEBUG_ENV]
  return ("DEBUG", upstream) if upstream is not None else (DEBUG_ENV, "0")


def log_level(debug: str, variable: str = DEBUG_ENV) -> int:
  """The logging level for EXO_DEBUG (or DEBUG): 0 warnings and errors, 1 also what the node does (peers found and dropped,
  requests sent), 2 and up everything."""
  try:
    level = int(debug or "0")
  except ValueError:
    raise BadInput(f"{variable} must be an integer (0 quiet, 1 what the node does, 2 everything), got {debug!r}") from None
  return logging.WARNING if level <= 0 else logging.INFO if level == 1 else logging.DEBUG


def main(argv: list[str] | None = None) -> int:
  variable, debug = debug_setting(os.environ)  # first: before anything imports tinygrad
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["plan"]:
    from exo import plan_cli

    return plan_cli.main(argv[1:])
  try:
    logging.basicConfig(level=log_level(debug, variable), format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
