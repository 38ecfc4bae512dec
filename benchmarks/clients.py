"""HTTP clients of the benchmarks: JSON calls and streamed chat completions against a node's API, and starting a Cluster's nodes
one at a time, each waited for until its API answers."""

import http.client
import json
import time
from dataclasses import dataclass

from exo.tools.local_cluster import HOST, Cluster

REQUEST_TIMEOUT_S = 300.0


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
  conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
  try:
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
      raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
    return json.loads(data)
  finally:
    conn.close()


@dataclass
class Stream:
  """One streamed chat completion as its client saw it: time.perf_counter() when it was sent and when each text chunk came."""

  sent_s: float
  chunk_s: list[float]
  prompt_tokens: int
  completion_tokens: int
  text: str  # the answer

  @property
  def first_s(self) -> float:
    return self.chunk_s[0]

  @property
  def last_s(self) -> float:
    return self.chunk_s[-1]

  @property
  def ttft_s(self) -> float:
    return self.first_s - self.sent_s

  @property
  def tpot_s(self) -> float | None:
    """The decode time per token after the first; None for one token or one chunk."""
    n = self.completion_tokens
    return (self.last_s - self.first_s) / (n - 1) if n > 1 and len(self.chunk_s) > 1 else None


def stream_chat(port: int, model: str, prompt: str, max_tokens: int, timeout: float = REQUEST_TIMEOUT_S) -> Stream:
  """One streamed chat completion, timed as a client sees it."""
  body = {
    "model": model,
    "messages": [{"role": "user", "content": prompt}],
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
  try:
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
      raise RuntimeError(f"chat completion: HTTP {response.status}: {response.read()[:300]!r}")
    chunks, texts, usage = [], [], None
    for raw in response:
      line = raw.decode().strip()
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[len("data: ") :])
      if "error" in event:
        raise RuntimeError(f"chat completion failed: {event['error']}")
      if event.get("usage"):
        usage = event["usage"]
      content = "".join(choice.get("delta", {}).get("content") or "" for choice in event.get("choices", []))
      if content:
        chunks.append(time.perf_counter())
        texts.append(content)
  finally:
    conn.close()
  if not chunks or usage is None:
    raise RuntimeError("the stream carried no text or no usage")
  return Stream(sent, chunks, usage["prompt_tokens"], usage["completion_tokens"], "".join(texts))


def start_in_turn(cluster: Cluster, node_ids: list[str], args: list[str], timeout: float) -> None:
  """Start the declared nodes `node_ids` (each with `api`) with `args`, one at a time (a node that times its engine at start must
  not share the cores with another doing so), each waited for until its API answers, then until every node sees every other."""
  for node_id in node_ids:
    cluster.start(node_id, *args)

    def api_up(node_id=node_id) -> bool:
      return node_id in http_json(cluster.api_ports[node_id], "GET", "/v1/topology")["nodes"]

    cluster.wait_for(api_up, f"{node_id}'s API", timeout, retry_on=(OSError, RuntimeError, http.client.HTTPException), poll_s=0.5)
  cluster.wait_for_mesh(timeout=timeout)
