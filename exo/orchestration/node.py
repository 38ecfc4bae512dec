"""A node of the ring: keeps the live topology, plans requests it receives, runs its shard and forwards around the ring.

The node that receives a request plans it once; the plan travels in every message of the request, so each hop follows the
same ring whatever its own view of the topology. The last stage samples, reports the tokens to the requesting node and sends
the new token back to the first stage. Work triggered by a message runs in a task, so a gRPC call returns at once and a long
generation never nests calls around the ring.

A node that measures (`measure_layer_times`) times its engine on the model it serves before it starts serving, publishes the
layer times with its device (capabilities, its topology entry, its announcements) and refines them from its own steps of
requests, so re-planning between requests follows the engine's real speed.
"""

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities
from exo.base.errors import BadInput, Busy, ClusterCannotServe
from exo.base.model_spec import MAX_CONTEXT, ModelSpec
from exo.base.models import MODELS
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.calibration import calibrate
from exo.inference.inference_engine import InferenceEngine, Step, positions_in
from exo.inference.layer_time_estimate import LayerTimeEstimate
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.discovery import Discovery
from exo.networking.membership import NotAllowed
from exo.networking.outbox import Outbox
from exo.networking.peer_handle import PeerHandle, Refused
from exo.networking.request_context import RequestContext, RingPlan
from exo.networking.server import Server
from exo.orchestration.recent_ids import RecentIds
from exo.orchestration.replan import should_replan
from exo.orchestration.served import ServedRequests
from exo.orchestration.stage_scheduler import StageScheduler, StepCancelled
from exo.orchestration.stop_strings import visible_text
from exo.topology.cost_model import PlannerParams, Prediction, head_layers
from exo.topology.flops_latency_partitioning_strategy import DEFAULT_PROMPT_TOKENS
from exo.topology.plan import Plan
from exo.topology.planner import plan_for, predict_ring

log = logging.getLogger(__name__)
PEER_WAIT_S = 5.0  # how long a message waits for its ring neighbour to be discovered (nodes that just started)
WATCH_S = 2.0  # the origin health-checks a request's ring when no token has come for this long
LOAD_WINDOW_S = 10.0  # the aggregate tokens/s a node reports is over this many seconds
ADMIT_SHARE = 0.8  # admitted work must be predicted to end within this share of the time to the earliest deadline: the margin for error


def _rows(shard: Shard, tensor: np.ndarray, request_id: str) -> int:
  """The positions in a stage's input from the wire; BadInput unless it is shaped as the stage takes it: token ids (P,) or (1, P)
  on the first, hidden states (1, P, width) on the others, with P >= 1."""
  ids = np.issubdtype(tensor.dtype, np.integer)
  if shard.is_first_layer():
    fits = ids and (tensor.ndim == 1 or (tensor.ndim == 2 and tensor.shape[0] == 1))
  else:
    fits = not ids and tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[2] > 0
  rows = positions_in(tensor) if fits else 0
  if rows < 1:
    want = "token ids (P,) or (1, P)" if shard.is_first_layer() else "hidden states (1, P, width)"
    raise BadInput(
      f"request {request_id}: layers {shard.start_layer}-{shard.end_layer} take {want} with P >= 1, got {tensor.dtype} {list(tensor.shape)}"
    )
  return rows


class RequestFailed(Exception):
  """A request that could not complete: a node on its ring failed or the deadline passed. The message says which."""


@dataclass(frozen=True)
class PlannerConfig:
  strategy: str = "flops-latency"
  objective: str = "latency"
  memory_headroom: float = PlannerParams.memory_headroom
  default_rtt_ms: float = PlannerParams.default_rtt_ms
  replan_threshold: float = 0.1  # adopt a better plan for unchanged membership only if it is this much faster
  batch: int = 1  # requests each stage runs at once when the ring is saturated (the throughput objective's b)
  ignore_layer_times: bool = False  # plan from the devices' roofline alone, as if no node had measured its engine
  max_context: int | None = None  # --max-context: cap on the context each request reserves KV for (None: the model's, at most 8192)

  def params(self) -> dict:
    return {"memory_headroom": self.memory_headroom, "default_rtt_ms": self.default_rtt_ms, "batch": self.batch}


@dataclass(frozen=True)
class Admission:
  """A request the node takes: the plan it runs on, how many tokens its answer may have, and its id, under which it holds its
  place among the node's requests from admission on (`generate` runs it; `release` frees the place of one never run)."""

  plan: Plan
  max_tokens: int
  request_id: str


def drain_s(owed: list[tuple[float, int]], tpot_s: float, throughput_tps: float) -> float:
  """Predicted seconds until requests that still owe (prefill seconds, tokens) each are all answered, on a ring of `tpot_s`
  seconds per token for one request and `throughput_tps` tokens/s when saturated:

    sum(prefill) + max(sum(tokens) / throughput, max(tokens) x tpot)

  the prefills one after another (they take whole stages), then every token at the saturated rate but no sooner than the
  longest answer alone takes (one request's tokens come one after another). Every request is answered by then whatever order
  the stages serve them in: this bounds the last of them."""
  if not owed:
    return 0.0
  tokens = [n for _, n in owed]
  return sum(p for p, _ in owed) + max(sum(tokens) / throughput_tps, max(tokens) * tpot_s)


def predicted_speed(plan: Plan | None) -> tuple[float, float] | None:
  """(TPOT seconds, saturated tokens/s) the plan predicts, or None if it predicts no speed."""
  prediction = plan.prediction if plan is not None else None
  if prediction is None or prediction.tpot_s is None or not prediction.throughput_tps:
    return None
  return prediction.tpot_s, prediction.throughput_tps


