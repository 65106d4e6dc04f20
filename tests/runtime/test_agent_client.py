"""AgentClient over a real socket: a kept-alive connection the agent closes under a call.

At equal keep-alive timeouts a call could go out on a connection the agent's server was closing
(CI saw a fleet deployment rolled back for it: "Server disconnected without sending a
response"). The client sends such a call again once, on a new connection, and keeps its idle
connections for less time than the agent does. A raw asyncio server plays the agent here, so
the test decides exactly when a connection dies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from shipyard.errors import AgentUnavailable
from shipyard.runtime.local import AgentClient

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"


class Agent:
    """Answers ``{"n": k}`` to each request; with ``drop`` set, the next request that arrives
    on an already used connection is read and the connection closed with no answer; ``dead``:
    every request is."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.drop = 0
        self.dead = False
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if self.dead:
                    return  # closed without an answer
                if served and self.drop:
                    self.drop -= 1
                    return
                self.requests += 1
                served += 1
                body = json.dumps({"n": self.requests}).encode()
                writer.write(ANSWER % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    a = Agent()
    server = await asyncio.start_server(a.serve, "127.0.0.1", 0)
    a.port = server.sockets[0].getsockname()[1]
    async with server:
        yield a


async def test_a_call_on_a_connection_closed_under_it_is_sent_again_once(agent: Agent) -> None:
    client = AgentClient(f"http://127.0.0.1:{agent.port}", "token", "local")
    try:
        assert await client.call("GET", "/v1/health") == {"n": 1}
        agent.drop = 1
        assert await client.call("GET", "/v1/health") == {"n": 2}
        assert agent.connections == 2  # the second call went out again, on a new connection
    finally:
        await client.aclose()


async def test_a_connection_closed_under_the_retry_too_is_an_unavailable_agent(
    agent: Agent,
) -> None:
    client = AgentClient(f"http://127.0.0.1:{agent.port}", "token", "local")
    try:
        await client.call("GET", "/v1/health")
        agent.dead = True
        with pytest.raises(AgentUnavailable, match="without sending a response"):
            await client.call("GET", "/v1/health")
        assert agent.connections == 2  # the kept-alive one, then one retry: no more
    finally:
        await client.aclose()
