"""Two real SmolLM2 nodes (tinygrad) of 160 MB each, on loopback: SmolLM2's KV cache for its whole 8192-token context (360 MB)
does not fit beside its weights, so the cluster plans a shorter context (docs/DESIGN.md v2.1), serves the model in it, says so
in /v1/plan, and refuses a request beyond it with 400.

The expected context is worked out by hand from the model file's figures (tests/support/planned_context.py): with 10% headroom
each node has 151.0e6 bytes, less the 31.9e6-byte embedding (first) or head (last), for 15 layers of 2.2e6 bytes plus their KV
at C tokens (12.6e6 bytes a layer at 8192): 15 layers each fit up to C = 3728, so C = 3584, the largest multiple of 256 below.
"""

import json
import urllib.error
import urllib.request

import pytest

from exo.inference.model_figures import model_spec_from_file
from exo.inference.model_files import locate_model
from tests.cluster.harness import Cluster, Device
from tests.support.planned_context import largest_context

pytestmark = pytest.mark.slow  # about 50 s: two real engines load, measure their layers and compile for the planned context

MODEL = "smollm2-135m"
NODES = {"a": Device(160, 1, 20), "b": Device(160, 1, 20)}  # --memory-mb 160 each
TINYGRAD = ("--inference-engine", "tinygrad", "--run-model", MODEL, "--request-timeout", "300")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
START_TIMEOUT_S = 300.0  # two engines loading and measuring their layers on 2 busy cores


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """The two nodes, meshed, and the address of a's HTTP API."""
  cluster = Cluster(tmp_path_factory.mktemp("planned-context"))
  try:
    for node_id, device in NODES.items():
      cluster.declare(node_id, device, engine=TINYGRAD, api=node_id == "a")
    for node_id in NODES:
      cluster.start(node_id)
    cluster.wait_for_mesh(timeout=START_TIMEOUT_S)
    base = f"http://127.0.0.1:{cluster.api_ports['a']}"
    cluster.wait_for(lambda: call(f"{base}/healthcheck")[0] == 200, "a's HTTP API", START_TIMEOUT_S, retry_on=(OSError,))
    yield cluster, base
  finally:
    cluster.close()


def call(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
  """(status, JSON body) of a GET, or of a POST of `body`; error statuses too."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def expected_context() -> int:
  context = largest_context(model_spec_from_file(locate_model(MODEL), MODEL), [d.memory_mb for d in NODES.values()])
  assert context == 3584  # as the module's docstring works it out
  return context


def test_two_160_mb_nodes_serve_smollm2_in_a_planned_context(pair, expected_context):
  cluster, base = pair
  status, reply = call(f"{base}/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 24}, timeout=360)
  assert status == 200, f"{reply}\n{cluster.logs()}"
  assert "Paris" in reply["choices"][0]["message"]["content"]
  status, plan = call(f"{base}/v1/plan")
  assert status == 200 and plan["context_tokens"] == expected_context
  assert sorted(s["node_id"] for s in plan["shards"]) == ["a", "b"]  # neither holds the model alone
  assert f"with a context of 8192 tokens: planned for {expected_context} tokens, the most it holds" in " ".join(plan["warnings"])


def test_a_request_beyond_the_planned_context_gets_400_naming_it(pair, expected_context):
  _, base = pair
  status, error = call(f"{base}/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": expected_context})
  message = error["error"]["message"]
  assert status == 400 and f"max_tokens is {expected_context}" in message
  assert f"beyond the planned context of {expected_context} tokens" in message
