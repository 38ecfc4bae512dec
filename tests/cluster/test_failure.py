"""A ring node that dies (SIGKILL) or hangs (SIGSTOP) in the middle of a request: the request fails with a clear error naming
it well before its deadline, nothing hangs, and the next request from the same origin runs on the survivors.

Three paced node processes (--emulate): a and c at 4 GB/s (8.6 ms per layer), b at 400 GB/s (0.09 ms). Upstream's
memory-weighted split puts every node in the ring, in order of memory (ties to the larger id): c 0-7, b 8-11, a 12-15, about
100 ms per token, so a 40-token request lasts about four seconds; without b: c 0-9, a 10-15. The origin is a node of unknown
memory, in no ring: in this process where the test drives several requests, or an `exo run` process.

A crash is reported at once by the node that can no longer pass its hidden states on to b. b's own stage is kept short, so the
kill almost never lands inside it: a kill there (like any hang) leaves nobody to report, and the origin notices within seconds
that no token comes, health-checks the ring and names the node that does not answer.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time

import pytest

from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.paced_inference_engine import PacedInferenceEngine
from exo.orchestration.requests import RequestFailed
from exo.topology.cost_model import device_pacing
from tests.cluster.harness import (
  CLIENT,
  EXO,
  ROOT,
  Cluster,
  Device,
  Spy,
  collect_topology,
  error_lines,
  plan_line,
  reference_tokens,
  ring_of,
  wait_for_local_mesh,
)
from tests.support.patience import HANG_S

MODEL = "llama-3.2-1b"
PROMPT = "Survive a crash"
DEVICES = {"a": Device(1000, 1, 4), "b": Device(1000, 1, 400), "c": Device(2000, 1, 4)}
RING = [("c", 8), ("b", 4), ("a", 4)]
REQUEST_TIMEOUT_S = 60.0  # far beyond the 4 s a request takes even on a busy machine: each failure below is named long before
SLACK_S = 15.0  # generous: after the deadline the origin health-checks the ring (1 s) and tells each node the request is over (2 s each)
MAX_TOKENS = 40
WEIGHTED = ("--partitioning-strategy", "ring-memory-weighted")


def start_paced_trio(cluster: Cluster, clients=("o",)) -> None:
  for node_id, device in DEVICES.items():
    cluster.declare(node_id, device)
  for client in clients:
    cluster.declare(client, CLIENT)
  for node_id in DEVICES:
    cluster.start(node_id, "--emulate")
  cluster.wait_for_mesh()


async def fail_mid_request(cluster: Cluster, origin, how: signal.Signals) -> tuple[RequestFailed, float]:
  """From `origin`: start a request, hit b with `how` once two tokens are back, and await the outcome. Returns the exception
  raised and the seconds from the hit to the failure."""
  await origin.start(wait_for_peers=len(DEVICES))
  two_tokens = asyncio.Event()
  request = asyncio.create_task(origin.generate(PROMPT, max_tokens=MAX_TOKENS, on_token=lambda tokens: len(tokens) >= 2 and two_tokens.set()))
  await asyncio.wait({request, asyncio.create_task(two_tokens.wait())}, timeout=HANG_S, return_when=asyncio.FIRST_COMPLETED)
  assert two_tokens.is_set() and not request.done(), "the request should still be running when b is hit"
  assert origin.current_plan.ring() == RING
  cluster.nodes["b"].proc.send_signal(how)
  hit = time.monotonic()
  try:
    await asyncio.wait_for(request, REQUEST_TIMEOUT_S + SLACK_S)
  except RequestFailed as e:
    return e, time.monotonic() - hit
  raise AssertionError("the request did not fail")


async def next_request_runs_on_survivors(origin) -> None:
  survivors = await origin.generate(PROMPT, max_tokens=5)
  assert survivors.plan.ring() == [("c", 10), ("a", 6)]
  assert survivors.tokens == await reference_tokens(origin.model, PROMPT, 5)


def run_origin(cluster: Cluster, scenario) -> None:
  """`await scenario(origin)` with the origin o in this process, stopped whatever happens."""

  async def main():
    origin = cluster.local_node("o", *WEIGHTED, "--request-timeout", str(REQUEST_TIMEOUT_S))
    try:
      await scenario(origin)
    finally:
      await origin.stop()

  asyncio.run(main())


def test_killed_node_fails_the_request_naming_it_and_the_next_runs_on_survivors(cluster):
  start_paced_trio(cluster)

  async def scenario(origin):
    error, elapsed = await fail_mid_request(cluster, origin, signal.SIGKILL)
    assert "'b'" in str(error), str(error)  # c could not reach it (or, if the kill landed in b's own stage, b did not answer)
    assert elapsed < REQUEST_TIMEOUT_S  # reported, not timed out
    await next_request_runs_on_survivors(origin)

  run_origin(cluster, scenario)


@pytest.mark.slow
def test_hung_node_fails_the_request_before_its_deadline_and_the_next_runs_on_survivors(cluster):
  start_paced_trio(cluster)

  async def scenario(origin):
    error, elapsed = await fail_mid_request(cluster, origin, signal.SIGSTOP)
    # nobody reports a hang: the origin notices that no token comes, health-checks the ring and names b, before the deadline
    assert "stalled" in str(error) and "'b' did not answer a health check" in str(error), str(error)
    assert elapsed < REQUEST_TIMEOUT_S  # about WATCH_S of silence plus one health-check timeout
    await next_request_runs_on_survivors(origin)  # at once: no wait for the next topology refresh to clear a and c

  run_origin(cluster, scenario)


def test_exo_run_reports_a_crash_in_one_line(cluster):
  cluster.declare_devices = True  # so the survivors' views show b as a node that could hold layers, not one of unknown memory
  start_paced_trio(cluster, clients=("x", "y"))
  args = [*EXO, "run", MODEL, "--prompt", PROMPT, *cluster.node_args("x", "--wait-for-peers", "3", "--request-timeout", str(REQUEST_TIMEOUT_S))]
  args += [*WEIGHTED, "--max-generate-tokens", str(MAX_TOKENS)]
  run = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "DEBUG": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stderr_lines: list[str] = []
  sent = threading.Event()  # x logged that its request went to the first stage (DEBUG=1): it runs for about four seconds

  def read_stderr():
    for line in run.stderr:
      stderr_lines.append(line)
      if "prompt sent to" in line:
        sent.set()

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  try:
    assert sent.wait(HANG_S), "".join(stderr_lines)
    assert run.poll() is None, "the request should still be running when b is killed"
    cluster.nodes["b"].kill()
    killed = time.monotonic()
    run.wait(REQUEST_TIMEOUT_S + SLACK_S + 30)
  finally:
    if run.poll() is None:
      run.kill()
      run.wait()
  reader.join(10)
  with run.stdout, run.stderr:
    stdout, stderr = run.stdout.read(), "".join(stderr_lines)
  assert run.returncode == 1
  assert stdout == ""
  [line] = error_lines(stderr)
  assert "'b'" in line, stderr
  assert time.monotonic() - killed < REQUEST_TIMEOUT_S  # the crash was reported, the request did not time out

  # a new origin, which never reached b, plans without it at once, though a and c list b until their discovery timeout (30 s)
  result = cluster.run("y", MODEL, PROMPT, "--request-timeout", str(REQUEST_TIMEOUT_S), "--max-generate-tokens", "5", "--show-plan", *WEIGHTED)
  assert "b" in (collect_topology(cluster.nodes["a"].address) or {"nodes": {}})["nodes"]
  assert result.returncode == 0, result.stderr
  assert ring_of(plan_line(result.stderr)) == [("c", 0, 9), ("a", 10, 15)]


def test_ring_stops_when_its_origin_dies(cluster):
  """Each token goes round before the origin is told of it; once the origin cannot be told, the ring stops going round."""
  for node_id in ("a", "b"):
    cluster.declare(node_id, Device(800, 1, 20))  # 8 layers each at an end of the ring: both needed; 1.7 ms per layer
  cluster.declare("o", CLIENT)
  calls: list = []
  finished: list = []  # (request id, ring node): the request is over at that node, which runs no step of it from then on

  async def scenario():
    origin = cluster.local_node("o")
    ring = [cluster.local_node(node_id) for node_id in ("a", "b")]
    changed = asyncio.Event()  # a ring node ran a step, or dropped a request
    for node in ring:  # never EOS: only the origin's death can end this request early
      paced = PacedInferenceEngine(DummyInferenceEngine(eos_after=10**9), device_pacing(node.model, node.capabilities))
      node.engine = Spy(paced, node.id, calls, finished, changed.set)
    try:
      await asyncio.gather(*(node.start(wait_for_peers=2) for node in [origin, *ring]))
      await wait_for_local_mesh([origin, *ring])
      three = asyncio.Event()
      request = asyncio.create_task(origin.generate(PROMPT, max_tokens=5_000, on_token=lambda tokens: len(tokens) >= 3 and three.set()))
      await asyncio.wait_for(three.wait(), HANG_S)
      [request_id] = origin.originated_request_ids()
      request.cancel()
      await origin.stop()
      deadline = time.monotonic() + 30  # generous: the last stage retries the origin for 5 s before it gives up
      while not any(r == request_id for r, _ in finished):  # until a ring node drops the request: told it is over, or unable to tell
        changed.clear()
        left = deadline - time.monotonic()
        assert left > 0, f"the ring kept going round for its dead origin: {len(calls)} stages run"
        with contextlib.suppress(asyncio.TimeoutError):
          await asyncio.wait_for(changed.wait(), left)
      while True:  # then the steps already under way end: silence is what the ring stopped looks like
        changed.clear()
        try:
          await asyncio.wait_for(changed.wait(), 1.5)
        except asyncio.TimeoutError:
          break
        assert time.monotonic() < deadline, f"the ring kept going round for its dead origin: {len(calls)} stages run"
    finally:
      for node in [origin, *ring]:
        await node.stop()

  asyncio.run(scenario())
