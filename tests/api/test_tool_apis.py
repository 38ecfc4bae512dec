"""The APIs people's tools speak, driven by their official clients against one real node (SmolLM2 on the default engine): OpenAI's
completions and responses, Anthropic's messages and Ollama's chat and generate each answer the capital question with the greedy
text chat completions gives, streamed and not; stop sequences and token limits end answers as in chat; a client that goes away
stops its request; bad requests get each API's own error shape and status."""

import json
import time
import urllib.error
import urllib.request

import anthropic
import ollama
import openai
import pytest

from tests.support.node_process import exo_node
from tests.support.patience import HANG_S

MODEL = "smollm2-135m"
QUESTION = "Which city is the capital of France?"  # ggml answers it "Paris" (tests/test_exo_run.py)
TOKENS = 24
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
  """The node's base URL, once its API is up."""
  args = ["--node-id", "tools", "--discovery-module", "none", "--disable-tui", "--run-model", MODEL, "--max-generate-tokens", "64"]
  with exo_node(args, tmp_path_factory.mktemp("tools") / "node.log") as (_, url):
    yield url.rstrip("/")


@pytest.fixture(scope="module")
def chat(node):
  """The chat completion's greedy text for QUESTION, at most TOKENS tokens: what every API must give."""
  client = openai.OpenAI(base_url=f"{node}/v1", api_key="unused", max_retries=0, timeout=HANG_S)
  reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=TOKENS)
  client.close()
  assert "Paris" in reply.choices[0].message.content
  return reply.choices[0].message.content


def raw(node: str, path: str, body: dict | None = None) -> tuple[int, dict]:
  request = urllib.request.Request(f"{node}{path}", None if body is None else json.dumps(body).encode(), {"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=HANG_S) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def idle(node: str) -> bool:
  return raw(node, "/v1/plan")[1]["load"]["active_requests"] == 0


def test_openai_responses_and_completions(node, chat):
  client = openai.OpenAI(base_url=f"{node}/v1", api_key="unused", max_retries=0, timeout=HANG_S)
  response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=TOKENS)
  assert response.output_text == chat and response.usage.output_tokens >= 1 and response.status in ("completed", "incomplete")
  events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}], max_output_tokens=TOKENS, stream=True))
  assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == chat
  assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
  assert events[-1].response.output_text == chat

  done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
  assert "Paris" in done.choices[0].text and done.usage.completion_tokens <= 8
  streamed = "".join(
    c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, stream=True) if c.choices
  )
  assert streamed == done.choices[0].text
  cut = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2)
  assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
  with pytest.raises(openai.BadRequestError) as error:
    client.responses.create(model=MODEL, input=[])
  assert error.value.status_code == 400 and error.value.body["type"] == "invalid_request_error" and "'input'" in error.value.body["message"]
  client.close()


def test_anthropic_messages(node, chat):
  client = anthropic.Anthropic(base_url=node, api_key="unused", max_retries=0, timeout=HANG_S)
  message = client.messages.create(model=MODEL, max_tokens=TOKENS, messages=[{"role": "user", "content": QUESTION}])
  assert message.content[0].text == chat and message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens >= 1
  with client.messages.stream(model=MODEL, max_tokens=TOKENS, messages=[{"role": "user", "content": QUESTION}]) as stream:
    assert "".join(stream.text_stream) == chat
    assert stream.get_final_message().content[0].text == chat

  word = chat.split()[1]  # a stop sequence inside the answer: it ends before it, and says which
  stopped = client.messages.create(model=MODEL, max_tokens=TOKENS, messages=[{"role": "user", "content": QUESTION}], stop_sequences=[word])
  assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word) and chat.startswith(stopped.content[0].text)
  assert word not in stopped.content[0].text
  short = client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": QUESTION}])
  assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2

  with pytest.raises(anthropic.BadRequestError) as error:
    client.messages.create(model=MODEL, max_tokens=TOKENS, messages=[])
  assert error.value.status_code == 400 and error.value.body == {
    "type": "error",
    "error": {"type": "invalid_request_error", "message": error.value.body["error"]["message"]},
  }
  assert "'messages'" in error.value.body["error"]["message"]
  with pytest.raises(anthropic.NotFoundError):  # a repository this offline node does not have
    client.messages.create(model="nobody/no-such-model", max_tokens=TOKENS, messages=[{"role": "user", "content": QUESTION}])

  with client.messages.stream(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Count from one to a hundred."}]) as stream:
    next(iter(stream.text_stream))  # the first words, then the client goes away
  deadline = time.monotonic() + HANG_S
  while not idle(node):  # the node stops the request the client left
    assert time.monotonic() < deadline
    time.sleep(0.1)
  client.close()


def test_ollama_chat_generate_tags_and_show(node, chat):
  client = ollama.Client(host=node, timeout=HANG_S)
  options = {"num_predict": TOKENS}
  reply = client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=options)
  assert reply.message.content == chat and reply.done and reply.eval_count >= 1
  pieces = list(client.chat(model=f"{MODEL}:latest", messages=[{"role": "user", "content": QUESTION}], options=options, stream=True))
  assert "".join(p.message.content for p in pieces) == chat and pieces[-1].done and pieces[-1].done_reason in ("stop", "length")
  generated = client.generate(model=MODEL, prompt=QUESTION, options=options)
  assert generated.response == chat
  short = client.generate(model=MODEL, prompt=QUESTION, options={"num_predict": 2, "stop": ["\n"]})
  assert short.done_reason == "length" and short.eval_count == 2

  assert MODEL in [m.model for m in client.list().models]
  shown = client.show(MODEL)
  assert shown.modelinfo["llama.block_count"] == 30
  with pytest.raises(ollama.ResponseError) as error:
    client.chat(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
  assert error.value.status_code == 400 and "role" in error.value.error
  status, body = raw(node, "/api/show", {"model": "no-such-model"})
  assert status == 404 and set(body) == {"error"}
