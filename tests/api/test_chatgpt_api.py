"""The OpenAI-compatible API against a real node (dummy engine, gRPC server on loopback), driven by the official `openai` client."""

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request

import openai
import pytest

from exo.api import ChatGPTAPI
from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import MODELS, model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
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


@pytest.fixture(scope="module")
def served():
  served = Served()
  yield served
  served.close()


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


# Chat completions.


def test_completion_is_what_the_ring_generates(served):
  prompt, tokens, text = reference(MESSAGES)
  response = served.client.chat.completions.create(model=SERVED, messages=MESSAGES)
  assert tokens[-1] == 2 and 20 <= len(tokens) <= 61  # the dummy stops on EOS after 20..60 tokens
  assert response.object == "chat.completion" and response.model == SERVED and response.id.startswith("chatcmpl-")
  choice = response.choices[0]
  assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, "stop")
  assert text and served.run(served.node.generate(prompt)).text == text
  assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt.encode()), len(tokens))
  assert response.usage.total_tokens == len(prompt.encode()) + len(tokens)


def test_streamed_deltas_add_up_to_the_completion(served):
  whole = served.client.chat.completions.create(model=SERVED, messages=MESSAGES).choices[0].message.content
  chunks = stream(served, model=SERVED, messages=MESSAGES, stream_options={"include_usage": True})
  deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
  assert "".join(deltas) == whole
  assert sum(1 for d in deltas if d) > 1  # sent as it was generated, not in one piece
  assert all(c.object == "chat.completion.chunk" and c.model == SERVED for c in chunks)
  assert len({c.id for c in chunks}) == 1
  reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
  assert reasons[-1] == "stop" and not any(reasons[:-1])
  _, tokens, _ = reference(MESSAGES)
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_max_tokens_cuts_the_reply_with_finish_reason_length(served):
  _, tokens, text = reference(MESSAGES, max_tokens=5)
  response = served.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=5, temperature=0)
  assert (response.choices[0].message.content, response.choices[0].finish_reason) == (text, "length")
  assert response.usage.completion_tokens == 5 == len(tokens)
  chunks = stream(served, model=SERVED, messages=MESSAGES, max_tokens=5)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason == "length"


def test_another_built_in_model_is_planned_for_that_model(served):
  messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
  _, _, text = reference([{"role": "user", "content": "Hello there"}], "smollm2-135m")
  response = served.client.chat.completions.create(model="smollm2-135m", messages=messages)
  assert (response.model, response.choices[0].message.content) == ("smollm2-135m", text)
  assert text != reference([{"role": "user", "content": "Hello there"}])[2]  # a different layer count gives a different reply
  assert served.node.last_generation.plan.model.id == "smollm2-135m"


def test_unknown_model_is_a_bad_request_naming_it(served):
  for create in (served.client.chat.completions.create, lambda **kw: list(served.client.chat.completions.create(stream=True, **kw))):
    with pytest.raises(openai.BadRequestError) as error:
      create(model="gpt-5-turbo", messages=MESSAGES)
    assert error.value.status_code == 400 and "'gpt-5-turbo'" in error.value.message and SERVED in error.value.message
    assert error.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
  "body, names",
  [
    (b"not json", "JSON object"),
    (json.dumps({"model": SERVED}).encode(), "'messages'"),
    (json.dumps({"model": SERVED, "messages": [{"content": "hi"}]}).encode(), "messages[0]"),
    (json.dumps({"model": SERVED, "messages": MESSAGES, "max_tokens": 0}).encode(), "'max_tokens'"),
    (json.dumps({"model": SERVED, "messages": MESSAGES, "stream": "yes"}).encode(), "'stream'"),
    *(
      (json.dumps({"model": SERVED, "messages": MESSAGES, key: value}).encode(), f"'{key}' must be")
      for key, value in [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "lucky"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ""),
        ("stop", ["ok", 3]),
      ]
    ),
    (b'{"model": "llama-3.2-1b", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "'temperature' must be"),
  ],
)
def test_malformed_requests_are_rejected_with_400(served, body, names):
  status, _, error = get(f"{served.base}/v1/chat/completions", "POST", body)
  assert status == 400 and names in error["error"]["message"] and error["error"]["type"] == "invalid_request_error"
  if names.startswith("'") and " must be" in names:
    assert error["error"]["param"] == names.split("'")[1]


