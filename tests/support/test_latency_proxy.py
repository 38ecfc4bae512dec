import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo.tools.latency_proxy import LatencyProxy
from tests.support.patience import HANG_S, STALL_S

ROOT = Path(__file__).resolve().parents[2]


async def start_echo_server() -> asyncio.Server:
  async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
      while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()

  return await asyncio.start_server(echo, "127.0.0.1", 0)


async def round_trip(port: int, message: bytes) -> tuple[bytes, float]:
  """Send `message`, read its echo back; the echo and the seconds from sending to the last byte back."""
  loop = asyncio.get_running_loop()
  reader, writer = await asyncio.open_connection("127.0.0.1", port)
  start = loop.time()
  writer.write(message)
  await writer.drain()
  echoed = await reader.readexactly(len(message))
  elapsed = loop.time() - start
  writer.close()
  await writer.wait_closed()
  return echoed, elapsed


def test_echo_through_proxy_is_intact_and_delayed():
  async def scenario():
    server = await start_echo_server()
    async with LatencyProxy("127.0.0.1", server.sockets[0].getsockname()[1], 0.02, 0.02) as proxy:
      assert proxy.port > 0
      echoed, rtt = await round_trip(proxy.port, b"hello through the proxy")
      assert echoed == b"hello through the proxy"
      assert rtt >= 0.04
      big = os.urandom(5 * 2**20)
      echoed, _ = await round_trip(proxy.port, big)
      assert echoed == big
    server.close()
    await server.wait_closed()

  asyncio.run(scenario())


def test_delays_per_direction_and_at_runtime():
  async def scenario():
    server = await start_echo_server()
    proxy = LatencyProxy("127.0.0.1", server.sockets[0].getsockname()[1], up_s=0.0, down_s=0.0)
    await proxy.start()
    proxy.set_delay(0.03, 0.01)
    echoed, rtt = await round_trip(proxy.port, b"x" * 100)
    assert echoed == b"x" * 100 and rtt >= 0.04
    with pytest.raises(ValueError):
      proxy.set_delay(-1, 0)
    await proxy.stop()
    server.close()
    await server.wait_closed()

  asyncio.run(scenario())


def test_stop_closes_open_connections_cleanly():
  async def scenario():
    server = await start_echo_server()
    proxy = LatencyProxy("127.0.0.1", server.sockets[0].getsockname()[1], 0.02)
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(4) == b"ping"
    await asyncio.wait_for(proxy.stop(), STALL_S)
    assert await asyncio.wait_for(reader.read(), STALL_S) == b""  # the proxy closed our connection
    writer.close()
    with pytest.raises(OSError):
      await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.stop()  # idempotent
    server.close()
    await server.wait_closed()

  asyncio.run(scenario())


def test_unreachable_target_closes_the_client():
  async def scenario():
    unused = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = unused.sockets[0].getsockname()[1]
    unused.close()
    await unused.wait_closed()
    async with LatencyProxy("127.0.0.1", port) as proxy:
      reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
      assert await asyncio.wait_for(reader.read(), STALL_S) == b""
      writer.close()

  asyncio.run(scenario())


def test_runs_as_a_process():
  async def scenario():
    server = await start_echo_server()
    target = server.sockets[0].getsockname()[1]
    process = await asyncio.create_subprocess_exec(
      sys.executable,
      "-m",
      "exo.tools.latency_proxy",
      "--listen",
      "127.0.0.1:0",
      "--target",
      f"127.0.0.1:{target}",
      "--delay-ms",
      "10",
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
    )
    try:
      line = (await asyncio.wait_for(process.stdout.readline(), HANG_S)).decode()
      assert line.startswith("listening on 127.0.0.1:")
      echoed, rtt = await round_trip(int(line.rsplit(":", 1)[1]), b"from another process")
      assert echoed == b"from another process" and rtt >= 0.02
    finally:
      process.terminate()
      assert await asyncio.wait_for(process.wait(), HANG_S) == 0
    server.close()
    await server.wait_closed()

  asyncio.run(scenario())
