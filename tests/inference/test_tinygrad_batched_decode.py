"""The tinygrad engine's batched decode steps (continuous batching): each request's outputs at every shard and step are
bit-identical to its steps alone, for 2, 3 and 8 requests on a whole tiny model and on a ring of three shards, in every file
format; and 8 SmolLM2-135M chat requests decoded as one batch give the greedy tokens each gets alone."""

import asyncio
import dataclasses

import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference.inference_engine import Step
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from tests.inference.engine_steps import greedy, whole
from tests.inference.tiny_models import FAMILIES, FILE_FORMATS, TINY, tiny_model

SMOLLM = "smollm2-135m"
SMOLLM_LAYERS = 30


async def decode(
  ring: list[tuple[TinygradInferenceEngine, Shard]], prompts: dict[str, np.ndarray], steps: int, batched: int
) -> dict[str, list[np.ndarray]]:
  """Each request's output at every shard of the ring, for its prompt and then `steps` greedy decode steps. batched > 0: the
  prompts go to each shard as one infer_batch (rows of several positions: each runs alone), then the first `batched` decode
  steps as one batch per shard; every other step, one request at a time."""
  outputs: dict[str, list[np.ndarray]] = {r: [] for r in prompts}
  inputs, positions = dict(prompts), dict.fromkeys(prompts, 0)
  for step in range(steps + 1):
    rows = {r: len(x) for r, x in inputs.items()}
    for engine, shard in ring:
      if batched and step <= batched:
        outs = await engine.infer_batch(shard, [Step(r, inputs[r], positions[r]) for r in prompts])
        assert not [out for out in outs if isinstance(out, Exception)]
      else:
        outs = [await engine.infer_tensor(r, shard, inputs[r], positions[r]) for r in prompts]
      for r, out in zip(prompts, outs):
        outputs[r].append(out)
        inputs[r] = out
    for r in prompts:
      positions[r] += rows[r]
      inputs[r] = np.array([int(np.argmax(inputs[r][0, -1]))], dtype=np.int64)
  for engine, _ in ring:
    for r in prompts:
      await engine.finish_request(r)
  return outputs


BATCHED_STEPS = {2: {(2, 2)}, 3: {(2, 2)}, 5: {(4, 4)}, 8: {(4, 4)}}  # requests -> captured steps: 3 = 2 + 1, 5 = 4 + 1, 8 = 4 + 4


def assert_batched_equals_alone(shards: list[Shard], prompts: dict[str, np.ndarray], steps: int, batched: int) -> None:
  """Requests decoded through the ring of `shards` with their first `batched` steps batched give, at every shard and step,
  bit-identical outputs to the same requests stepped one at a time on other engines, and each engine captured its batched step."""
  engines = [TinygradInferenceEngine() for _ in range(2 * len(shards))]
  try:
    alone = asyncio.run(decode(list(zip(engines[: len(shards)], shards)), prompts, steps, 0))
    together = asyncio.run(decode(list(zip(engines[len(shards) :], shards)), prompts, steps, batched))
    for engine, shard in zip(engines[len(shards) :], shards):
      batched_steps = {key[:2] for key in engine._models[shard].steps if key[1] > 1}  # (rows, requests) of any cache size
      assert batched_steps == BATCHED_STEPS[len(prompts)]  # the batch ran in steps of 4 (then 2) requests, not one at a time
  finally:
    for engine in engines:
      engine.close()
  for r in prompts:
    assert len(together[r]) == len(alone[r]) == (steps + 1) * len(shards)
    for got, expected in zip(together[r], alone[r]):
      assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32
      assert np.array_equal(got, expected)  # bit-identical, not merely close


def prompts_of_lengths(count: int, vocab_size: int) -> dict[str, np.ndarray]:
  """`count` prompts of different lengths (so their requests decode at different positions)."""
  rng = np.random.default_rng(count)
  return {f"r{i}": rng.integers(0, vocab_size, 2 + 3 * i).astype(np.int64) for i in range(count)}


@pytest.mark.parametrize("split", [False, True], ids=["whole", "first-middle-last"])
@pytest.mark.parametrize("count", [2, 3, 8])
def test_batched_decode_is_bit_identical_to_steps_alone(models, count, split):
  """Two batched decode steps, then two steps alone (which read the caches the batch wrote), at every shard."""
  config = dataclasses.replace(TINY, n_layers=6)
  model_id = tiny_model(models, "llama", "gguf-q4_0", config)
  shards = [Shard(model_id, a, b, 6) for a, b in ((0, 1), (2, 4), (5, 5))] if split else [whole(model_id, 6)]
  assert_batched_equals_alone(shards, prompts_of_lengths(count, config.vocab_size), steps=4, batched=2)


@pytest.mark.parametrize("fmt", sorted(FILE_FORMATS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_decode_is_bit_identical_in_every_format(models, family, fmt):
  config = FAMILIES[family]
  model_id = tiny_model(models, family, fmt)
  assert_batched_equals_alone([whole(model_id, config.n_layers)], prompts_of_lengths(5, config.vocab_size), steps=3, batched=2)


# the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm_engine():
  """An engine that holds the whole of SmolLM2-135M."""
  engine = TinygradInferenceEngine()
  asyncio.run(engine.load_shard(whole(SMOLLM, SMOLLM_LAYERS)))
  yield engine
  engine.close()


@pytest.mark.slow
def test_smollm_batched_decode_gives_the_greedy_tokens_of_each_request_alone(smollm_engine):
  """8 chat requests of different lengths: their prompts, then 8 decode steps as one batch; tokens and logits as alone."""
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engine
  questions = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hello.", "What is 2 + 2?",
               "Write a haiku about the sea.", "Who wrote Hamlet?", "List three colours."]  # fmt: skip

  async def prompt(question: str) -> np.ndarray:
    return await engine.encode(shard, await engine.apply_chat_template(shard, [{"role": "user", "content": question}]))

  prompts = {f"q{i}": asyncio.run(prompt(q)) for i, q in enumerate(questions)}
  assert len({len(p) for p in prompts.values()}) > 1
  alone = {r: asyncio.run(greedy([(engine, shard)], p, 9, f"alone-{r}")) for r, p in prompts.items()}
  together = asyncio.run(decode([(engine, shard)], prompts, 8, 8))
  model = engine._models[shard]
  assert (4, 4, model.capacity) in model.steps  # 8 requests, each with the engine's whole context: two steps of 4
  for r in prompts:
    tokens = [int(np.argmax(logits[0, -1])) for logits in together[r]]
    assert tokens == alone[r][0]
    assert np.array_equal(together[r][-1], alone[r][1])