def answer_budget(prompt_tokens: int, requested: int | None, context: int, most: int, what: str = "the planned context") -> int:
  """How many tokens the answer to a prompt of `prompt_tokens` may have in a context of `context` tokens (`what` names it): the
  client's `requested` max_tokens if the prompt and it fit (BadInput naming both numbers if not), else what the context leaves
  after the prompt; at most `most` (--max-generate-tokens) either way. BadInput if the prompt leaves no room for one token."""
  if prompt_tokens >= context:
    raise BadInput(
      f"the prompt is {prompt_tokens} tokens, beyond {what} of {context} tokens (the answer included): a prompt may have at most {context - 1}"
    )
  if requested is not None and prompt_tokens + requested > context:
    raise BadInput(
      f"the prompt is {prompt_tokens} tokens and max_tokens is {requested}: {prompt_tokens + requested} tokens, beyond {what} of "
      f"{context} tokens; ask for at most {context - prompt_tokens}"
    )
  return min(requested or most, most, context - prompt_tokens)


@dataclass
class Generation:
  """A finished request at the node that received it."""

  request_id: str
  tokens: list[int]
  text: str
  plan: Plan
  elapsed_s: float
  finish_reason: str  # "stop": an end-of-sequence token or a stop string ended it (the text ends before it); "length": the budget


@dataclass
class _Pending:
  future: asyncio.Future
  tokens: list[int] = field(default_factory=list)
  on_token: Callable[[list[int]], None] | None = None
  last_progress: float = field(default_factory=time.monotonic)  # when the last token came (or the request started)
  arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when tokens come; the stop-string watch clears it
  budget: int = 0  # the tokens it was admitted for
  prefill_s: float = 0.0  # its prompt's predicted prefill, owed until its first token
  deadline: float = math.inf  # time.monotonic() at which it times out
  running: bool = False  # `generate` runs it, and releases it when over
  senders: frozenset[str] = frozenset()  # the nodes of its ring: the others' results are ignored


