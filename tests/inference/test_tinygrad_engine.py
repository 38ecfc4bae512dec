"""The tinygrad engine on the real SmolLM2-135M (the GGUF that locate_model finds): against the numpy reference, split against
single, cached against recomputed. Engines are shared per module, one instance per shard (each its own node)."""

import asyncio
import time

import numpy as np
import pytest

from exo.inference import tinygrad_inference_engine
from exo.inference.llama_weights import EMBED, LM_HEAD, NORM, load_shard_weights, shard_tensor_names
from exo.inference.model_files import locate_model
from exo.inference.shard import Shard
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from tests.inference.numpy_llama import forward

MODEL = "smollm2-135m"
N_LAYERS = 30
WHOLE = Shard(MODEL, 0, N_LAYERS - 1, N_LAYERS)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
LOGITS_ATOL = 1e-3  # float32 over 30 layers; logits reach ~40
HIDDEN_RTOL = 1e-5  # hidden states hold outliers of ~25,000: compare relative to the largest magnitude


def shards(*bounds: tuple[int, int]) -> list[Shard]:
  return [Shard(MODEL, start, end, N_LAYERS) for start, end in bounds]


@pytest.fixture(scope="module")
def engines():
  """Shard -> its engine, created (and loaded) on first use."""
  made: dict[Shard, TinygradInferenceEngine] = {}

  def get(shard: Shard) -> TinygradInferenceEngine:
    if shard not in made:
      made[shard] = TinygradInferenceEngine()
      made[shard].load_shard(shard)
    return made[shard]

  yield get
  for engine in made.values():
    engine.close()


@pytest.fixture(scope="module")
def reference():
  return load_shard_weights(locate_model(MODEL), WHOLE)


@pytest.fixture(scope="module")
def prompt_ids(engines) -> np.ndarray:
  engine = engines(WHOLE)
  return asyncio.run(engine.encode(WHOLE, asyncio.run(engine.apply_chat_template(WHOLE, QUESTION))))


async def run_ring(ring: list[tuple[TinygradInferenceEngine, Shard]], prompt: np.ndarray, max_tokens: int, request_id: str):
  """Exactly `max_tokens` greedy tokens (past EOS too: more to compare) for `prompt` through a ring of engines, each passing its
  output to the next. Returns the tokens and the last logits."""
  x, tokens = prompt, []
  while len(tokens) < max_tokens:
    for engine, shard in ring:
      x = await engine.infer_tensor(request_id, shard, x)
    tokens.append(await ring[-1][0].sample(x))
    if len(tokens) < max_tokens:
      x = np.array([tokens[-1]], dtype=np.int64)
  for engine, _ in ring:
    await engine.finish_request(request_id)
  return tokens, x


@pytest.fixture(scope="module")
def single_run(engines, prompt_ids) -> tuple[list[int], np.ndarray]:
  return asyncio.run(run_ring([(engines(WHOLE), WHOLE)], prompt_ids, MAX_TOKENS, "single"))


@pytest.mark.slow
def test_logits_match_numpy_reference(engines, reference, prompt_ids):
  config, weights = reference
  engine, cache = engines(WHOLE), {}
  expected = forward(weights, config, prompt_ids, 0, N_LAYERS - 1, cache)
  got = asyncio.run(engine.infer_tensor("ref", WHOLE, prompt_ids))
  assert got.shape == (1, len(prompt_ids), config.vocab_size) and got.dtype == np.float32
  assert np.abs(got[0] - expected).max() < LOGITS_ATOL
  for _ in range(2):  # decode steps read the KV cache
    token = np.array([int(np.argmax(expected[-1]))], dtype=np.int64)
    expected = forward(weights, config, token, 0, N_LAYERS - 1, cache)
    got = asyncio.run(engine.infer_tensor("ref", WHOLE, token))
    assert got.shape == (1, 1, config.vocab_size)
    assert np.abs(got[0] - expected).max() < LOGITS_ATOL
  asyncio.run(engine.finish_request("ref"))


@pytest.mark.slow
def test_long_inputs_run_in_chunks(engines, reference, prompt_ids, monkeypatch):
  config, weights = reference
  monkeypatch.setattr(tinygrad_inference_engine, "PREFILL_CHUNK", 16)  # 37 positions: chunks of 16, 16 and 5
  expected = forward(weights, config, prompt_ids, 0, N_LAYERS - 1)
  got = asyncio.run(engines(WHOLE).infer_tensor("chunks", WHOLE, prompt_ids))
  asyncio.run(engines(WHOLE).finish_request("chunks"))
  assert got.shape == (1, len(prompt_ids), config.vocab_size)
  assert np.abs(got[0] - expected).max() < LOGITS_ATOL


@pytest.mark.slow
def test_middle_shard_hidden_states_match_numpy_reference(engines, reference, prompt_ids):
  config, weights = reference
  middle = Shard(MODEL, 5, 22, N_LAYERS)
  first_cache, cache = {}, {}  # the reference's layers 0-4 and 5-22
  hidden = forward(weights, config, prompt_ids, 0, 4, first_cache)
  expected = forward(weights, config, hidden, 5, 22, cache)
  got = asyncio.run(engines(middle).infer_tensor("mid", middle, hidden[None]))
  assert got.shape == (1, len(prompt_ids), config.hidden_size) and got.dtype == np.float32
  assert np.abs(got[0] - expected).max() < HIDDEN_RTOL * np.abs(expected).max()
  # a decode step: the middle shard's own KV cache is read
  step_hidden = forward(weights, config, prompt_ids[-1:], 0, 4, first_cache)
  expected = forward(weights, config, step_hidden, 5, 22, cache)
  got = asyncio.run(engines(middle).infer_tensor("mid", middle, step_hidden[None]))
  assert np.abs(got[0] - expected).max() < HIDDEN_RTOL * np.abs(expected).max()
  asyncio.run(engines(middle).finish_request("mid"))


