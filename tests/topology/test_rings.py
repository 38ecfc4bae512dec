import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo.topology.cycles import hamiltonian_cycle, ring_holding
from exo.topology.rings import held_karp, members, optimal_tours, two_opt_tour


@st.composite
def hop_matrices(draw, max_nodes=6):
  n = draw(st.integers(1, max_nodes))
  hop = np.full((n, n), math.inf)
  for i in range(n):
    for j in range(i + 1, n):
      if draw(st.booleans()) or draw(st.booleans()):
        hop[i, j] = hop[j, i] = draw(st.sampled_from([1.0, 2.0, 0.5, 3.25]))
  return hop


def tour_cost(tour, hop) -> float:
  """The hops of a closed tour, last -> first included; none for one node."""
  if len(tour) < 2:
    return 0.0
  return float(sum(hop[tour[k], tour[(k + 1) % len(tour)]] for k in range(len(tour))))


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


def is_ring(ring, hop) -> bool:
  """Distinct nodes, consecutive ones (and last -> first) joined by finite hops; one node needs none, two need their link."""
  if not ring or len(set(ring)) != len(ring):
    return False
  return len(ring) == 1 or all(math.isfinite(hop[ring[k], ring[(k + 1) % len(ring)]]) for k in range(len(ring)))


def is_canonical(ring) -> bool:
  return ring[0] == min(ring) and (len(ring) < 3 or ring[1] <= ring[-1])


def has_ring(nodes, hop) -> bool:
  """Brute force: some ordering of `nodes` is a ring."""
  return any(is_ring([nodes[0], *rest], hop) for rest in itertools.permutations(nodes[1:]))


@st.composite
def graphs(draw, max_nodes=8):
  """Symmetric hop matrices, sparse (a quarter of the links), half or dense (three quarters), with a few distinct hop values."""
  n = draw(st.integers(1, max_nodes))
  density = draw(st.sampled_from(["sparse", "half", "dense"]))
  hop = np.full((n, n), math.inf)
  for i, j in itertools.combinations(range(n), 2):
    a, b = draw(st.booleans()), draw(st.booleans())
    if {"sparse": a and b, "half": a, "dense": a or b}[density]:
      hop[i, j] = hop[j, i] = draw(st.sampled_from([1.0, 2.0, 0.5, 3.25]))
  return hop


def subsets(n):
  """All n nodes (half the time), else any non-empty subset, in any order."""
  return st.one_of(st.permutations(range(n)).map(list), st.lists(st.integers(0, n - 1), min_size=1, unique=True))


def edges_graph(n, edges, cost=lambda i, j: 1.0 + (3 * i + 5 * j) % 4 / 4):
  hop = np.full((n, n), math.inf)
  for i, j in edges:
    hop[i, j] = hop[j, i] = cost(i, j)
  return hop


def banded(n, width=2):
  """Node i linked to i+1 .. i+width only: a ring exists (0, 2, 4, ..., 5, 3, 1 for width 2), nearest neighbour misses it."""
  return edges_graph(n, [(i, j) for i in range(n) for j in range(i + 1, min(n, i + width + 1))])


def star(leaves):
  return edges_graph(leaves + 1, [(0, i) for i in range(1, leaves + 1)])


def two_sites(a, b):
  """Two complete sites, nodes 0..a-1 and a..a+b-1, joined by the single link a-1 -- a."""
  inside = [(i, j) for i, j in itertools.combinations(range(a + b), 2) if (i < a) == (j < a)]
  return edges_graph(a + b, [*inside, (a - 1, a)])


def petersen():
  """3-regular, one block, yet no Hamiltonian cycle: only the search itself can tell."""
  return edges_graph(10, [(i, (i + 1) % 5) for i in range(5)] + [(5 + i, 5 + (i + 2) % 5) for i in range(5)] + [(i, i + 5) for i in range(5)])


@settings(max_examples=300, deadline=None)
@given(graphs(), st.data())
def test_hamiltonian_cycle_finds_a_ring_exactly_when_brute_force_does(hop, data):
  nodes = data.draw(subsets(len(hop)))
  ring = hamiltonian_cycle(nodes, hop)
  if not has_ring(nodes, hop):
    assert ring is None
    return
  assert ring is not None and sorted(ring) == sorted(nodes) and is_ring(ring, hop) and is_canonical(ring)


@pytest.mark.parametrize("n", [12, 16, 40, 200, 500])
def test_hamiltonian_cycle_finds_the_ring_of_a_band(n):
  hop = banded(n)
  ring = hamiltonian_cycle(list(range(n)), hop)
  assert ring is not None and sorted(ring) == list(range(n)) and is_ring(ring, hop) and is_canonical(ring)


def test_hamiltonian_cycle_within_a_subset_of_a_band():
  hop = banded(30, width=3)
  evens = list(range(0, 30, 2))  # 0 ~ 2 ~ 4 ...: a path, no ring
  assert hamiltonian_cycle(evens, hop) is None
  nodes = [i for i in range(30) if i % 3]  # 1 ~ 2 ~ 4 ~ 5 ...: width 3 skips every third node and keeps a band
  ring = hamiltonian_cycle(nodes, hop)
  assert ring is not None and sorted(ring) == nodes and is_ring(ring, hop)


