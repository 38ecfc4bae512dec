"""A node of the ring. It wires the collaborators that each do one job and routes the messages it receives to them:

  ClusterView     the live peers and the topology merged from every node's view (cluster_view.py)
  PlannerDriver   the plan of the next request, re-planned with hysteresis, and its prediction (planner_driver.py)
  Origin          a request this node receives, from admission to its last token (origin.py)
  StageRunner     this node's stages of requests: run, pass on, report, relay failures (stage_runner.py)
  LayerTimeMeter  the engine's measured layer times, published with the device (layer_meter.py)
  PeerFiles       the model files it gets from its peers before the hub, and serves them (exo.networking.peer_files)

The node that receives a request plans it once; the plan travels in every message of the request, so each hop follows the
same ring whatever its own view of the topology. Work triggered by a message runs in a task, so a gRPC call returns at once
and a long generation never nests calls around the ring. The API and the terminal view see the node as a ServingNode
(service.py).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Callable, Coroutine

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities, FileTransfer, layer_ranges
from exo.base.errors import Busy
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.hub_files import HubFile
from exo.inference.inference_engine import InferenceEngine
from exo.inference.model_figures import model_spec_for
from exo.inference.model_file_engine import ModelFileEngine
from exo.inference.model_files import held_layers, present
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.discovery import Discovery
from exo.networking.peer_files import PeerFiles
from exo.networking.peer_handle import FileState
from exo.networking.request_context import RequestContext
from exo.networking.server import Server
from exo.orchestration.admission import AdmissionPolicy
from exo.orchestration.cluster_view import ClusterView
from exo.orchestration.layer_meter import LayerTimeMeter
from exo.orchestration.messenger import Messenger
from exo.orchestration.model_text import ModelText
from exo.orchestration.origin import Origin
from exo.orchestration.planner_driver import PlannerConfig, PlannerDriver
from exo.orchestration.recent_ids import RecentIds
from exo.orchestration.requests import Admission, Generation, LastRequest
from exo.orchestration.served import ServedRequests
from exo.orchestration.stage_runner import StageRunner
from exo.orchestration.stage_scheduler import StageScheduler
from exo.topology.cost_model import requests_held
from exo.topology.plan import Plan

log = logging.getLogger(__name__)

__all__ = ["Node"]


class Node:
  def __init__(
    self,
    node_id: str,
    engine: InferenceEngine,
    discovery: Discovery,
    capabilities: DeviceCapabilities,
    model: ModelSpec | str,
    planner: PlannerConfig | None = None,
    max_generate_tokens: int = 256,
    request_timeout: float = 120.0,
    refresh_interval: float = 1.0,
    measure_layer_times: bool = False,
    max_requests: int = 64,
    admit_by_rate: bool = False,
  ):
    # what requests without a model of their own run; a repo id: a model whose files the node gets once it joins its cluster
    self.model_ref = model if isinstance(model, str) else None
    self.model = None if isinstance(model, str) else model
    self.measure_layer_times = measure_layer_times  # calibrate the engine at start, refine from requests, publish
    self.server: Server | None = None
    self.cluster = ClusterView(node_id, discovery, capabilities, refresh_interval)
    planner = planner or PlannerConfig()
    self.planner = PlannerDriver(planner, self.cluster)
    self.text = ModelText(engine)
    self.meter = LayerTimeMeter(engine, self.cluster)
    self.finished = RecentIds()  # requests over (finished, cancelled, failed): their late messages are dropped
    self.scheduler = StageScheduler(
      self.meter.engine_call, self.finished.__contains__, planner.request.params.batch, batch_limit=self._requests_held,
      prompt_rows=engine.prompt_rows,
    )  # fmt: skip
    self.served = ServedRequests(request_timeout)  # requests whose stage runs here, and who may change each
    self.policy = AdmissionPolicy(node_id, max_requests, request_timeout, admit_by_rate)
    self.messenger = Messenger(self.cluster, self)
    self.origin = Origin(self.cluster, self.planner, self.policy, self.text, self.messenger, self._running, max_generate_tokens)
    self.stages = StageRunner(
      node_id, model, self.text, self.scheduler, self.messenger, self.served, self.finished,
      self.origin.requests.__contains__, self._take_place, self.spawn,
    )  # fmt: skip
    self._tasks: set[asyncio.Task] = set()
    self.files = PeerFiles(node_id, lambda: list(self.cluster.peers.values()), measured=self.cluster.measured_bandwidth)
    if (files_engine := self._model_file_engine()) is not None:
      files_engine.mirror = self.files

  @property
  def id(self) -> str:
    return self.cluster.node_id

  @property
  def engine(self) -> InferenceEngine:
    return self.text.engine

  @engine.setter
  def engine(self, engine: InferenceEngine) -> None:
    self.text.engine = self.meter.engine = engine
    self.scheduler.prompt_rows = engine.prompt_rows

  @property
  def capabilities(self) -> DeviceCapabilities:
    return self.cluster.capabilities

  @property
  def topology(self) -> Topology:
    return self.cluster.topology

  @property
  def peers(self) -> dict:
    return self.cluster.peers

  @peers.setter
  def peers(self, peers: dict) -> None:
    self.cluster.peers = peers

  @property
  def planner_config(self) -> PlannerConfig:
    return self.planner.config

  @property
  def current_plan(self) -> Plan | None:
    return self.planner.current_plan

  @property
  def last_generation(self) -> Generation | None:
    return self.origin.last_generation

  @property
  def last_request(self) -> LastRequest | None:
    return self.origin.last_request

  @property
  def max_generate_tokens(self) -> int:
    return self.origin.max_generate_tokens

  async def start(self, wait_for_peers: int = 0, wait_timeout: float | None = None) -> None:
    """Serve; with `wait_for_peers`, once that many peers are live, or ClusterCannotServe after `wait_timeout` seconds naming
    those that answered and those heard of that did not. A node that lacks files of its model joins its cluster before it gets
    them (the model's figures, then the layers it calibrates on), so that they come from its peers where they can."""
    self.files.loop = asyncio.get_running_loop()
    if self.reads_model_files():
      self.spawn(self._announce_files())
    if self.model_ref is None and not self._lacks_files():
      if self.measure_layer_times:
        await self.meter.calibrate(self.model)
      await self.server.start()
      await self.cluster.start(wait_for_peers, wait_timeout)
      return
    await self.server.start()
    await self.cluster.start(wait_for_peers, wait_timeout)
    if self.model is None:
      self.model = self.stages.model = await asyncio.to_thread(model_spec_for, self.model_ref, True, self.files)
    if self.measure_layer_times:
      await self.meter.calibrate(self.model)

  async def _announce_files(self) -> None:
    """Keep this node's announced holdings (the layers of its model it holds) and transfers (files arriving) current."""
    while True:
      holdings = {}
      if self.model is not None and (held := await asyncio.to_thread(held_layers, self.model.id, self.model.n_layers)):
        holdings[self.model.id] = layer_ranges(held)
      transfers = tuple(FileTransfer(f"{f.repo}/{f.filename}", here, f.size, source) for f, here, source in self.files.progress())
      if (holdings, transfers) != (self.capabilities.holdings, self.capabilities.transfers):
        self.cluster.publish(replace(self.capabilities, holdings=holdings, transfers=transfers))
      await asyncio.sleep(self.cluster.refresh_interval)

  def _lacks_files(self) -> bool:
    return self._model_file_engine() is not None and not present(self.model.id)

  async def stop(self) -> None:
    for task in list(self._tasks):
      task.cancel()
    await self.scheduler.stop()
    await self.cluster.stop()
    await self.server.stop()

  def is_healthy(self) -> bool:
    return True

  def spawn(self, coroutine: Coroutine) -> None:
    """Run `coroutine` in a task the node cancels when it stops."""
    task = asyncio.create_task(coroutine)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  def tasks_running(self) -> int:
    """Work the node's messages started that is not over yet (stages, failures being reported)."""
    return len(self._tasks)

  # ---------- what the API and the terminal view use (service.py) ----------

  async def admit(self, prompt: str, model: ModelSpec, max_tokens: int | None = None) -> Admission:
    return await self.origin.admit(prompt, model, max_tokens)

  def release(self, admission: Admission | None) -> None:
    self.origin.release(admission)

  async def generate(
    self,
    prompt: str,
    model: ModelSpec | None = None,
    max_tokens: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    sampling: Sampling = GREEDY,
    stop: tuple[str, ...] = (),
    admission: Admission | None = None,
  ) -> Generation:
    """Origin.generate, of this node's model unless `model` says otherwise."""
    return await self.origin.generate(prompt, model or self.model, max_tokens, on_token, sampling, stop, admission)

  def plan(self, model: ModelSpec) -> Plan:
    return self.planner.plan(model)

  def candidate_plan(self, model: ModelSpec) -> Plan:
    return self.planner.candidate_plan(model)

  def current_prediction(self) -> Plan | None:
    return self.planner.current_prediction()

  def planning_topology(self) -> Topology:
    return self.planner.topology()

  def rtt_ms(self, node_id: str) -> float | None:
    return self.cluster.rtt_ms(node_id)

  def reads_model_files(self) -> bool:
    return self._model_file_engine() is not None

  def _model_file_engine(self) -> ModelFileEngine | None:
    engine = self.engine
    while isinstance(engine, EngineWrapper):
      engine = engine.inner
    return engine if isinstance(engine, ModelFileEngine) else None

  def file_status(self, file: HubFile, claim: int) -> FileState:
    return self.files.status(file, claim)

  def file_chunks(self, file: HubFile, offset: int, length: int) -> AsyncIterator[tuple[int, bytes]]:
    return self.files.chunks(file, offset, length)

  def load(self) -> dict:
    """What the node is doing: requests it is the origin of, requests with steps waiting at its stage, the mean size of its
    last decode batches (up to 100), its decode calls and their requests' steps since it started (a client reads the mean batch
    between two readings from them), and the tokens per second its requests received over the last LOAD_WINDOW_S seconds."""
    sizes = self.scheduler.batch_sizes
    return {
      "active_requests": len(self.active_request_ids()),
      "waiting_requests": self.scheduler.waiting_requests(),
      "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
      "max_batch": self.scheduler.largest_batch(),
      "decode_calls": self.scheduler.decode_calls,
      "decode_steps": self.scheduler.decode_steps,
      "tokens_per_s": self.origin.tokens_per_s(),
    }

  def originated_request_ids(self) -> list[str]:
    """The requests this node is the origin of that are still generating, oldest first."""
    return list(self.origin.requests)

  def active_request_ids(self) -> set[str]:
    """The requests running on this node: those it is the origin of and those whose stage runs here."""
    return set(self.origin.requests) | self.served.ids()

  def _running(self) -> int:
    return len(self.active_request_ids())

  def _requests_held(self, shard: Shard, context_tokens: int) -> int | None:
    """Requests whose KV cache at `context_tokens` (0: the model's default) fits in this node's memory beside the shard, less the
    headroom: a stage's largest batch (None: unbounded, the model or its KV size or the memory unknown)."""
    model = self.model if self.model is not None and shard.model_id == self.model.id else MODELS.get(shard.model_id)
    if model is None:
      return None
    usable = self.capabilities.memory * 2**20 * (1 - self.planner.config.request.params.memory_headroom)
    return requests_held(model, usable, shard, context_tokens or model.default_context())

  def _take_place(self, context: RequestContext) -> None:
    """Count a request that starts at this node's stage among those running here; Busy if that makes more than --max-requests."""
    running = self.active_request_ids()
    if context.request_id not in running and len(running) >= self.policy.max_requests:
      raise Busy(f"node {self.id!r} already runs {len(running)} requests, its limit (--max-requests); try again shortly")
    self.served.track(context)

  # ---------- messages, from the wire (the gRPC server) or from this node (the Messenger) ----------

  async def process_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str | None = None) -> None:
    """The prompt of a request, for this node's first stage, from `sender` (None: this node, its origin, which admitted it).
    From another node it is checked first (StageRunner.take_prompt): refused with nothing run unless it came from its origin and
    fits."""
    if context.request_id in self.finished:  # a message of a request already over is dropped
      return
    if sender is None:
      self.served.track(context)
      self.spawn(self.stages.run(shard, context, prompt=prompt))
      return
    tokens = await self.stages.take_prompt(shard, prompt, context, sender)
    self.spawn(self.stages.run(shard, context, tensor=tokens[None, :]))

  async def process_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str | None = None) -> None:
    """Token ids or hidden states of a request for this node's stage, from `sender` (None: this node); from another node they
    are checked first (StageRunner.take_tensor)."""
    if context.request_id in self.finished:
      return
    if sender is None:
      self.served.track(context)
    elif not await self.stages.take_tensor(shard, tensor, context, sender):
      return
    self.spawn(self.stages.run(shard, context, tensor=tensor))

  def process_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str, sender: str | None = None) -> None:
    self.origin.process_result(request_id, tokens, is_finished, error, sender)

  def process_opaque_status(self, request_id: str, status: str, sender: str | None = None) -> None:
    """A status of a request from `sender` (None: this node): "finish" ends it here, unless `sender` is neither its origin nor
    on its ring; "failed" asks this node to tell the request's origin that it failed (`reporter`: the ring node that asked), or
    tells this node, if it is the origin."""
    try:
      message = json.loads(status)
    except json.JSONDecodeError:
      log.warning("ignoring a status that is not JSON for request %s", request_id)
      return
    if not isinstance(message, dict):
      log.warning("ignoring a status that is not a JSON object for request %s", request_id)
      return
    if message.get("type") == "finish":
      own = self.origin.requests.get(request_id)
      senders = own.senders | {self.id} if own is not None else self.served.senders(request_id)
      if sender is not None and senders is not None and sender not in senders:
        log.warning("ignoring a cancellation of request %s from %r, which is neither its origin nor on its ring", request_id, sender)
        return
      self.stages.finish(request_id)
    elif message.get("type") == "failed" and isinstance(message.get("origin"), str) and isinstance(message.get("error"), str):
      if message["origin"] != self.id:
        self.spawn(self.messenger.pass_on_failure(request_id, message["origin"], message["error"], sender))
      elif sender is None or isinstance(message.get("reporter"), str):
        self.process_result(request_id, [], True, message["error"], sender if sender is None else message["reporter"])

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    return await self.cluster.collect_topology(visited, max_depth)
