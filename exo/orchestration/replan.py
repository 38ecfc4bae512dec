"""When to move weights: re-plan between requests only when membership changes or the new plan is clearly better."""

from exo.topology.cost_model import Prediction


def predicted_gain(current: Prediction | None, candidate: Prediction, objective: str) -> float:
  """Relative improvement of `candidate` over `current` on the objective (0.25 = 25% better); inf if `current` is gone or unknown."""
  if current is None or not current.feasible:
    return float("inf")
  if objective == "latency":
    old, new = current.tpot_s, candidate.tpot_s
    if old is None or new is None or new <= 0:
      return 0.0
    return old / new - 1
  old, new = current.throughput_tps, candidate.throughput_tps
  if old is None or new is None or old <= 0:
    return 0.0
  return new / old - 1


def should_replan(membership_changed: bool, current: Prediction | None, candidate: Prediction, objective: str, threshold: float) -> bool:
  """Adopt the candidate plan if nodes joined or left, or if it beats the current ring (re-evaluated on today's topology) by more
  than `threshold`: small measured wobbles in RTT must not shuffle layers between nodes."""
  return membership_changed or predicted_gain(current, candidate, objective) > threshold
