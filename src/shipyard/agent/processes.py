"""Replicas as process groups, for the agent's supervisor (``agent.supervisor``): the
``ProcessHandle`` its keeper drives for a directory artifact (``agent.containers`` has the
container one), the thread that copies a replica's stdout and stderr into its log, and the
process-group signalling both the supervisor and a restarted agent (``kill_orphan_group``) use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from shipyard.agent.replica_logs import ReplicaLog
from shipyard.errors import RevisionStartFailed
from shipyard.runtime.base import LogStream
from shipyard.sandbox import launch

log = logging.getLogger("shipyard.agent")


class ProcessHandle:
    """A replica started as a process group, its output copied by ``pump`` (``pump_log``)."""

    container_id = None

    def __init__(self, process: asyncio.subprocess.Process, pump: threading.Thread) -> None:
        self.process = process
        self.pump = pump

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        code = await self.process.wait()
        await flushed(self.pump)
        return code

    async def reap(self, drain: Callable[[float], Awaitable[object]] | None, grace: float) -> None:
        """Kill what the dead leader left behind, after the requests it still holds finished.

        Workers that outlive their master (gunicorn's) keep serving the connections they have:
        cutting them would fail requests the router already forwarded. The router stopped
        sending new ones when the replica left its rotation; ``grace`` bounds the wait.
        """
        if drain is not None and group_exists(self.pid):
            with contextlib.suppress(Exception):  # a drain that fails must not stop the keeper
                await drain(grace)
        signal_group(self.pid, signal.SIGKILL)

    async def terminate(self, grace: float) -> None:
        proc = self.process
        signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
                # A sandboxed app outlives the sandbox's monitor process (the signal ends that
                # at once); its shutdown is over when its process group is empty.
                while group_running(proc.pid):  # noqa: ASYNC110 - no event to wait on
                    await asyncio.sleep(0.02)
        except TimeoutError:
            signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        signal_group(proc.pid, signal.SIGKILL)

    async def kill(self) -> None:
        signal_group(self.pid, signal.SIGKILL)

    async def discard(self) -> None:
        signal_group(self.pid, signal.SIGKILL)


def launcher_argv() -> list[str]:
    return [sys.executable, "-I", "-S", launch.__file__]


def check_command(argv: list[str], workdir: Path, env: dict[str, str], revision: str) -> None:
    """Refuse a command that cannot be executed now, with the same message in both modes (the
    launcher would only find out after the replica had started)."""
    command = argv[0] if argv else ""
    if not command:
        raise RevisionStartFailed(f"revision {revision} has an empty run command", command="")
    if "/" in command:
        path = workdir / command  # an absolute command stays absolute
        if not path.is_file() or not os.access(path, os.X_OK):
            raise RevisionStartFailed(
                f"cannot start {command!r} for revision {revision}: {path} is not an "
                "executable file",
                command=command,
            )
    elif shutil.which(command, path=env.get("PATH", os.defpath)) is None:
        raise RevisionStartFailed(
            f"cannot start {command!r} for revision {revision}: not found on PATH "
            f"{env.get('PATH', os.defpath)!r}",
            command=command,
        )


def group_exists(pgid: int) -> bool:
    """Whether any process of the group is left (signal 0 checks without sending)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def flushed(pump: threading.Thread | None, timeout: float = 1.0) -> None:
    """Wait (a little) until ``pump`` has stored what the exited process printed, so a crash is
    reported only once its last lines can be read. Workers that outlive their master keep the
    pipe open: then only ``timeout``."""
    if pump is not None and pump.is_alive():
        await asyncio.to_thread(pump.join, timeout)


def unchanged(line: str) -> str:
    return line


#: The longest line kept whole; a longer one is cut into pieces of this size.
MAX_LINE = 65536


def pump_log(sources: dict[int, LogStream], out: ReplicaLog, mask: Callable[[str], str]) -> None:
    """Copy a replica's stdout and stderr (``sources``: read end -> stream) into ``out`` line by
    line through ``mask``, until every process holding the pipes has exited (its own thread)."""
    pending = dict.fromkeys(sources, b"")

    def write(fd: int, raw: list[bytes]) -> None:
        out.write(sources[fd], [mask(line.decode("utf-8", errors="replace")) for line in raw])

    try:
        with selectors.DefaultSelector() as selector:
            for fd in sources:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        selector.unregister(fd)
                        if pending[fd]:
                            write(fd, [pending[fd]])
                        continue
                    *lines, pending[fd] = (pending[fd] + chunk).split(b"\n")
                    if len(pending[fd]) > MAX_LINE:  # a very long line without newline: cut it
                        lines.append(pending[fd])
                        pending[fd] = b""
                    if lines:
                        write(fd, lines)
    except OSError:
        log.exception("copying the output of replica %s failed", out.replica_id)
    finally:
        for fd in sources:
            os.close(fd)
        out.detach()


def group_running(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies, which wait for whoever reaps
    orphans, do not count). Scans ``/proc``: only while a replica is being stopped."""
    if not group_exists(pgid):
        return False
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()  # state ppid pgrp ...
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
    return False


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def kill_orphan_group(pid: int, replica_id: str) -> None:
    """Kill a replica process group left behind by an earlier agent (found in its state file).

    Only if that pid still is the replica (its environment names it): pids get reused.
    """
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return
    if f"SHIPYARD_REPLICA={replica_id}".encode() in environ:
        signal_group(pid, signal.SIGKILL)
