"""One admitted request: its prompt, its admission, and what every API builds from the tokens generated so far (OpenAI's
objects among them)."""

import time
import uuid
from typing import Callable

from exo.base.model_spec import ModelSpec
from exo.inference.sampling import Sampling
from exo.orchestration.requests import Admission, Generation
from exo.orchestration.service import ServingNode

__all__ = ["Completion"]


class Completion:
  """One chat completion request: its prompt, and the OpenAI objects built from the tokens generated so far."""

  def __init__(self, node: ServingNode, model: ModelSpec, prompt: str, admission: Admission, sampling: Sampling, stop: tuple[str, ...]):
    self.node, self.model, self.prompt, self.admission = node, model, prompt, admission
    self.sampling, self.stop = sampling, stop
    self.id, self.created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

  async def generate(self, on_token: Callable[[list[int]], None] | None = None) -> Generation:
    """On the plan the request was admitted with, for the tokens it was admitted for."""
    admission = self.admission
    return await self.node.generate(self.prompt, self.model, admission.max_tokens, on_token, self.sampling, self.stop, admission)

  async def text(self, tokens: list[int]) -> str:
    """The decoded reply, without the end-of-sequence token's text."""
    return (await self.node.text.answer_text(self.model, tokens))[0]

  async def stopped_by(self, tokens: list[int]) -> str | None:
    """The stop string that ended the answer (the first to occur in its whole text), or None (an end-of-sequence token, the budget)."""
    whole = await self.text(tokens)
    found = [(whole.find(s), s) for s in self.stop if s in whole]
    return min(found)[1] if found else None

  async def prompt_tokens(self) -> int:
    return len(await self.node.text.encode(self.model, self.prompt))

  async def usage(self, tokens: list[int]) -> dict:
    prompt_tokens = await self.prompt_tokens()
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)}

  def chunk(self, kind: str, message: dict, finish_reason: str | None) -> dict:
    key = "delta" if kind == "chat.completion.chunk" else "message"
    choice = {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model.id, "choices": [choice]}
