"""A node and its OpenAI-compatible API on loopback for the API tests, and the requests they make of it."""

import asyncio
import json
import threading
import urllib.error
import urllib.request

import openai

from exo.api import ChatGPTAPI
from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from tests.support.greedy import greedy_tokens
from tests.support.patience import STALL_S

SERVED = "llama-3.2-1b"
CAPS = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
TINY = DeviceCapabilities("Tiny Box", "Tiny Chip", 512.0, DeviceFlops(1.0, 2.0, 4.0), 20.0)
MAX_TOKENS = 100  # the node's --max-generate-tokens: above the dummy's 20..60 tokens before EOS
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
PLAN_KEYS = {"strategy", "objective", "params", "model", "context_tokens", "partitions", "shards", "predicted", "warnings"}


class Served:
  """A node and its API on loopback (`api_options`: ChatGPTAPI's key and origins), run by an event loop in a background thread."""

  def __init__(self, engine=None, api_options: dict | None = None, caps: DeviceCapabilities = CAPS, **node_options):
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.thread.start()
    options = {"max_generate_tokens": MAX_TOKENS, "request_timeout": STALL_S, **node_options}
    self.node = Node("api-node", engine or DummyInferenceEngine(), NoDiscovery(), caps, model_spec(SERVED), **options)
    self.node.server = GRPCServer(self.node, "127.0.0.1", 0)
    self.api = ChatGPTAPI(self.node, "127.0.0.1", 0, **(api_options or {}))
    self.run(self.node.start())
    self.run(self.api.start())
    self.base = f"http://127.0.0.1:{self.api.port}"
    key = self.api.access.key or "unused"
    self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=STALL_S)

  def run(self, coroutine, timeout: float = STALL_S):
    return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

  def close(self):
    self.client.close()
    try:
      self.run(self.api.stop())
      self.run(self.node.stop())
    finally:
      self.loop.call_soon_threadsafe(self.loop.stop)
      self.thread.join(5)
      self.loop.close()


def reference(messages: list[dict], model_id: str = SERVED, max_tokens: int = MAX_TOKENS) -> tuple[str, list[int], str]:
  """(prompt, tokens, reply text) computed on a fresh engine holding every layer, greedy until EOS or max_tokens."""

  async def generate():
    engine, model = DummyInferenceEngine(), model_spec(model_id)
    shard = Shard(model.id, 0, model.n_layers - 1, model.n_layers)
    prompt = await engine.apply_chat_template(shard, messages)
    tokens = await greedy_tokens(engine, shard, await engine.encode(shard, prompt), max_tokens)
    text = await engine.decode(shard, [t for t in tokens if t not in engine.eos_token_ids(shard)])
    return prompt, tokens, text

  return asyncio.run(generate())


def get(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, dict]:
  """(status, headers, JSON body or {}) of one request; error statuses too."""
  request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=STALL_S) as response:
      status, headers, raw = response.status, dict(response.headers), response.read()
  except urllib.error.HTTPError as e:
    status, headers, raw = e.code, dict(e.headers), e.read()
  return status, headers, json.loads(raw) if raw else {}


def stream(served: Served, **kwargs) -> list:
  return list(served.client.chat.completions.create(stream=True, **kwargs))
