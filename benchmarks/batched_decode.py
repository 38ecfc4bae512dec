"""Continuous batching, one engine call: SmolLM2-135M (the GGUF that locate_model finds) whole, one decode step of B requests at
once (B = 1, 2, 4, 8, 16) through `infer_batch`, as a node runs the requests waiting at its stage, on the default CPU engine
(ggml) or another (--engine). Set against the cost model's step, (L + eta) t(B) with t(B) = max(d, B c) per layer (docs/DESIGN.md
section 2), d and c from the engine's own calibration (what a node publishes as its layer times), and against the straight line
fitted to the measured steps, t(B) = d' + (B - 1) c' per layer.

Sixteen chat requests of different lengths are prefilled first; a batch of B takes the first B of them, each at its own
position, fed its own greedy token. Each B is warmed up before timing (tinygrad captures its kernels); the figure is the median
of --steps steps. Prints ms per step, ms per token of one request, aggregate tokens/s, the speed-up over B = 1, and the two
models' steps.

  python benchmarks/batched_decode.py [--engine ggml|tinygrad|mlx] [--threads N] [--steps 7] [--sizes 1,2,4,8,16]
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
from exo.inference.calibration import calibrate
from exo.inference.inference_engine import InferenceEngine, Step
from exo.inference.model_figures import model_spec_for
from exo.node_setup import make_engine
from exo.topology.cost_model import head_layers

WHOLE = Shard("smollm2-135m", 0, 29, 30)
QUESTIONS = [
  "What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hello.", "What is 2 + 2?",
  "Write a haiku about the sea.", "Who wrote Hamlet?", "List three colours.", "How far is the Moon?", "What is a CPU?",
  "Tell me a joke.", "What do bees make?", "Translate 'cat' into French.", "How many legs has a spider?",
  "What is the boiling point of water?", "Suggest a name for a dog.",
]  # fmt: skip
WARM_UP = 3  # steps before timing: run uncaptured, capture, one replay


async def step(engine: InferenceEngine, requests: dict[str, dict]) -> float:
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


async def prefill(engine: InferenceEngine, count: int) -> dict[str, dict]:
  """`count` chat requests prefilled: each request's next position and greedy token."""
  requests = {}
  for i, question in enumerate(QUESTIONS[:count]):
    prompt = await engine.encode(WHOLE, await engine.apply_chat_template(WHOLE, [{"role": "user", "content": question}]))
    logits = await engine.infer_tensor(f"r{i}", WHOLE, prompt, 0)
    requests[f"r{i}"] = {"position": len(prompt), "token": np.array([int(np.argmax(logits[0, -1]))], dtype=np.int64)}
  return requests


def fitted_line(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
  """(d', c'): the least-squares line through the steps, d' + (B - 1) c', in seconds a step."""
  slope, intercept = np.polyfit(np.array(sizes, dtype=float) - 1, np.array(seconds), 1)
  return float(intercept), float(slope)


async def main(args) -> None:
  sizes = [int(b) for b in args.sizes.split(",")]
  console = Console(width=140)
  engine = make_engine(args.engine, args.threads)
  model = model_spec_for(WHOLE.model_id, from_files=True)
  try:
    times = await calibrate(engine, model)
    d, c = times.decode_ms / 1000, times.token_ms / 1000
    layers = model.n_layers + head_layers(model)
    console.print(
      f"batched decode: {WHOLE.model_id} whole on {args.engine} ({os.cpu_count()} cores, {platform.machine()}), median of {args.steps} "
      f"steps; calibrated d = {d * 1000:.4f} ms, c = {c * 1000:.4f} ms a layer; L + eta = {layers:.2f} layers"
    )
    requests = await prefill(engine, max(sizes))
    measured = []
    for b in sizes:
      batch = dict(list(requests.items())[:b])
      for _ in range(WARM_UP):
        await step(engine, batch)
      measured.append(statistics.median([await step(engine, batch) for _ in range(args.steps)]))
  finally:
    engine.close()
  line = fitted_line(sizes, measured)
  table = Table(box=box.MARKDOWN)
  for column in ("B", "ms per step", "ms per token", "tokens/s", "x B = 1", "max(d, B c) ms", "measured / max(d, B c)", "line ms"):
    table.add_column(column, justify="right")
  for b, seconds in zip(sizes, measured):
    model_s = layers * max(d, b * c)
    fit_s = line[0] + (b - 1) * line[1]
    row = (b, seconds * 1000, seconds * 1000 / b, b / seconds, measured[0] / seconds * b, model_s * 1000, seconds / model_s, fit_s * 1000)
    table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
  console.print(table)
  console.print(
    f"fitted: t(B) = d' + (B - 1) c' a layer, d' = {line[0] / layers * 1000:.4f} ms ({line[0] / layers / d:.2f} d), "
    f"c' = {line[1] / layers * 1000:.4f} ms ({line[1] / layers / c:.2f} c)"
  )


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--engine", default="ggml", choices=("ggml", "tinygrad", "mlx"))
  parser.add_argument("--threads", type=int, default=None, help="ggml's CPU threads (default: the physical cores)")
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--sizes", default="1,2,4,8,16")
  asyncio.run(main(parser.parse_args()))