class Node:
  def __init__(
    self,
    node_id: str,
    engine: InferenceEngine,
    discovery: Discovery,
    capabilities: DeviceCapabilities,
    model: ModelSpec,
    planner: PlannerConfig = PlannerConfig(),
    max_generate_tokens: int = 256,
    request_timeout: float = 120.0,
    refresh_interval: float = 1.0,
    measure_layer_times: bool = False,
    max_requests: int = 64,
    admit_by_rate: bool = False,
  ):
    self.id = node_id
    self.engine = engine
    self.discovery = discovery
    self.capabilities = capabilities
    self.model = model  # what requests without a model of their own run
    self.planner = planner
    self.max_generate_tokens = max_generate_tokens
    self.request_timeout = request_timeout
    self.max_requests = max_requests  # requests this node may run at once, as their origin or a stage; more are refused (Busy)
    self.admit_by_rate = admit_by_rate  # also refuse what the plan's predicted rate cannot finish in time (admit); for engines it predicts
    self.refresh_interval = refresh_interval
    self.server: Server | None = None
    self.peers: dict[str, PeerHandle] = {}
    self.topology = Topology()
    self.topology.update_node(node_id, capabilities)
    self.current_plan: Plan | None = None
    self._planned_membership: set[str] = set()
    self._pending: dict[str, _Pending] = {}
    self._ring_tokens: dict[str, list[int]] = {}  # at the last stage: tokens generated so far per request
    self._generators: dict[str, np.random.Generator] = {}  # at the last stage: each sampled request's own, from its first token
    self._orphans: set[str] = set()  # at the last stage: requests whose origin could not be told a result; not continued
    self._tasks: set[asyncio.Task] = set()
    self._refresher: asyncio.Task | None = None
    self.last_generation: Generation | None = None
    self.measure_layer_times = measure_layer_times  # calibrate the engine at start, refine from requests, publish
    self._measuring: dict[str, tuple[ModelSpec, LayerTimeEstimate]] = {}  # by model id: the models whose layer times it refines
    self._eos: dict[str, set[int]] = {}  # by model id: its end-of-sequence tokens
    self.outbox = Outbox()  # hidden states leave one message per peer and turn of the event loop
    self._finished = RecentIds()  # requests over (finished, cancelled, failed): their late messages are dropped
    self.scheduler = StageScheduler(self._engine_call, self._finished.__contains__, max_batch=planner.batch)
    self._calls_running = 0  # engine calls in flight on this node
    self._calls_started = 0
    self._delivered: deque[tuple[float, int]] = deque()  # at the origin: (time, tokens) of the last LOAD_WINDOW_S seconds
    self._served = ServedRequests(request_timeout)  # requests whose stage runs here, and who may change each

  async def start(self, wait_for_peers: int = 0, wait_timeout: float | None = None) -> None:
    """Serve; with `wait_for_peers`, once that many peers are live, or ClusterCannotServe after `wait_timeout` seconds naming
    those that answered and those heard of that did not."""
    if self.measure_layer_times:
      await self.calibrate(self.model)
    await self.server.start()
    await self.discovery.start()
    try:
      await asyncio.wait_for(self.discovery.discover_peers(wait_for_peers), wait_timeout)
    except asyncio.TimeoutError:
      live, silent = sorted(p.id() for p in await self.discovery.discover_peers()), self.discovery.silent_peers()
      raise ClusterCannotServe(
        f"waited {wait_timeout:g} s for {wait_for_peers} peer(s): {len(live)} answered ({', '.join(live) or 'none'})"
        + (f", {', '.join(silent)} did not" if silent else "")
        + "; start the missing nodes, or check that they are on this network with the same --broadcast-port and --listen-port "
        "(or in the --discovery-config-path file)"
      ) from None
    await self._refresh(0)
    self._refresher = asyncio.create_task(self._refresh_forever())

  async def stop(self) -> None:
    if self._refresher:
      self._refresher.cancel()
    for task in list(self._tasks):
      task.cancel()
    await self.scheduler.stop()
    await self.discovery.stop()
    await self.server.stop()
    for peer in self.peers.values():
      await peer.disconnect()

  def is_healthy(self) -> bool:
    return True

  # ---------- this node's engine: measured layer times ----------

  async def calibrate(self, model: ModelSpec) -> None:
    """Time the engine on `model`'s layers and publish the layer times; refine them from then on with the steps of requests.
    A calibration that fails is logged and publishes nothing (the planner then uses the roofline until steps give figures)."""
    max_bytes = self.capabilities.memory * 2**20 / 2 if self.capabilities.memory > 0 else None
    try:
      measured = await calibrate(self.engine, model, max_bytes)
    except Exception as e:
      log.warning("could not measure the engine on %s: %s: %s", model.id, type(e).__name__, e)
      measured = None
    self._measuring[model.id] = (model, LayerTimeEstimate(measured))
    if measured is not None:
      log.info("engine on %s: %.4g ms a layer per decode step, %.4g ms a layer per prefill token", model.id, measured.decode_ms, measured.token_ms)
      self._publish_layer_times(model.id)

  async def _engine_call(self, shard: Shard, steps: list[Step], chunk: bool) -> list:
    """One engine call of the stage scheduler. A call of one step that ran alone (no other call overlapped it: the scheduler
    runs one per shard) refines the layer times of the model, if this node measures it: a decode step, or a prompt chunk. The
    last stage's step includes the head: eta layers of time. A batch of several decode steps tells neither figure."""
    alone = self._calls_running == 0
    self._calls_running += 1
    self._calls_started += 1
    started, mark = time.perf_counter(), self._calls_started
    try:
      outputs = await self.engine.infer_batch(shard, steps)
    finally:
      self._calls_running -= 1
    single = len(steps) == 1 and not isinstance(outputs[0], Exception)
    if shard.model_id in self._measuring and single and alone and mark == self._calls_started:
      model, estimate = self._measuring[shard.model_id]
      eta = head_layers(model) if shard.is_last_layer() else 0.0
      if estimate.add_step(time.perf_counter() - started, positions_in(steps[0].input_data), shard.get_layer_count() + eta):
        self._publish_layer_times(model.id)
    return outputs

  def _publish_layer_times(self, model_id: str) -> None:
    """This node's capabilities, its entry in the topology and its announcements carry the current estimate."""
    times = self._measuring[model_id][1].value()
    if times is None:
      return
    self.capabilities = self.capabilities.with_layer_times(model_id, times)
    self.topology.update_node(self.id, self.capabilities)
    self.discovery.announce(self.capabilities)

  # ---------- topology: peers, measured RTT, collection ----------

  async def _refresh_forever(self) -> None:
    while True:
      await asyncio.sleep(self.refresh_interval)
      try:
        await self._refresh(0)
      except Exception:
        log.exception("topology refresh failed")

  async def _refresh(self, wait_for_peers: int) -> None:
    """Take the live peers (and their RTT) from discovery, and rebuild the topology from every node's view."""
    self.peers = {p.id(): p for p in await self.discovery.discover_peers(wait_for_peers)}
    self.topology = await self.collect_topology({self.id}, max_depth=1)

  def local_view(self) -> Topology:
    """This node, its live peers and its own measured outgoing edges."""
    view = Topology()
    view.update_node(self.id, self.capabilities)
    for peer_id, peer in self.peers.items():
      view.update_node(peer_id, peer.device_capabilities())
      view.add_edge(self.id, peer_id, self.discovery.rtt_ms(peer_id))
    return view

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    """Own view merged with the views of peers not yet visited, `max_depth` levels deep: their devices and the edges between
    live nodes. Unreachable peers are skipped, and so are nodes this one does not list as live."""
    topology = self.local_view()
    if max_depth <= 0:
      return topology
    todo = [p for p in self.peers.values() if p.id() not in visited]
    seen = visited | {self.id} | {p.id() for p in todo}
    views = await asyncio.gather(*(p.collect_topology(seen, max_depth - 1) for p in todo), return_exceptions=True)
    for peer, view in zip(todo, views):
      if isinstance(view, Exception):
        log.info("could not collect topology from %s: %s", peer.id(), view)
        continue
      # Only this node and its live peers: a node another lists may have left (it lists it until its discovery timeout) and is
      # left out of plans here anyway (planning_topology). A node is the authority on its own device.
      if peer.id() in view.nodes:
        topology.update_node(peer.id(), view.nodes[peer.id()])
      for (a, b), edge in view.edges.items():
        if a != self.id and a in topology.nodes and b in topology.nodes:
          topology.add_edge(a, b, edge.rtt_ms, edge.bandwidth_mbps)
    return topology

  def planning_topology(self) -> Topology:
    """The topology without the nodes this node does not list as peers (those that just failed a request and a health check are
    not listed): every ring node sends its results here, and other nodes list a peer that died until their discovery timeout,
    so a new node would plan with it.
    With `ignore_layer_times`, without the nodes' measured layer times."""
    usable = {self.id} | set(self.peers)
    if set(self.topology.nodes) <= usable and not self.planner.ignore_layer_times:
      return self.topology
    kept = Topology()
    for node_id, caps in self.topology.nodes.items():
      if node_id in usable:
        kept.update_node(node_id, replace(caps, layer_times={}) if self.planner.ignore_layer_times else caps)
    for (a, b), edge in self.topology.edges.items():
      if a in kept.nodes and b in kept.nodes:
        kept.add_edge(a, b, edge.rtt_ms, edge.bandwidth_mbps)
    return kept

  # ---------- planning ----------

  def plan(self, model: ModelSpec) -> Plan:
    """The plan for the next request: a fresh one if membership changed or it beats the current ring by the threshold."""
    topology = self.planning_topology()  # one view of the topology for the candidate and the kept ring
    candidate, current = self._plan_on(topology, model), self.current_plan
    if current is not None and current.model.id == model.id:
      # another context (the cluster's memory changed) is adopted as a change of membership is
      changed = set(topology.nodes) != self._planned_membership or candidate.context_tokens != current.context_tokens
      still = self._predict_on(topology, current)
      if not should_replan(changed, still, candidate.prediction, self.planner.objective, self.planner.replan_threshold):
        self.current_plan = replace(current, prediction=still)  # the kept ring, predicted with today's figures
        return self.current_plan
    self.current_plan, self._planned_membership = candidate, set(topology.nodes)
    return candidate

  def candidate_plan(self, model: ModelSpec) -> Plan:
    """The plan the strategy would make for `model` now, without adopting it."""
    return self._plan_on(self.planning_topology(), model)

  def current_prediction(self) -> Plan | None:
    """The current plan predicted on today's topology (measured layer times move between requests); None before any plan."""
    current = self.current_plan
    if current is None:
      return None
    still = self._predict_on(self.planning_topology(), current)
    return current if still is None else replace(current, prediction=still)

  def _plan_on(self, topology: Topology, model: ModelSpec) -> Plan:
    return plan_for(topology, model, self.planner.strategy, self.planner.objective, max_context=self.planner.max_context, **self.planner.params())

  def _predict_on(self, topology: Topology, plan: Plan) -> Prediction | None:
    """`plan`'s ring predicted on `topology` at the plan's context; None if a ring node has left it."""
    params = PlannerParams(**self.planner.params())
    return predict_ring(topology, plan.model, params, plan.ring(), self.planner.objective, context_tokens=plan.context_tokens)

  # ---------- requests at the node that receives them ----------

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
    """Admit the request (or run `admission`, what `admit` gave for this prompt and model), send the prompt to the first stage,
    and wait for the last stage's tokens (chosen as `sampling` says) until EOS, a stop string in the text (the text ends before
    it), the token budget (`admit`'s) or the deadline. Refused first as `admit` says."""
    started, model = time.perf_counter(), model or self.model
    if "" in stop:
      self.release(admission)
      raise BadInput("a stop string must not be empty")
    admission = admission or await self.admit(prompt, model, max_tokens)
    plan, max_tokens, request_id = admission.plan, admission.max_tokens, admission.request_id
    pending = self._pending.get(request_id)
    if pending is None:
      raise RequestFailed(f"request {request_id} was released before it ran")
    pending.on_token, pending.running = on_token, True
    whole = Shard(model.id, 0, model.n_layers - 1, model.n_layers)  # tokenizers are per model: any shard of it decodes
    watch = asyncio.create_task(self._watch_for_stop(pending, whole, stop)) if stop else None
    ring = None
    try:
      ring = RingPlan.from_node_shards(plan.node_shards(), plan.context_tokens)
      pending.senders = frozenset(ring.node_ids())
      context = RequestContext(request_id, self.id, ring, max_tokens, sampling=sampling)
      try:
        await self._deliver(ring.stages[0].node_id, "prompt", ring.shard(0), prompt, context)
      except RequestFailed:
        await self._check_ring(ring)  # leave the first stage out of plans while it does not answer
        raise
      log.info("request %s: prompt sent to %s, ring %s", request_id, ring.stages[0].node_id, " -> ".join(ring.node_ids()))
      tokens = await self._await_tokens(pending, ring, request_id)
    finally:
      if watch is not None:
        watch.cancel()
      self._pending.pop(request_id, None)
      if ring is not None:
        await self._broadcast_finish(ring, request_id)
    ended = bool(tokens) and tokens[-1] in await self._eos_token_ids(whole)
    text, stopped = visible_text(await self.engine.decode(whole, tokens[:-1] if ended else tokens), stop, final=True)
    finish_reason = "stop" if ended or stopped else "length"
    self.last_generation = Generation(request_id, tokens, text, plan, time.perf_counter() - started, finish_reason)
    return self.last_generation

  async def _watch_for_stop(self, pending: _Pending, shard: Shard, stop: tuple[str, ...]) -> None:
    """End the request with the tokens so far once a stop string is in their text (the ring is told as on any finish)."""
    try:
      eos = await self._eos_token_ids(shard)
      while not pending.future.done():
        await pending.arrived.wait()
        pending.arrived.clear()
        tokens = list(pending.tokens)
        text = await self.engine.decode(shard, tokens[:-1] if tokens and tokens[-1] in eos else tokens)
        if visible_text(text, stop)[1] and not pending.future.done():
          pending.future.set_result(tokens)
    except Exception as e:  # a tokenizer that fails: the request fails with it rather than run past its stop strings
      if not pending.future.done():
        pending.future.set_exception(e)

  async def admit(self, prompt: str, model: ModelSpec, max_tokens: int | None = None) -> Admission:
    """The plan a request runs on (planned now, which may raise ClusterCannotServe) and how many tokens its answer may have
    (answer_budget: the client's `max_tokens`, else what the planned context leaves after the prompt, at most
    --max-generate-tokens), if this node takes it now; it holds its place among the node's requests from now on (`generate`
    runs it, `release` frees it). BadInput if the prompt and `max_tokens` do not fit in the planned context (or the engine's,
    if shorter); Busy as `_make_room` says."""
    if len(self.active_request_ids()) >= self.max_requests:  # a full node refuses before any work
      raise self._full(self.current_plan)
    shard = Shard(model.id, 0, model.n_layers - 1, model.n_layers)
    prompt_tokens, engine_context = len(await self.engine.encode(shard, prompt)), await self.engine.context_length(shard)
    plan = await asyncio.to_thread(self.plan, model)  # the search takes milliseconds to a few seconds
    context, what = plan.context_tokens, "the planned context"
    if engine_context is not None and engine_context < context:
      context, what = engine_context, f"{model.id}'s context"
    budget = answer_budget(prompt_tokens, max_tokens, context, self.max_generate_tokens, what)
    prefill_s = self._make_room(plan, prompt_tokens, budget)  # no await from this check to the place taken: none can pass between
    request_id = str(uuid.uuid4())
    future = asyncio.get_running_loop().create_future()
    self._pending[request_id] = _Pending(future, budget=budget, prefill_s=prefill_s, deadline=time.monotonic() + self.request_timeout)
    return Admission(plan, budget, request_id)

  def release(self, admission: Admission | None) -> None:
    """Free the place of an admitted request that `generate` never ran (a no-op for None, or one it runs or ran)."""
    if admission is not None and admission.request_id in self._pending and not self._pending[admission.request_id].running:
      del self._pending[admission.request_id]

  def _make_room(self, plan: Plan, prompt_tokens: int, budget: int) -> float:
    """Whether the node takes one more request, of `budget` tokens after a prompt of `prompt_tokens` on `plan`, else Busy with
    the seconds after which to ask again. Returns the request's predicted prefill seconds (0 if the plan predicts no speed).

    Always: at most `max_requests` at once. With `admit_by_rate`, when others run and the plan predicts a speed, also only if
    everything admitted, this request included, is predicted to be answered (drain_s of what each still owes: a prefill until
    its first token, its budget less the tokens it has) within ADMIT_SHARE of the time to the earliest deadline among them
    (this one's: now + the request timeout). So a request admitted later never makes an earlier one time out, as long as the
    ring runs at its predicted rate (measured layer times make it the engine's). The prefill is the plan's TTFT, scaled up
    linearly from the prompt length it was predicted for. A node with nothing running always takes one request."""
    speed = predicted_speed(plan)
    if len(self.active_request_ids()) >= self.max_requests:
      raise self._full(plan)
    if speed is None:
      return 0.0
    prefill_s = (plan.prediction.ttft_s or 0.0) * max(1.0, prompt_tokens / DEFAULT_PROMPT_TOKENS)
    if not self.admit_by_rate or not self._pending:
      return prefill_s
    now = time.monotonic()
    earliest = min([p.deadline for p in self._pending.values()] + [now + self.request_timeout])
    needed = self._owed_s(speed, (prefill_s, budget))
    if needed > ADMIT_SHARE * (earliest - now):
      raise Busy(
        f"node {self.id!r} cannot take a request of up to {budget} tokens now: with the {len(self._pending)} it runs it would take "
        f"{needed:.1f} s at the predicted rate, beyond {ADMIT_SHARE:g} of the {earliest - now:.1f} s before the earliest deadline",
        self._retry_after_s(speed),
      )
    return prefill_s

  def _full(self, plan: Plan | None) -> Busy:
    return Busy(
      f"node {self.id!r} already runs {len(self.active_request_ids())} requests, its limit (--max-requests); try again shortly",
      self._retry_after_s(predicted_speed(plan)),
    )

  def _owed_s(self, speed: tuple[float, float] | None, *more: tuple[float, int]) -> float:
    """drain_s of the requests in flight (and `more`) at `speed` (TPOT, throughput); 0 when no speed is predicted."""
    if speed is None:
      return 0.0
    owed = [(0.0 if p.tokens else p.prefill_s, max(0, p.budget - len(p.tokens))) for p in self._pending.values()]
    return drain_s(owed + list(more), *speed)

  def _retry_after_s(self, speed: tuple[float, float] | None) -> int:
    """Whole seconds until the requests in flight are predicted to be answered: at least 1, at most the request timeout."""
    return max(1, min(math.ceil(self._owed_s(speed)), math.ceil(self.request_timeout)))

  async def _await_tokens(self, pending: _Pending, ring: RingPlan, request_id: str) -> list[int]:
    """The request's tokens once the last stage reports it finished. When no token has come for WATCH_S seconds, the ring's
    nodes are health-checked: one that does not answer fails the request at once, naming it, rather than at the deadline (the
    one set at its admission)."""
    deadline = pending.deadline
    while True:
      now = time.monotonic()
      if now >= deadline:
        silent = await self._check_ring(ring)
        because = f": {', '.join(repr(n) for n in silent)} did not answer a health check" if silent else ""
        raise RequestFailed(f"request {request_id} timed out after {self.request_timeout:g} s on ring {' -> '.join(ring.node_ids())}{because}")
      quiet = now - pending.last_progress
      if quiet >= WATCH_S:
        pending.last_progress = now  # checked: the next check after another WATCH_S of silence
        silent = await self._check_ring(ring)
        if silent:
          raise RequestFailed(
            f"request {request_id} stalled on ring {' -> '.join(ring.node_ids())}: {', '.join(repr(n) for n in silent)} did not answer a health check"
          )
        continue
      try:
        return await asyncio.wait_for(asyncio.shield(pending.future), min(WATCH_S - quiet, deadline - now))
      except asyncio.TimeoutError:
        pass
      except RequestFailed:
        await self._check_ring(ring)  # a node reported the failure: leave out of plans those that no longer answer
        raise

  def process_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str, sender: str | None = None) -> None:
    """Tokens (or a failure) of a request this node is the origin of, from `sender` (None: this node); ignored from a node that
    is not on the request's ring."""
    pending = self._pending.get(request_id)
    if pending is None or pending.future.done():
      return
    if sender is not None and sender not in pending.senders:
      log.warning("ignoring a result for request %s from %r, which is not on its ring", request_id, sender)
      return
    if error:
      pending.future.set_exception(RequestFailed(error))
      return
    if not is_finished and len(tokens) <= len(pending.tokens):
      return  # a report resent, or overtaken by the next one
    if len(tokens) > len(pending.tokens):
      pending.last_progress = time.monotonic()
      self._delivered.append((pending.last_progress, len(tokens) - len(pending.tokens)))
    pending.tokens = list(tokens)
    pending.arrived.set()
    if pending.on_token:
      pending.on_token(pending.tokens)
    if is_finished:
      pending.future.set_result(pending.tokens)

  def load(self) -> dict:
    """What the node is doing: requests it is the origin of, requests with steps waiting at its stage, the mean size of its
    last decode batches (up to 100), its decode calls and their requests' steps since it started (a client reads the mean batch
    between two readings from them), and the tokens per second its requests received over the last LOAD_WINDOW_S seconds."""
    now = time.monotonic()
    while self._delivered and self._delivered[0][0] < now - LOAD_WINDOW_S:
      self._delivered.popleft()
    sizes = self.scheduler.batch_sizes
    return {
      "active_requests": len(self.active_request_ids()),
      "waiting_requests": self.scheduler.waiting_requests(),
      "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
      "max_batch": self.scheduler.max_batch,
      "decode_calls": self.scheduler.decode_calls,
      "decode_steps": self.scheduler.decode_steps,
      "tokens_per_s": sum(n for _, n in self._delivered) / LOAD_WINDOW_S,
    }

  def originated_request_ids(self) -> list[str]:
    """The requests this node is the origin of that are still generating, oldest first."""
    return list(self._pending)

  def active_request_ids(self) -> set[str]:
    """The requests running on this node: those it is the origin of and those whose stage runs here."""
    return set(self._pending) | self._served.ids()

  async def _check_ring(self, ring: RingPlan) -> list[str]:
    """Have discovery health-check the ring's other nodes now; those that fail (or are no longer peers) are left out of the
    peers, and so of plans, until they answer again. Returns them in ring order."""
    failed = await self.discovery.check_now(n for n in ring.node_ids() if n != self.id)
    self.peers = {p.id(): p for p in await self.discovery.discover_peers()}
    return [n for n in ring.node_ids() if n in failed]

  async def _broadcast_finish(self, ring: RingPlan, request_id: str) -> None:
    """Tell every ring node, all at once, that the request is over; a dead node (it has no state left) costs one timeout."""
    status = json.dumps({"type": "finish", "request_id": request_id})

    async def tell(node_id: str) -> None:
      try:
        if node_id == self.id:
          self.process_opaque_status(request_id, status)
        elif node_id in self.peers:
          await asyncio.wait_for(self.peers[node_id].send_opaque_status(request_id, status), 2.0)
      except Exception as e:
        log.info("could not tell %s that request %s finished: %s", node_id, request_id, e)

    await asyncio.gather(*(tell(node_id) for node_id in ring.node_ids()))

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
      senders = self._pending[request_id].senders | {self.id} if request_id in self._pending else self._served.senders(request_id)
      if sender is not None and senders is not None and sender not in senders:
        log.warning("ignoring a cancellation of request %s from %r, which is neither its origin nor on its ring", request_id, sender)
        return
      self.finish(request_id)
    elif message.get("type") == "failed" and isinstance(message.get("origin"), str) and isinstance(message.get("error"), str):
      if message["origin"] != self.id:
        self._spawn(self._pass_on_failure(request_id, message["origin"], message["error"], sender))
      elif sender is None or isinstance(message.get("reporter"), str):
        self.process_result(request_id, [], True, message["error"], sender if sender is None else message["reporter"])

  def finish(self, request_id: str) -> None:
    """The request is over: its waiting steps are dropped, its later messages ignored, and its state released."""
    self._finished.add(request_id)
    self.scheduler.cancel(request_id)
    self._ring_tokens.pop(request_id, None)
    self._generators.pop(request_id, None)
    self._orphans.discard(request_id)
    self._served.forget(request_id)
    self._spawn(self.engine.finish_request(request_id))

  async def _pass_on_failure(self, request_id: str, origin: str, error: str, reporter: str | None) -> None:
    """A ring node, `reporter`, that could not reach `origin` asked this one to tell it that the request failed: the origin takes
    the failure as the reporter's (it takes results only from the request's ring)."""
    status = json.dumps({"type": "failed", "origin": origin, "error": error, "reporter": reporter or self.id})
    try:
      await (await self._peer(origin, f"which asked for request {request_id}")).send_opaque_status(request_id, status)
    except Exception as e:
      log.warning("could not pass on the failure of request %s to %s: %s", request_id, origin, e)

  # ---------- the ring ----------

  async def process_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str | None = None) -> None:
    """The prompt of a request, for this node's first stage, from `sender` (None: this node, its origin, which admitted it).
    From another node it is checked first (`_take_prompt`): refused with nothing run unless it came from its origin and fits."""
    if context.request_id in self._finished:  # a message of a request already over is dropped
      return
    if sender is None:
      self._served.track(context)
      self._spawn(self._run_stage(shard, context, prompt=prompt))
      return
    tokens = await self._take_prompt(shard, prompt, context, sender)
    self._spawn(self._run_stage(shard, context, tensor=tokens[None, :]))

  async def process_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str | None = None) -> None:
    """Token ids or hidden states of a request for this node's stage, from `sender` (None: this node); from another node they
    are checked first (`_take_tensor`)."""
    if context.request_id in self._finished:
      return
    if sender is None:
      self._served.track(context)
    elif not await self._take_tensor(shard, tensor, context, sender):
      return
    self._spawn(self._run_stage(shard, context, tensor=tensor))

  async def _take_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str) -> np.ndarray:
    """The prompt's tokens, if this node takes it from `sender` (and counts the request as running here): only from the request's
    origin, never one naming this node as origin (its own prompts never come over the wire: such a request skipped its
    admission), only for the ring's first stage, with the model's layer count, and only if the prompt and max_tokens fit in the
    planned context (and the engine's). NotAllowed, BadInput or Busy (--max-requests) otherwise, before any engine call."""
    request_id, origin = context.request_id, context.origin_node_id
    if origin == self.id:
      raise NotAllowed(f"request {request_id} names node {self.id!r} as its origin but did not come through its admission: refused")
    if sender != origin:
      raise NotAllowed(f"request {request_id}'s prompt came from {sender!r}, not from its origin {origin!r}: refused")
    if context.plan.index_of(shard, self.id) != 0 or context.position != 0:
      raise BadInput(
        f"request {request_id}: a prompt goes to the first stage of its ring at position 0, not to layers {shard.start_layer}-{shard.end_layer} of {self.id!r} at {context.position}"
      )
    self._check_layers(shard)
    tokens = await self.engine.encode(shard, prompt)
    context_tokens, what = await self._context_limit(shard, context.plan.context_tokens)
    answer_budget(len(tokens), context.max_tokens, context_tokens, context.max_tokens, what)
    self._take_place(context)
    return tokens

  async def _take_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str) -> bool:
    """Whether this node runs `tensor` from `sender` (counting the request as running here): only from the stage before this one
    on the request's ring, with the model's layer count, shaped as this stage takes it and within the planned context (and the
    engine's); NotAllowed or BadInput otherwise. A request that would start here beyond --max-requests is failed (its origin is
    told) rather than refused, so that the other requests of the same message run."""
    request_id, ring = context.request_id, context.plan
    index = ring.index_of(shard, self.id)
    if index is None:
      raise BadInput(f"request {request_id}: node {self.id!r} was sent layers {shard.start_layer}-{shard.end_layer}, which its plan does not give it")
    previous = ring.stages[index - 1].node_id  # the first stage takes each new token from the last
    if sender != previous:
      raise NotAllowed(f"request {request_id}'s input to {self.id!r} came from {sender!r}; only {previous!r}, the stage before, sends it")
    if context.origin_node_id == self.id and request_id not in self._pending:
      raise NotAllowed(f"request {request_id} names node {self.id!r} as its origin but did not come through its admission: refused")
    if index == 0 and context.position == 0:
      raise NotAllowed(f"request {request_id}: a request starts with its prompt, from its origin, not with token ids")
    self._check_layers(shard)
    rows = _rows(shard, tensor, request_id)
    context_tokens, what = await self._context_limit(shard, ring.context_tokens)
    if context.position + rows > context_tokens:
      raise BadInput(f"request {request_id} would reach position {context.position + rows}, beyond {what} of {context_tokens} tokens")
    if request_id not in self._served and context.position == 0:
      try:
        self._take_place(context)
      except Busy as e:
        self._spawn(self._fail(context, str(e)))
        return False
    self._served.track(context)
    return True

  def _take_place(self, context: RequestContext) -> None:
    """Count a request that starts at this node's stage among those running here; Busy if that makes more than --max-requests."""
    running = self.active_request_ids()
    if context.request_id not in running and len(running) >= self.max_requests:
      raise Busy(f"node {self.id!r} already runs {len(running)} requests, its limit (--max-requests); try again shortly")
    self._served.track(context)

  def _check_layers(self, shard: Shard) -> None:
    """BadInput if the shard's model is one this node knows and has another number of layers (the wire bounds any model's)."""
    known = self.model if shard.model_id == self.model.id else MODELS.get(shard.model_id)
    if known is not None and shard.n_layers != known.n_layers:
      raise BadInput(f"{shard.model_id} has {known.n_layers} layers; the request's plan says {shard.n_layers}")

  async def _context_limit(self, shard: Shard, planned: int) -> tuple[int, str]:
    """The positions a request planned for `planned` tokens of context (0: the model's) may reach on this node's engine, and
    what to call that limit."""
    engine = await self.engine.context_length(shard)
    if planned > 0 and (engine is None or planned <= engine):
      return planned, "the planned context"
    if engine is not None:
      return engine, f"{shard.model_id}'s context"
    return MAX_CONTEXT, "the default context"

  def _spawn(self, coroutine) -> None:
    task = asyncio.create_task(coroutine)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  async def _run_stage(self, shard: Shard, context: RequestContext, prompt: str | None = None, tensor: np.ndarray | None = None) -> None:
    """Run this node's stage of the carried plan and pass the result on; any failure is reported to the requesting node."""
    ring = context.plan
    try:
      index = ring.index_of(shard, self.id)
      if index is None:
        raise RequestFailed(f"node {self.id!r} was sent layers {shard.start_layer}-{shard.end_layer}, which the request's plan does not give it")
      if prompt is not None:
        tensor = (await self.engine.encode(shard, prompt))[None, :]
      rows = positions_in(tensor)
      out = await self.scheduler.run(shard, Step(context.request_id, tensor, context.position, ring.context_tokens))
      if context.request_id in self._finished:
        return  # finished while its step ran
      if index < len(ring.stages) - 1:
        await self._deliver(ring.stages[index + 1].node_id, "tensor", ring.shard(index + 1), out, context)
        return
      token = await self._sample(out, context)
      tokens = self._ring_tokens.setdefault(context.request_id, [])
      tokens.append(token)
      eos = await self._eos_token_ids(shard)
      finished = token in eos or len(tokens) >= context.max_tokens
      # The next step goes round first, so the report to the origin is off the ring's critical path (one RPC less per token).
      if not finished and context.request_id not in self._orphans:
        next_step = context.at(context.position + rows)
        await self._deliver(ring.stages[0].node_id, "tensor", ring.shard(0), np.array([[token]], dtype=np.int64), next_step)
      try:
        await self._report(context, list(tokens), finished)
      except Exception:
        self._orphans.add(context.request_id)  # the origin is gone: stop going round for it
        raise
    except StepCancelled:
      return  # the request is over: nobody waits for this step
    except asyncio.CancelledError:
      raise
    except Exception as e:
      await self._fail(context, str(e) if isinstance(e, RequestFailed) else f"node {self.id!r} failed: {type(e).__name__}: {e}")

  async def _fail(self, context: RequestContext, reason: str) -> None:
    """The request failed at this node: it is over here, and its origin is told why (through a peer if it cannot be reached)."""
    log.warning("request %s failed at %s: %s", context.request_id, self.id, reason)
    self.finish(context.request_id)
    try:
      await self._report(context, [], True, reason)
    except Exception as report_error:
      log.warning(
        "could not report the failure of request %s to %s: %s; asking its peers to", context.request_id, context.origin_node_id, report_error
      )
      await self._relay_failure(context, reason)

  async def _sample(self, logits: np.ndarray, context: RequestContext) -> int:
    """The request's next token. A sampled request draws from its own generator, made at its first token, so the same seed gives
    the same tokens whatever else runs on the node."""
    sampling = context.sampling
    if sampling.greedy:
      return await self.engine.sample(logits)
    if context.request_id not in self._generators:
      self._generators[context.request_id] = sampling.generator()
    rng = self._generators[context.request_id]
    return await self.engine.sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, rng=rng)

  async def _relay_failure(self, context: RequestContext, reason: str) -> None:
    """Ask the peers, one after another, to tell the origin that the request failed, until one takes it on."""
    status = json.dumps({"type": "failed", "origin": context.origin_node_id, "error": reason})
    for peer_id, peer in sorted(self.peers.items()):
      if peer_id == context.origin_node_id:
        continue
      try:
        await asyncio.wait_for(peer.send_opaque_status(context.request_id, status), 2.0)
        return
      except Exception as e:
        log.info("%s could not take on the failure of request %s: %s", peer_id, context.request_id, e)

  async def _eos_token_ids(self, shard: Shard) -> set[int]:
    """The model's end-of-sequence tokens; the first call builds its tokenizer, off the event loop."""
    if shard.model_id not in self._eos:
      self._eos[shard.model_id] = await asyncio.to_thread(self.engine.eos_token_ids, shard)
    return self._eos[shard.model_id]

  async def _deliver(self, node_id: str, kind: str, shard: Shard, payload, context: RequestContext) -> None:
    if node_id == self.id:
      await (self.process_prompt if kind == "prompt" else self.process_tensor)(shard, payload, context)
      return
    peer = await self._peer(node_id, "the next node on the request's ring")
    try:
      if kind == "prompt":
        await peer.send_prompt(shard, payload, context)
      else:
        await self.outbox.send_tensor(peer, shard, payload, context)
    except Exception as e:
      if isinstance(e, Refused):
        raise RequestFailed(f"node {node_id!r} refused request {context.request_id}: {e}") from e
      raise RequestFailed(f"node {self.id!r} could not reach {node_id!r}: {type(e).__name__}") from e

  async def _report(self, context: RequestContext, tokens: list[int], finished: bool, error: str = "") -> None:
    await self._report_to(context.origin_node_id, context.request_id, tokens, finished, error)

  async def _report_to(self, origin: str, request_id: str, tokens: list[int], finished: bool, error: str = "") -> None:
    if origin == self.id:
      self.process_result(request_id, tokens, finished, error)
      return
    peer = await self._peer(origin, f"which asked for request {request_id}")
    # A result may be sent twice, so it is retried for a while: an origin restarted under the same id (a second `exo run`) is
    # reached through the channel to the first process, which gRPC keeps failing at once while it backs off between reconnects.
    deadline = time.monotonic() + PEER_WAIT_S
    while True:
      try:
        await peer.send_result(request_id, tokens, finished, error)
        return
      except Exception:
        if time.monotonic() >= deadline:
          raise
        await asyncio.sleep(0.2)

  async def _peer(self, node_id: str, role: str) -> PeerHandle:
    """The handle for a ring neighbour; one this node has not discovered yet (it may have just started) is waited for briefly."""
    waited = 0.0
    while node_id not in self.peers and waited < PEER_WAIT_S:
      await asyncio.sleep(0.1)
      waited += 0.1
      self.peers.update({p.id(): p for p in await self.discovery.discover_peers(0)})
    if node_id not in self.peers:
      raise RequestFailed(f"node {self.id!r} has no connection to {node_id!r}, {role}")
    return self.peers[node_id]
