"""Sampling against its definition: 20,000 draws follow the softmax at the temperature restricted to the tokens top_k and top_p
keep (a chi-square test at 5 sigma), tokens outside them are never drawn, temperature 0 is the argmax, and a seed fixes the draws."""

import math

import numpy as np
import pytest

from exo.base.errors import BadInput
from exo.inference.sampling import GREEDY, Sampling, _candidates, sample_last

# softmax(LOGITS / 0.7), by token:   0: .0398  1: .4519  2: .0062  3: .1249  4: .0260  5: .2552  6: .0147  7: .0814
# most likely first: 1 (.4519), 5 (cumulative .7070), 3 (.8320), 7 (.9133), 0, 4, 6, 2
# the top 4 renormalised: 1 (.4947), 5 (cumulative .7741), 3 (.9109), 7 (1)
LOGITS = np.array([0.3, 2.0, -1.0, 1.1, 0.0, 1.6, -0.4, 0.8])
DRAWS = 20_000


def chi_square_bound(df: int, z: float = 5.0) -> float:
  """The chi-square quantile with `df` degrees of freedom that a standard normal's z matches (Wilson-Hilferty; it errs high at
  few degrees of freedom, so the tail beyond it is at most that beyond z)."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
  "top_k, top_p, kept",
  [
    (0, 1.0, [0, 1, 2, 3, 4, 5, 6, 7]),
    (4, 1.0, [1, 3, 5, 7]),
    (0, 0.8, [1, 3, 5]),  # .7070 < .8 <= .8320
    (0, 0.75, [1, 3, 5]),
    (4, 0.75, [1, 5]),  # the nucleus of the top 4 renormalised: .4947 < .75 <= .7741
    (1, 1.0, [1]),
  ],
)
def test_draws_follow_the_softmax_over_the_kept_tokens(top_k, top_p, kept):
  sampling, rng = Sampling(0.7, top_p, top_k), np.random.default_rng(1234)
  counts = np.bincount([sample_last(LOGITS, sampling, rng) for _ in range(DRAWS)], minlength=len(LOGITS))
  assert set(np.flatnonzero(counts)) <= set(kept)  # nothing outside top_k and the nucleus, ever
  weights = np.exp(LOGITS[kept] / 0.7)
  expected = DRAWS * weights / weights.sum()
  if len(kept) > 1:
    chi_square = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi_square < chi_square_bound(len(kept) - 1)
  else:
    assert counts[kept[0]] == DRAWS


@pytest.mark.parametrize("df", [1, 2, 3, 7])
def test_the_chi_square_bound_leaves_a_tail_of_at_most_5_sigma(df):
  x = np.linspace(chi_square_bound(df), chi_square_bound(df) + 400, 400_001)
  density = np.exp((df / 2 - 1) * np.log(x) - x / 2 - df / 2 * math.log(2) - math.lgamma(df / 2))
  tail = np.trapezoid(density, x)
  assert 1e-8 < tail <= 0.5 * math.erfc(5 / math.sqrt(2))  # a true draw fails at most 2.9e-7 of the time


def test_a_wrong_distribution_fails_the_test():
  rng = np.random.default_rng(5)
  counts = np.bincount([sample_last(LOGITS, Sampling(0.8), rng) for _ in range(DRAWS)], minlength=len(LOGITS))  # not 0.7
  weights = np.exp(LOGITS / 0.7)
  expected = DRAWS * weights / weights.sum()
  assert ((counts - expected) ** 2 / expected).sum() > chi_square_bound(len(LOGITS) - 1)


def test_temperature_0_is_the_argmax_of_the_last_position():
  logits = np.stack([np.roll(LOGITS, 3), LOGITS])[None]  # (1, 2, vocab): the last row decides
  rng = np.random.default_rng(0)
  assert sample_last(logits, GREEDY, rng) == 1
  assert sample_last(logits, Sampling(0.0, top_p=0.1, top_k=3, seed=9), rng) == 1  # the rest is ignored
  assert sample_last(LOGITS, Sampling(1e-300), rng) == 1  # a tiny temperature is the argmax too, not a NaN
  assert sample_last(np.array([1.0, 3.0, 3.0]), GREEDY, rng) == 1  # ties: the lowest id


def test_a_cut_between_equal_tokens_keeps_the_lower_ids():
  logits, rng = np.array([1.0, 2.0, 2.0, 2.0, 0.0]), np.random.default_rng(0)
  assert {sample_last(logits, Sampling(1.0, top_k=2), rng) for _ in range(200)} == {1, 2}
  assert {sample_last(logits, Sampling(1.0, top_p=0.5), rng) for _ in range(200)} == {1, 2}  # 1/3 < .5 <= 2/3 of the mass


def test_the_same_seed_draws_the_same_sequence():
  def draws(seed: int) -> list[int]:
    rng = Sampling(1.0, seed=seed).generator()
    return [sample_last(LOGITS, Sampling(1.0), rng) for _ in range(50)]

  assert draws(7) == draws(7)
  assert draws(7) != draws(8)


@pytest.mark.parametrize(
  "kwargs, names",
  [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.0}, "seed"),
  ],
)
def test_bad_values_are_refused_naming_the_parameter(kwargs, names):
  with pytest.raises(BadInput, match=f"^{names} must be .*got"):
    Sampling(**kwargs)


def test_numpy_numbers_are_taken_as_plain_ones():
  sampling = Sampling(np.float32(0.5), np.float64(0.9), np.int64(3), np.uint64(2**63 - 1))
  assert sampling == Sampling(0.5, 0.9, 3, 2**63 - 1) and type(sampling.seed) is int and type(sampling.top_k) is int


def brute_force_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
  """The tokens the definition keeps: sort them all by probability (ties: lower id first), take the top k, then the shortest
  prefix whose share of the top k's mass reaches top_p (top_p 1: all of them, however small the last ones)."""
  weights = np.exp((logits - logits.max()) / temperature)
  order = sorted(range(len(logits)), key=lambda i: (-weights[i], i))[: top_k or None]
  if top_p == 1:
    return set(order)
  total, mass = sum(weights[i] for i in order), 0.0
  for n, i in enumerate(order, 1):
    mass += weights[i]
    if mass >= top_p * total:
      return set(order[:n])
  return set(order)


def test_the_kept_tokens_are_the_definitions_on_random_logits_with_ties():
  rng = np.random.default_rng(3)
  for case in range(300):
    vocab = int(rng.integers(2, 3000))
    logits = np.round(rng.standard_normal(vocab) * rng.uniform(0.5, 4), int(rng.integers(0, 3)))  # rounding makes ties
    temperature, top_k, top_p = float(rng.uniform(0.2, 2)), int(rng.integers(0, vocab + 2)), float(rng.choice([1.0, rng.uniform(0.05, 1)]))
    ids, p = _candidates(logits, Sampling(temperature, top_p, top_k))
    assert set(ids.tolist()) == brute_force_kept(logits, temperature, top_k, top_p), case
    assert len(ids) == len(set(ids.tolist())) and p.sum() == pytest.approx(1.0)