def test_a_seed_fixes_the_sampled_reply_and_temperature_0_is_the_greedy_one(served):
  def reply(**sampling) -> str:
    return served.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=30, **sampling).choices[0].message.content

  greedy = reply()
  assert reply(temperature=0) == greedy == reply(temperature=0, top_p=0.5, seed=3)
  seeded = reply(temperature=1.0, top_p=0.95, seed=11)
  assert seeded == reply(temperature=1.0, top_p=0.95, seed=11) != greedy
  assert reply(temperature=1.0, top_p=0.95, seed=12) != seeded
  assert reply(temperature=1.5, seed=11, extra_body={"top_k": 1}) == greedy  # top_k 1 keeps the likeliest token alone


def test_a_stop_string_cuts_the_reply_streamed_and_not(served):
  _, tokens, text = reference(MESSAGES)
  stop = text[10:13]
  cut = text[: text.index(stop)]
  response = served.client.chat.completions.create(model=SERVED, messages=MESSAGES, stop=["never there", stop])
  assert (response.choices[0].message.content, response.choices[0].finish_reason) == (cut, "stop")
  assert response.usage.completion_tokens < len(tokens)  # the ring stopped there
  chunks = stream(served, model=SERVED, messages=MESSAGES, stop=stop)
  deltas = [c.choices[0].delta.content or "" for c in chunks]
  assert "".join(deltas) == cut and chunks[-1].choices[0].finish_reason == "stop"
  assert sum(1 for d in deltas if d) > 1  # streamed as it came, up to the stop string
  # A stop string that the reply's end begins but never completes: the end, held back while it might, is sent once it cannot.
  pending = text[-2:] + "\x01"
  chunks = stream(served, model=SERVED, messages=MESSAGES, stop=pending)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text and chunks[-1].choices[0].finish_reason == "stop"


def test_a_model_the_cluster_cannot_hold_fails_with_503_or_an_error_chunk(served):
  with pytest.raises(openai.InternalServerError) as error:
    served.client.chat.completions.create(model="llama-3.1-405b", messages=MESSAGES)
  assert error.value.status_code == 503 and "llama-3.1-405b" in error.value.message
  with pytest.raises(openai.APIError) as error:
    stream(served, model="llama-3.1-405b", messages=MESSAGES)
  assert "llama-3.1-405b" in error.value.message
  status, _, body = get(f"{served.base}/v1/chat/completions", "POST", json.dumps({"model": "llama-3.1-405b", "messages": MESSAGES}).encode())
  assert status == 503 and body["error"]["type"] == "service_unavailable"


# The planned context.

SHORT_CONTEXT = 300  # --max-context of the `short` node: the context its plan reserves KV for


@pytest.fixture(scope="module")
def short():
  """A node planned for SHORT_CONTEXT tokens whose dummy engine never ends an answer, with no --max-generate-tokens to speak of."""
  served = Served(DummyInferenceEngine(eos_after=10**9), planner=PlannerConfig(max_context=SHORT_CONTEXT), max_generate_tokens=10**6)
  yield served
  served.close()


def dummy_prompt_tokens(messages: list[dict]) -> int:
  """Tokens of the dummy engine's prompt for `messages`: a byte each, of "role: content" lines and the assistant cue."""
  return len(("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ").encode())


def test_a_prompt_and_max_tokens_beyond_the_planned_context_get_400_naming_both(short):
  prompt = dummy_prompt_tokens(MESSAGES)
  over = SHORT_CONTEXT - prompt + 1
  expected = (
    f"the prompt is {prompt} tokens and max_tokens is {over}: {SHORT_CONTEXT + 1} tokens, beyond the planned context of "
    f"{SHORT_CONTEXT} tokens; ask for at most {SHORT_CONTEXT - prompt}"
  )
  for key in ("max_tokens", "max_completion_tokens"):
    status, _, body = get(f"{short.base}/v1/chat/completions", "POST", json.dumps({"model": SERVED, "messages": MESSAGES, key: over}).encode())
    assert status == 400 and body["error"]["message"] == expected
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == ("invalid_request_error", "messages", "context_length_exceeded")
  with pytest.raises(openai.BadRequestError, match="beyond the planned context of 300 tokens"):  # refused before anything streams
    stream(short, model=SERVED, messages=MESSAGES, max_tokens=over)
  assert short.node.last_generation is None or short.node.last_generation.plan.context_tokens == SHORT_CONTEXT


