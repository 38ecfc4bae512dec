"""The real thing, as a user runs it: `exo run` answers with SmolLM2 offline, and a node's API answers the official openai client."""

import os
import subprocess
import sys

import openai
import pytest

from tests.support.node_process import exo_node
from tests.support.patience import HANG_S

QUESTION = "What is the capital of France?"
# ggml computes as llama.cpp does, with 8-bit activations, and then answers QUESTION as llama.cpp does on the same file:
# "L'Étoile, ..." (the float32 engines' two likeliest first tokens are 0.08 apart; README "Ask a model"). It answers this one
# "Paris", as the float32 engines do.
GGML_QUESTION = "Which city is the capital of France?"
QUESTIONS = {"ggml": GGML_QUESTION, "tinygrad": QUESTION, "mlx": QUESTION}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(QUESTIONS))
def test_exo_run_answers_offline_and_its_debug_log_goes_to_stderr(engine):
  """With DEBUG=2, exo's level 2 log goes to stderr and stdout holds the answer only: tinygrad reads the same variable and would
  print its kernel log (hundreds of lines) to stdout, into the answer ("The capital of Francejit execs ..."), so exo takes it out
  of the environment before tinygrad is imported."""
  env = {name: value for name, value in os.environ.items() if name not in ("DEBUG", "EXO_DEBUG")}
  result = subprocess.run(
    [sys.executable, "-m", "exo.main", "run", "smollm2-135m", "--prompt", QUESTIONS[engine], "--inference-engine", engine],
    capture_output=True,
    text=True,
    timeout=HANG_S,
    env={**env, "DEBUG": "2"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Paris" in result.stdout and len(result.stdout.strip().splitlines()) == 1, result.stdout[:2000]  # the answer, one line
  assert " exo.networking.grpc.grpc_server INFO node " in result.stderr and " DEBUG " in result.stderr  # exo's own log, level 2


@pytest.mark.slow
def test_exo_run_samples_as_its_flags_say():
  """A seed gives the same answer twice, another seed another one, and temperature 0 is the greedy answer. On MLX, whose start
  is the shorter (about 13 s a run here against tinygrad's 27 s): both engines sample through ShardedEngine.sample."""

  def answer(*flags: str) -> str:
    command = [sys.executable, "-m", "exo.main", "run", "smollm2-135m", "--prompt", "Write one sentence about the sea.", "--inference-engine", "mlx"]
    result = subprocess.run([*command, "--max-generate-tokens", "24", *flags], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

  seeded = answer("--temperature", "0.8", "--seed", "1")
  assert seeded and answer("--temperature", "0.8", "--seed", "1") == seeded
  assert answer("--temperature", "0.8", "--seed", "2") != seeded
  greedy = answer()
  assert answer("--temperature", "0") == greedy != seeded


@pytest.fixture
def api_node(tmp_path):
  """A node serving the API; yielded once it prints its chat page's address, which it does once the API is up."""
  args = ["--node-id", "api", "--discovery-module", "none", "--disable-tui", "--run-model", "smollm2-135m", "--max-generate-tokens", "40"]
  with exo_node(args, tmp_path / "node.log") as (_, url):
    client = openai.OpenAI(base_url=f"{url}v1", api_key="unused", max_retries=0, timeout=HANG_S)
    yield client
    client.close()


@pytest.mark.slow
def test_api_answers_the_openai_client_streamed_and_not(api_node):
  messages = [{"role": "user", "content": GGML_QUESTION}]  # the node runs the default engine: ggml on a machine without a GPU
  reply = api_node.chat.completions.create(model="smollm2-135m", messages=messages)
  content = reply.choices[0].message.content
  assert "Paris" in content and reply.choices[0].finish_reason == "stop"
  stream = api_node.chat.completions.create(model="smollm2-135m", messages=messages, stream=True)
  streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
  assert streamed == content
