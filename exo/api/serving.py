"""The one request path every API (OpenAI's chat, completions and responses, Anthropic's messages, Ollama's chat and generate)
translates onto: a TextRequest in, the model resolved, the prompt built (the model's chat template, or the caller's raw text),
the request admitted (ServingNode.admit), then its text as it comes and its Generation at the end; a client that goes away
cancels it, and the node's place is freed however it ends. What goes wrong is a Refusal: an HTTP status, a sentence, and the
field at fault, which each API words in its own error shape.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from exo.api.api_errors import ERROR_TYPES, BadRequest, error_response, failure
from exo.api.chat_request import MAX_BODY_BYTES, json_body
from exo.api.completion import Completion
from exo.base.errors import BadInput, Busy, ExoError
from exo.base.model_spec import ModelSpec
from exo.inference.sampling import GREEDY, Sampling
from exo.orchestration.requests import Generation
from exo.orchestration.service import ServingNode
from exo.orchestration.stop_strings import visible_text

log = logging.getLogger(__name__)

__all__ = ["Refusal", "RequestPath", "TextRequest", "openai_error", "read_json", "refusal", "sse_response"]


class Refusal(Exception):
  """A request that gets no answer: `status` (400, 404, 429, 503, 500...), the sentence, the field at fault and a code."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


@dataclass(frozen=True)
class TextRequest:
  """What any API asks: a model (None: the node's), chat `messages` (templated) or a raw `prompt`, an answer of at most
  `max_tokens` (None: what the context leaves, at most the node's limit), sampling and stop strings."""

  model_id: str | None
  messages: list[dict] | None = None
  prompt: str | None = None
  max_tokens: int | None = None
  sampling: Sampling = GREEDY
  stop: tuple[str, ...] = field(default=())


class RequestPath:
  def __init__(self, node: ServingNode, resolve_model: Callable[[str | None], Awaitable[ModelSpec]]):
    self.node, self.resolve_model = node, resolve_model

  @contextlib.asynccontextmanager
  async def opened(self, request: TextRequest) -> AsyncIterator[Completion]:
    """The request admitted, as a Completion; its place on the node is freed when the block ends. Refusal if it is not."""
    try:
      model = await self.resolve_model(request.model_id)
    except BadRequest as e:
      raise Refusal(400, str(e), e.param, e.code) from None
    except ExoError as e:  # not found here nor at the hub (404), or the hub cannot be reached (503)
      raise Refusal(e.http_status, str(e), "model", "model_not_found" if e.http_status == 404 else None) from None
    try:
      prompt = request.prompt if request.messages is None else await self.node.text.apply_chat_template(model, request.messages)
    except Exception as e:
      raise _refusal(model, e) from None
    try:  # before anything streams: a node full (429), a prompt and max_tokens beyond the planned context (400), no plan (503)
      admission = await self.node.admit(prompt, model, request.max_tokens)
    except BadInput as e:
      raise Refusal(400, str(e), "messages", "context_length_exceeded") from None
    except Busy as e:  # at once, before any work: the node could not finish it in time next to those it runs
      raise Refusal(429, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except ExoError as e:
      raise _refusal(model, e) from None
    try:
      yield Completion(self.node, model, prompt, admission, request.sampling, request.stop)
    finally:
      self.node.release(admission)

  async def whole(self, completion: Completion) -> Generation:
    """The whole answer; Refusal if the request fails."""
    try:
      return await completion.generate()
    except Exception as e:
      raise _refusal(completion.model, e) from None

  async def pieces(self, completion: Completion) -> AsyncIterator[str | Generation]:
    """The answer's new text as it comes (never text after a stop string, nor what may begin one, nor half a character), then
    its Generation; Refusal if the request fails. Leaving early (a client gone) cancels the request."""
    updates: asyncio.Queue = asyncio.Queue()  # token lists so far; None once the generation is over
    task = asyncio.create_task(completion.generate(on_token=updates.put_nowait))
    task.add_done_callback(lambda _: updates.put_nowait(None))
    sent = ""
    try:
      while (tokens := await updates.get()) is not None:
        while not updates.empty():  # a slow client gets the latest state, not every step; the end is sent from the result
          tokens = updates.get_nowait()
        if tokens is None:
          break
        visible = (await completion.text(tokens)).rstrip("\ufffd")  # an unfinished multi-byte character may still change
        visible = visible_text(visible, completion.stop)[0]
        if visible.startswith(sent) and len(visible) > len(sent):
          yield visible[len(sent) :]
          sent = visible
      try:
        generation = await task
      except Exception as e:
        raise _refusal(completion.model, e) from None
      text = generation.text
      rest = text[len(sent) :]
      if not text.startswith(sent):  # a tokenizer revised text already sent: the client's copy cannot be corrected
        log.warning("streamed text of %s was revised after it was sent", completion.model.id)
        rest = text[len(os.path.commonprefix([sent, text])) :]
      if rest:
        yield rest
      yield generation
    finally:
      task.cancel()  # a client that went away leaves no generation running (a no-op once it is over)


def _refusal(model: ModelSpec, e: Exception) -> Refusal:
  body, status = failure(model, e)
  return Refusal(status, body["error"]["message"])


def refusal(e: BadRequest | Refusal) -> Refusal:
  """A request's fault found while reading it (BadRequest: 400) or later (a Refusal), as one Refusal."""
  return e if isinstance(e, Refusal) else Refusal(400, str(e), e.param, e.code)


async def read_json(request: web.Request) -> dict:
  """The request's JSON object (chat_request.json_body); Refusal 400 if it is none, 413 beyond MAX_BODY_BYTES."""
  try:
    return await json_body(request)
  except BadRequest as e:
    raise refusal(e) from None
  except web.HTTPRequestEntityTooLarge:
    raise Refusal(413, f"the request body is larger than {MAX_BODY_BYTES} bytes") from None


def openai_error(e: Refusal) -> web.Response:
  """A Refusal in OpenAI's error shape: {"error": {message, type, param, code}} with its status."""
  return error_response(e.status, e.message, ERROR_TYPES.get(e.status, "internal_error"), e.param, e.code, e.headers or None)


async def sse_response(request: web.Request, headers: dict | None = None) -> web.StreamResponse:
  """A server-sent event stream, headers sent."""
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})})
  await response.prepare(request)
  return response