def test_an_answer_fills_at_most_what_the_planned_context_leaves(short):
  left = SHORT_CONTEXT - dummy_prompt_tokens(MESSAGES)
  fits = short.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=left)
  unasked = short.client.chat.completions.create(model=SERVED, messages=MESSAGES)  # no max_tokens: the context's room, no more
  for response in (fits, unasked):
    assert (response.usage.completion_tokens, response.choices[0].finish_reason) == (left, "length")
    assert response.usage.total_tokens == SHORT_CONTEXT
  status, _, plan = get(f"{short.base}/v1/plan")
  assert status == 200 and plan["context_tokens"] == SHORT_CONTEXT and short.node.last_generation.plan.context_tokens == SHORT_CONTEXT


# Models, topology, plan, health, CORS.


def test_models_list_the_served_model_first(served):
  ids = [m.id for m in served.client.models.list()]
  assert ids[0] == SERVED and sorted(ids) == sorted(MODELS)
  assert served.client.models.retrieve("llama-3.1-70b").id == "llama-3.1-70b"
  with pytest.raises(openai.NotFoundError):
    served.client.models.retrieve("gpt-5-turbo")


def test_topology_is_the_nodes_live_view(served):
  status, _, topology = get(f"{served.base}/v1/topology")
  assert status == 200 and topology == served.node.topology.to_dict()
  assert set(topology) == {"nodes", "edges"} and topology["nodes"]["api-node"]["memory"] == CAPS.memory


def test_plan_is_the_current_plan_with_predictions(served):
  served.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)  # a prompt and one decode step
  status, _, plan = get(f"{served.base}/v1/plan")
  load, node_id, last = plan.pop("load"), plan.pop("node_id"), plan.pop("last_request")
  assert status == 200 and set(plan) == PLAN_KEYS and plan == served.node.current_prediction().to_dict()  # on today's layer times
  assert {k: v for k, v in plan.items() if k != "predicted"} == {k: v for k, v in served.node.current_plan.to_dict().items() if k != "predicted"}
  assert load["active_requests"] == 0 and load["waiting_requests"] == 0 and load["max_batch"] == 1
  assert load["mean_batch"] == 1.0 and load["tokens_per_s"] > 0  # the request above: two tokens, in the last 10 s
  assert load["decode_steps"] == load["decode_calls"] >= 1  # --batch 1: one request's step per call
  assert plan["model"]["id"] == SERVED and plan["shards"] == [{"node_id": "api-node", "start_layer": 0, "end_layer": 15, "n_layers": 16}]
  assert plan["model"] == served.node.model.to_dict() and plan["model"]["embed_bytes"] > 0  # every figure the plan rests on
  assert plan["predicted"] and plan["context_tokens"] == 8192  # 16 GB hold the model's whole context (at most 8192 tokens)
  assert node_id == "api-node" and (last["model"], last["ring"], last["tokens"]) == (SERVED, ["api-node"], 2)  # the request above
  assert last["elapsed_s"] > 0 and set(last["predicted"]) == set(plan["predicted"])  # measured, next to the plan's prediction


@pytest.mark.parametrize("caps, model_id, status", [(CAPS, SERVED, 200), (TINY, "llama-3.1-70b", 503)])
def test_plan_before_any_request_is_computed_or_503(caps, model_id, status):
  node = Node("fresh", DummyInferenceEngine(), NoDiscovery(), caps, model_spec(model_id))

  async def main():
    api = ChatGPTAPI(node, "127.0.0.1", 0)
    await api.start()
    try:
      return await asyncio.to_thread(get, f"http://127.0.0.1:{api.port}/v1/plan")
    finally:
      await api.stop()

  got, _, body = asyncio.run(main())
  assert got == status
  if status == 200:
    assert set(body) == PLAN_KEYS | {"load", "node_id", "last_request"} and body["model"]["id"] == model_id
    assert (body["node_id"], body["last_request"]) == ("fresh", None)
    assert node.current_plan is None  # reading the plan adopted nothing
  else:
    assert body["error"]["type"] == "service_unavailable" and "does not fit" in body["error"]["message"]


