"""Local clusters of `exo` node processes, latency proxies and one-shot `exo` CLI calls, all on 127.0.0.1: for the multi-process
tests and the benchmarks.

Every node uses manual discovery with a peers file of its own, so a link can be routed through a LatencyProxy (the proxy in front
of v, used by u only, delays u -> v traffic both ways). Every process started here is killed by `Cluster.close()`.

A node runs the dummy engine and serves its HTTP API on a port of the OS's choosing unless declared otherwise: `declare(...,
engine=[...], api=True)` gives it other engine flags and an API port of its own, known in advance (`Cluster.api_ports`).
"""

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from exo.networking.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository: processes run from it
HOST = "127.0.0.1"
EXO = [sys.executable, "-m", "exo.main"]
PROXY = [sys.executable, "-m", "exo.tools.latency_proxy"]
START_TIMEOUT_S = 300.0  # only a hang: on a loaded 2-core machine a node is normally up in about half a second
RUN_TIMEOUT_S = 300.0  # an `exo run` on a dummy-engine cluster normally takes about two seconds; only a hang reaches this
DUMMY_ENGINE = ("--inference-engine", "dummy")

T = TypeVar("T")


@dataclass(frozen=True)
class Device:
  """Declared device figures: memory in MB, fp16 TFLOPS, memory bandwidth in GB/s."""

  memory_mb: float
  tflops: float
  memory_bandwidth: float

  def args(self) -> list[str]:
    return ["--memory-mb", f"{self.memory_mb:g}", "--tflops", f"{self.tflops:g}", "--memory-bandwidth", f"{self.memory_bandwidth:g}"]

  def capabilities(self, name: str = "declared") -> dict:
    """The device_capabilities of a peers-file entry (what a node `--tflops X` reports: fp32 = X / 2, int8 = X)."""
    flops = {"fp32": self.tflops / 2, "fp16": self.tflops, "int8": self.tflops}
    return {"model": name, "chip": name, "memory": self.memory_mb, "flops": flops, "memory_bandwidth": self.memory_bandwidth}


CLIENT = Device(0, 1, 1)  # an `exo run` origin of unknown memory: it holds no layer under either strategy, so it is in no ring


def spawn(args: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
  # No preexec_fn (e.g. to set a parent-death signal): it makes CPython run gRPC's at-fork handlers in the child, which can abort it.
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  with open(log_path, "ab") as log:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=kwargs.pop("stdout", log), stderr=log, **kwargs)


def stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
  """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
  if proc.poll() is None:
    proc.terminate()
  try:
    proc.wait(grace_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  for stream in (proc.stdout, proc.stderr):
    if stream is not None:
      stream.close()


@dataclass
class NodeProcess:
  node_id: str
  port: int
  device: Device
  proc: subprocess.Popen
  log_path: Path
  api_port: int = 0  # 0: the OS chose it, and only the node's log says which

  @property
  def address(self) -> str:
    return f"{HOST}:{self.port}"

  def kill(self) -> None:
    """SIGKILL: a crash, with no chance to say goodbye."""
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
  """Nodes, clients (`exo run` origins) and proxies on 127.0.0.1 under `workdir`. Declare every node and client first, so each
  peers file lists them all; `close()` kills everything started."""

  workdir: Path
  nodes: dict[str, NodeProcess] = field(default_factory=dict)
  ports: dict[str, int] = field(default_factory=dict)  # every declared node and client
  devices: dict[str, Device] = field(default_factory=dict)
  routes: dict[tuple[str, str], int] = field(default_factory=dict)  # (from, to) -> the port `from` dials for `to` (a proxy's)
  engines: dict[str, tuple[str, ...]] = field(default_factory=dict)  # every declared node's engine flags
  api_ports: dict[str, int] = field(default_factory=dict)  # every declared node's HTTP API port (0: the OS chooses)
  processes: list[subprocess.Popen] = field(default_factory=list)
  declare_devices: bool = False  # peers files give every node's device figures (clients' are always given)

  def __post_init__(self):
    self.workdir.mkdir(parents=True, exist_ok=True)

  def declare(self, node_id: str, device: Device, engine: Sequence[str] = DUMMY_ENGINE, api: bool = False) -> None:
    """Declare a node or client: its device, its engine flags (e.g. `--inference-engine tinygrad --engine-slowdown 3`) and, with
    `api`, an HTTP API port of its own that a caller can reach (otherwise the OS chooses one when the node starts)."""
    self.ports[node_id], self.devices[node_id] = free_port(), device
    self.engines[node_id], self.api_ports[node_id] = tuple(engine), free_port() if api else 0

  def start_proxy(self, target_port: int, delay_ms: float) -> int:
    """A LatencyProxy process adding `delay_ms` each way in front of target_port; returns the port it listens on."""
    log_path = self.workdir / f"proxy-{len(self.processes)}-to-{target_port}.log"
    args = [*PROXY, "--listen", f"{HOST}:0", "--target", f"{HOST}:{target_port}", "--delay-ms", f"{delay_ms}"]
    proc = spawn(args, log_path, stdout=subprocess.PIPE)
    self.processes.append(proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
      ready, _, _ = select.select([proc.stdout], [], [], 0.1)
      if ready:
        line = proc.stdout.readline().decode()
        if line.startswith("listening on "):
          return int(line.rsplit(":", 1)[1])
      if proc.poll() is not None:
        break
    raise RuntimeError(f"latency proxy to port {target_port} did not start: {log_path.read_text(errors='replace')}")

  def delay(self, u: str, v: str, rtt_ms: float) -> None:
    """Put `rtt_ms` of round trip on the link u - v: each side dials the other through a proxy adding rtt_ms / 2 each way."""
    for a, b in ((u, v), (v, u)):
      self.routes[(a, b)] = self.start_proxy(self.ports[b], rtt_ms / 2)

  def peers_file(self, node_id: str) -> Path:
    """The peers file of `node_id`: every other declared node, at the port it dials for it (a proxy's on a delayed link)."""
    declared = {i: d for i, d in self.devices.items() if self.declare_devices or d == CLIENT}
    peers = {}
    for peer_id, port in self.ports.items():
      if peer_id != node_id:
        entry = {"address": HOST, "port": self.routes.get((node_id, peer_id), port)}
        if peer_id in declared:
          entry["device_capabilities"] = declared[peer_id].capabilities(peer_id)
        peers[peer_id] = entry
    path = self.workdir / f"peers-{node_id}.json"
    path.write_text(json.dumps({"peers": peers}, indent=2))
    return path

  def node_args(self, node_id: str, *extra: str) -> list[str]:
    """The flags that make `node_id` a node of this cluster: its id, port, device, engine, API port and its own peers file."""
    return [
      "--node-id",
      node_id,
      "--node-host",
      HOST,
      "--node-port",
      str(self.ports[node_id]),
      "--discovery-module",
      "manual",
      "--discovery-config-path",
      str(self.peers_file(node_id)),
      *self.engines[node_id],
      "--chatgpt-api-host",  # loopback, as by default, and a free port each (the default is 52415)
      HOST,
      "--chatgpt-api-port",
      str(self.api_ports[node_id]),
      *self.devices[node_id].args(),
      *extra,
    ]

  def start(self, node_id: str, *extra: str) -> NodeProcess:
    """Start a declared node as a long-running `exo` process (no prompt, no terminal view)."""
    log_path = self.workdir / f"node-{node_id}.log"
    proc = spawn([*EXO, *self.node_args(node_id, *extra), "--disable-tui"], log_path)
    self.processes.append(proc)
    node = self.nodes[node_id] = NodeProcess(node_id, self.ports[node_id], self.devices[node_id], proc, log_path, self.api_ports[node_id])
    return node

  def run(self, client_id: str, model: str, prompt: str, *extra: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`exo run MODEL --prompt PROMPT` from the declared client `client_id`, waiting for every node still running."""
    running = sum(node.proc.poll() is None for node in self.nodes.values())
    args = [*EXO, "run", model, "--prompt", prompt, *self.node_args(client_id, "--wait-for-peers", str(running), *extra)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

  def topology(self, node_id: str, timeout: float = 30.0) -> dict:
    """`exo topology --address` of a started node, parsed."""
    result = subprocess.run([*EXO, "topology", "--address", self.nodes[node_id].address], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
      raise RuntimeError(f"exo topology failed for {node_id}: {result.stderr}")
    return json.loads(result.stdout)

  def wait_for(
    self,
    ready: Callable[[], T],
    what: str,
    timeout: float = START_TIMEOUT_S,
    node_ids: list[str] | None = None,
    retry_on: tuple[type[Exception], ...] = (),
    poll_s: float = 0.3,
  ) -> T:
    """Call `ready()` until it returns a true value, and return that; an exception in `retry_on` counts as not yet. Raises
    RuntimeError if a node in `node_ids` (default: all started) exits first, TimeoutError after `timeout` s (with the logs)."""
    deadline = time.monotonic() + timeout
    while True:
      for node_id in node_ids or list(self.nodes):
        proc = self.nodes[node_id].proc
        if proc.poll() is not None:
          raise RuntimeError(f"node {node_id} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
      try:
        if result := ready():
          return result
      except retry_on:
        pass
      if time.monotonic() > deadline:
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}:\n{self.logs()}")
      time.sleep(poll_s)

  def wait_for_mesh(self, node_ids: list[str] | None = None, timeout: float = START_TIMEOUT_S) -> dict[str, dict]:
    """Wait until every node in `node_ids` (default: all started) sees all of them, with a measured RTT on every directed edge
    between them; returns each node's view (collected over gRPC from this process, cheaper than `exo topology`)."""
    node_ids = sorted(node_ids or self.nodes)
    views: dict[str, dict] = {}

    def meshed() -> dict[str, dict] | None:
      views.update({n: collect_topology(self.nodes[n].address) for n in node_ids})
      return dict(views) if all(view is not None and mesh_complete(view, node_ids) for view in views.values()) else None

    try:
      return self.wait_for(meshed, f"nodes {node_ids} to all see each other", timeout, node_ids)
    except TimeoutError as e:
      raise TimeoutError(f"{e}\nlast views: {views}") from None

  def logs(self) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

  def close(self) -> None:
    """SIGTERM every process started, then SIGKILL whatever has not exited a few seconds later."""
    for proc in self.processes:
      if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a process a test froze (SIGSTOP) handles SIGTERM only once it runs again
        proc.terminate()
    deadline = time.monotonic() + 3.0
    for proc in self.processes:
      stop_process(proc, max(0.0, deadline - time.monotonic()))
    self.processes.clear()

  def local_node(self, node_id: str, *extra: str):
    """A declared node built in this process exactly as `exo` builds one (not started): for an origin whose requests a test
    drives, or a node whose engine a test watches."""
    from exo.node_flags import build_parser
    from exo.node_setup import build_node

    return build_node(build_parser().parse_args(self.node_args(node_id, *extra)))


def mesh_complete(view: dict, node_ids: list[str]) -> bool:
  edges = {(e["from"], e["to"]): e.get("rtt_ms") for e in view["edges"]}
  return set(node_ids) <= set(view["nodes"]) and all(edges.get((a, b)) is not None for a in node_ids for b in node_ids if a != b)


def collect_topology(address: str, timeout: float = 5.0) -> dict | None:
  """A node's live topology (as `exo topology` prints it) over gRPC from this process; None if it does not answer."""
  from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle

  async def collect():
    peer = GRPCPeerHandle("harness", address, None)
    try:
      return (await asyncio.wait_for(peer.collect_topology(set(), max_depth=1), timeout)).to_dict()
    except Exception:
      return None
    finally:
      await peer.disconnect()

  return asyncio.run(collect())


def edge_rtts(view: dict) -> dict[tuple[str, str], float | None]:
  return {(e["from"], e["to"]): e.get("rtt_ms") for e in view["edges"]}
