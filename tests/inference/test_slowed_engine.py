"""--engine-slowdown's wrapper: the inner engine's outputs, and a sleep of (factor - 1) x each call's own time after it."""

import asyncio

import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference import slowed_engine
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.slowed_engine import SlowedEngine

WHOLE = Shard("m", 0, 9, 10)


class Clock:
  """perf_counter for the wrapper: each reading is `step` seconds after the previous one."""

  def __init__(self, step: float):
    self.now, self.step = 0.0, step

  def perf_counter(self) -> float:
    self.now += self.step
    return self.now


def test_sleeps_factor_minus_one_times_the_inner_call(monkeypatch):
  slept = []

  async def fake_sleep(seconds):
    slept.append(seconds)

  monkeypatch.setattr(slowed_engine.asyncio, "sleep", fake_sleep)
  monkeypatch.setattr(slowed_engine, "time", Clock(0.25))  # every inner call reads as 0.25 s
  engine = SlowedEngine(DummyInferenceEngine(), 5)
  asyncio.run(engine.infer_tensor("r", WHOLE, np.array([5, 6, 7])))
  assert slept == [pytest.approx(1.0)]
  engine.factor = 1  # switched off while it runs
  asyncio.run(engine.infer_tensor("r", WHOLE, np.array([[8]]), 3))
  assert slept == [pytest.approx(1.0)]


def test_outputs_and_everything_else_are_the_inner_engines():
  async def run(engine) -> list[np.ndarray]:
    x, outputs = await engine.encode(WHOLE, "slow me"), []
    for position in (0, 7, 8):  # the 7-token prompt, then one token a step
      outputs.append(await engine.infer_tensor("r", WHOLE, x, position))
      x = np.array([[await engine.sample(outputs[-1])]])
    await engine.finish_request("r")
    return outputs

  inner = DummyInferenceEngine()
  slowed = SlowedEngine(inner, 1.5)
  plain = asyncio.run(run(DummyInferenceEngine()))
  assert all(np.array_equal(a, b) for a, b in zip(asyncio.run(run(slowed)), plain))
  assert inner.active_requests() == set()
  assert asyncio.run(slowed.hidden_size(Shard("m", 3, 5, 10))) == asyncio.run(inner.hidden_size(Shard("m", 3, 5, 10)))
  assert Shard("m", 3, 5, 10) in inner.resident_shards()
  asyncio.run(slowed.unload_shard(Shard("m", 3, 5, 10)))
  assert Shard("m", 3, 5, 10) not in inner.resident_shards()


@pytest.mark.parametrize("factor", [0.5, 0, -2, float("nan")])
def test_a_factor_below_one_is_refused(factor):
  with pytest.raises(ValueError, match="factor >= 1"):
    SlowedEngine(DummyInferenceEngine(), factor)
