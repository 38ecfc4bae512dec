"""What to plan, in one frozen object checked once when it is made: the strategy, the objective, the cost model's parameters,
the cap on each request's context and the search method. `exo` and `exo plan` build it from the same flags
(exo.cli_args.add_planner_flags); a plan's JSON `params` and the API's model-spec JSON reach it through `PlanRequest.of`."""

import dataclasses
import math
from dataclasses import dataclass, field

from exo.base.errors import BadInput
from exo.base.model_spec import CONTEXT_LIMIT
from exo.topology.cost_model import OBJECTIVES, PlannerParams

__all__ = ["METHODS", "STRATEGIES", "PlanRequest", "check_method"]

STRATEGIES = ("flops-latency", "ring-memory-weighted")
METHODS = ("auto", "exact", "heuristic")  # exo/topology/search.py: which search the flops-latency strategy runs


def check_method(method: str) -> None:
  if method not in METHODS:
    raise BadInput(f"search method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_params(params: PlannerParams) -> None:
  if not isinstance(params, PlannerParams):
    raise BadInput(f"planner parameters must be PlannerParams, got {type(params).__name__}")
  if not (isinstance(params.memory_headroom, (int, float)) and 0 <= params.memory_headroom < 1):
    raise BadInput(f"memory headroom must be a fraction in [0, 1), got {params.memory_headroom!r}")
  if not (isinstance(params.default_rtt_ms, (int, float)) and math.isfinite(params.default_rtt_ms) and params.default_rtt_ms >= 0):
    raise BadInput(f"default RTT must be a finite number of milliseconds >= 0, got {params.default_rtt_ms!r}")
  if isinstance(params.batch, bool) or not isinstance(params.batch, int) or params.batch < 1:
    raise BadInput(f"batch must be a whole number of requests >= 1, got {params.batch!r}")


@dataclass(frozen=True)
class PlanRequest:
  strategy: str = STRATEGIES[0]
  objective: str = OBJECTIVES[0]
  params: PlannerParams = field(default_factory=PlannerParams)
  max_context: int | None = None  # cap on the context each request reserves KV for (None: the model's, at most 8192)
  method: str = "auto"

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise BadInput(f"unknown partitioning strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if self.objective not in OBJECTIVES:
      raise BadInput(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
    _check_params(self.params)
    max_context = self.max_context
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int) or not 1 <= max_context <= CONTEXT_LIMIT):
      raise BadInput(f"max context must be a whole number of tokens from 1 to {CONTEXT_LIMIT}, got {max_context!r}")
    check_method(self.method)

  @staticmethod
  def of(
    strategy: str = STRATEGIES[0], objective: str = OBJECTIVES[0], max_context: int | None = None, method: str = "auto", **params
  ) -> "PlanRequest":
    """A request from loose values, as JSON gives them: `params` are PlannerParams' fields by name; BadInput names one that is not."""
    names = [f.name for f in dataclasses.fields(PlannerParams)]
    unknown = sorted(set(params) - set(names))
    if unknown:
      raise BadInput(f"unknown planner parameter {unknown[0]!r}; expected {', '.join(names[:-1])} or {names[-1]}")
    return PlanRequest(strategy, objective, PlannerParams(**params), max_context, method)
