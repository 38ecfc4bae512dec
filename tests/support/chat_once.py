"""Chat completions against an in-process node's HTTP API: start the node and its API, send each request, stop both."""

import asyncio
import json

import aiohttp


def chat_replies(node, models: list[str]) -> list[tuple[int, dict]]:
  """(HTTP status, JSON body) of one "hi" chat completion per model id, in turn, from `node` (started and stopped here)."""

  async def run() -> list[tuple[int, dict]]:
    from exo.api import ChatGPTAPI

    await node.start()
    api = ChatGPTAPI(node, "127.0.0.1", 0)
    await api.start()
    replies = []
    try:
      async with aiohttp.ClientSession() as session:
        for model in models:
          request = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
          async with session.post(f"http://127.0.0.1:{api.port}/v1/chat/completions", json=request) as response:
            replies.append((response.status, json.loads(await response.text())))
    finally:
      await api.stop()
      await node.stop()
      node.engine.close()
    return replies

  return asyncio.run(run())
