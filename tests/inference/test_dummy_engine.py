import asyncio

import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import EOS_TOKEN, HIDDEN_SIZE, VOCAB_SIZE, DummyInferenceEngine
from tests.support.greedy import greedy_tokens

N_LAYERS = 8
WHOLE = Shard("dummy", 0, N_LAYERS - 1, N_LAYERS)


def shards_for(sizes: list[int]) -> list[Shard]:
  starts = np.cumsum([0, *sizes])
  return [Shard("dummy", int(s), int(s) + n - 1, N_LAYERS) for s, n in zip(starts, sizes)]


async def run_ring(sizes: list[int], prompt: str, steps: int, request_id: str = "r1", eos_after: int | None = None):
  """Prompt then `steps` greedy tokens through a ring of one engine per shard; every output tensor, and the tokens."""
  shards = shards_for(sizes)
  engines = [DummyInferenceEngine(eos_after=eos_after) for _ in shards]
  x = await engines[0].encode(shards[0], prompt)
  outputs, tokens, position = [], [], 0
  for _ in range(steps + 1):
    for engine, shard in zip(engines, shards):
      x = await engine.infer_tensor(request_id, shard, x, position)
      outputs.append(x)
    position += x.shape[1]
    token = await engines[-1].sample(x)
    tokens.append(token)
    x = np.array([[token]], dtype=np.int64)
  return outputs, tokens, engines


async def generate(engine: DummyInferenceEngine, prompt: str, max_tokens: int, request_id: str = "g") -> list[int]:
  return await greedy_tokens(engine, WHOLE, await engine.encode(WHOLE, prompt), max_tokens, request_id)


@pytest.mark.parametrize("sizes", [[3, 5], [2, 2, 4], [1] * 8, [7, 1]])
def test_split_equals_single_shard(sizes):
  single_outputs, single_tokens, _ = asyncio.run(run_ring([8], "The quick brown fox", 10))
  split_outputs, split_tokens, _ = asyncio.run(run_ring(sizes, "The quick brown fox", 10))
  assert split_tokens == single_tokens
  per_step = len(sizes)
  last_of_each_step = split_outputs[per_step - 1 :: per_step]
  assert len(last_of_each_step) == len(single_outputs) == 11
  for split, single in zip(last_of_each_step, single_outputs):
    assert split.dtype == single.dtype and split.shape == single.shape
    assert np.array_equal(split, single)  # bit-identical, not merely close


def test_output_shapes():
  outputs, _, _ = asyncio.run(run_ring([3, 5], "hi", 1))
  assert outputs[0].shape == (1, 2, HIDDEN_SIZE) and outputs[0].dtype == np.float32
  assert outputs[1].shape == (1, 2, VOCAB_SIZE)
  assert outputs[2].shape == (1, 1, HIDDEN_SIZE) and outputs[3].shape == (1, 1, VOCAB_SIZE)


def test_two_dimensional_token_input_is_accepted():
  engine = DummyInferenceEngine()
  tokens = asyncio.run(engine.encode(WHOLE, "abc"))
  one = asyncio.run(engine.infer_tensor("a", WHOLE, tokens))
  two = asyncio.run(engine.infer_tensor("b", WHOLE, tokens[None]))
  assert np.array_equal(one, two)


def test_output_depends_on_history():
  engine = DummyInferenceEngine()
  token = np.array([50], dtype=np.int64)

  async def last_logits(prefix: str, request_id: str):
    await engine.infer_tensor(request_id, WHOLE, await engine.encode(WHOLE, prefix))
    return await engine.infer_tensor(request_id, WHOLE, token, len(prefix))

  assert not np.array_equal(asyncio.run(last_logits("abcd", "x")), asyncio.run(last_logits("abce", "y")))


def test_finish_request_releases_state():
  _, _, engines = asyncio.run(run_ring([3, 5], "hello", 3))
  assert all(e.active_requests() == {"r1"} for e in engines)
  for engine in engines:
    asyncio.run(engine.finish_request("r1"))
    asyncio.run(engine.finish_request("never seen"))
  assert all(e.active_requests() == set() for e in engines)


def test_finished_request_starts_afresh():
  engine = DummyInferenceEngine()
  first = asyncio.run(generate(engine, "same prompt", 15, request_id="same"))
  again = asyncio.run(generate(engine, "same prompt", 15, request_id="same"))
  assert first == again


