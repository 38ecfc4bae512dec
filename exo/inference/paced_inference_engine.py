"""An engine that takes as long as a given device would: it wraps another engine and stretches every call to the time a delay
function gives for the shard and the positions the call runs at once (the cost model's `device_pacing` gives a device's
roofline time), so one machine can stand in for a cluster of uneven devices. The inner engine's own time counts towards the
delay. Calls are serialised: a device runs one shard call at a time, which is what makes a paced node a
pipeline stage with the cost model's throughput.
"""

import asyncio
import time
from typing import Callable

import numpy as np

from exo.base.shard import Shard
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.inference_engine import InferenceEngine, Step, positions_in


class PacedInferenceEngine(EngineWrapper):
  def __init__(self, inner: InferenceEngine, delay: Callable[[Shard, int], float], prompt_tokens_scale: bool = True):
    super().__init__(inner)
    self._delay = delay  # seconds the device takes to run a shard over so many positions at once
    self.prompt_tokens_scale = prompt_tokens_scale
    self._busy = asyncio.Lock()

  def delay(self, shard: Shard, steps: list[Step]) -> float:
    """The device's time for one call running `steps` together: n = all their positions at once (each step counts as one
    position when prompts are not scaled)."""
    tokens = sum(positions_in(step.input_data) for step in steps) if self.prompt_tokens_scale else len(steps)
    return self._delay(shard, tokens)

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    delay = self.delay(shard, steps)
    async with self._busy:
      start = time.perf_counter()
      outputs = await self.inner.infer_batch(shard, steps)
      remaining = delay - (time.perf_counter() - start)
      if remaining > 0:
        await asyncio.sleep(remaining)
    return outputs
