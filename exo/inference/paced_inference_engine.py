"""An engine that takes as long as a given device would: it wraps another engine and stretches every infer_tensor call to the time
the v1 cost model (docs/DESIGN.md section 2) gives for that device, so one machine can stand in for a cluster of uneven devices.

Per call of P positions over a shard of n layers: n x max(P x F / fp16, B / bandwidth) (P = 1 for decode, the prompt length for
prefill, the TTFT rule), dropping an unknown (0) capability; with both unknown there is no pacing. The inner engine's own time
counts towards the delay. Calls are serialised: a device runs one shard call at a time, which is what makes a paced node a
pipeline stage with the cost model's throughput.
"""

import asyncio
import time

import numpy as np

from exo.inference.inference_engine import InferenceEngine
from exo.inference.shard import Shard
from exo.topology.cost_model import roofline_layer_time
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.model_spec import ModelSpec


def positions_in(input_data: np.ndarray) -> int:
  """Positions (tokens) in an infer_tensor input: token ids (P,) or (1, P), or hidden states (..., P, hidden)."""
  shape = np.shape(input_data)
  if np.issubdtype(np.asarray(input_data).dtype, np.integer) or len(shape) < 2:
    return int(shape[-1]) if shape else 1
  return int(shape[-2])


def pacing_delay(shard: Shard, model: ModelSpec, device: DeviceCapabilities, tokens: int = 1, prompt_tokens_scale: bool = True) -> float:
  """Seconds `device` needs to run `shard` over `tokens` positions; 0 if its speed is unknown. With `prompt_tokens_scale` False a
  prefill is paced as one token."""
  p = tokens if prompt_tokens_scale else 1
  per_layer = roofline_layer_time(p * model.layer_flops, model.layer_bytes, device.flops.fp16, device.memory_bandwidth)
  return 0.0 if per_layer is None else shard.get_layer_count() * per_layer


class PacedInferenceEngine(InferenceEngine):
  def __init__(self, inner: InferenceEngine, model: ModelSpec, device: DeviceCapabilities, prompt_tokens_scale: bool = True):
    self.inner = inner
    self.model = model
    self.device = device
    self.prompt_tokens_scale = prompt_tokens_scale
    self._busy = asyncio.Lock()

  def delay(self, shard: Shard, input_data: np.ndarray) -> float:
    return pacing_delay(shard, self.model, self.device, positions_in(input_data), self.prompt_tokens_scale)

  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray, position: int = 0) -> np.ndarray:
    delay = self.delay(shard, input_data)
    async with self._busy:
      start = time.perf_counter()
      output = await self.inner.infer_tensor(request_id, shard, input_data, position)
      remaining = delay - (time.perf_counter() - start)
      if remaining > 0:
        await asyncio.sleep(remaining)
    return output

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return await self.inner.encode(shard, prompt)

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return await self.inner.decode(shard, tokens)

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    return await self.inner.apply_chat_template(shard, messages)

  async def sample(self, logits: np.ndarray, temperature: float = 0.0) -> int:
    return await self.inner.sample(logits, temperature)

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return self.inner.eos_token_ids(shard)

  async def finish_request(self, request_id: str) -> None:
    await self.inner.finish_request(request_id)

  def close(self) -> None:
    self.inner.close()
