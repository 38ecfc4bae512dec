"""Stop strings (OpenAI's `stop`): an answer ends before the first place any of them occurs, and text that may turn out to be
the start of one is not shown until the next tokens tell.

`visible_text` takes the text decoded so far: with a stop string in it, the text before the first occurrence (the earliest
start; of two starting there, either cuts the same); else, while more may come, the text less its longest tail that is the
beginning of a stop string. Text it returned once is always the beginning of what it returns for a longer text. O(len(text)
* len(stop)) with Python's substring search.
"""

__all__ = ["MAX_STOP_STRINGS", "visible_text"]

MAX_STOP_STRINGS = 4  # as OpenAI


def visible_text(text: str, stop: tuple[str, ...], final: bool = False) -> tuple[str, bool]:
  """(the text that can be shown, whether a stop string ended it); `final`: no more text will come."""
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  if found:
    return text[: min(found)], True
  if final:
    return text, False
  held = max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
  return text[: len(text) - held], False
