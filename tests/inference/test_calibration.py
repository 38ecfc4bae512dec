"""Calibration times an engine's middle layers: which shards, what it runs, that it cleans up after itself, and on the real
SmolLM2-135M that it times the engine and leaves it serving the whole model."""

import asyncio
import importlib.util
import time
from statistics import median

import numpy as np
import pytest

from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.inference.calibration import LONG, PREFILL_TOKENS, SHORT, calibrate, calibration_shards, per_layer
from exo.inference.dummy_inference_engine import HIDDEN_SIZE, DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.topology.cost_model import head_layers

MODEL = ModelSpec("m", n_layers=30, layer_bytes=1e6, layer_flops=2e6, activation_bytes=4 * HIDDEN_SIZE)


class StepRecorder(EngineWrapper):
  """Records (shard, input shape, input dtype, position) of every step."""

  def __init__(self, inner):
    super().__init__(inner)
    self.steps = []

  async def infer_tensor(self, request_id, shard, input_data, position=0):
    self.steps.append((shard, input_data.shape, input_data.dtype, position))
    return await self.inner.infer_tensor(request_id, shard, input_data, position)


@pytest.mark.parametrize(
  "n_layers, max_bytes, lengths",
  [
    (30, None, [SHORT, LONG]),
    (4, None, [1, 2]),  # two middle layers
    (3, None, [1]),  # one middle layer: one shard
    (30, 3e6, [1, 2]),  # room for three layers, both shards resident at once
    (30, 1.5e6, [1]),
  ],
)
def test_shards_are_middle_layers_that_fit(n_layers, max_bytes, lengths):
  model = ModelSpec("m", n_layers=n_layers, layer_bytes=1e6, layer_flops=2e6, activation_bytes=32)
  shards = calibration_shards(model, max_bytes)
  assert [s.get_layer_count() for s in shards] == lengths
  assert all(not s.is_first_layer() and not s.is_last_layer() and s.model_id == "m" and s.n_layers == n_layers for s in shards)


@pytest.mark.parametrize("n_layers, max_bytes, problem", [(2, None, "it has 2 layers"), (30, 0.5e6, "room for 0 of its layers")])
def test_a_model_without_a_middle_layer_that_fits_cannot_be_calibrated(n_layers, max_bytes, problem):
  model = ModelSpec("m", n_layers=n_layers, layer_bytes=1e6, layer_flops=2e6, activation_bytes=32)
  with pytest.raises(ValueError, match=problem):
    calibration_shards(model, max_bytes)


def test_a_layer_is_the_difference_between_the_shards_per_layer():
  assert per_layer([(1, [5.0, 5.2, 5.1]), (4, [8.0, 8.2, 11.0])]) == pytest.approx(1.0)  # the fixed 4 ms of a call left out
  assert per_layer([(1, [5.0, 5.0]), (4, [4.0, 4.0])]) == pytest.approx(1.0)  # a difference lost in noise: time per layer
  assert per_layer([(3, [6.0, 9.0, 6.3])]) == pytest.approx(2.1)


def test_calibration_runs_random_hidden_states_through_middle_layers_and_cleans_up():
  inner = DummyInferenceEngine()
  engine = StepRecorder(inner)
  times = asyncio.run(calibrate(engine, MODEL))
  assert times.decode_ms > 0 and times.token_ms > 0
  assert {shard for shard, *_ in engine.steps} == set(calibration_shards(MODEL))
  assert {(shape, dtype.name) for _, shape, dtype, _ in engine.steps} == {
    ((1, PREFILL_TOKENS, HIDDEN_SIZE), "float32"),
    ((1, 1, HIDDEN_SIZE), "float32"),
  }
  assert inner.active_requests() == set() and inner.resident_shards() == []


def test_a_failing_engine_fails_the_calibration_and_leaves_nothing_behind():
  class Failing(EngineWrapper):
    async def infer_tensor(self, request_id, shard, input_data, position=0):
      if position > 0:
        raise RuntimeError("the device fell over")
      return await self.inner.infer_tensor(request_id, shard, input_data, position)

  inner = DummyInferenceEngine()
  with pytest.raises(RuntimeError, match="fell over"):
    asyncio.run(calibrate(Failing(inner), MODEL))
  assert inner.active_requests() == set() and inner.resident_shards() == []


def real_engines():
  from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

  engines = [pytest.param(TinygradInferenceEngine, id="tinygrad", marks=pytest.mark.slow)]
  if importlib.util.find_spec("mlx") is not None:
    from exo.inference.mlx_inference_engine import MLXInferenceEngine

    engines.append(pytest.param(MLXInferenceEngine, id="mlx", marks=pytest.mark.slow))
  return engines


async def decode_steps_of_the_whole_model(engine, model: ModelSpec, steps: int = 5, warmup: int = 2) -> list[float]:
  """Seconds of each decode step of every layer on one engine, after a short prompt and `warmup` steps (captured kernels)."""
  whole = Shard(model.id, 0, model.n_layers - 1, model.n_layers)
  x, position, times = np.arange(100, 108, dtype=np.int64)[None], 0, []
  for i in range(warmup + steps + 1):
    start = time.perf_counter()
    logits = await engine.infer_tensor("whole", whole, x, position)
    if i > warmup:
      times.append(time.perf_counter() - start)
    position += x.shape[1]
    x = np.array([[await engine.sample(logits)]], dtype=np.int64)
  await engine.finish_request("whole")
  return times


@pytest.mark.parametrize("engine_class", real_engines())
def test_calibration_of_smollm2_times_the_engine_and_leaves_it_serving(engine_class):
  """Calibration on the real SmolLM2 gives positive layer times, and the engine then runs the whole model's decode steps. How
  close decode_ms x (layers + eta) comes to the engine's own time per token depends on what else the machine runs, so it is
  printed here and measured by benchmarks/real_ring.py (TPOT from calibration alone against the ring's), not asserted."""
  from exo.base.models import model_spec
  from exo.inference.model_figures import served_model_spec

  model = served_model_spec(model_spec("smollm2-135m"))
  engine = engine_class()
  try:
    times = asyncio.run(calibrate(engine, model))
    per_token = median(asyncio.run(decode_steps_of_the_whole_model(engine, model)))
  finally:
    engine.close()
  predicted = times.decode_ms / 1000 * (model.n_layers + head_layers(model))
  print(f"{engine_class.__name__}: {times}, predicted {predicted * 1000:.1f} ms per token, measured {per_token * 1000:.1f} ms")
  assert times.decode_ms > 0 and times.token_ms > 0 and per_token > 0
