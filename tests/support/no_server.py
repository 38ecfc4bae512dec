"""A node's server for tests that drive the node directly: it starts and stops, and serves nothing."""


class NoServer:
  async def start(self):
    pass

  async def stop(self):
    pass
