import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from exo.topology.ring_search import all_tours, held_karp, members, optimal_tours, tour_cost, two_opt_tour


@st.composite
def hop_matrices(draw, max_nodes=6):
  n = draw(st.integers(1, max_nodes))
  hop = np.full((n, n), math.inf)
  for i in range(n):
    for j in range(i + 1, n):
      if draw(st.booleans()) or draw(st.booleans()):
        hop[i, j] = hop[j, i] = draw(st.sampled_from([1.0, 2.0, 0.5, 3.25]))
  return hop


def brute_force_tours(mask, hop):
  nodes = members(mask)
  tours = [[nodes[0], *rest] for rest in itertools.permutations(nodes[1:])]
  return [(tour_cost(t, hop), t) for t in tours]


@settings(max_examples=150, deadline=None)
@given(hop_matrices())
def test_held_karp_matches_every_permutation_for_every_subset(hop):
  cycle, path = held_karp(hop)
  for mask in range(1, 1 << len(hop)):
    costs = brute_force_tours(mask, hop)
    best = min(c for c, _ in costs)
    if math.isinf(best):
      assert math.isinf(cycle[mask]) and list(optimal_tours(mask, cycle, path, hop)) == []
      continue
    assert math.isclose(cycle[mask], best, rel_tol=1e-12)
    cheapest = sorted(t for c, t in costs if math.isclose(c, best, rel_tol=1e-9))
    assert list(optimal_tours(mask, cycle, path, hop)) == cheapest
    assert list(all_tours(mask, hop)) == sorted(t for c, t in costs if math.isfinite(c))


def test_two_node_ring_crosses_its_link_twice():
  hop = np.array([[math.inf, 1.5], [1.5, math.inf]])
  cycle, _ = held_karp(hop)
  assert cycle[0b11] == 3.0 and cycle[0b01] == 0.0


def test_two_opt_returns_a_canonical_permutation_no_worse_than_the_circle_order():
  rng = np.random.default_rng(7)
  points = rng.random((40, 2))
  hop = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
  np.fill_diagonal(hop, math.inf)
  nodes = list(range(40))
  tour = two_opt_tour(nodes, hop, 1e6)
  assert sorted(tour) == nodes and tour[0] == 0 and tour[1] < tour[-1]
  assert tour_cost(tour, hop) < tour_cost(nodes, hop)
  # 2-opt optimum: no segment reversal shortens the tour
  for i, j in itertools.combinations(range(1, 40), 2):
    assert tour_cost(tour[:i] + tour[i : j + 1][::-1] + tour[j + 1 :], hop) >= tour_cost(tour, hop) - 1e-9
