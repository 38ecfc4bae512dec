"""An engine that takes as long as a given device would: it wraps another engine and stretches every infer_tensor call to the time
the cost model (docs/DESIGN.md section 2) gives for that device's roofline, so one machine can stand in for a cluster of uneven
devices.

Per call of P positions over a shard of n layers: (n + eta on the last shard) x t(P), t(P) = max(d, P c) from the device's
TFLOPS and memory bandwidth (P = 1 for decode, the prompt length for prefill), dropping an unknown (0) capability; with both
unknown there is no pacing. The inner engine's own time
counts towards the delay. Calls are serialised: a device runs one shard call at a time, which is what makes a paced node a
pipeline stage with the cost model's throughput.
"""

import asyncio
import time

import numpy as np

from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.inference_engine import InferenceEngine, Step, positions_in
from exo.inference.shard import Shard
from exo.topology.cost_model import head_layers, layer_speed, layer_time
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.model_spec import ModelSpec


def pacing_delay(shard: Shard, model: ModelSpec, device: DeviceCapabilities, tokens: int = 1) -> float:
  """Seconds `device` needs to run `shard` over `tokens` positions at once: (layers + eta on the last shard) x t(tokens); 0 if
  its speed is unknown."""
  speed = layer_speed(model, device.flops.fp16, device.memory_bandwidth)
  if speed is None:
    return 0.0
  layers = shard.get_layer_count() + (head_layers(model) if shard.is_last_layer() else 0.0)
  return layers * layer_time(speed, tokens)


class PacedInferenceEngine(EngineWrapper):
  def __init__(self, inner: InferenceEngine, model: ModelSpec, device: DeviceCapabilities, prompt_tokens_scale: bool = True):
    super().__init__(inner)
    self.model = model
    self.device = device
    self.prompt_tokens_scale = prompt_tokens_scale
    self._busy = asyncio.Lock()

  def delay(self, shard: Shard, steps: list[Step]) -> float:
    """The device's time for one call running `steps` together: n = all their positions at once (each step counts as one
    position when prompts are not scaled)."""
    tokens = sum(positions_in(step.input_data) for step in steps) if self.prompt_tokens_scale else len(steps)
    return pacing_delay(shard, self.model, self.device, tokens)

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    delay = self.delay(shard, steps)
    async with self._busy:
      start = time.perf_counter()
      outputs = await self.inner.infer_batch(shard, steps)
      remaining = delay - (time.perf_counter() - start)
      if remaining > 0:
        await asyncio.sleep(remaining)
    return outputs
