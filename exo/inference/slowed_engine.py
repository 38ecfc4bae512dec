"""A node slower than it says, for benchmarks of the planner's measurements: `exo --engine-slowdown FACTOR` makes every
engine call take FACTOR times as long as the wrapped engine's (it sleeps (FACTOR - 1) x the call's own time after it).
Nothing declares the slowdown: the node's device figures are unchanged, so only its measured layer times reveal it.

Calls are serialised, as on a device that runs one shard call at a time; `factor` may be changed while the engine runs.
"""

import asyncio
import time

import numpy as np

from exo.base.shard import Shard
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.inference_engine import InferenceEngine, Step


class SlowedEngine(EngineWrapper):
  def __init__(self, inner: InferenceEngine, factor: float):
    super().__init__(inner)
    self.factor = factor
    self._busy = asyncio.Lock()

  @property
  def factor(self) -> float:
    return self._factor

  @factor.setter
  def factor(self, value: float) -> None:
    if not value >= 1:
      raise ValueError(f"an engine slowdown must be a factor >= 1, got {value!r}")
    self._factor = float(value)

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    async with self._busy:
      start = time.perf_counter()
      outputs = await self.inner.infer_batch(shard, steps)
      extra = (self.factor - 1) * (time.perf_counter() - start)
      if extra > 0:
        await asyncio.sleep(extra)
    return outputs