@pytest.mark.parametrize("hop", [star(8), two_sites(5, 6), petersen(), edges_graph(7, [(i, j) for i in range(3) for j in range(3, 7)])])
def test_hamiltonian_cycle_is_none_where_no_ring_exists(hop):
  assert hamiltonian_cycle(list(range(len(hop))), hop) is None  # star, sites, Petersen, K(3, 4)


def test_hamiltonian_cycle_gives_up_when_its_budget_runs_out():
  hop = banded(40)
  assert hamiltonian_cycle(list(range(40)), hop, budget=10) is None  # a ring needs 39 path extensions
  assert hamiltonian_cycle(list(range(40)), hop, budget=39) is not None


def test_hamiltonian_cycle_on_a_complete_graph_is_nearest_neighbour_plus_two_opt():
  rng = np.random.default_rng(3)
  points = rng.random((30, 2))
  hop = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
  np.fill_diagonal(hop, math.inf)
  nodes = list(range(30))
  assert hamiltonian_cycle(nodes, hop) == two_opt_tour(nodes, hop, 1e6)


def test_hamiltonian_cycle_is_two_opt_optimal_along_existing_edges():
  rng = np.random.default_rng(5)
  hop = banded(36, width=4)
  hop[np.isfinite(hop)] = rng.random(int(np.isfinite(hop).sum()))
  hop = np.minimum(hop, hop.T)
  ring = hamiltonian_cycle(list(range(36)), hop)
  assert ring is not None and is_ring(ring, hop)
  for i, j in itertools.combinations(range(1, 36), 2):
    moved = ring[:i] + ring[i : j + 1][::-1] + ring[j + 1 :]
    assert tour_cost(moved, hop) >= tour_cost(ring, hop) - 1e-9  # inf where the reversal needs a missing link


def rings_by_brute_force(hop, weight, need, order):
  """Every ring of nodes from `order` weighing `need`, as (latest rank in it, size)."""
  rank = {node: r for r, node in enumerate(order)}
  found = []
  for size in range(1, len(order) + 1):
    for subset in itertools.combinations(order, size):
      if sum(weight[i] for i in subset) >= need and has_ring(list(subset), hop):
        found.append((max(rank[i] for i in subset), size))
  return found


@settings(max_examples=200, deadline=None)
@given(graphs(max_nodes=7), st.data())
def test_ring_holding_matches_brute_force(hop, data):
  n = len(hop)
  weight = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
  order = data.draw(st.permutations(range(n)).flatmap(lambda p: st.integers(1, n).map(lambda k: list(p[:k]))))
  need = data.draw(st.integers(1, 14))
  ring = ring_holding(hop, weight, need, order)
  found = rings_by_brute_force(hop, weight, need, order)
  if not found:
    assert ring is None
    return
  assert ring is not None and is_ring(ring, hop) and is_canonical(ring) and set(ring) <= set(order)
  assert sum(weight[i] for i in ring) >= need
  latest = min(r for r, _ in found)
  assert max(order.index(i) for i in ring) == latest  # the earliest possible prefix of `order`
  if min(size for r, size in found if r == latest) <= 2:
    assert len(ring) <= 2  # a node alone or a linked pair before any longer ring


def test_ring_holding_around_a_router_uses_one_link():
  hop = star(8)
  weight = [2] + [3] * 8
  order = [5, 0, 3, 1, 2, 4, 6, 7, 8]
  assert ring_holding(hop, weight, 5, order) == [0, 5]
  assert ring_holding(hop, weight, 6, order) is None  # a pair holds 5 at most and there is no longer ring


def test_ring_holding_stays_within_one_site():
  hop = two_sites(5, 5)
  order = [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]  # fastest first, alternating sites
  ring = ring_holding(hop, [1.0] * 10, 5, order)
  assert ring is not None and sorted(ring) == [0, 1, 2, 3, 4] and is_ring(ring, hop)
  assert ring_holding(hop, [1.0] * 10, 4, order) is not None
  assert ring_holding(hop, [1.0] * 10, 6, order) is None  # all ten hold 6 but no ring crosses the single link


@pytest.mark.parametrize("n, need", [(40, 1), (40, 3), (40, 20), (40, 39), (40, 40), (500, 500)])
def test_ring_holding_in_a_shuffled_band(n, need):
  hop = banded(n)  # 500 of 500: the search through the last node is cut off, the block's Hamiltonian cycle found
  order = [int(i) for i in np.random.default_rng(need).permutation(n)]
  ring = ring_holding(hop, [1.0] * n, need, order)
  assert ring is not None and is_ring(ring, hop) and len(ring) >= need
  assert ring_holding(hop, [1.0] * n, n + 1, order) is None


def test_ring_holding_on_a_ring_graph_and_a_complete_graph_missing_links():
  cycle = edges_graph(12, [(i, (i + 1) % 12) for i in range(12)])
  assert ring_holding(cycle, [1] * 12, 2, list(range(12))) == [0, 1]
  assert ring_holding(cycle, [1] * 12, 3, list(range(12))) == list(range(12))  # no shorter ring exists
  rng = np.random.default_rng(11)
  missing = {pair for pair in itertools.combinations(range(14), 2) if rng.random() < 0.25}
  hop = edges_graph(14, [pair for pair in itertools.combinations(range(14), 2) if pair not in missing])
  order = [int(i) for i in rng.permutation(14)]
  for need in (4, 9, 14):
    ring = ring_holding(hop, [1] * 14, need, order)
    assert ring is not None and is_ring(ring, hop) and len(ring) >= need