@pytest.mark.slow
def test_answer_mentions_paris(engines, single_run):
  tokens, _ = single_run
  eos = engines(WHOLE).eos_token_ids(WHOLE)
  answer = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
  assert "Paris" in asyncio.run(engines(WHOLE).decode(WHOLE, answer))


@pytest.mark.slow
@pytest.mark.parametrize("bounds", [((0, 20), (21, 29)), ((0, 4), (5, 22), (23, 29))], ids=["2-nodes", "3-nodes"])
def test_split_equals_single(engines, prompt_ids, single_run, bounds):
  ring = [(engines(shard), shard) for shard in shards(*bounds)]
  tokens, logits = asyncio.run(run_ring(ring, prompt_ids, MAX_TOKENS, "split"))
  assert tokens == single_run[0]
  assert np.array_equal(logits, single_run[1])  # bit-identical, not merely close


@pytest.mark.slow
def test_kv_cache_equals_recomputing(engines, prompt_ids, single_run):
  tokens, engine, recomputed = single_run[0], engines(WHOLE), []
  for step in range(len(tokens)):  # each step: the whole sequence so far, as a fresh request with no cache
    sequence = np.concatenate([prompt_ids, np.array(tokens[:step], dtype=np.int64)])
    recomputed.append(asyncio.run(engine.sample(asyncio.run(engine.infer_tensor(f"scratch-{step}", WHOLE, sequence)))))
    asyncio.run(engine.finish_request(f"scratch-{step}"))
  assert recomputed == tokens


@pytest.mark.slow
def test_event_loop_keeps_running_while_computing(engines, prompt_ids):
  engine = engines(WHOLE)

  async def ticks_during_prompt() -> tuple[int, float]:
    ticks, done = 0, asyncio.Event()

    async def ticker():
      nonlocal ticks
      while not done.is_set():
        ticks += 1
        await asyncio.sleep(0.005)

    task, start = asyncio.create_task(ticker()), time.perf_counter()
    await engine.infer_tensor("busy", WHOLE, prompt_ids)
    elapsed = time.perf_counter() - start
    done.set()
    await task
    await engine.finish_request("busy")
    return ticks, elapsed

  ticks, elapsed = asyncio.run(ticks_during_prompt())
  assert ticks >= elapsed / 0.005 / 4  # the loop ran throughout, not just before and after


@pytest.mark.slow
def test_finish_request_releases_state(engines, prompt_ids):
  engine = engines(WHOLE)
  asyncio.run(engine.infer_tensor("a", WHOLE, prompt_ids[:1]))
  asyncio.run(engine.infer_tensor("b", WHOLE, prompt_ids[:1][None]))
  assert {"a", "b"} <= engine.active_requests()
  asyncio.run(engine.finish_request("a"))
  asyncio.run(engine.finish_request("never seen"))
  assert "a" not in engine.active_requests() and "b" in engine.active_requests()
  asyncio.run(engine.finish_request("b"))
  assert not engine.active_requests() & {"a", "b"}


@pytest.mark.slow
def test_a_shard_loads_only_its_layers():
  first, middle, last = shards((0, 3), (4, 5), (28, 29))
  engine = TinygradInferenceEngine()
  try:
    for shard in (first, middle, last):
      engine.load_shard(shard)
      assert engine.loaded_tensor_names() == set(shard_tensor_names(shard))
    assert EMBED in set(shard_tensor_names(first)) and {NORM, LM_HEAD} <= set(shard_tensor_names(last))
    assert engine.embedding is None and set(engine.weights) == set(shard_tensor_names(last))
    hidden = np.zeros((1, 2, 576), dtype=np.float32)
    asyncio.run(engine.infer_tensor("x", last, hidden))
    assert engine.active_requests() == {"x"}
    asyncio.run(engine.infer_tensor("y", middle, hidden))  # another shard replaces the loaded one and its requests
    assert engine.shard == middle and engine.active_requests() == {"y"}
  finally:
    engine.close()


@pytest.mark.slow
def test_bad_inputs_are_rejected(engines):
  engine = engines(WHOLE)
  before = engine.active_requests()
  with pytest.raises(ValueError):
    asyncio.run(engine.infer_tensor("bad", WHOLE, np.zeros((1, 3, 576), dtype=np.float32)))
  with pytest.raises(ValueError):
    asyncio.run(engine.infer_tensor("bad", WHOLE, np.array([1, 10**6])))
  assert engine.active_requests() == before  # a rejected call leaves no state behind


def test_sampling():
  engine = TinygradInferenceEngine(seed=1)
  logits = np.log(np.array([[[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]], dtype=np.float32))
  assert asyncio.run(engine.sample(logits)) == 0  # greedy reads the last position
  draws = [asyncio.run(engine.sample(logits, temperature=1.0)) for _ in range(200)]
  again = TinygradInferenceEngine(seed=1)
  assert draws == [asyncio.run(again.sample(logits, temperature=1.0)) for _ in range(200)]
  assert set(draws) == {0, 1, 2, 3} and draws.count(0) > 100


def test_tokenizer():
  engine = TinygradInferenceEngine()  # needs no weights
  prompt = asyncio.run(engine.apply_chat_template(WHOLE, QUESTION))
  assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
  ids = asyncio.run(engine.encode(WHOLE, prompt))
  assert ids.dtype == np.int64 and ids.ndim == 1
  assert asyncio.run(engine.decode(WHOLE, ids.tolist())) == prompt
  assert engine.eos_token_ids(WHOLE) and all(isinstance(t, int) for t in engine.eos_token_ids(WHOLE))
