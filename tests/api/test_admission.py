"""Admission that finishes what it admits: a node takes only the requests its plan's predicted rate finishes within the request
timeout next to those it runs, and answers the rest 429 with Retry-After at once, so no admitted request times out (503)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.models import model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.orchestration.admission import drain_s
from exo.topology.cost_model import device_pacing
from tests.api.test_api_access import call
from tests.support.served_api import SERVED, Served

SLOW = DeviceCapabilities("Slow Box", "Slow Chip", 16384.0, DeviceFlops(1.0, 2.0, 4.0), 7.0)  # ~0.1 s per token of the served model
TIMEOUT_S = 10.0
TOKENS = 5
CLIENTS = 70  # the load: 70 requests at once to one node


def test_drain_time_is_the_prefills_then_the_tokens_at_the_saturated_rate_or_the_longest_answer_alone():
  assert drain_s([], 0.1, 20.0) == 0.0
  assert drain_s([(0.5, 10), (0.0, 20)], 0.1, 20.0) == pytest.approx(0.5 + 2.0)  # 20 tokens one after another: 2 s > 30 / 20
  assert drain_s([(0.25, 10), (0.25, 10), (0.0, 10), (0.0, 10)], 0.1, 20.0) == pytest.approx(0.5 + 2.0)  # 40 / 20 = 2 s > 10 x 0.1
  assert drain_s([(0.0, 100)], 0.05, 1000.0) == pytest.approx(5.0)


@pytest.fixture
def paced():
  engine = PacedInferenceEngine(DummyInferenceEngine(eos_after=10**9), device_pacing(model_spec(SERVED), SLOW))
  served = Served(engine, caps=SLOW, admit_by_rate=True, request_timeout=TIMEOUT_S, max_generate_tokens=100)
  yield served
  served.close()


def test_many_clients_at_once_get_200_or_an_early_429_with_retry_after_and_none_times_out(paced):
  prediction = paced.node.plan(model_spec(SERVED)).prediction
  assert 0.05 < prediction.tpot_s < 0.2  # the pacing and the prediction are one figure: about 0.1 s per token
  body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "Count."}], "max_tokens": TOKENS})
  answers, lock = [], threading.Lock()  # (status, headers, body) in the order they came back

  def ask(_):
    answer = call(paced, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with lock:
      answers.append(answer)

  with ThreadPoolExecutor(CLIENTS) as pool:
    list(pool.map(ask, range(CLIENTS)))
  statuses = [status for status, _, _ in answers]
  assert set(statuses) == {200, 429}, statuses  # no 503: nothing admitted timed out
  admitted = statuses.count(200)
  # The work admitted fits in 0.8 of the timeout at the predicted rate: at most 0.8 x 10 / 0.1 tokens' worth, more than one request
  assert 2 <= admitted <= 0.8 * TIMEOUT_S / (TOKENS * prediction.tpot_s)
  assert statuses.index(200) == CLIENTS - admitted  # every 429 came back before the first answer: refused at once, not after waiting
  for status, headers, raw in answers:
    if status == 200:
      assert json.loads(raw)["usage"]["completion_tokens"] == TOKENS  # each admitted request got all its tokens
    else:
      error = json.loads(raw)["error"]
      assert raw.count(b"\n") == 0 and error["type"] == "rate_limit_error" and "cannot take a request of up to 5 tokens" in error["message"]
      assert 1 <= int(headers["retry-after"]) <= TIMEOUT_S
  assert paced.node.load()["active_requests"] == 0
  assert call(paced, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})[0] == 200  # idle again: admitted
