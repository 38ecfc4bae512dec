import asyncio

import numpy as np
import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.model_spec import ModelSpec
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference import paced_inference_engine
from exo.inference.dummy_inference_engine import HIDDEN_SIZE, DummyInferenceEngine
from exo.inference.inference_engine import Step, positions_in
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.topology.cost_model import device_pacing, pacing_delay

MODEL = ModelSpec("m", n_layers=10, layer_bytes=1e8, layer_flops=2e9, activation_bytes=4096)
DEVICE = DeviceCapabilities(memory=8192, flops=DeviceFlops(5, 10, 20), memory_bandwidth=100)  # fp16 10 TFLOPS, 100 GB/s
SHARD = Shard("m", 2, 5, 10)  # 4 layers


@pytest.mark.parametrize(
  "device, tokens, expected",
  [
    (DEVICE, 1, 4 * 1e-3),  # decode: max(2e9 / 1e13, 1e8 / 1e11) = 1 ms per layer, bandwidth bound
    (DEVICE, 3, 4 * 1e-3),  # short prefill: 6e9 / 1e13 = 0.6 ms of compute, still bandwidth bound
    (DEVICE, 50, 4 * 1e-2),  # prefill: 1e11 / 1e13 = 10 ms per layer, compute bound
    (DeviceCapabilities(flops=DeviceFlops(fp16=10)), 1, 4 * 2e-4),  # bandwidth unknown: compute term only
    (DeviceCapabilities(memory_bandwidth=100), 50, 4 * 1e-3),  # TFLOPS unknown: bandwidth term only
    (DeviceCapabilities(memory=8192), 50, 0.0),  # speed unknown: no pacing
  ],
)
def test_delay_matches_hand_computed(device, tokens, expected):
  assert pacing_delay(SHARD, MODEL, device, tokens) == pytest.approx(expected, rel=1e-12)


def test_delay_for_a_built_in_model():
  model = model_spec("llama-3.2-1b")
  m4_pro = DeviceCapabilities(flops=DeviceFlops(8.08, 16.16, 32.32), memory_bandwidth=273)
  shard = Shard(model.id, 0, 7, model.n_layers)
  assert pacing_delay(shard, model, m4_pro) == pytest.approx(8 * model.layer_bytes / 273e9)
  assert pacing_delay(shard, model, m4_pro, tokens=512) == pytest.approx(8 * 512 * model.layer_flops / 16.16e12)


def test_positions_in_inputs():
  assert positions_in(np.arange(5, dtype=np.int64)) == 5
  assert positions_in(np.arange(5, dtype=np.int64)[None]) == 5
  assert positions_in(np.zeros((1, 7, HIDDEN_SIZE), dtype=np.float32)) == 7
  assert positions_in(np.zeros((7, HIDDEN_SIZE), dtype=np.float32)) == 7


def test_engine_delay_uses_input_positions():
  engine = PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, DEVICE))
  assert engine.delay(SHARD, [Step("r", np.zeros((1, 50, HIDDEN_SIZE), dtype=np.float32))]) == pytest.approx(0.04)
  assert engine.delay(SHARD, [Step("r", np.zeros((1, 1, HIDDEN_SIZE), dtype=np.float32))]) == pytest.approx(0.004)
  unscaled = PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, DEVICE), prompt_tokens_scale=False)
  assert unscaled.delay(SHARD, [Step("r", np.zeros((1, 50, HIDDEN_SIZE), dtype=np.float32))]) == pytest.approx(0.004)  # as one token


def test_a_batch_is_paced_as_its_positions_at_once():
  """t(n) = max(d, n c) for the n positions of a call: 4 layers, d = 1 ms, c = 0.2 ms, so 5 decode steps together cost as
  much as one (bandwidth bound) and 20 cost 4 layers x 20 x 0.2 ms = 16 ms."""
  engine = PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, DEVICE))
  decode = [Step(f"r{i}", np.zeros((1, 1, HIDDEN_SIZE), dtype=np.float32)) for i in range(20)]
  assert engine.delay(SHARD, decode[:5]) == pytest.approx(4 * 1e-3)
  assert engine.delay(SHARD, decode) == pytest.approx(4 * 20 * 2e-4)


def test_outputs_are_the_inner_engines():
  async def run(engine_factory) -> tuple[list[np.ndarray], list[int]]:
    shards = [Shard("m", 0, 3, 10), Shard("m", 4, 9, 10)]
    engines = [engine_factory() for _ in shards]
    x = await engines[0].encode(shards[0], "pace me")
    outputs, tokens, position = [], [], 0
    for _ in range(5):
      for engine, shard in zip(engines, shards):
        x = await engine.infer_tensor("r", shard, x, position)
        outputs.append(x)
      position += x.shape[1]
      tokens.append(await engines[-1].sample(x))
      x = np.array([tokens[-1]], dtype=np.int64)
    for engine in engines:
      await engine.finish_request("r")
    return outputs, tokens

  fast = DeviceCapabilities(flops=DeviceFlops(1e6, 1e6, 1e6), memory_bandwidth=1e9)  # microsecond delays
  plain_outputs, plain_tokens = asyncio.run(run(DummyInferenceEngine))
  paced_outputs, paced_tokens = asyncio.run(run(lambda: PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, fast))))
  assert paced_tokens == plain_tokens
  assert all(np.array_equal(a, b) for a, b in zip(paced_outputs, plain_outputs))


def test_delegates_everything_else():
  inner = DummyInferenceEngine(eos_after=3)
  engine = PacedInferenceEngine(inner, device_pacing(MODEL, DEVICE))
  tokens = asyncio.run(engine.encode(SHARD, "héllo"))
  assert np.array_equal(tokens, asyncio.run(inner.encode(SHARD, "héllo")))
  assert asyncio.run(engine.decode(SHARD, tokens.tolist())) == "héllo"
  assert engine.eos_token_ids(SHARD) == inner.eos_token_ids(SHARD)
  assert asyncio.run(engine.sample(np.array([[0.0, 3.0, 1.0]]))) == 1
  asyncio.run(inner.infer_tensor("r", Shard("m", 0, 9, 10), tokens))
  asyncio.run(engine.finish_request("r"))
  assert inner.active_requests() == set()


def test_sleeps_for_the_delay_less_the_inner_time(monkeypatch):
  slept = []

  async def fake_sleep(seconds):
    slept.append(seconds)

  monkeypatch.setattr(paced_inference_engine.asyncio, "sleep", fake_sleep)
  slow = DeviceCapabilities(memory_bandwidth=1e-3)  # 1e8 B / 1e6 B/s = 100 s per layer
  engine = PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, slow))
  asyncio.run(engine.infer_tensor("r", Shard("m", 0, 1, 10), np.array([5, 6, 7])))
  assert len(slept) == 1 and 199 < slept[0] <= 200

  unknown = PacedInferenceEngine(DummyInferenceEngine(), device_pacing(MODEL, DeviceCapabilities()))
  asyncio.run(unknown.infer_tensor("r", Shard("m", 0, 1, 10), np.array([5, 6, 7])))
  assert len(slept) == 1
