"""The API under the real uvicorn, configured as ``shipyard serve`` configures it
(``api.edge.server_config``), on an ephemeral port in a thread of the test process. Used by the
edge, TLS and docs tests that need real sockets; ``with LiveServer(app, settings) as port:``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn

from shipyard.api import edge
from shipyard.settings import Settings


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()  # also when startup failed: __enter__ then says so


class LiveServer:
    def __init__(self, app: Any, settings: Settings) -> None:
        config = edge.server_config(app, settings, "127.0.0.1", 0)
        self._ready = threading.Event()
        self.server = _Server(config, self._ready)
        self._thread = threading.Thread(target=self._run, name="live-api", daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> int:
        self._thread.start()
        if not self._ready.wait(60) or not self.server.started:
            self.server.should_exit = True
            raise RuntimeError("the API server did not start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True  # graceful: idle connections are closed at once
        self._thread.join(60)
