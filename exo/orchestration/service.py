"""What the API and the terminal view may ask of a node, and nothing more: run a request (admit, generate, release), read its
plan, prediction, load and topology, get model files through its peers, and turn text into tokens and back for the models it serves. A request is cancelled by
cancelling the task that awaits `generate`: the ring is told and its stages drop the request."""

from typing import Callable, Protocol

from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.peer_files import PeerFiles
from exo.orchestration.model_text import ModelText
from exo.orchestration.planner_driver import PlannerConfig
from exo.orchestration.requests import Admission, Generation, LastRequest
from exo.topology.plan import Plan

__all__ = ["ServingNode"]


class ServingNode(Protocol):
  @property
  def id(self) -> str: ...

  @property
  def model(self) -> ModelSpec:
    """What requests that name no model run."""

  @property
  def text(self) -> ModelText: ...

  @property
  def files(self) -> PeerFiles:
    """The model files the node gets from its peers before the hub: a model a request names is fetched through it."""

  @property
  def planner_config(self) -> PlannerConfig: ...

  @property
  def topology(self) -> Topology: ...

  @property
  def current_plan(self) -> Plan | None: ...

  @property
  def last_generation(self) -> Generation | None: ...

  @property
  def last_request(self) -> LastRequest | None:
    """The last request the node received, whatever its outcome, with its prediction."""

  @property
  def max_generate_tokens(self) -> int:
    """The longest answer the node gives (--max-generate-tokens)."""

  async def admit(self, prompt: str, model: ModelSpec, max_tokens: int | None = None) -> Admission: ...

  def release(self, admission: Admission | None) -> None: ...

  async def generate(
    self,
    prompt: str,
    model: ModelSpec | None = None,
    max_tokens: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    sampling: Sampling = GREEDY,
    stop: tuple[str, ...] = (),
    admission: Admission | None = None,
  ) -> Generation: ...

  def candidate_plan(self, model: ModelSpec) -> Plan: ...

  def current_prediction(self) -> Plan | None: ...

  def load(self) -> dict: ...

  def rtt_ms(self, node_id: str) -> float | None: ...

  def planning_topology(self) -> Topology:
    """The topology plans are made on: the live nodes, with what each announces (its layer times, the model layers it holds)."""

  def reads_model_files(self) -> bool:
    """Whether the node's engine serves models from their files (so a model is served only where its files are)."""
