"""The tinygrad engine: tiny random Llama and Qwen2 models in every supported file format against the numpy reference, prompts
in chunks, weights held at file precision, request-state errors, shards side by side; and on the real SmolLM2-135M (the GGUF
that locate_model finds): splits over 2 and 3 engines give one engine's exact greedy tokens, and it answers "Paris". Batched
decode steps are test_tinygrad_batched_decode's."""

import asyncio
import dataclasses
import time

import gguf
import numpy as np
import pytest

from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference import tinygrad_inference_engine
from exo.inference.inference_engine import Step
from exo.inference.llama_layout import LM_HEAD, layer_key, layer_parts
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_files import locate_model
from exo.inference.quantized import weight_nbytes
from exo.inference.sharded_engine import RequestStateError
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from tests.inference.engine_steps import greedy, whole
from tests.inference.numpy_llama import forward
from tests.inference.tiny_models import FAMILIES, FILE_FORMATS, TINY, TINY_QWEN2, tiny_model

LOGITS_RTOL = 1e-5  # of the largest logit (measured: at most 1e-6): float32 sums in another order than numpy's, same weights
PROMPT = np.array([3, 17, 5, 31, 8, 2, 26], dtype=np.int64)
SMOLLM = "smollm2-135m"
SMOLLM_LAYERS = 30
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# tiny models: every family and format


@pytest.mark.parametrize("fmt", sorted(FILE_FORMATS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_numpy_reference(models, family, fmt):
  config = FAMILIES[family]
  model_id = tiny_model(models, family, fmt)
  shard = whole(model_id, config.n_layers)
  _, weights = load_shard_weights(locate_model(model_id), shard)
  engine = TinygradInferenceEngine()

  async def run():
    cache, tokens, position = {}, PROMPT, 0
    for _ in range(4):  # the prompt, then decode steps that read the KV cache
      expected = forward(weights, config, tokens, 0, config.n_layers - 1, cache)
      got = await engine.infer_tensor("r", shard, tokens, position)
      assert got.shape == (1, len(tokens), config.vocab_size) and got.dtype == np.float32
      assert np.abs(got[0] - expected).max() <= LOGITS_RTOL * np.abs(expected).max()
      position += len(tokens)
      tokens = np.array([int(np.argmax(expected[-1]))], dtype=np.int64)

  try:
    asyncio.run(run())
  finally:
    engine.close()


def test_long_inputs_run_in_chunks(models, monkeypatch):
  monkeypatch.setattr(tinygrad_inference_engine, "PREFILL_CHUNK", 4)  # 7 positions: chunks of 4 and 3
  model_id = tiny_model(models, "qwen2", "gguf-q4_1")
  shard = whole(model_id, TINY_QWEN2.n_layers)
  _, weights = load_shard_weights(locate_model(model_id), shard)
  engine = TinygradInferenceEngine()
  try:
    got = asyncio.run(engine.infer_tensor("chunks", shard, PROMPT, 0))
  finally:
    engine.close()
  expected = forward(weights, TINY_QWEN2, PROMPT, 0, TINY_QWEN2.n_layers - 1)
  assert np.abs(got[0] - expected).max() <= LOGITS_RTOL * np.abs(expected).max()


def test_split_over_three_engines_is_bit_identical(models):
  config = dataclasses.replace(TINY, n_layers=6)
  model_id = tiny_model(models, "llama", "gguf-q4_0", config)
  shards = [Shard(model_id, a, b, 6) for a, b in ((0, 1), (2, 4), (5, 5))]
  engines = [TinygradInferenceEngine() for _ in range(4)]
  try:
    single = asyncio.run(greedy([(engines[0], whole(model_id, 6))], PROMPT, 6, "single"))
    split = asyncio.run(greedy(list(zip(engines[1:], shards)), PROMPT, 6, "split"))
  finally:
    for engine in engines:
      engine.close()
  assert split[0] == single[0]
  assert np.array_equal(split[1], single[1])


def test_weights_stay_packed(models):
  """A Q4_1 shard holds exactly its file's tensor bytes (5 bits a weight) besides its RoPE tables, far below float32; the tied
  head is the embedding's matrix, held once."""
  config = dataclasses.replace(TINY_QWEN2, context_length=64)  # small RoPE tables, so the weights dominate
  model_id = tiny_model(models, "qwen2", "gguf-q4_1", config)
  shard = whole(model_id, config.n_layers)
  file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(locate_model(model_id))).tensors)
  _, weights = load_shard_weights(locate_model(model_id), shard)
  float32_bytes = sum(4 * int(np.prod(w.shape)) for name, w in weights.items() if name != LM_HEAD)
  engine = TinygradInferenceEngine()
  try:
    asyncio.run(engine.load_shard(shard))
    held = engine.held_array_bytes(shard)
  finally:
    engine.close()
  rope_tables = 2 * config.context_length * config.head_dim // 2 * 4  # cos and sin, float32
  assert held - rope_tables == file_bytes
  assert held < 0.2 * float32_bytes


