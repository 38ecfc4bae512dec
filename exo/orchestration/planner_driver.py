"""Plans a node's requests on its view of the cluster: a fresh plan when membership changes, the kept ring otherwise unless a
new one beats it by the re-plan threshold (hysteresis: small wobbles in measured RTT must not shuffle layers between nodes)."""

from dataclasses import dataclass, replace

from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.orchestration.cluster_view import ClusterView
from exo.orchestration.replan import should_replan
from exo.topology.cost_model import PlannerParams, Prediction
from exo.topology.plan import Plan
from exo.topology.planner import plan_for, predict_ring

__all__ = ["PlannerConfig", "PlannerDriver"]


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
      if not should_replan(changed, still, candidate.prediction, self.config.objective, self.config.replan_threshold):
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
    config = self.config
    return plan_for(topology, model, config.strategy, config.objective, max_context=config.max_context, **config.params())

  def _predict_on(self, topology: Topology, plan: Plan) -> Prediction | None:
    """`plan`'s ring predicted on `topology` at the plan's context; None if a ring node has left it."""
    params = PlannerParams(**self.config.params())
    return predict_ring(topology, plan.model, params, plan.ring(), self.config.objective, context_tokens=plan.context_tokens)
