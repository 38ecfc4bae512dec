"""Claims to fetch a file from the hub (exo.networking.fetch_claims): however the claims and the questions of several nodes
interleave, exactly one node finds its claim the earliest among the answers it got."""

from hypothesis import given
from hypothesis import strategies as st

from exo.networking.fetch_claims import FetchClaims

KEY = "org/model/model.gguf@0123456789ab"


def decisions(n: int, turns: list[int]) -> list[bool]:
  """Each node claims, then asks every other node in turn (which hears its claim and answers with its own, if any), its steps
  taken in the order `turns` picks nodes; returns whether each node found its claim the earliest."""
  nodes = [FetchClaims(f"n{i}") for i in range(n)]
  programs = [[("claim", None)] + [("ask", j) for j in range(n) if j != i] for i in range(n)]
  answers: list[dict[str, int]] = [{} for _ in range(n)]
  for turn in turns + [i for i in range(n) for _ in range(n)]:  # then every node finishes
    if not programs[turn]:
      continue
    step, other = programs[turn].pop(0)
    if step == "claim":
      nodes[turn].claim(KEY)
    else:
      nodes[other].heard(nodes[turn].own[KEY])
      answers[turn][f"n{other}"] = nodes[other].own.get(KEY, 0)
  return [node.earliest(KEY, answers[i]) for i, node in enumerate(nodes)]


@given(st.integers(2, 5).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=30))))
def test_exactly_one_node_fetches_whatever_the_interleaving(case):
  n, turns = case
  assert sum(decisions(n, turns)) == 1


def test_by_hand_a_node_that_heard_a_claim_before_its_own_comes_after_it():
  a, b = FetchClaims("a"), FetchClaims("b")
  a.claim(KEY)  # a: 1
  b.heard(a.own[KEY])  # a asks b before b needs the file
  assert b.claim(KEY) == 2 and not b.earliest(KEY, {"a": 1}) and a.earliest(KEY, {"b": 0})


def test_by_hand_equal_clocks_are_ordered_by_node_id_and_a_released_claim_is_none():
  a, b = FetchClaims("a"), FetchClaims("b")
  assert a.claim(KEY) == b.claim(KEY) == 1
  assert a.earliest(KEY, {"b": 1}) and not b.earliest(KEY, {"a": 1})
  a.release(KEY)
  assert a.own == {} and b.earliest(KEY, {"a": 0})
