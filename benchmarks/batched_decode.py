"""Continuous batching on the tinygrad engine: SmolLM2-135M (the GGUF that locate_model finds) whole on the CPU, one decode step
of B requests at once (B = 1, 2, 4, 8, 16) through `infer_batch`, as a node runs the requests waiting at its stage. B = 1 is
the single-request step; B >= 2 runs every matrix product over the B rows at once and attention per request.

Sixteen chat requests of different lengths are prefilled first; a batch of B takes the first B of them, each at its own
position, fed its own greedy token. Each B is captured (TinyJit, kernels compiled once and cached on disk) and warmed up before
timing; the figure is the median of --steps steps. Prints ms per step, ms per token of one request, aggregate tokens/s and the
speed-up of aggregate tokens/s over B = 1.

  python benchmarks/batched_decode.py [--steps 7] [--sizes 1,2,4,8,16]
"""

import argparse
import asyncio
import os
import platform
import statistics
import time

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from exo.base.shard import Shard
from exo.inference.inference_engine import Step
from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

WHOLE = Shard("smollm2-135m", 0, 29, 30)
QUESTIONS = [
  "What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hello.", "What is 2 + 2?",
  "Write a haiku about the sea.", "Who wrote Hamlet?", "List three colours.", "How far is the Moon?", "What is a CPU?",
  "Tell me a joke.", "What do bees make?", "Translate 'cat' into French.", "How many legs has a spider?",
  "What is the boiling point of water?", "Suggest a name for a dog.",
]  # fmt: skip
WARM_UP = 3  # steps before timing: run uncaptured, capture, one replay


async def step(engine: TinygradInferenceEngine, requests: dict[str, dict]) -> float:
  """One decode step of every request in `requests` as one infer_batch; feeds each its greedy token. Returns seconds."""
  started = time.perf_counter()
  outputs = await engine.infer_batch(WHOLE, [Step(r, s["token"], s["position"]) for r, s in requests.items()])
  elapsed = time.perf_counter() - started
  for (r, state), logits in zip(requests.items(), outputs):
    if isinstance(logits, Exception):
      raise RuntimeError(f"request {r}: {logits}")
    state["position"] += 1
    state["token"] = np.array([int(np.argmax(logits[0, -1]))], dtype=np.int64)
  return elapsed


async def main(args) -> None:
  sizes = [int(b) for b in args.sizes.split(",")]
  console = Console(width=120)
  console.print(
    f"batched decode: {WHOLE.model_id} whole, tinygrad on the CPU ({os.cpu_count()} cores, {platform.machine()}), median of {args.steps} steps"
  )
  engine = TinygradInferenceEngine()
  try:
    await engine.load_shard(WHOLE)
    requests = {}
    for i, question in enumerate(QUESTIONS[: max(sizes)]):
      prompt = await engine.encode(WHOLE, await engine.apply_chat_template(WHOLE, [{"role": "user", "content": question}]))
      logits = await engine.infer_tensor(f"r{i}", WHOLE, prompt, 0)
      requests[f"r{i}"] = {"position": len(prompt), "token": np.array([int(np.argmax(logits[0, -1]))], dtype=np.int64)}
    positions = sorted(s["position"] for s in requests.values())
    console.print(f"{len(requests)} requests prefilled, at positions {positions[0]}..{positions[-1]}")
    table = Table(box=box.MARKDOWN)
    for column in ("B", "ms per step", "ms per token (one request)", "aggregate tokens/s", "speed-up over B = 1", "warm-up s"):
      table.add_column(column, justify="right")
    base = None
    for b in sizes:
      batch = dict(list(requests.items())[:b])
      started = time.perf_counter()
      for _ in range(WARM_UP):
        await step(engine, batch)
      warm_up = time.perf_counter() - started
      seconds = statistics.median([await step(engine, batch) for _ in range(args.steps)])
      rate = b / seconds
      base = base or rate
      table.add_row(str(b), f"{seconds * 1000:.1f}", f"{seconds * 1000 / b:.1f}", f"{rate:.1f}", f"{rate / base:.2f}x", f"{warm_up:.1f}")
    console.print(table)
  finally:
    engine.close()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--sizes", default="1,2,4,8,16")
  asyncio.run(main(parser.parse_args()))
