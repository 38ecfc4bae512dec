"""Plans a node's requests on its view of the cluster: a fresh plan when membership changes, the kept ring otherwise unless a
new one beats it by the re-plan threshold (hysteresis: small wobbles in measured RTT must not shuffle layers between nodes)."""

from dataclasses import dataclass, field, replace

from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.orchestration.cluster_view import ClusterView
from exo.orchestration.replan import should_replan
from exo.topology.cost_model import Prediction
from exo.topology.plan import Plan
from exo.topology.plan_request import PlanRequest
from exo.topology.planner import plan_for, predict_ring

__all__ = ["PlannerConfig", "PlannerDriver"]


@dataclass(frozen=True)
class PlannerConfig:
  """How a node plans: what it asks the planner for, and when it moves to a new plan."""

  request: PlanRequest = field(default_factory=PlanRequest)
  replan_threshold: float = 0.1  # adopt a better plan for unchanged membership only if it is this much faster
  ignore_layer_times: bool = False  # plan from the devices' roofline alone, as if no node had measured its engine


class PlannerDriver:
  def __init__(self, config: PlannerConfig, cluster: ClusterView):
    self.config = config
    self.cluster = cluster
    self.current_plan: Plan | None = None
    self._planned_membership: set[str] = set()

  def topology(self) -> Topology:
    """The topology plans are made on now (ClusterView.planning_topology)."""
    return self.cluster.planning_topology(self.config.ignore_layer_times)

  def plan(self, model: ModelSpec) -> Plan:
    """The plan for the next request: a fresh one if membership changed or it beats the current ring by the threshold."""
    topology = self.topology()  # one view of the topology for the candidate and the kept ring
    candidate, current = self._plan_on(topology, model), self.current_plan
    if current is not None and current.model.id == model.id:
      # another context (the cluster's memory changed) is adopted as a change of membership is
      changed = set(topology.nodes) != self._planned_membership or candidate.context_tokens != current.context_tokens
      still = self._predict_on(topology, current)
      if not should_replan(changed, still, candidate.prediction, self.config.request.objective, self.config.replan_threshold):
        self.current_plan = replace(current, prediction=still)  # the kept ring, predicted with today's figures
        return self.current_plan
    self.current_plan, self._planned_membership = candidate, set(topology.nodes)
    return candidate

  def candidate_plan(self, model: ModelSpec) -> Plan:
    """The plan the strategy would make for `model` now, without adopting it."""
    return self._plan_on(self.topology(), model)

  def current_prediction(self) -> Plan | None:
    """The current plan predicted on today's topology (measured layer times move between requests); None before any plan."""
    current = self.current_plan
    if current is None:
      return None
    still = self._predict_on(self.topology(), current)
    return current if still is None else replace(current, prediction=still)

  def _plan_on(self, topology: Topology, model: ModelSpec) -> Plan:
    return plan_for(topology, model, self.config.request)

  def _predict_on(self, topology: Topology, plan: Plan, prompt_tokens: int | None = None) -> Prediction | None:
    """`plan`'s ring predicted on `topology` at the plan's context (TTFT for `prompt_tokens`, by default the planner's); None if
    a ring node has left it."""
    more = {} if prompt_tokens is None else {"prompt_tokens": max(1, prompt_tokens)}
    return predict_ring(topology, plan.model, self.config.request, plan.ring(), context_tokens=plan.context_tokens, **more)

  def predict_for(self, plan: Plan, prompt_tokens: int) -> Prediction | None:
    """`plan`'s ring predicted now for a request of `prompt_tokens` tokens; None if a ring node has left."""
    return self._predict_on(self.topology(), plan, prompt_tokens)
