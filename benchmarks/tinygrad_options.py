"""What the tinygrad engine's choices cost: SmolLM2-135M decode tokens/s, prefill time and weight bytes held, with weights as the
file holds them (packed quants dequantized inside each product's kernel, the default), widened on load to float16 or float32,
without TinyJit, or with BEAM kernel search (cached on disk in tinygrad's CACHEDB), and optionally the engine of an earlier commit
(which widened every weight to float32) in the same process. Variants run side by side, repeats alternating, on one worker.

  python benchmarks/tinygrad_options.py [--repeats 3] [--variants file,float16,float32,beam2,nojit] [--before COMMIT]
"""

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from tinygrad import Context

from exo.base.shard import Shard
from exo.inference import tinygrad_inference_engine as engine_module
from exo.inference.quantized import as_float32

WHOLE = Shard("smollm2-135m", 0, 29, 30)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 24
_load = engine_module.load_shard_weights


def widened(dtype):
  """A loader whose matrices are widened to `dtype` (what the engine would hold without quantized kernels)."""

  def load(path, shard):
    config, weights = _load(path, shard)
    return config, {k: as_float32(w).astype(dtype) if len(w.shape) == 2 else w for k, w in weights.items()}

  return load


def engine_of(commit: str):
  """The tinygrad engine module of an earlier commit, run on today's loader with every weight widened to float32 as it expects."""
  source = subprocess.run(["git", "show", f"{commit}:exo/inference/tinygrad_inference_engine.py"], capture_output=True, text=True, check=True).stdout
  path = Path(tempfile.mkdtemp()) / "earlier_tinygrad_engine.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("earlier_tinygrad_engine", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module._WORKER = engine_module._WORKER  # one thread for all tinygrad work in the process
  module.load_shard_weights = widened(np.float32)
  module.TinygradInferenceEngine.__abstractmethods__ = frozenset()  # methods today's interface added; this benchmark calls none of them
  return module


async def make(variant: str, before):
  """(engine, whether infer_tensor takes positions, BEAM level)."""
  if variant == "before":
    engine = before.TinygradInferenceEngine()
    await asyncio.get_running_loop().run_in_executor(None, engine.load_shard, WHOLE)
    return engine, False, 0
  engine_module.load_shard_weights = {"float16": widened(np.float16), "float32": widened(np.float32)}.get(variant, _load)
  engine = engine_module.TinygradInferenceEngine(jit=variant != "nojit")
  await engine.load_shard(WHOLE)
  engine_module.load_shard_weights = _load
  return engine, True, int(variant.removeprefix("beam")) if variant.startswith("beam") else 0


async def generate(engine, positions: bool, ids: np.ndarray, request_id: str) -> tuple[float, float, list[int]]:
  """(prefill seconds, decode tokens/s, tokens)."""

  async def step(x, position):
    return await (engine.infer_tensor(request_id, WHOLE, x, position) if positions else engine.infer_tensor(request_id, WHOLE, x))

  def greedy(logits: np.ndarray) -> int:  # what every engine's default sampling does (an earlier engine's sample() takes other arguments)
    return int(np.argmax(np.asarray(logits).reshape(-1, np.shape(logits)[-1])[-1]))

  started = time.perf_counter()
  tokens = [greedy(await step(ids, 0))]
  prefilled = time.perf_counter()
  for i in range(TOKENS):
    tokens.append(greedy(await step(np.array([tokens[-1]]), len(ids) + i)))
  await engine.finish_request(request_id)
  return prefilled - started, TOKENS / (time.perf_counter() - prefilled), tokens


async def main(args) -> None:
  variants = args.variants.split(",") + (["before"] if args.before else [])
  before = engine_of(args.before) if args.before else None
  engines = {v: await make(v, before) for v in variants}
  reference, _, _ = engines[variants[0]]
  ids = await reference.encode(WHOLE, await reference.apply_chat_template(WHOLE, CHAT))
  for variant, (engine, positions, beam) in engines.items():  # compile and capture (BEAM searches here) before timing
    started = time.perf_counter()
    with Context(BEAM=beam):
      for r in range(2 if variant != "nojit" else 1):
        await generate(engine, positions, ids, f"warm-{r}")
    held = engine.held_array_bytes(WHOLE) / 1e6 if positions else float("nan")
    print(f"{variant}: warm-up {time.perf_counter() - started:.1f} s, weights held {held:.1f} MB", flush=True)
  runs = {v: [] for v in variants}
  for r in range(args.repeats):
    for variant, (engine, positions, _) in engines.items():
      runs[variant].append(await generate(engine, positions, ids, f"{variant}-{r}"))
  for variant in variants:
    rates = " ".join(f"{run[1]:6.2f}" for run in runs[variant])
    prefill = statistics.median(run[0] for run in runs[variant])
    text = await reference.decode(WHOLE, runs[variant][-1][2])
    print(
      f"{variant:8s} decode tokens/s {rates} (median {statistics.median(run[1] for run in runs[variant]):.2f}), prefill {len(ids)} tokens {prefill:.2f} s, {text[:32]!r}"
    )


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--variants", default="file,float16,float32", help="of file, float16, float32, nojit, beamN")
  parser.add_argument("--before", default=None, help="also run the engine of this earlier commit (e.g. e006b37)")
  asyncio.run(main(parser.parse_args()))
