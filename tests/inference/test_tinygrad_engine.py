"""The tinygrad engine: tiny random Llama and Qwen2 models in every supported file format against the numpy reference, weights
held at file precision, request-state errors, shards side by side, batched decode steps bit-identical to steps alone; and on the
real SmolLM2-135M (the GGUF that locate_model finds): splits over 2 and 3 engines give one engine's exact greedy tokens, it
answers "Paris", and 8 requests decoded as one batch give the greedy tokens each gets alone."""

import asyncio
import dataclasses
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference import tinygrad_inference_engine
from exo.inference.inference_engine import Step
from exo.inference.llama_weights import LM_HEAD, layer_key, layer_parts, load_shard_weights
from exo.inference.model_files import locate_model
from exo.inference.quantized import weight_nbytes
from exo.inference.sharded_engine import RequestStateError
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine
from tests.inference.numpy_llama import forward
from tests.inference.tiny_models import TINY, TINY_QWEN2, Q, tiny_weights, write_gguf, write_hf_dir

FAMILIES = {"llama": TINY, "qwen2": TINY_QWEN2}
FORMATS = {  # name: how the model directory is written
  "gguf-q4_0": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q4_0),
  "gguf-q4_1": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q4_1),
  "gguf-q8_0": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.Q8_0),
  "gguf-f16": lambda d, w, c: write_gguf(d / "model.gguf", w, c, qtype=Q.F16),
  "hf-f32": lambda d, w, c: write_hf_dir(d, w, c, dtype="F32"),
  "hf-bf16": lambda d, w, c: write_hf_dir(d, w, c, dtype="BF16"),
  "mlx-4bit": lambda d, w, c: write_hf_dir(d, w, c, mlx_bits=4, group_size=32),
  "mlx-8bit-g64": lambda d, w, c: write_hf_dir(d, w, c, mlx_bits=8, group_size=64),
}
LOGITS_RTOL = 1e-5  # of the largest logit (measured: at most 1e-6): float32 sums in another order than numpy's, same weights
PROMPT = np.array([3, 17, 5, 31, 8, 2, 26], dtype=np.int64)
SMOLLM = "smollm2-135m"
SMOLLM_LAYERS = 30
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def tiny_model(root: Path, family: str, fmt: str, config=None) -> str:
  """Write (once) the tiny `family` model in format `fmt` under root; returns its model id."""
  config = config or FAMILIES[family]
  model_id = f"tiny-{family}-{fmt}-{config.n_layers}-layers-{config.context_length}-positions"
  directory = root / model_id
  if not directory.exists():
    if fmt.startswith("gguf"):
      directory.mkdir()
    FORMATS[fmt](directory, tiny_weights(config, seed=1), config)
    (directory / "tokenizer.json").write_text("{}")  # only the weights are used
  return model_id


def whole(model_id: str, n_layers: int) -> Shard:
  return Shard(model_id, 0, n_layers - 1, n_layers)


async def greedy(ring: list[tuple[TinygradInferenceEngine, Shard]], prompt: np.ndarray, steps: int, request: str) -> tuple[list[int], np.ndarray]:
  """`steps` greedy tokens (past EOS too: more to compare) for `prompt` through engines in a ring, and the last logits."""
  x, tokens = prompt, []
  while len(tokens) < steps:
    position = len(prompt) + len(tokens) - 1 if tokens else 0
    for engine, shard in ring:
      x = await engine.infer_tensor(request, shard, x, position)
    logits = x
    tokens.append(await ring[-1][0].sample(logits))
    x = np.array(tokens[-1:], dtype=np.int64)
  for engine, _ in ring:
    await engine.finish_request(request)
  return tokens, logits


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


# tiny models: every family and format


@pytest.mark.parametrize("fmt", sorted(FORMATS))
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


@pytest.mark.parametrize("split", [False, True], ids=["whole", "first-middle-last"])
@pytest.mark.parametrize("count", [2, 3, 8])
def test_batched_decode_is_bit_identical_to_steps_alone(models, count, split):
  """Two batched decode steps, then two steps alone (which read the caches the batch wrote), at every shard."""
  config = dataclasses.replace(TINY, n_layers=6)
  model_id = tiny_model(models, "llama", "gguf-q4_0", config)
  shards = [Shard(model_id, a, b, 6) for a, b in ((0, 1), (2, 4), (5, 5))] if split else [whole(model_id, 6)]
  assert_batched_equals_alone(shards, prompts_of_lengths(count, config.vocab_size), steps=4, batched=2)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_decode_is_bit_identical_in_every_format(models, family, fmt):
  config = FAMILIES[family]
  model_id = tiny_model(models, family, fmt)
  assert_batched_equals_alone([whole(model_id, config.n_layers)], prompts_of_lengths(5, config.vocab_size), steps=3, batched=2)


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


@pytest.mark.slow
def test_smollm_batched_decode_gives_the_greedy_tokens_of_each_request_alone(smollm_engines):
  """8 chat requests of different lengths: their prompts, then 8 decode steps as one batch; tokens and logits as alone."""
  shard = whole(SMOLLM, SMOLLM_LAYERS)
  engine = smollm_engines(shard)
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
