import asyncio
import time

import pytest

from exo.networking.liveness import health_check_ms
from exo.networking.rtt import RttEstimator
from tests.support.health_only_peer import HealthOnlyPeer


class SlowPeer(HealthOnlyPeer):
  """Answers a health check after at least `delay_s` seconds, with `healthy`."""

  def __init__(self, delay_s: float, healthy: bool = True):
    self.delay_s, self.healthy, self.timeouts = delay_s, healthy, []

  def id(self):
    return "slow"

  def addr(self):
    return "127.0.0.1:1"

  def device_capabilities(self):
    raise NotImplementedError

  async def health_check(self, timeout=2.0):
    self.timeouts.append(timeout)
    start = time.perf_counter()
    while time.perf_counter() - start < self.delay_s:  # asyncio.sleep may wake a clock tick early
      await asyncio.sleep(self.delay_s)
    return self.healthy


def test_empty_estimator_has_no_value():
  rtt = RttEstimator()
  assert rtt.value() is None
  assert rtt.samples == []


def test_value_is_the_median():
  rtt = RttEstimator()
  for s in (30, 10, 20):
    rtt.add(s)
  assert rtt.value() == 20
  rtt.add(40)
  assert rtt.value() == 25  # even count: the mean of the middle two


def test_one_outlier_among_five_stays_within_the_spread_of_the_others():
  others = [10.0, 11.5, 12.0, 13.0]
  rtt = RttEstimator(window=5)
  for s in [*others[:2], 5000.0, *others[2:]]:
    rtt.add(s)
  assert min(others) <= rtt.value() <= max(others)
  assert abs(rtt.value() - sorted(others)[len(others) // 2]) <= max(others) - min(others)


def test_window_slides():
  rtt = RttEstimator(window=3)
  for s in (100, 1, 2, 3):
    rtt.add(s)
  assert rtt.samples == [1, 2, 3]
  assert rtt.value() == 2
  rtt.add(4)
  assert rtt.samples == [2, 3, 4]


def test_window_must_be_positive():
  with pytest.raises(ValueError, match="window"):
    RttEstimator(window=0)


def test_measure_rtt_times_one_health_check():
  peer = SlowPeer(0.05)
  rtt_ms = asyncio.run(health_check_ms(peer, timeout=1.5))
  assert rtt_ms is not None and rtt_ms >= 50.0
  assert peer.timeouts == [1.5]


def test_measure_rtt_of_an_unhealthy_peer_is_none():
  assert asyncio.run(health_check_ms(SlowPeer(0.0, healthy=False), timeout=1.0)) is None