def test_cache_covers_the_capped_context(models):
  model_id = tiny_model(models, "llama", "hf-f32")
  shard = whole(model_id, TINY.n_layers)
  engine = TinygradInferenceEngine()
  try:
    asyncio.run(engine.load_shard(shard))
    model = engine._models[shard]
    assert engine._dims(model).context_length == min(TINY.context_length, MAX_CONTEXT)
    with pytest.raises(ValueError):
      asyncio.run(engine.infer_tensor("r", shard, np.zeros(TINY.context_length + 1, dtype=np.int64), 0))
  finally:
    engine.close()


def test_a_request_keeps_kv_for_the_context_its_step_names(models):
  """A step's `context` (the plan's) sizes the request's cache below the model's: its logits are the numpy reference's, decoded
  in one batch with a request at the model's whole context, and a step beyond its context is refused naming it."""
  model_id = tiny_model(models, "llama", "hf-f32")
  shard = whole(model_id, TINY.n_layers)
  _, weights = load_shard_weights(locate_model(model_id), shard)
  engine = TinygradInferenceEngine()
  short = len(PROMPT) + 3  # the prompt and three decode steps

  async def run():
    caches, inputs, position = {"short": {}, "whole": {}}, {"short": PROMPT, "whole": PROMPT}, 0
    for _ in range(4):  # the prompt, then three decode steps, each one batch of both requests
      outs = await engine.infer_batch(shard, [Step(r, x, position, short if r == "short" else 0) for r, x in inputs.items()])
      for (r, x), out in zip(inputs.items(), outs):
        expected = forward(weights, TINY, x, 0, TINY.n_layers - 1, caches[r])
        assert np.abs(out[0] - expected).max() <= LOGITS_RTOL * np.abs(expected).max()
        inputs[r] = np.array([int(np.argmax(expected[-1]))], dtype=np.int64)
      position += len(x)
    assert [c.shape for c in engine._states[("short", shard)].cache] == [(2, TINY.n_kv_heads, short, TINY.head_dim)] * TINY.n_layers
    assert engine._states[("whole", shard)].cache[0].shape[2] == min(TINY.context_length, MAX_CONTEXT)
    beyond, whole_step = await engine.infer_batch(shard, [Step(r, x, position, short if r == "short" else 0) for r, x in inputs.items()])
    assert isinstance(beyond, ValueError) and f"reach {short + 1} positions" in str(beyond) and f", {short}" in str(beyond)
    assert isinstance(whole_step, np.ndarray)

  try:
    asyncio.run(run())
  finally:
    engine.close()


def test_lost_or_unknown_steps_raise(models):
  model_id = tiny_model(models, "llama", "gguf-q8_0")
  shard = whole(model_id, TINY.n_layers)
  engine = TinygradInferenceEngine()

  async def run():
    await engine.infer_tensor("r", shard, PROMPT, 0)
    with pytest.raises(RequestStateError):  # a step lost: position 7 never arrived
      await engine.infer_tensor("r", shard, PROMPT[:1], 8)
    with pytest.raises(RequestStateError):  # a step repeated
      await engine.infer_tensor("r", shard, PROMPT[:1], 0)
    with pytest.raises(RequestStateError):  # state this engine never had
      await engine.infer_tensor("unknown", shard, PROMPT[:1], 5)
    await engine.infer_tensor("r", shard, PROMPT[:1], len(PROMPT))  # the right position still works
    assert engine.active_requests() == {"r"}
    await engine.finish_request("r")
    assert not engine.active_requests()

  try:
    asyncio.run(run())
  finally:
    engine.close()


def test_two_resident_shards_serve_interleaved_requests(models):
  llama, qwen = tiny_model(models, "llama", "mlx-4bit"), tiny_model(models, "qwen2", "hf-bf16")
  shards = {"a": whole(llama, TINY.n_layers), "b": whole(qwen, TINY_QWEN2.n_layers), "c": whole(llama, TINY.n_layers)}
  prompts = {"a": PROMPT, "b": PROMPT[::-1].copy(), "c": PROMPT[2:]}
  engine = TinygradInferenceEngine()

  async def alone(request: str) -> list[int]:
    return (await greedy([(engine, shards[request])], prompts[request], 5, f"alone-{request}"))[0]

  async def interleaved() -> dict[str, list[int]]:
    tokens = {r: [] for r in shards}
    inputs = dict(prompts)
    for _ in range(5):
      for request, shard in shards.items():
        position = len(prompts[request]) + len(tokens[request]) - 1 if tokens[request] else 0
        logits = await engine.infer_tensor(request, shard, inputs[request], position)
        tokens[request].append(await engine.sample(logits))
        inputs[request] = np.array(tokens[request][-1:], dtype=np.int64)
    assert set(engine.resident_shards()) == {shards["a"], shards["b"]}
    assert engine.active_requests() == set(shards)
    return tokens

  try:
    expected = {r: asyncio.run(alone(r)) for r in shards}
    assert asyncio.run(interleaved()) == expected
  finally:
    engine.close()
  assert not engine.resident_shards()


