"""OpenAI's completions and responses endpoints on a node, translations onto the API's one request path (exo.api.serving), with
the sampling, `stop` and token limits of chat completions:

  POST /v1/completions  {model, prompt (a string, or a list of one), max_tokens, stream, ...}: the prompt as it is, no chat
                        template; text_completion objects, streamed as chunks ending with [DONE]
  POST /v1/responses    {model, input (a string, or messages whose content is a string or input_text parts), instructions,
                        max_output_tokens, stream, ...}: a response object with one output message; streamed as the Responses
                        API's events (response.created ... response.output_text.delta ... response.completed)

Errors are OpenAI's shape (exo.api.serving.openai_error).
"""

import contextlib
import json
import time
import uuid

from aiohttp import web

from exo.api.api_errors import BadRequest, error_body, shown
from exo.api.chat_request import ROLES, parse_sampling, parse_stop, positive_int
from exo.api.completion import Completion
from exo.api.serving import Refusal, TextRequest, openai_error, read_json, refusal, sse_response
from exo.orchestration.requests import Generation

__all__ = ["OpenAIText"]


def flag(data: dict, key: str) -> bool:
  value = data.get(key, False)
  if not isinstance(value, bool):
    raise BadRequest(f"'{key}' must be true or false, got {shown(value)}", key)
  return value


def completions_request(data: dict, model_id: str | None) -> TextRequest:
  prompt = data.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1:
    prompt = prompt[0]
  if not isinstance(prompt, str) or not prompt:
    raise BadRequest(f"'prompt' must be a non-empty string (or a list of one), got {shown(prompt)}", "prompt")
  if data.get("n", 1) != 1 or data.get("echo") or data.get("suffix") or data.get("best_of", 1) != 1:
    raise BadRequest("'n', 'best_of', 'echo' and 'suffix' are not served: one completion of the prompt as it is", "n")
  return TextRequest(model_id, None, prompt, positive_int(data, "max_tokens"), parse_sampling(data), parse_stop(data))


def input_messages(data: dict) -> list[dict]:
  """The Responses API's `instructions` and `input` as chat messages."""
  given, instructions = data.get("input"), data.get("instructions")
  if instructions is not None and not isinstance(instructions, str):
    raise BadRequest(f"'instructions' must be a string, got {shown(instructions)}", "instructions")
  messages = [{"role": "system", "content": instructions}] if instructions else []
  if isinstance(given, str) and given:
    return [*messages, {"role": "user", "content": given}]
  if not isinstance(given, list) or not given:
    raise BadRequest(f"'input' must be a non-empty string or list of messages, got {shown(given)}", "input")
  for i, item in enumerate(given):
    role, content = (item.get("role"), item.get("content")) if isinstance(item, dict) else (None, None)
    role = "system" if role == "developer" else role
    if role not in ROLES or item.get("type", "message") != "message":
      raise BadRequest(f"input[{i}] must be a message with a role of user, assistant, system or developer, got {shown(item)}", f"input[{i}]")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in content):
      content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
      raise BadRequest(f"input[{i}].content must be a string or text parts; this node serves text models", f"input[{i}].content")
    messages.append({"role": role, "content": content})
  return messages


