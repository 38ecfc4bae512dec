import math

import pytest

from exo.orchestration.replan import predicted_gain, should_replan
from exo.topology.cost_model import Prediction


def prediction(tpot, bottleneck, feasible=True):
  return Prediction(tpot, None if bottleneck is None else 1 / bottleneck, None, feasible)


def test_gain_is_relative_on_the_objective():
  assert predicted_gain(prediction(0.2, 0.1), prediction(0.1, 0.1), "latency") == pytest.approx(1.0)
  assert predicted_gain(prediction(0.1, 0.2), prediction(0.1, 0.16), "throughput") == pytest.approx(0.25)
  assert predicted_gain(prediction(0.1, 0.1), prediction(0.2, 0.1), "latency") == pytest.approx(-0.5)


def test_a_ring_that_lost_a_node_or_no_longer_fits_is_always_replaced():
  assert math.isinf(predicted_gain(None, prediction(1, 1), "latency"))
  assert math.isinf(predicted_gain(prediction(0.1, 0.1, feasible=False), prediction(1, 1), "latency"))


def test_hysteresis_keeps_the_ring_for_small_gains_only():
  current, slightly_better, much_better = prediction(0.100, 0.1), prediction(0.095, 0.1), prediction(0.080, 0.1)
  assert not should_replan(False, current, slightly_better, "latency", 0.1)  # 5% better: weights stay where they are
  assert should_replan(False, current, much_better, "latency", 0.1)  # 25% better
  assert should_replan(True, current, slightly_better, "latency", 0.1)  # membership changed
