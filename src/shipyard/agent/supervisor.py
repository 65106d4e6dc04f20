"""Supervises app replicas as child processes for the local agent.

Each replica is the manifest's ``[run] command`` (an argv list, never a shell) started in the
artifact directory with ``PORT`` set, its own process group, and its output kept in a log file.
A watcher notices exits and crashes at once and tells the agent (``on_change``) so the router
stops sending the replica traffic. Called by ``agent.server`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.errors import RevisionStartFailed
from shipyard.runtime.base import ReplicaState, ReplicaStatus, RevisionSpec

#: Environment every replica gets; nothing of the agent's own environment leaks into apps.
BASE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH_SHIPYARD_UNUSED")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (the app binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    replica_id: str
    spec: RevisionSpec
    port: int
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    state: ReplicaState = "starting"
    routable: bool = False
    exit_code: int | None = None
    stopping: bool = False
    started_at: float = field(default_factory=time.time)
    watcher: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running")

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica_id=self.replica_id,
            revision=self.spec.revision,
            host="127.0.0.1",
            port=self.port,
            state=self.state,
            routable=self.routable and self.alive,
            pid=self.process.pid if self.process else None,
            exit_code=self.exit_code,
            log_path=str(self.log_path),
        )


class Supervisor:
    def __init__(self, logs_dir: Path, on_change: Callable[[Replica], None]) -> None:
        self._logs_dir = logs_dir
        self._on_change = on_change
        self.replicas: dict[str, Replica] = {}
        self._counter = 0

    def of_revision(self, service: str, revision: str) -> list[Replica]:
        return [
            r
            for r in self.replicas.values()
            if r.spec.service == service and r.spec.revision == revision
        ]

    def of_service(self, service: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.spec.service == service]

    async def start_revision(self, spec: RevisionSpec) -> list[Replica]:
        """Bring ``spec.revision`` up to ``spec.replicas`` alive replicas (idempotent)."""
        alive = [r for r in self.of_revision(spec.service, spec.revision) if r.alive]
        started: list[Replica] = []
        try:
            for _ in range(spec.replicas - len(alive)):
                started.append(await self.start_replica(spec))
        except RevisionStartFailed:
            for r in started:
                await self.stop(r, grace=2.0)
            raise
        return alive + started

    async def start_replica(self, spec: RevisionSpec) -> Replica:
        workdir = Path(spec.artifact_location)
        if not workdir.is_dir():  # noqa: ASYNC240 - one stat, local disk
            raise RevisionStartFailed(f"artifact directory {workdir} does not exist")
        self._counter += 1
        replica_id = f"{spec.revision}-{self._counter}-{os.urandom(2).hex()}"
        log_dir = self._logs_dir / spec.service
        log_dir.mkdir(parents=True, exist_ok=True)
        replica = Replica(replica_id, spec, free_port(), log_dir / f"{replica_id}.log")
        env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        env.update(spec.env)
        env.update(
            PORT=str(replica.port),
            HOME=str(workdir),
            SHIPYARD_SERVICE=spec.service,
            SHIPYARD_REVISION=spec.revision,
            SHIPYARD_REPLICA=replica_id,
        )
        argv = list(spec.argv)
        try:
            with open(replica.log_path, "ab", buffering=0) as log:  # noqa: ASYNC230 - local file
                replica.process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=workdir,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # own process group: stopped as a whole
                )
        except (OSError, ValueError) as exc:
            raise RevisionStartFailed(
                f"cannot start {argv[0]!r} for revision {spec.revision}: {exc}",
                command=argv[0],
            ) from exc
        replica.state = "running"
        self.replicas[replica_id] = replica
        replica.watcher = asyncio.get_running_loop().create_task(self._watch(replica))
        self._on_change(replica)
        return replica

    async def _watch(self, replica: Replica) -> None:
        assert replica.process is not None
        code = await replica.process.wait()
        replica.exit_code = code
        replica.state = "stopped" if replica.stopping else ("exited" if code == 0 else "crashed")
        replica.routable = False
        self._on_change(replica)

    async def stop(self, replica: Replica, *, grace: float = 10.0) -> None:
        """SIGTERM the replica's process group, SIGKILL after ``grace`` seconds."""
        replica.stopping = True
        replica.routable = False
        proc = replica.process
        if proc is not None and proc.returncode is None:
            replica.state = "stopping"
            self._on_change(replica)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        if replica.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await replica.watcher
        replica.state = "stopped"
        self.replicas.pop(replica.replica_id, None)
        self._on_change(replica)

    async def stop_all(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(self.stop(r, grace=grace) for r in list(self.replicas.values())))


def _signal_group(pid: int, sig: signal.Signals) -> None:
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
        _signal_group(pid, signal.SIGKILL)
