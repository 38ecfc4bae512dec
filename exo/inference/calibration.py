"""How fast this node's own engine runs one layer of a model: the `layer_times` the planner trusts over the roofline
(docs/DESIGN.md section 2), measured when a node starts serving the model.

The engine runs middle layers of the model (neither the first shard, which embeds, nor the last, which runs the head) over
random float32 hidden states of the model's width, at whatever precision it holds the weights: prefills of PREFILL_TOKENS
tokens and decode steps of one token, after a warm-up prefill and WARMUP_DECODES decode steps (tinygrad runs a shape's first
step uncaptured and captures its kernels on the second). decode_ms is a layer's time for one token, token_ms a layer's time
per token of a prefill.

A call costs a fixed overhead besides its layers (tinygrad on a 2-core CPU: about 4 ms a call, against 1.6 ms a SmolLM2
layer), which must not be charged to the few layers timed. So two shards are timed, of SHORT and LONG layers, both resident
(each keeps a request open), their steps interleaved so that both see the same load from other processes; a layer's time is
the median difference between a long and a short step, per layer of difference. When that difference is lost in noise, or
memory has room for one shard only, it is the longer shard's median step time per layer.

The timed rounds stop after about `budget_s` seconds (warm-up, which compiles kernels, comes on top). The calibration's
requests are finished and its shards dropped afterwards.
"""

import time
import uuid
from statistics import median

import numpy as np

from exo.base.device_capabilities import LayerTimes
from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.inference.inference_engine import InferenceEngine

PREFILL_TOKENS = 32
SHORT, LONG = 1, 4  # layers of the two shards timed
WARMUP_DECODES = 2
DECODES_PER_ROUND = 4  # decode steps after each round's prefill
MAX_ROUNDS = 6
BUDGET_S = 2.0


def calibration_shards(model: ModelSpec, max_bytes: float | None = None) -> list[Shard]:
  """The middle shards timed: SHORT and LONG layers, shortened to what the model's middle layers and `max_bytes` of weights
  (both shards resident at once) allow, or a single shard where there is room for one only."""
  middle = model.n_layers - 2
  fit = SHORT + LONG if max_bytes is None else int(max_bytes // model.layer_bytes)
  if min(middle, fit) < 1:
    room = f"it has {model.n_layers} layers" if middle < 1 else f"there is room for {fit} of its layers"
    raise ValueError(f"cannot calibrate {model.id}: a layer that is neither first nor last is needed, and {room}")
  long = min(LONG, middle, fit - SHORT)
  lengths = [SHORT, long] if long > SHORT else [min(middle, fit)]
  return [Shard(model.id, (model.n_layers - n) // 2, (model.n_layers - n) // 2 + n - 1, model.n_layers) for n in lengths]


class _Run:
  """One shard's open calibration request: each step runs fresh random hidden states at the request's next position."""

  def __init__(self, engine: InferenceEngine, shard: Shard, width: int, rng: np.random.Generator):
    self.engine, self.shard, self.width, self.rng = engine, shard, width, rng
    self.request_id: str | None = None
    self.position = 0

  async def prefill(self) -> float:
    """Seconds of a prefill of PREFILL_TOKENS tokens, as a new request (the previous one is finished)."""
    await self.finish()
    self.request_id, self.position = f"calibration-{uuid.uuid4()}", 0
    return await self.step(PREFILL_TOKENS)

  async def step(self, tokens: int = 1) -> float:
    x = self.rng.standard_normal((1, tokens, self.width)).astype(np.float32)
    start = time.perf_counter()
    await self.engine.infer_tensor(self.request_id, self.shard, x, self.position)
    took = time.perf_counter() - start
    self.position += tokens
    return took

  async def finish(self) -> None:
    if self.request_id is not None:
      await self.engine.finish_request(self.request_id)
      self.request_id = None


def per_layer(runs: list[tuple[int, list[float]]]) -> float:
  """Seconds of one layer from the (layers, step times) of one shard, or of two whose steps were interleaved."""
  long, long_times = runs[-1]
  if len(runs) == 2:
    short, short_times = runs[0]
    difference = median(b - a for a, b in zip(short_times, long_times))
    if difference > 0:
      return difference / (long - short)
  return median(long_times) / long


async def calibrate(engine: InferenceEngine, model: ModelSpec, max_bytes: float | None = None, budget_s: float = BUDGET_S) -> LayerTimes:
  """`engine`'s layer times for `model`, timed on its middle layers with at most `max_bytes` of their weights loaded. Raises
  ValueError when the model has no middle layer or no room for one, or whatever the engine raises."""
  rng = np.random.default_rng(0)
  shards = calibration_shards(model, max_bytes)
  runs: list[_Run] = []
  prefills: list[list[float]] = [[] for _ in shards]
  decodes: list[list[float]] = [[] for _ in shards]
  try:
    for shard in shards:  # loaded one by one; a shard with an open request stays resident while the next loads
      run = _Run(engine, shard, await engine.hidden_size(shard), rng)
      runs.append(run)
      await run.prefill()
      for _ in range(WARMUP_DECODES):
        await run.step()
    deadline = time.perf_counter() + budget_s
    for _ in range(MAX_ROUNDS):
      for run, times in zip(runs, prefills):
        times.append(await run.prefill())
      for _ in range(DECODES_PER_ROUND):
        for run, times in zip(runs, decodes):
          times.append(await run.step())
      if time.perf_counter() >= deadline:
        break
  finally:
    for run in runs:
      await run.finish()
    for shard in shards:
      await engine.unload_shard(shard)
  lengths = [s.get_layer_count() for s in shards]
  decode_s = per_layer(list(zip(lengths, decodes)))
  prefill_s = per_layer(list(zip(lengths, prefills)))
  if decode_s <= 0:
    raise ValueError(f"calibrating {model.id} measured no time for a decode step")
  return LayerTimes(decode_ms=decode_s * 1000, token_ms=prefill_s / PREFILL_TOKENS * 1000)