# the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm_engines():
  """Shard -> its own loaded engine (each a node of its own), created on first use."""
  made: dict[Shard, TinygradInferenceEngine] = {}

  def get(shard: Shard) -> TinygradInferenceEngine:
    if shard not in made:
      made[shard] = TinygradInferenceEngine()
      asyncio.run(made[shard].load_shard(shard))
    return made[shard]

  yield get
  for engine in made.values():
    engine.close()


@pytest.fixture(scope="module")
def chat_prompt(smollm_engines) -> np.ndarray:
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engines(shard)
  return asyncio.run(engine.encode(shard, asyncio.run(engine.apply_chat_template(shard, QUESTION))))


@pytest.fixture(scope="module")
def single_run(smollm_engines, chat_prompt) -> tuple[list[int], np.ndarray]:
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  return asyncio.run(greedy([(smollm_engines(shard), shard)], chat_prompt, 24, "single"))


def test_smollm_shards_hold_packed_layers_in_proportion(smollm_engines):
  """Q4_1 layers are held at their file size; a shard of half the middle layers holds half the layer bytes."""
  config, weights = load_shard_weights(locate_model(SMOLLM), whole(SMOLLM, SMOLLM_LAYERS))
  parts = layer_parts(config)
  layer_bytes = {i: sum(weight_nbytes(weights[layer_key(i, p)]) for p in parts) for i in range(SMOLLM_LAYERS)}
  quarter, half = Shard(SMOLLM, 1, 7, SMOLLM_LAYERS), Shard(SMOLLM, 1, 14, SMOLLM_LAYERS)
  held = {s: smollm_engines(s).held_array_bytes(s) for s in (quarter, half)}
  tables = held[half] - sum(layer_bytes[i] for i in range(1, 15))  # the RoPE tables, the same in both
  assert 0 <= tables <= 4 * MAX_CONTEXT * 64  # cos and sin, (context, head_dim / 2) float32 each
  assert held[quarter] - tables == sum(layer_bytes[i] for i in range(1, 8))
  assert abs((held[quarter] - tables) / (held[half] - tables) - 0.5) < 0.01
  assert held[half] < 0.2 * 4 * sum(int(np.prod(weights[layer_key(i, p)].shape)) for i in range(1, 15) for p in parts)


@pytest.mark.slow
def test_smollm_logits_match_numpy_reference(smollm_engines, chat_prompt):
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engines(shard)
  config, weights = load_shard_weights(locate_model(SMOLLM), shard)

  async def run():
    cache, tokens, position = {}, chat_prompt, 0
    for _ in range(3):  # the prompt, then decode steps that read the KV cache
      expected = forward(weights, config, tokens, 0, SMOLLM_LAYERS - 1, cache)
      got = await engine.infer_tensor("reference", shard, tokens, position)
      assert np.abs(got[0] - expected).max() <= 10 * LOGITS_RTOL * np.abs(expected).max()  # 30 layers, not 3
      position += len(tokens)
      tokens = np.array([int(np.argmax(expected[-1]))], dtype=np.int64)
    await engine.finish_request("reference")

  asyncio.run(run())


@pytest.mark.slow
def test_smollm_answers_paris(smollm_engines, chat_prompt, single_run):
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engines(shard)
  tokens, _ = single_run
  eos = engine.eos_token_ids(shard)
  answer = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
  assert "Paris" in asyncio.run(engine.decode(shard, answer))


@pytest.mark.slow
@pytest.mark.parametrize("bounds", [((0, 20), (21, 29)), ((0, 4), (5, 22), (23, 29))], ids=["2-engines", "3-engines"])
def test_smollm_split_equals_single(smollm_engines, chat_prompt, single_run, bounds):
  ring = [(smollm_engines(s), s) for s in (Shard(SMOLLM, a, b, SMOLLM_LAYERS) for a, b in bounds)]
  tokens, logits = asyncio.run(greedy(ring, chat_prompt, 24, "split"))
  assert tokens == single_run[0]
  assert np.array_equal(logits, single_run[1])  # bit-identical, not merely close


@pytest.mark.slow
def test_event_loop_keeps_running_while_computing(smollm_engines, chat_prompt):
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engines(shard)

  async def ticks_during_prompt() -> tuple[int, float]:
    ticks, done = 0, asyncio.Event()

    async def ticker():
      nonlocal ticks
      while not done.is_set():
        ticks += 1
        await asyncio.sleep(0.005)

    task, start = asyncio.create_task(ticker()), time.perf_counter()
    await engine.infer_tensor("busy", shard, chat_prompt, 0)
    elapsed = time.perf_counter() - start
    done.set()
    await task
    await engine.finish_request("busy")
    return ticks, elapsed

  ticks, elapsed = asyncio.run(ticks_during_prompt())
  assert ticks >= elapsed / 0.005 / 4  # the loop ran throughout, not just before and after