def test_interleaved_requests_do_not_interfere():
  async def interleaved():
    engine = DummyInferenceEngine()
    xs = {r: await engine.encode(WHOLE, p) for r, p in (("a", "first prompt"), ("b", "second prompt"))}
    tokens, positions = {"a": [], "b": []}, {"a": 0, "b": 0}
    for _ in range(8):
      for r in ("a", "b"):
        t = await engine.sample(await engine.infer_tensor(r, WHOLE, xs[r], positions[r]))
        tokens[r].append(t)
        positions[r] += len(xs[r])
        xs[r] = np.array([t], dtype=np.int64)
    return tokens

  tokens = asyncio.run(interleaved())
  assert tokens["a"] == asyncio.run(generate(DummyInferenceEngine(eos_after=100), "first prompt", 8))
  assert tokens["b"] == asyncio.run(generate(DummyInferenceEngine(eos_after=100), "second prompt", 8))


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld ✓ 日本語", "\x00\x7f"])
def test_encode_decode_round_trip(text):
  engine = DummyInferenceEngine()
  tokens = asyncio.run(engine.encode(WHOLE, text))
  assert tokens.dtype == np.int64 and tokens.ndim == 1
  assert asyncio.run(engine.decode(WHOLE, tokens.tolist())) == text
  assert asyncio.run(engine.decode(WHOLE, [*tokens.tolist(), EOS_TOKEN])) == text


def test_different_prompts_give_different_sequences():
  prompts = ["Hello, world", "Tell me a story", "What is 2 + 2?", "exo"]
  sequences = [tuple(asyncio.run(generate(DummyInferenceEngine(), p, 12))) for p in prompts]
  assert len(set(sequences)) == len(prompts)
  assert all(len(set(s)) > 3 for s in sequences)  # varied, not one token repeated


def test_greedy_is_deterministic_across_engines():
  assert asyncio.run(generate(DummyInferenceEngine(), "determinism", 30)) == asyncio.run(generate(DummyInferenceEngine(), "determinism", 30))


def test_default_eos_comes_after_twenty_to_sixty_tokens():
  lengths = []
  for prompt in ["Hello, world", "Tell me a story", "What is 2 + 2?", "exo", "a much longer prompt about pipelines and rings"]:
    tokens = asyncio.run(generate(DummyInferenceEngine(), prompt, 100))
    assert tokens[-1] == EOS_TOKEN and EOS_TOKEN not in tokens[:-1]
    lengths.append(len(tokens) - 1)
  assert all(20 <= n <= 60 for n in lengths)
  assert len(set(lengths)) > 1


@pytest.mark.parametrize("eos_after", [0, 1, 5, 37])
def test_eos_after_is_exact(eos_after):
  tokens = asyncio.run(generate(DummyInferenceEngine(eos_after=eos_after), "anything", 100))
  assert len(tokens) == eos_after + 1 and tokens[-1] == EOS_TOKEN


def test_eos_after_holds_across_a_split():
  _, tokens, _ = asyncio.run(run_ring([2, 6], "split", 6, eos_after=4))
  assert tokens[4] == EOS_TOKEN and EOS_TOKEN not in tokens[:4]


def test_generated_text_is_printable():
  tokens = asyncio.run(generate(DummyInferenceEngine(eos_after=40), "printable?", 40))
  text = asyncio.run(DummyInferenceEngine().decode(WHOLE, tokens))
  assert len(text) == 40 and text.isprintable()


def test_sampling_with_temperature_is_seeded():
  def sample_many(seed: int) -> list[int]:
    engine = DummyInferenceEngine(seed=seed)
    logits = asyncio.run(engine.infer_tensor("t", WHOLE, asyncio.run(engine.encode(WHOLE, "temperature"))))
    return [asyncio.run(engine.sample(logits, temperature=1.0)) for _ in range(20)]

  assert sample_many(1) == sample_many(1)
  assert sample_many(1) != sample_many(2)
  assert EOS_TOKEN not in sample_many(3)


def test_bad_inputs_are_rejected():
  engine = DummyInferenceEngine()
  with pytest.raises(ValueError):
    asyncio.run(engine.infer_tensor("x", WHOLE, np.zeros((1, 3, HIDDEN_SIZE), dtype=np.float32)))
  with pytest.raises(ValueError):
    asyncio.run(engine.infer_tensor("x", Shard("dummy", 4, 7, 8), np.array([1, 2, 3])))
  assert engine.active_requests() == set()  # a rejected call leaves no state behind
  with pytest.raises(ValueError):
    DummyInferenceEngine(eos_after=-1)
