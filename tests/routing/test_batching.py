"""Write batching (routing/batching.py): one write per connection per event-loop iteration.

Driven by hand (tests/routing/fakes.py): the loop iteration ends when the test runs what was
scheduled, so what a connection holds, and when it leaves, is visible byte for byte.
"""

from __future__ import annotations

import asyncio
from typing import cast

from shipyard.routing.batching import BatchedConnection, WriteBatcher

from .fakes import FakeLoop, FakeTransport, connect


class Conn(BatchedConnection):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)


def batcher() -> tuple[WriteBatcher, FakeLoop]:
    loop = FakeLoop()
    batcher = WriteBatcher()
    batcher.bind(cast(asyncio.AbstractEventLoop, loop))
    return batcher, loop


def opened(b: WriteBatcher) -> tuple[Conn, FakeTransport]:
    conn = Conn(b)
    return conn, connect(conn)


def test_writes_of_one_iteration_leave_as_one_write_per_connection_in_order() -> None:
    b, loop = batcher()
    (one, one_out), (two, two_out) = opened(b), opened(b)
    one.send(b"head ")
    two.send(b"other")
    one.send(b"body")
    assert one_out.writes == two_out.writes == []  # held until the iteration ends
    assert len(loop.ready) == 1  # one flush for everyone
    loop.run_ready()
    assert one_out.writes == [b"head body"]
    assert two_out.writes == [b"other"]


def test_each_iteration_schedules_its_own_flush() -> None:
    b, loop = batcher()
    conn, out = opened(b)
    conn.send(b"a")
    loop.run_ready()
    assert loop.ready == []  # nothing held: nothing scheduled
    conn.send(b"b")
    assert len(loop.ready) == 1
    loop.run_ready()
    assert out.writes == [b"a", b"b"]


def test_close_writes_what_is_held_first() -> None:
    b, loop = batcher()
    conn, out = opened(b)
    conn.send(b"last words")
    conn.close_transport()
    assert (out.writes, out.closing) == ([b"last words"], True)
    loop.run_ready()
    assert out.writes == [b"last words"]  # not twice


def test_abort_drops_what_is_held() -> None:
    b, loop = batcher()
    conn, out = opened(b)
    conn.send(b"never sent")
    conn.abort_transport()
    loop.run_ready()
    assert (out.writes, out.aborted) == ([], True)


def test_nothing_is_written_to_a_transport_closed_meanwhile() -> None:
    b, loop = batcher()
    conn, out = opened(b)
    conn.send(b"too late")
    out.close()  # the peer went away within the iteration
    loop.run_ready()
    assert out.writes == []
    assert conn.out is None
