"""Anthropic's Messages API on a node, a translation onto the API's one request path (exo.api.serving): POST /v1/messages with
`model`, `max_tokens` (required, as Anthropic's), `messages` (user and assistant turns; content a string or text blocks),
`system` (a string or text blocks), `stop_sequences`, `temperature`, `top_p`, `top_k` and `stream`. The answer is a message
with one text block, its stop_reason (end_turn, max_tokens, stop_sequence) and usage; streamed, it is Anthropic's events:
message_start, content_block_start, ping, content_block_delta per piece, content_block_stop, message_delta, message_stop.
Errors are Anthropic's shape, {"type": "error", "error": {"type", "message"}}, with the status of their kind.
"""

import contextlib
import json
import uuid

from aiohttp import web

from exo.api.api_errors import BadRequest, shown
from exo.api.chat_request import message_text, parse_messages, parse_sampling, parse_stop, positive_int
from exo.api.completion import Completion
from exo.api.serving import Refusal, TextRequest, read_json, refusal, sse_response
from exo.orchestration.requests import Generation

__all__ = ["AnthropicMessages"]

ERROR_TYPES = {
  400: "invalid_request_error",
  401: "authentication_error",
  403: "permission_error",
  404: "not_found_error",
  413: "request_too_large",
  429: "rate_limit_error",
  503: "overloaded_error",
}


def anthropic_error(e: Refusal) -> web.Response:
  body = {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
  return web.json_response(body, status=e.status, headers=e.headers or None)


def parse(data: dict, model_id: str | None) -> TextRequest:
  """The request's fields, each checked; BadRequest naming the first bad one."""
  max_tokens = positive_int(data, "max_tokens")
  if max_tokens is None:
    raise BadRequest("'max_tokens' is required: the most tokens the answer may have", "max_tokens")
  messages = parse_messages(data.get("messages"))
  if bad := next((i for i, m in enumerate(messages) if m["role"] == "system"), None):
    raise BadRequest(f"messages[{bad}].role must be user or assistant (the system prompt is the top-level 'system')", f"messages[{bad}].role")
  system = data.get("system")
  if system is not None:
    if not isinstance(system, (str, list)):
      raise BadRequest(f"'system' must be a string or a list of text blocks, got {shown(system)}", "system")
    messages = [{"role": "system", "content": message_text(system, 0).strip()}, *messages]
  stop = parse_stop({"stop": data.get("stop_sequences") or None})
  return TextRequest(model_id, messages, None, max_tokens, parse_sampling({k: data.get(k) for k in ("temperature", "top_p", "top_k")}), stop)


class AnthropicMessages:
  """`api`: the node's ChatGPTAPI, whose request path and model checks these routes share."""

  def __init__(self, api):
    self.path, self.requested_model = api.path, api.requested_model

  def routes(self) -> list[web.RouteDef]:
    return [web.post("/v1/messages", self.handle)]

  async def handle(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      model_id = data.get("model")
      if not isinstance(model_id, str):
        raise BadRequest(f"'model' must be a string naming the model, got {shown(model_id)}", "model")
      asked = parse(data, self.requested_model(model_id))
      stream = data.get("stream", False)
      if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {shown(stream)}", "stream")
      async with self.path.opened(asked) as completion:
        if stream:
          return await self.stream(request, completion)
        generation = await self.path.whole(completion)
        return web.json_response(await self.message(completion, generation))
    except (BadRequest, Refusal) as e:
      return anthropic_error(refusal(e))

  async def message(self, completion: Completion, generation: Generation | None) -> dict:
    """The message: whole (its text, stop reason and usage), or as message_start sends it (None: no content yet)."""
    prompt_tokens = await completion.prompt_tokens()
    body = {
      "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": completion.model.id, "content": [],
      "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }  # fmt: skip
    if generation is not None:
      body.update(await self.ending(completion, generation))
      body["content"] = [{"type": "text", "text": generation.text}]
      body["usage"]["output_tokens"] = len(generation.tokens)
    return body

  async def ending(self, completion: Completion, generation: Generation) -> dict:
    """stop_reason and stop_sequence: the budget (max_tokens), a stop sequence, or the model's end of turn."""
    if generation.finish_reason == "length":
      return {"stop_reason": "max_tokens", "stop_sequence": None}
    found = await completion.stopped_by(generation.tokens)
    return {"stop_reason": "stop_sequence" if found else "end_turn", "stop_sequence": found}

  async def stream(self, request: web.Request, completion: Completion) -> web.StreamResponse:
    response = await sse_response(request)

    async def send(event: str, data: dict) -> None:
      await response.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())

    with contextlib.suppress(ConnectionResetError):  # a client gone: RequestPath.pieces cancels the request
      await send("message_start", {"message": await self.message(completion, None)})
      await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
      await send("ping", {})
      try:
        async for piece in self.path.pieces(completion):
          if isinstance(piece, str):
            await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            continue
          await send("content_block_stop", {"index": 0})
          await send("message_delta", {"delta": await self.ending(completion, piece), "usage": {"output_tokens": len(piece.tokens)}})
          await send("message_stop", {})
      except Refusal as e:
        await send("error", {"error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}})
      await response.write_eof()
    return response