def test_healthcheck_and_no_cors_without_listed_origins(served):
  status, headers, body = get(f"{served.base}/healthcheck")
  assert (status, body) == (200, {"status": "ok"}) and "Access-Control-Allow-Origin" not in headers
  status, headers, _ = get(f"{served.base}/v1/chat/completions", "OPTIONS")
  assert status == 204 and not any(h.startswith("Access-Control-") for h in headers)  # no page of another origin may call it


def test_a_port_in_use_is_an_oserror_naming_it(served):
  api = ChatGPTAPI(served.node, "127.0.0.1", served.api.port)
  with pytest.raises(OSError, match=f"127.0.0.1:{served.api.port}"):
    served.run(api.start())


# Many clients at once.


class Counted(EngineWrapper):
  """Counts the steps run per request; never ends a generation (no EOS); a context of CONTEXT positions. Notes the requests its
  node tells it are over (`finished`), notifying `finishing` (for a test's thread) at each."""

  def __init__(self):
    super().__init__(DummyInferenceEngine(eos_after=10**9))
    self.steps: dict[str, int] = {}
    self.finished: set[str] = set()
    self.finishing = threading.Condition()

  async def infer_batch(self, shard, steps):
    for step in steps:
      self.steps[step.request_id] = self.steps.get(step.request_id, 0) + 1
    return await self.inner.infer_batch(shard, steps)

  async def finish_request(self, request_id):
    await self.inner.finish_request(request_id)
    with self.finishing:
      self.finished.add(request_id)
      self.finishing.notify_all()

  async def context_length(self, shard):
    return CONTEXT


CONTEXT = 400


@pytest.fixture
def endless():
  served = Served(Counted(), max_generate_tokens=10**6, max_requests=2, request_timeout=STALL_S)
  yield served
  served.close()


def open_stream(served: Served, content: str = "Go on forever."):
  """A streamed chat completion, opened; the caller reads it and closes it."""
  body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": content}], "stream": True}).encode()
  request = urllib.request.Request(f"{served.base}/v1/chat/completions", data=body, method="POST", headers={"Content-Type": "application/json"})
  return urllib.request.urlopen(request, timeout=STALL_S)


def read_chunks(response, n: int) -> None:
  while n > 0:
    if response.readline().startswith(b"data: "):
      n -= 1


def test_a_client_that_disconnects_leaves_the_node_idle_within_a_step(endless):
  response = open_stream(endless)
  read_chunks(response, 5)
  [request_id] = endless.node.originated_request_ids()
  response.close()
  engine = endless.node.engine
  with engine.finishing:  # the server notices the closed connection and cancels the generation, which the node ends
    ended = engine.finishing.wait_for(lambda: request_id in engine.finished and not endless.node.originated_request_ids(), STALL_S)
  assert ended, "the generation went on after its client left"
  at_end = endless.node.engine.steps[request_id]
  assert len(endless.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=10).choices[0].message.content) > 0
  assert endless.node.engine.steps[request_id] <= at_end + 1  # 10 steps of another request later: at most the one running
  assert endless.node.scheduler.waiting_requests() == 0 and endless.node.engine.inner.active_requests() == set()


def test_a_prompt_longer_than_the_context_is_refused_at_once_with_400(endless):
  status, _, body = get(
    f"{endless.base}/v1/chat/completions", "POST", json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "x" * 500}]}).encode()
  )
  assert status == 400 and body["error"]["type"] == "invalid_request_error"
  message = body["error"]["message"]
  assert re.fullmatch(
    r"the prompt is \d+ tokens, beyond llama-3.2-1b's context of 400 tokens \(the answer included\): a prompt may have at most 399", message
  )
  assert endless.node.engine.steps == {}  # nothing ran


def test_beyond_its_request_limit_a_node_answers_429(endless):
  streams = [open_stream(endless, f"client {i}") for i in range(2)]
  try:
    for response in streams:
      read_chunks(response, 2)
    with pytest.raises(openai.RateLimitError, match=r"already runs 2 requests, its limit \(--max-requests\)"):
      endless.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3)
  finally:
    for response in streams:
      response.close()
