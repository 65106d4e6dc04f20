"""Stopping a uvicorn server that serves TLS without waiting on idle clients.

uvicorn's graceful shutdown closes each idle keep-alive connection and waits until every
connection is gone. Over TLS, closing waits for the peer's close_notify, up to asyncio's 30 s TLS
shutdown timeout, and a client that keeps an idle pooled connection (the control plane's agent
client, a joined agent's artifact client) does not read it. So a clean stop of ``serve``'s fleet
listener or a joined agent's API took 30 s. ``stop_server`` gives requests under way ``grace``
seconds and then drops what is left (``force_exit``). Called by ``api/fleet.FleetListener.aclose``
and ``agent/server.run_agent``.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

#: Seconds requests under way get when a server stops.
SHUTDOWN_GRACE = 3.0


async def stop_server(
    server: uvicorn.Server, task: asyncio.Task[None], grace: float = SHUTDOWN_GRACE
) -> None:
    """Ask ``server`` (run by ``task``) to exit; after ``grace`` seconds, force it."""
    server.should_exit = True
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        server.force_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task