class OpenAIText:
  """`api`: the node's ChatGPTAPI, whose request path and model checks these routes share."""

  def __init__(self, api):
    self.path, self.requested_model = api.path, api.requested_model

  def routes(self) -> list[web.RouteDef]:
    return [web.post("/v1/completions", self.handle_completions), web.post("/v1/responses", self.handle_responses)]

  # ---------- /v1/completions ----------

  async def handle_completions(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      asked, stream = completions_request(data, self.requested_model(data.get("model"))), flag(data, "stream")
      options = data.get("stream_options") or {}
      if not isinstance(options, dict):
        raise BadRequest(f"'stream_options' must be an object, got {shown(options)}", "stream_options")
      usage_too = bool(options.get("include_usage"))
      async with self.path.opened(asked) as completion:
        ident = f"cmpl-{uuid.uuid4()}"
        if not stream:
          generation = await self.path.whole(completion)
          return web.json_response(
            {**text_chunk(completion, ident, generation.text, generation.finish_reason), "usage": await completion.usage(generation.tokens)}
          )
        response = await sse_response(request)
        with contextlib.suppress(ConnectionResetError):
          try:
            async for piece in self.path.pieces(completion):
              if isinstance(piece, str):
                await send_data(response, text_chunk(completion, ident, piece, None))
                continue
              await send_data(response, text_chunk(completion, ident, "", piece.finish_reason))
              if usage_too:
                await send_data(response, {**text_chunk(completion, ident, "", None), "choices": [], "usage": await completion.usage(piece.tokens)})
          except Refusal as e:
            await send_data(response, error_body(e.message, "internal_error" if e.status >= 500 else "invalid_request_error"))
          await response.write(b"data: [DONE]\n\n")
          await response.write_eof()
        return response
    except (BadRequest, Refusal) as e:
      return openai_error(refusal(e))

  # ---------- /v1/responses ----------

  async def handle_responses(self, request: web.Request) -> web.StreamResponse:
    try:
      data = await read_json(request)
      model_id = self.requested_model(data.get("model"))
      asked = TextRequest(model_id, input_messages(data), None, positive_int(data, "max_output_tokens"), parse_sampling(data), parse_stop(data))
      stream = flag(data, "stream")
      async with self.path.opened(asked) as completion:
        shape = ResponseShape(completion, data)
        if not stream:
          return web.json_response(await shape.whole(await self.path.whole(completion)))
        return await self.stream_response(request, completion, shape)
    except (BadRequest, Refusal) as e:
      return openai_error(refusal(e))

  async def stream_response(self, request: web.Request, completion: Completion, shape: "ResponseShape") -> web.StreamResponse:
    response = await sse_response(request)
    sequence = iter(range(1_000_000_000))

    async def send(event: str, **fields) -> None:
      await response.write(f"event: {event}\ndata: {json.dumps({'type': event, 'sequence_number': next(sequence), **fields})}\n\n".encode())

    where = {"item_id": shape.item_id, "output_index": 0, "content_index": 0}
    with contextlib.suppress(ConnectionResetError):
      await send("response.created", response=shape.body("in_progress", []))
      await send("response.in_progress", response=shape.body("in_progress", []))
      await send("response.output_item.added", output_index=0, item=shape.item("in_progress", []))
      await send("response.content_part.added", **where, part=shape.part(""))
      text = ""
      try:
        async for piece in self.path.pieces(completion):
          if isinstance(piece, str):
            text += piece
            await send("response.output_text.delta", **where, delta=piece, logprobs=[])
            continue
          await send("response.output_text.done", **where, text=piece.text, logprobs=[])
          await send("response.content_part.done", **where, part=shape.part(piece.text))
          await send("response.output_item.done", output_index=0, item=shape.item("completed", [shape.part(piece.text)]))
          whole = await shape.whole(piece)
          await send("response.completed" if whole["status"] == "completed" else "response.incomplete", response=whole)
      except Refusal as e:
        await send("error", code=None, message=e.message, param=e.param)
      await response.write_eof()
    return response


def text_chunk(completion: Completion, ident: str, text: str, finish_reason: str | None) -> dict:
  choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
  return {"id": ident, "object": "text_completion", "created": completion.created, "model": completion.model.id, "choices": [choice]}


async def send_data(response: web.StreamResponse, payload: dict) -> None:
  await response.write(f"data: {json.dumps(payload)}\n\n".encode())


class ResponseShape:
  """The Responses API's objects for one request: the response, its one output message and that message's text part."""

  def __init__(self, completion: Completion, data: dict):
    self.completion, self.data = completion, data
    self.id, self.item_id, self.created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())

  def part(self, text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}

  def item(self, status: str, content: list[dict]) -> dict:
    return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

  def body(self, status: str, output: list[dict], usage: dict | None = None, incomplete: dict | None = None) -> dict:
    sampling = self.completion.sampling
    return {
      "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.completion.model.id, "output": output,
      "usage": usage, "error": None, "incomplete_details": incomplete, "instructions": self.data.get("instructions"),
      "max_output_tokens": self.data.get("max_output_tokens"), "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
      "temperature": sampling.temperature, "top_p": sampling.top_p, "text": {"format": {"type": "text"}}, "metadata": {},
    }  # fmt: skip

  async def whole(self, generation: Generation) -> dict:
    """The finished response: completed, or incomplete at max_output_tokens, with its usage."""
    prompt_tokens, answer_tokens = await self.completion.prompt_tokens(), len(generation.tokens)
    usage = {
      "input_tokens": prompt_tokens, "output_tokens": answer_tokens, "total_tokens": prompt_tokens + answer_tokens,
      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip
    cut = generation.finish_reason == "length"
    item = self.item("incomplete" if cut else "completed", [self.part(generation.text)])
    return self.body("incomplete" if cut else "completed", [item], usage, {"reason": "max_output_tokens"} if cut else None)
