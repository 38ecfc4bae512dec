"""The OpenAI-compatible API against a real node (dummy engine, gRPC server on loopback), driven by the official `openai` client."""

import asyncio
import json

import openai
import pytest

from exo.api import ChatGPTAPI
from exo.base.models import MODELS, model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
from exo.topology.planner import predict_ring
from tests.support.served_api import CAPS, MAX_TOKENS, MESSAGES, PLAN_KEYS, SERVED, TINY, Served, get, reference, stream


@pytest.fixture(scope="module")
def served():
  served = Served()
  yield served
  served.close()


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
  served = Served(DummyInferenceEngine(eos_after=10**9), planner=PlannerConfig(PlanRequest.of(max_context=SHORT_CONTEXT)), max_generate_tokens=10**6)
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
  status, _, body = get(f"{served.base}/v1/models")
  fits = {m["id"]: m["fits"] for m in body["data"]}
  assert fits[SERVED] and not fits["llama-3.1-405b"]  # 16 GB hold a 1B model, not a 405B one
  assert all(m["max_tokens"] == MAX_TOKENS and m["present"] and not m["downloadable"] for m in body["data"])  # the dummy needs no files
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
  assert plan.pop("downloads") == []  # the dummy engine reads no model files
  assert plan.pop("assumes") == {"prompt_tokens": 128, "batch": 1}  # what the predicted TTFT and throughput are for
  assert status == 200 and set(plan) == PLAN_KEYS and plan == served.node.current_prediction().to_dict()  # on today's layer times
  assert {k: v for k, v in plan.items() if k != "predicted"} == {k: v for k, v in served.node.current_plan.to_dict().items() if k != "predicted"}
  assert load["active_requests"] == 0 and load["waiting_requests"] == 0 and load["max_batch"] == 1
  assert load["mean_batch"] == 1.0 and load["tokens_per_s"] > 0  # the request above: two tokens, in the last 10 s
  assert load["decode_steps"] == load["decode_calls"] >= 1  # --batch 1: one request's step per call
  assert plan["model"]["id"] == SERVED and plan["shards"] == [{"node_id": "api-node", "start_layer": 0, "end_layer": 15, "n_layers": 16}]
  assert plan["model"] == served.node.model.to_dict() and plan["model"]["embed_bytes"] > 0  # every figure the plan rests on
  assert plan["predicted"] and plan["context_tokens"] == 8192  # 16 GB hold the model's whole context (at most 8192 tokens)
  assert node_id == "api-node" and (last["model"], last["ring"], last["tokens"], last["outcome"]) == (SERVED, ["api-node"], 2, "length")
  prompt, _, _ = reference(MESSAGES)
  prompt_tokens = len(served.run(served.node.text.encode(served.node.model, prompt)))
  own = predict_ring(served.node.planning_topology(), served.node.model, served.node.planner_config.request, [("api-node", 16)], prompt_tokens)
  assert last["prompt_tokens"] == prompt_tokens and last["elapsed_s"] > 0  # measured, next to what the plan predicts for this prompt:
  assert last["predicted_s"] == pytest.approx(own.ttft_s + (2 - 1) * own.tpot_s)  # its TTFT for its own prompt, then one more token


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
    assert set(body) == PLAN_KEYS | {"assumes", "downloads", "load", "node_id", "last_request"} and body["model"]["id"] == model_id
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


def test_the_last_request_is_the_last_received_whatever_its_outcome():
  """A request whose ring fails is the node's last request, as failed with the reason; a finished one after it replaces it."""

  class FailsOnce(EngineWrapper):
    failed = False

    async def infer_batch(self, shard, steps):
      if not FailsOnce.failed:
        FailsOnce.failed = True
        raise RuntimeError("the engine broke")
      return await self.inner.infer_batch(shard, steps)

  served = Served(FailsOnce(DummyInferenceEngine()))
  try:
    with pytest.raises(openai.APIError):
      served.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3)
    last = get(f"{served.base}/v1/plan")[2]["last_request"]
    assert last["outcome"] == "failed" and "the engine broke" in last["error"] and last["tokens"] == 0
    served.client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=3)
    last = get(f"{served.base}/v1/plan")[2]["last_request"]
    assert (last["outcome"], last["error"], last["tokens"]) == ("length", "", 3)
  finally:
    served.close()
