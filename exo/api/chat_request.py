"""A chat completion request's body, checked field by field before any work: BadRequest (400) names the first bad field."""

import json

from aiohttp import web

from exo.api.api_errors import BadRequest, shown
from exo.inference.sampling import MAX_SEED, MAX_TOP_K, Sampling
from exo.orchestration.stop_strings import MAX_STOP_STRINGS

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "json_body", "parse_messages", "parse_sampling", "parse_stop", "positive_int"]

MAX_BODY_BYTES = 2**20  # a request body; a prompt this long is far beyond any planned context already
MAX_JSON_DEPTH = 32  # nesting of a request body: a chat request needs 5
ROLES = ("system", "user", "assistant")


def too_deep(value, most: int) -> bool:
  """Whether JSON `value` nests lists and objects more than `most` deep (walked without recursion)."""
  stack = [(value, 1)]
  while stack:
    item, depth = stack.pop()
    if isinstance(item, (dict, list)):
      if depth > most:
        return True
      stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
  return False


async def json_body(request: web.Request) -> dict:
  """The request's JSON object; BadRequest if it is not one, is nested beyond MAX_JSON_DEPTH or is not UTF-8; web's 413 if it
  is larger than MAX_BODY_BYTES (the application's client_max_size)."""
  raw, deep = await request.read(), BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels; a chat request needs 5")
  try:
    data = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise BadRequest("the request body must be a JSON object") from None
  except RecursionError:
    raise deep from None
  if too_deep(data, MAX_JSON_DEPTH):
    raise deep
  if not isinstance(data, dict):
    raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
  return data


def message_text(content, index: int) -> str:
  """A message's content as text: a string, or the text parts of a list of content parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) for p in content):
    if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
      raise BadRequest(f"messages[{index}].content may only hold text parts; this node serves text models", f"messages[{index}].content")
    return "".join(p["text"] for p in content)
  raise BadRequest(f"messages[{index}].content must be a string or a list of text parts, got {shown(content)}", f"messages[{index}].content")


def parse_messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise BadRequest(f"'messages' must be a non-empty list of {{role, content}} objects, got {shown(messages)}", "messages")
  parsed = []
  for index, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
      raise BadRequest(f"messages[{index}] must be an object with a string 'role' and a 'content', got {shown(message)}", f"messages[{index}]")
    if message["role"] not in ROLES:
      raise BadRequest(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {shown(message['role'])}", f"messages[{index}].role")
    parsed.append({"role": message["role"], "content": message_text(message["content"], index)})
  return parsed


def positive_int(data: dict, key: str) -> int | None:
  value = data.get(key)
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise BadRequest(f"'{key}' must be an integer >= 1, got {shown(value)}", key)
  return value


def parse_sampling(data: dict) -> Sampling:
  """The request's temperature, top_p, top_k and seed; 400 naming the first bad one."""

  def field(key: str, default, valid, expected: str):
    value = data.get(key)
    if value is None:
      return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):  # a NaN fails `valid` too
      raise BadRequest(f"'{key}' must be {expected}, got {shown(value)}", key)
    return value

  temperature = field("temperature", 0.0, lambda v: 0 <= v <= 2, "a number from 0 (greedy) to 2")
  top_p = field("top_p", 1.0, lambda v: 0 < v <= 1, "a number above 0 and at most 1")
  top_k = field("top_k", 0, lambda v: isinstance(v, int) and 0 <= v <= MAX_TOP_K, f"an integer from 0 (every token) to {MAX_TOP_K}")
  seed = field("seed", None, lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED, "an integer from 0 to 2**63 - 1")
  return Sampling(temperature, top_p, top_k, seed)


def parse_stop(data: dict) -> tuple[str, ...]:
  stop = data.get("stop")
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, got {shown(data['stop'])}", "stop")
  return tuple(stop)
