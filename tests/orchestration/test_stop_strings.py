"""Stop strings on text as it grows: cut before the first one, hold back what may begin one, and never take back text shown."""

import numpy as np
import pytest

from exo.orchestration.stop_strings import visible_text


@pytest.mark.parametrize(
  "text, stop, final, expected",
  [
    ("Hello world", ("o w",), False, ("Hell", True)),
    ("Hello world", ("xyz", "ll", "o"), False, ("He", True)),  # the earliest occurrence, whichever string it is
    ("Hello world", ("wor", "o w"), True, ("Hell", True)),
    ("Hello wo", ("world",), False, ("Hello ", False)),  # "wo" may begin "world"
    ("Hello wo", ("world",), True, ("Hello wo", False)),  # no more text: nothing to wait for
    ("Hello w", ("ow", "wx", "o w!"), False, ("Hell", False)),  # the longest tail that begins one: "o w"
    ("aaa", ("aab",), False, ("a", False)),
    ("Hello", (), False, ("Hello", False)),
    ("", ("x",), False, ("", False)),
    ("stop here", ("stop",), False, ("", True)),
  ],
)
def test_cuts_and_holds_back(text, stop, final, expected):
  assert visible_text(text, stop, final) == expected


def test_text_shown_is_never_taken_back():
  """Text grows a character at a time until a stop string appears (the answer ends there) or it is over: each text shown
  begins with the one shown before, and the answer begins with all of them."""
  rng = np.random.default_rng(0)
  for _ in range(500):
    full = "".join(rng.choice(list("abc "), int(rng.integers(0, 40))))
    stop = tuple("".join(rng.choice(list("abc "), int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 5))))
    shown, steps = [], 0
    for steps in range(len(full) + 1):
      now, stopped = visible_text(full[:steps], stop)
      shown.append(now)
      if stopped:
        break
    answer, ended = visible_text(full[:steps], stop, final=True)
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:])) and all(answer.startswith(s) for s in shown)
    assert ended == any(s in full for s in stop) and (ended or answer == full)
