"""What the chat page's "Last request" compares, measured: on a real 2-node SmolLM2 ring (two ggml `exo` processes of 160 MB on
loopback, started one after the other so each measures its layers alone, as on two machines), chat requests one at a time
through the HTTP API; for each, the node's prediction for that request's own prompt and answer (TTFT for its prompt + (tokens
- 1) x TPOT, from /v1/plan's last_request) next to the time the node measured. The first request loads the layers and is shown
apart.

  .venv/bin/python benchmarks/last_request.py [--requests 6]
"""

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from statistics import median

from exo.tools.local_cluster import Cluster, Device, collect_topology

QUESTIONS = [
  "Which city is the capital of France?",
  "Name a primary colour.",
  "How many legs does a spider have?",
  "Write a haiku about rain.",
  "What is 12 times 12?",
  "Who wrote Hamlet?",
  "Give me a synonym for happy.",
]


def call(base: str, path: str, body: dict | None = None) -> dict:
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(f"{base}{path}", data, {"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=600) as response:
    return json.loads(response.read())


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--requests", type=int, default=6, help="warm requests after the first (default 6)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cluster = Cluster(Path(tmp))
    try:
      for node_id in ("a", "b"):
        cluster.declare(node_id, Device(160, 1, 10), engine=["--inference-engine", "ggml", "--run-model", "smollm2-135m"], api=node_id == "a")
      for node_id in ("a", "b"):
        cluster.start(node_id, "--max-generate-tokens", "48")
        cluster.wait_for(
          lambda n=node_id: "layer_times" in ((collect_topology(cluster.nodes[n].address) or {}).get("nodes", {}).get(n, {})),
          f"{node_id}'s layer times",
        )
      cluster.wait_for_mesh()
      base = f"http://127.0.0.1:{cluster.api_ports['a']}"
      ratios = []
      print(f"{'request':<9} {'prompt':>6} {'tokens':>6} {'predicted s':>12} {'measured s':>11} {'predicted/measured':>19}")
      for k in range(args.requests + 1):
        call(base, "/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]})
        last = call(base, "/v1/plan")["last_request"]
        ratio = last["predicted_s"] / last["elapsed_s"]
        if k:
          ratios.append(ratio)
        label = "first" if k == 0 else f"warm {k}"
        print(f"{label:<9} {last['prompt_tokens']:>6} {last['tokens']:>6} {last['predicted_s']:>12.3f} {last['elapsed_s']:>11.3f} {ratio:>19.2f}")
      print(f"warm requests: median predicted/measured {median(ratios):.2f}, from {min(ratios):.2f} to {max(ratios):.2f}")
    finally:
      cluster.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
