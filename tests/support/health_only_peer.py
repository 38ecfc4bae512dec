"""A peer handle for tests of discovery and RTT: subclasses say who the peer is and how it answers health checks; the ring's
calls are not part of those tests and refuse to run."""

from exo.networking.peer_handle import PeerHandle


class HealthOnlyPeer(PeerHandle):
  async def disconnect(self):
    pass

  async def send_prompt(self, shard, prompt, context):
    raise NotImplementedError

  async def send_tensor(self, shard, tensor, context):
    raise NotImplementedError

  async def send_result(self, request_id, tokens, is_finished, error=""):
    raise NotImplementedError

  async def send_opaque_status(self, request_id, status):
    raise NotImplementedError

  async def collect_topology(self, visited, max_depth):
    raise NotImplementedError
