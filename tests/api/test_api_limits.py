"""The API under load and at its limits: a client that leaves, a prompt beyond the context, more requests than the node takes."""

import json
import re
import threading
import urllib.error
import urllib.request

import openai
import pytest

from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from tests.support.patience import STALL_S
from tests.support.served_api import MESSAGES, SERVED, Served, get


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
