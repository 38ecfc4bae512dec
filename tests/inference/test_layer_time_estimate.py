"""The running estimate of a node's layer times: a robust median that one slow step does not move, that takes a lasting change
over, and the conversion of a stage's step time into a layer's time."""

import pytest

from exo.base.device_capabilities import LayerTimes
from exo.inference.layer_time_estimate import (
  DECODE_MIN_SAMPLES,
  DECODE_WINDOW,
  PREFILL_MIN_TOKENS,
  TOKEN_MIN_SAMPLES,
  LayerTimeEstimate,
  MovingMedian,
)

CALIBRATED = LayerTimes(decode_ms=2.0, token_ms=0.5)


def decode_steps(estimate: LayerTimeEstimate, ms_per_layer: float, count: int, layers: float = 10) -> None:
  for _ in range(count):
    estimate.add_step(ms_per_layer * layers / 1000, 1, layers)


def test_the_calibration_holds_until_enough_steps_have_been_seen():
  estimate = LayerTimeEstimate(CALIBRATED)
  assert estimate.value() == CALIBRATED
  decode_steps(estimate, 3.0, DECODE_MIN_SAMPLES - 1)
  assert estimate.value() == CALIBRATED
  decode_steps(estimate, 3.0, 1)
  assert estimate.value() == LayerTimes(3.0, 0.5)


def test_one_slow_step_does_not_move_the_estimate():
  estimate = LayerTimeEstimate(CALIBRATED)
  decode_steps(estimate, 2.0, DECODE_WINDOW)
  decode_steps(estimate, 2000.0, 1)  # a garbage collection, a kernel compiled, another process
  decode_steps(estimate, 2.0, 1)
  assert estimate.value().decode_ms == pytest.approx(2.0)


def test_the_estimate_converges_to_a_new_level_within_a_window():
  estimate = LayerTimeEstimate(CALIBRATED)
  decode_steps(estimate, 2.0, DECODE_WINDOW)
  decode_steps(estimate, 20.0, DECODE_WINDOW // 2 - 1)
  assert estimate.value().decode_ms == pytest.approx(2.0)  # not yet half the window
  decode_steps(estimate, 20.0, 2)
  assert estimate.value().decode_ms == pytest.approx(20.0)


def test_a_step_becomes_a_sample_of_one_layer_head_included():
  estimate = LayerTimeEstimate(CALIBRATED)
  # a decode step over 4 layers plus 2 layers of head time that took 12 ms: 2 ms a layer
  for _ in range(DECODE_MIN_SAMPLES):
    assert estimate.add_step(0.012, 1, 4, 2.0) is False  # the same figure as calibrated
  assert estimate.value().decode_ms == pytest.approx(2.0)
  # prefills of 16 tokens over 6 layers in 24 ms: 0.25 ms a layer per token
  for _ in range(TOKEN_MIN_SAMPLES - 1):
    assert estimate.add_step(0.024, 16, 6) is False
  assert estimate.add_step(0.024, 16, 6) is True
  assert estimate.value().token_ms == pytest.approx(0.25)


def test_a_prompt_whose_head_ran_on_its_last_row_only_is_charged_one_rows_head():
  """A last stage of 4 layers and 2 layers of head time, decode_ms 2.0: a prompt of 16 tokens asking for its last row's logits
  took 16 x 4 x 0.25 ms of layers and 2 x 2.0 ms of head, 20 ms: 0.25 ms a layer per token (charging the head 16 rows would say
  20 / (6 x 16) = 0.208)."""
  estimate = LayerTimeEstimate(CALIBRATED)
  for _ in range(TOKEN_MIN_SAMPLES):
    estimate.add_step(0.020, 16, 4, 2.0, head_rows=1)
  assert estimate.value().token_ms == pytest.approx(0.25)


def test_steps_of_a_few_tokens_tell_nothing():
  estimate = LayerTimeEstimate(CALIBRATED)
  for tokens in range(2, PREFILL_MIN_TOKENS):
    for _ in range(TOKEN_MIN_SAMPLES):
      assert estimate.add_step(1.0, tokens, 4) is False
  assert estimate.value() == CALIBRATED


def test_without_a_calibration_both_figures_come_from_steps():
  estimate = LayerTimeEstimate()
  assert estimate.value() is None
  decode_steps(estimate, 1.5, DECODE_MIN_SAMPLES)
  assert estimate.value() is None  # no prefill seen yet: token_ms unknown
  for _ in range(TOKEN_MIN_SAMPLES):
    estimate.add_step(0.032, 32, 10)
  assert estimate.value() == LayerTimes(pytest.approx(1.5), pytest.approx(0.1))


def test_moving_median_validates_its_window():
  with pytest.raises(ValueError, match="min_samples"):
    MovingMedian(None, 4, 5)
