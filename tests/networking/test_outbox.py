"""The outbox against a recording peer: what is sent in one turn of the event loop to one peer leaves as one message, in
order; other peers and later turns get messages of their own; a failed message fails each of its senders."""

import asyncio

import numpy as np
import pytest

from exo.networking.outbox import Outbox
from exo.networking.request_context import RequestContext, RingPlan, RingStage

PLAN = RingPlan("m", 8, (RingStage("a", 0, 3), RingStage("b", 4, 7)))
SHARD = PLAN.shard(1)


def context(i: int) -> RequestContext:
  return RequestContext(f"r{i}", "a", PLAN, 16, position=i)


class RecordingPeer:
  """Records each message as the request ids it carries; `fail` makes every send raise it."""

  def __init__(self, name: str, fail: Exception | None = None):
    self.name, self.fail, self.messages = name, fail, []

  async def send_tensor(self, shard, tensor, ctx):
    await self.send_tensors([(shard, tensor, ctx)])

  async def send_tensors(self, tensors):
    self.messages.append([ctx.request_id for _, _, ctx in tensors])
    await asyncio.sleep(0)
    if self.fail:
      raise self.fail


def send(outbox: Outbox, peer: RecordingPeer, i: int):
  return outbox.send_tensor(peer, SHARD, np.full((1, 1, 2), i, dtype=np.float32), context(i))


def test_steps_sent_in_one_turn_to_one_peer_leave_as_one_message_in_order():
  async def main():
    outbox, b, c = Outbox(), RecordingPeer("b"), RecordingPeer("c")
    await asyncio.gather(send(outbox, b, 0), send(outbox, c, 1), send(outbox, b, 2), send(outbox, b, 3))
    await send(outbox, b, 4)  # a later turn: a message of its own
    return b.messages, c.messages

  assert asyncio.run(main()) == ([["r0", "r2", "r3"], ["r4"]], [["r1"]])


def test_the_steps_of_a_batched_call_woken_together_share_a_message():
  """As at a stage: one engine call resolves the futures its requests' tasks wait on, and each task then sends its output."""

  async def main():
    outbox, b = Outbox(), RecordingPeer("b")
    results = [asyncio.get_running_loop().create_future() for _ in range(4)]

    async def stage(i: int):
      await results[i]
      await send(outbox, b, i)

    tasks = [asyncio.create_task(stage(i)) for i in range(4)]
    await asyncio.sleep(0)
    for future in results:
      future.set_result(None)
    await asyncio.gather(*tasks)
    return b.messages

  assert asyncio.run(main()) == [["r0", "r1", "r2", "r3"]]


def test_a_failed_message_fails_each_of_its_senders():
  async def main():
    outbox, b = Outbox(), RecordingPeer("b", fail=ConnectionError("b is gone"))
    return await asyncio.gather(send(outbox, b, 0), send(outbox, b, 1), return_exceptions=True)

  outcomes = asyncio.run(main())
  assert [type(o) for o in outcomes] == [ConnectionError, ConnectionError]


def test_a_cancelled_sender_does_not_hold_up_or_break_the_others():
  async def main():
    outbox, b = Outbox(), RecordingPeer("b")
    first = asyncio.create_task(send(outbox, b, 0))
    second = asyncio.create_task(send(outbox, b, 1))
    await asyncio.sleep(0)
    first.cancel()
    await second
    with pytest.raises(asyncio.CancelledError):
      await first
    return b.messages

  assert asyncio.run(main()) == [["r0", "r1"]]
