"""Supervises app replicas as child processes for the local agent; called by ``agent.server`` only.

Each replica is the manifest's ``[run] command`` (an argv list; ``/bin/sh -c`` only with ``[run]
shell = true``) started with ``PORT`` set, its own process group, and its output kept in a log
file. Its environment is built here, never inherited: ``PATH`` is the artifact's virtualenv
``bin`` (``build.venvs.venv_bins``) then ``DEFAULT_PATH``, never the agent's (which leads to
Shipyard's own virtualenv); its own ``HOME``/``TMPDIR``; locale and time zone; the manifest's
``[run] env``; the service's secrets (``agent/secret_files.py``); ``PORT`` and ``SHIPYARD_*``
last. Two rules shape it:

Artifacts stay immutable. The artifact directory is content-addressed and its digest is checked
before every start, so nothing a replica does may change it. Writable state lives in
``<run_dir>/<replica_id>/`` (``home/`` is ``HOME``, ``tmp/`` is ``TMPDIR``), fresh for every
process start and removed when the replica stops. When the agent may mount (root), the app runs
on a copy-on-write overlay of the artifact (``agent.launch``): it still sees the artifact as its
working directory and may write there, as on Heroku, Docker or Cloud Run, but the writes land in
the run directory. Otherwise (``direct``) it runs in the artifact directory itself, which the
artifact's read-only mode bits protect from a non-root agent. The mode is decided once per
supervisor by a probe, and logged.

Replicas are kept running. A keeper task per replica waits for its process; when the process
exits without ``stop`` having been asked, the keeper takes the replica out of the router's
rotation, lets the requests still held by what is left of its process group finish (gunicorn
workers of a killed master), kills that group (it would keep the port), waits out an exponential
backoff (``RestartPolicy``, after Kubernetes' CrashLoopBackOff), starts the same replica again
(same replica id, a new port, ``restarts`` + 1) and waits until it is ready (its health endpoint
answers 2xx, or its port accepts a connection) before it may take traffic again, and then only
if it was routable before. Every state change is reported through ``on_change``, which the agent
uses to reconfigure the router and persist its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from shipyard.agent import replica_logs, secret_files
from shipyard.agent.processes import (
    ProcessHandle,
    check_command,
    launcher_argv,
    pump_log,
    unchanged,
)
from shipyard.agent.replica_logs import LogLimits, ReplicaLog
from shipyard.build.venvs import venv_bins
from shipyard.errors import RevisionStartFailed
from shipyard.logs import log_event
from shipyard.runtime.base import ReplicaState, ReplicaStatus, RevisionSpec
from shipyard.sandbox import Sandbox, SandboxPolicy, launch

if TYPE_CHECKING:
    from shipyard.agent.containers import ContainerLauncher

log = logging.getLogger("shipyard.agent")

#: The agent's locale and time zone pass to replicas; nothing else of its environment does (its
#: PATH leads to Shipyard's own virtualenv, its SHIPYARD_* are its settings).
BASE_ENV_KEYS = ("LANG", "LC_ALL", "TZ")
#: Every replica's PATH, after the artifact's virtualenv ``bin`` if it has one.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

#: ``auto``: overlay when the probe says it works here, else direct. The others force a mode.
Isolation = Literal["auto", "overlay", "direct"]
Mode = Literal["overlay", "direct"]

_CHECK_DIR = ".overlay-check"


def free_port(host: str = "127.0.0.1", taken: Collection[int] = ()) -> int:
    """A port the kernel says is free now (the app binds it a moment later) and not in
    ``taken``: the kernel hands a just-released port out again, so two replicas started in a
    row could both be given the port the first has not bound yet."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port
    raise RevisionStartFailed("no free port found for the replica after 100 tries")


@dataclass(frozen=True)
class RestartPolicy:
    """When a replica that exited on its own is started again, and when it counts as ready.

    The n-th consecutive failure waits ``initial_delay * 2**(n-1)`` seconds, at most
    ``max_delay``; a process that ran ``reset_after`` seconds or more starts the count again
    (Kubernetes: 10 s doubling to 5 min, reset after 10 min; ours are shorter because a local
    replica starts in well under a second).
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    reset_after: float = 60.0
    #: A restarted replica that is not ready within this is killed and counts as a failure.
    ready_timeout: float = 30.0
    #: Pause between readiness probes, and the timeout of one probe.
    ready_interval: float = 0.15
    probe_timeout: float = 1.0
    #: When the leader dies but other processes of its group live on (gunicorn workers of a
    #: killed master), the requests they hold may finish for this long before the group is
    #: killed: the router stops sending the replica new requests at once.
    orphan_drain: float = 5.0

    def calculate_backoff(self, failures: int, ran_for: float) -> tuple[int, float]:
        """``(consecutive failures counting this exit, delay before the restart)``."""
        if ran_for >= self.reset_after:
            failures = 0
        failures += 1
        # The exponent is capped so that a long crash loop cannot overflow a float.
        delay = self.initial_delay * 2.0 ** min(failures - 1, 60)
        return failures, min(self.max_delay, delay)


class ReplicaHandle(Protocol):
    """One start of a replica, whatever runs it: a process group (``ProcessHandle``, here) or a
    container (``agent.containers.ContainerHandle``). The supervisor's keeper, backoff,
    readiness and restart logic is written once against this; only these steps differ."""

    @property
    def pid(self) -> int | None:
        """The process id (None for a container)."""
        ...

    @property
    def container_id(self) -> str | None:
        """The container's id (None for a process)."""
        ...

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited, else None."""
        ...

    async def wait(self) -> int:
        """Its exit code, once it has exited and what it printed is in its log."""
        ...

    async def reap(self, drain: Callable[[float], Awaitable[object]] | None, grace: float) -> None:
        """After it exited on its own: clear what is left of it (``drain`` lets the requests it
        still holds finish, for at most ``grace`` seconds, first)."""
        ...

    async def terminate(self, grace: float) -> None:
        """Stop it: the stop signal, then killed after ``grace`` seconds; returns once gone."""
        ...

    async def kill(self) -> None:
        """Kill it at once (its exit is then seen by ``wait``)."""
        ...

    async def discard(self) -> None:
        """Kill whatever is left and free what it holds (idempotent; stop's last step)."""
        ...


@dataclass
class Replica:
    replica_id: str
    spec: RevisionSpec
    port: int
    #: Its stdout and stderr, stamped, masked, rotated (``agent.replica_logs``).
    log: ReplicaLog
    #: ``<run_dir>/<replica_id>``: HOME, TMPDIR and the overlay's writable layer.
    run_dir: Path
    #: What runs its current start (a process group or a container); None before the first.
    handle: ReplicaHandle | None = None
    state: ReplicaState = "starting"
    #: Whether the orchestrator wants it to take traffic (``set_routable``). It survives a
    #: crash, so a restarted replica goes back into rotation once ready; see ``serving``.
    routable: bool = False
    exit_code: int | None = None
    #: Exit code of the process before the latest restart.
    last_exit_code: int | None = None
    restarts: int = 0
    stopping: bool = False
    #: Wall-clock start of the current process (informational).
    started_at: float = field(default_factory=time.time)
    #: Monotonic start of the current process: how long it ran decides the backoff reset.
    spawned_at: float = field(default_factory=time.monotonic)
    #: Consecutive failures, for the backoff.
    failures: int = 0
    #: The delay chosen at the latest exit; ``restart_at`` (monotonic) while one is pending.
    restart_delay: float | None = None
    restart_at: float | None = None
    mode: Mode = "direct"
    keeper: asyncio.Task[None] | None = None
    #: True while the keeper only waits (backoff, readiness): ``stop`` may cancel it then.
    interruptible: bool = False

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The current process of a process replica (None for a container)."""
        return self.handle.process if isinstance(self.handle, ProcessHandle) else None

    @property
    def log_path(self) -> Path:
        """The directory of its log (``agent.replica_logs`` describes the files in it)."""
        return self.log.directory

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def serving(self) -> bool:
        """Whether the router may send it requests now: wanted, running and not stopping."""
        return self.routable and self.state == "running" and not self.stopping

    @property
    def wanted(self) -> bool:
        """Counts towards its revision's replicas: alive, or waiting to be restarted."""
        return not self.stopping and (self.alive or self.restart_at is not None)

    def status(self) -> ReplicaStatus:
        next_restart_in = None
        if self.restart_at is not None:
            next_restart_in = round(max(0.0, self.restart_at - time.monotonic()), 3)
        return ReplicaStatus(
            replica_id=self.replica_id,
            revision=self.spec.revision,
            host="127.0.0.1",
            port=self.port,
            state=self.state,
            routable=self.serving,
            pid=self.handle.pid if self.handle else None,
            exit_code=self.exit_code,
            restarts=self.restarts,
            log_path=str(self.log_path),
            last_exit_code=self.last_exit_code,
            next_restart_in=next_restart_in,
            container_id=self.handle.container_id if self.handle else None,
        )


class Supervisor:
    def __init__(
        self,
        logs_dir: Path,
        on_change: Callable[[Replica], None],
        *,
        run_dir: Path,
        drain: Callable[[Replica, float], Awaitable[object]] | None = None,
        restart: RestartPolicy | None = None,
        isolation: Isolation = "auto",
        sandbox: Sandbox | None = None,
        mask: Callable[[str], str] | None = None,
        log_limits: LogLimits | None = None,
        containers: ContainerLauncher | None = None,
        region: str = "local",
    ) -> None:
        #: The region this agent serves: every replica's ``SHIPYARD_REGION``.
        self.region = region
        #: ``<agent_dir>/logs``: one directory per service, one per replica in it.
        self.logs_dir = logs_dir
        #: Applied to every line a replica prints before it is stored (``logs.SecretMasker``);
        #: None: stored as printed (tests of the supervision logic).
        self._mask = mask or unchanged
        #: Each replica's log size cap and how many stopped revisions' logs are kept.
        self.log_limits = log_limits or LogLimits()
        self._run_dir = run_dir
        self._on_change = on_change
        #: Waits until the router has finished the requests a replica holds (the agent passes
        #: the proxy's ``drain_replica``); used before killing the orphans of a dead leader.
        self._drain = drain
        self.policy = restart or RestartPolicy()
        self._isolation: Isolation = isolation
        #: How replicas are confined (``shipyard.sandbox``). None: unsandboxed, as the agent's
        #: own user -- only for tests of the supervision logic; the agent always passes one.
        self.sandbox = sandbox or Sandbox(SandboxPolicy(data_dir=run_dir, insecure=True))
        self._mode: Mode | None = None
        self._mode_lock = asyncio.Lock()
        #: Runs image revisions as containers (``agent.containers``); None: this agent runs
        #: directory artifacts only.
        self.containers = containers
        self.replicas: dict[str, Replica] = {}
        self._counter = 0

    def _ports(self) -> set[int]:
        """Ports given to this supervisor's replicas (some not bound yet)."""
        return {r.port for r in self.replicas.values()}

    def of_revision(self, service: str, revision: str) -> list[Replica]:
        return [
            r
            for r in self.replicas.values()
            if r.spec.service == service and r.spec.revision == revision
        ]

    def of_service(self, service: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.spec.service == service]

    # --- isolation -------------------------------------------------------------------------------

    async def mode(self) -> Mode:
        """How replicas run on this agent: decided on first use, then fixed (and logged)."""
        async with self._mode_lock:
            if self._mode is None:
                self._mode, why = await self._decide_mode()
                if self._mode == "overlay":
                    log.info("replicas run on a copy-on-write overlay of their artifact (%s)", why)
                elif os.geteuid() == 0:
                    log.warning(
                        "replicas run directly in their artifact directory (%s); the agent runs "
                        "as root, so an app that writes into its working directory changes its "
                        "artifact and the next start of that revision is refused",
                        why,
                    )
                else:
                    log.info("replicas run directly in their read-only artifact (%s)", why)
            return self._mode

    async def _decide_mode(self) -> tuple[Mode, str]:
        if self._isolation != "auto":
            return self._isolation, "configured"
        if os.geteuid() != 0:
            return "direct", "the agent is not root, so it cannot mount"
        check = self._run_dir / _CHECK_DIR
        if launch.UNSAFE_PATH_CHARS.intersection(str(check.resolve())):
            return "direct", f"{check} holds ',' ':' or '\\', which overlay options cannot carry"
        shutil.rmtree(check, ignore_errors=True)
        lower, upper, work = check / "lower", check / "upper", check / "work"
        try:
            for d in (lower, upper, work):
                d.mkdir(parents=True)
            proc = await asyncio.create_subprocess_exec(
                *launcher_argv(),
                "--check",
                "--overlay",
                *(str(d.resolve()) for d in (lower, upper, work)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(30):
                    _, err = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return "direct", "the overlay probe did not finish within 30s"
        except OSError as exc:
            return "direct", f"the overlay probe could not run: {exc!r}"
        finally:
            written_below = (lower / launch.CHECK_FILE).exists()
            written_above = (upper / launch.CHECK_FILE).exists()
            shutil.rmtree(check, ignore_errors=True)
        if proc.returncode != 0:
            return "direct", err.decode(errors="replace").strip()[-300:] or "the probe failed"
        if written_below or not written_above:
            return "direct", "the overlay probe's write did not land in the upper layer"
        return "overlay", "the probe mounted one"

    def clean_stale(self) -> None:
        """Remove run directories no replica of this supervisor owns (a previous agent's)."""
        if not self._run_dir.is_dir():
            return
        for entry in self._run_dir.iterdir():
            if entry.name not in self.replicas and entry.name != _CHECK_DIR:
                shutil.rmtree(entry, ignore_errors=True)

    # --- starting --------------------------------------------------------------------------------

    async def start_revision(self, spec: RevisionSpec) -> list[Replica]:
        """Bring ``spec.revision`` up to ``spec.replicas`` replicas (idempotent).

        A replica waiting out its restart backoff counts: starting another one beside it would
        leave one too many once it is back.
        """
        present = [r for r in self.of_revision(spec.service, spec.revision) if r.wanted]
        started: list[Replica] = []
        try:
            for _ in range(spec.replicas - len(present)):
                started.append(await self.start_replica(spec))
        except RevisionStartFailed:
            for r in started:
                await self.stop(r, grace=2.0)
            raise
        return present + started

    async def start_replica(self, spec: RevisionSpec) -> Replica:
        if spec.artifact_kind == "directory":
            workdir = Path(spec.artifact_location)
            if not workdir.is_dir():  # noqa: ASYNC240 - one stat, local disk
                raise RevisionStartFailed(f"artifact directory {workdir} does not exist")
        elif self.containers is None:
            raise RevisionStartFailed(
                f"revision {spec.revision} is an image, and this agent runs no containers "
                "(it has no Docker Engine)",
                artifact_kind=spec.artifact_kind,
            )
        self._counter += 1
        replica_id = f"{spec.revision}-{self._counter}-{os.urandom(2).hex()}"
        replica = self._new_replica(spec, replica_id, free_port(taken=self._ports()))
        if spec.artifact_kind == "directory":
            replica.mode = await self.mode()
        try:
            replica.handle = await self._launch(replica)
        except RevisionStartFailed:
            shutil.rmtree(replica.run_dir, ignore_errors=True)
            replica.log.retire()
            raise
        replica.state = "running"
        self.replicas[replica_id] = replica
        replica.keeper = asyncio.get_running_loop().create_task(self._keep(replica))
        self._on_change(replica)
        return replica

    def _new_replica(self, spec: RevisionSpec, replica_id: str, port: int) -> Replica:
        """A replica's record and log (appended to when the id has one already)."""
        service_logs = self.logs_dir / spec.service
        log = ReplicaLog(service_logs / replica_id, self.log_limits, service=spec.service,
                         revision=spec.revision, replica_id=replica_id)  # fmt: skip
        live = {r.replica_id for r in self.of_service(spec.service)} | {replica_id}
        replica_logs.prune(service_logs, self.log_limits, live)
        return Replica(replica_id, spec, port, log, self._run_dir / replica_id)

    async def adopt(
        self, spec: RevisionSpec, replica_id: str, container_id: str, port: int, restarts: int = 0
    ) -> Replica | None:
        """Take back a container a previous agent started (``Agent.restore``): same id, same
        port, not restarted; its log is followed again from where the stored one ends. None
        when it is gone, not running, or not that replica's (then the caller starts anew)."""
        if self.containers is None or replica_id in self.replicas:
            return None
        replica = self._new_replica(spec, replica_id, port)
        handle = await self.containers.adopt(replica, container_id)
        if handle is None:
            replica.log.retire()
            return None
        replica.handle = handle
        replica.restarts = restarts
        replica.state = "running"
        self.replicas[replica_id] = replica
        replica.keeper = asyncio.get_running_loop().create_task(self._keep(replica))
        self._on_change(replica)
        return replica

    async def _launch(self, replica: Replica) -> ReplicaHandle:
        """Start the replica's current run: a container for an image, else a process."""
        if replica.spec.artifact_kind == "oci-image":
            if self.containers is None:
                raise RevisionStartFailed(
                    f"revision {replica.spec.revision} is an image, and this agent runs no "
                    "containers"
                )
            replica.spawned_at = time.monotonic()
            replica.started_at = time.time()
            return await self.containers.launch(replica)
        return await self._spawn(replica)

    def _env(self, replica: Replica) -> dict[str, str]:
        home = replica.run_dir / "home"
        env = {"LANG": "C.UTF-8"}
        env.update((k, os.environ[k]) for k in BASE_ENV_KEYS if k in os.environ)
        # The artifact's venv is visible to the replica (its own tree is mounted back even
        # though it lies in the hidden data directory); of the rest, what the sandbox shows.
        bins = venv_bins(Path(replica.spec.artifact_location).resolve())
        env["PATH"] = os.pathsep.join(
            [*(str(b) for b in bins), self.sandbox.visible_path(DEFAULT_PATH)]
        )
        if bins:  # what bin/activate would set; the artifact's own venv, never the agent's
            env["VIRTUAL_ENV"] = str(bins[0].parent)
        # Defaults the manifest's [run] env may override.
        env.update(
            HOME=str(home),
            TMPDIR=str(replica.run_dir / "tmp"),
            XDG_CACHE_HOME=str(home / ".cache"),
            # The artifact is read-only (or an overlay that is thrown away): bytecode written
            # at start would be lost work at best.
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.update(replica.spec.env)
        secret_env, secret_dir = secret_files.environment(
            replica.spec, str(replica.run_dir / secret_files.DIR_NAME)
        )
        env.update(secret_env)  # app secrets (agent/secret_files.py)
        env.update(
            PORT=str(replica.port),
            SHIPYARD_SERVICE=replica.spec.service,
            SHIPYARD_REVISION=replica.spec.revision,
            SHIPYARD_REPLICA=replica.replica_id,
            SHIPYARD_REGION=self.region,
            **secret_dir,
        )
        return env

    def _prepare_run_dir(self, replica: Replica, mode: Mode) -> None:
        """A fresh state directory for one process start (nothing carries over a restart)."""
        shutil.rmtree(replica.run_dir, ignore_errors=True)
        replica.run_dir.mkdir(parents=True, mode=0o700)
        names = ("home", "home/.cache", "tmp") + (("upper", "work") if mode == "overlay" else ())
        for name in names:
            (replica.run_dir / name).mkdir(mode=0o700)
        writable = ("home", "tmp", "upper") if mode == "overlay" else ("home", "tmp")
        self.sandbox.hand_over(replica.spec.service, *(replica.run_dir / n for n in writable))
        if replica.spec.secret_files:
            secret_files.write(replica.run_dir / secret_files.DIR_NAME, replica.spec, self.sandbox)

    def sandboxed(
        self, replica: Replica, argv: list[str], workdir: Path, mode: Mode
    ) -> tuple[list[str], Path]:
        """A fresh run directory for ``replica`` (secret files in it) and the sandbox command
        running ``argv`` in ``workdir`` with it, and the directory to start it in. For a replica
        start (``_spawn``) and a hook (``agent/hooks.py``): one sandbox for both."""
        if mode == "overlay" and launch.UNSAFE_PATH_CHARS.intersection(
            f"{workdir}{replica.run_dir.resolve()}"
        ):
            log.warning(
                "replica %s runs directly in %s: its paths hold ',' ':' or '\\', which overlay "
                "options cannot carry",
                replica.replica_id,
                workdir,
            )
            mode = "direct"
        try:
            self._prepare_run_dir(replica, mode)
        except OSError as exc:
            raise RevisionStartFailed(
                f"cannot create the state directory {replica.run_dir}: {exc}"
            ) from exc
        run = replica.run_dir.resolve()
        overlay = (workdir, run / "upper", run / "work") if mode == "overlay" else None
        command = self.sandbox.command(
            argv,
            service=replica.spec.service,
            cwd=workdir,
            writable=[run / "home", run / "tmp"],
            readonly=([] if overlay else [workdir])
            + ([run / secret_files.DIR_NAME] if replica.spec.secret_files else []),
            overlay=overlay,
        )
        return command, run if overlay else workdir

    async def _spawn(self, replica: Replica) -> ProcessHandle:
        """Start the replica's process on its current port; RevisionStartFailed if it cannot."""
        spec = replica.spec
        argv = list(spec.argv)
        workdir = Path(spec.artifact_location).resolve()  # noqa: ASYNC240 - local disk
        env = self._env(replica)
        check_command(argv, workdir, env, spec.revision)
        command, cwd = self.sandboxed(replica, argv, workdir, replica.mode)
        replica.spawned_at = time.monotonic()
        replica.started_at = time.time()
        # Two pipes, so each line keeps its stream; one thread per process start reads both,
        # masks each line and appends it stamped to the replica's log.
        pipes = {"stdout": os.pipe(), "stderr": os.pipe()}
        try:
            replica.log.attach()
            pump = threading.Thread(
                target=pump_log,
                args=(
                    {r: name for name, (r, _) in pipes.items()},
                    replica.log,
                    secret_files.masking(self._mask, spec),
                ),
                name=f"log-{replica.replica_id}",
                daemon=True,
            )
            pump.start()
            try:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    cwd=cwd,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=pipes["stdout"][1],
                    stderr=pipes["stderr"][1],
                    start_new_session=True,  # own process group: stopped as a whole
                )
            finally:
                for _, into in pipes.values():
                    os.close(into)
        except (OSError, ValueError) as exc:
            raise RevisionStartFailed(
                f"cannot start {argv[0]!r} for revision {spec.revision}: {exc}",
                command=argv[0],
            ) from exc
        return ProcessHandle(process, pump)

    # --- keeping ---------------------------------------------------------------------------------

    async def _keep(self, replica: Replica) -> None:
        """Own the replica from its first start until ``stop``: restart it whenever it exits."""
        reason = "exited"
        try:
            while True:
                handle = replica.handle
                code: int | None = None
                if handle is not None:
                    code = await handle.wait()
                replica.exit_code = code
                if replica.stopping:  # stop() ends what is left of the process group
                    self._log_exit(replica, "stopped", None)
                    return
                ran_for = time.monotonic() - replica.spawned_at
                replica.failures, delay = self.policy.calculate_backoff(replica.failures, ran_for)
                replica.state = "exited" if code == 0 else "crashed"
                replica.restart_delay = delay
                replica.restart_at = time.monotonic() + delay
                self._log_exit(replica, reason, delay)
                self._on_change(replica)  # out of the router's rotation first
                if handle is not None:
                    await handle.reap(self._drainer(replica), self.policy.orphan_drain)
                replica.interruptible = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    replica.interruptible = False
                replica.restart_at = None
                reason = await self._restart(replica)
        except Exception:  # a bug here must not go unnoticed; the task's result is never read
            log.exception(
                "supervising replica %s failed; it is no longer restarted", replica.replica_id
            )

    def _drainer(self, replica: Replica) -> Callable[[float], Awaitable[object]] | None:
        """Waits until the router has answered what it sent ``replica`` (None: no router)."""
        drain = self._drain
        if drain is None:
            return None

        async def draining(timeout: float) -> object:
            return await drain(replica, timeout)

        return draining

    async def _restart(self, replica: Replica) -> str:
        """Start the replica again and wait until it is ready; returns why it is going down if
        it is not (its process is then exited or being killed, for ``_keep`` to reap)."""
        replica.restarts += 1
        replica.last_exit_code = replica.exit_code
        replica.exit_code = None
        replica.port = free_port(taken=self._ports())
        replica.state = "starting"
        try:
            handle = await self._launch(replica)
        except RevisionStartFailed as exc:
            replica.handle = None
            return f"restart failed: {exc}"
        replica.handle = handle
        if replica.stopping:  # stop() came while we were spawning and saw the old process
            await handle.kill()
            return "stopped"
        log_event(
            log,
            "replica.restarted",
            service=replica.spec.service,
            revision=replica.spec.revision,
            replica=replica.replica_id,
            restarts=replica.restarts,
            pid=handle.pid,
            container=handle.container_id,
            port=replica.port,
        )
        self._on_change(replica)
        replica.interruptible = True
        try:
            not_ready = await self._await_ready(replica, handle)
        finally:
            replica.interruptible = False
        if not_ready is None:
            replica.state = "running"
            log_event(
                log,
                "replica.ready",
                service=replica.spec.service,
                revision=replica.spec.revision,
                replica=replica.replica_id,
                restarts=replica.restarts,
                routable=replica.serving,
            )
            self._on_change(replica)
            return "exited"
        if handle.returncode is None:
            await handle.kill()
        return not_ready

    async def _await_ready(self, replica: Replica, handle: ReplicaHandle) -> str | None:
        """None once the replica answers its readiness probe; else why it never did."""
        policy = self.policy
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.ready_timeout
        while True:
            if handle.returncode is not None:
                return "exited before it was ready"
            try:
                async with asyncio.timeout(policy.probe_timeout):
                    if await probe_ready(replica.port, replica.spec.health_endpoint):
                        return None
            except TimeoutError:
                pass
            if loop.time() >= deadline:
                what = replica.spec.health_endpoint or "its port"
                return f"not ready after {policy.ready_timeout:g}s (probed {what})"
            await asyncio.sleep(policy.ready_interval)

    def _log_exit(self, replica: Replica, reason: str, delay: float | None) -> None:
        log_event(
            log,
            "replica.exited",
            level=logging.INFO if delay is None else logging.WARNING,
            service=replica.spec.service,
            revision=replica.spec.revision,
            replica=replica.replica_id,
            exit_code=replica.exit_code,
            reason=reason,
            restarts=replica.restarts,
            next_restart_in=delay,
        )

    # --- stopping --------------------------------------------------------------------------------

    async def stop(self, replica: Replica, *, grace: float | None = None) -> None:
        """Stop for good: cancel a pending restart, SIGTERM the replica's process group (``docker
        stop`` its container), SIGKILL after ``grace`` seconds (default: the revision's
        ``stop_timeout``), remove its state directory (its container)."""
        if grace is None:
            grace = replica.spec.stop_timeout
        replica.stopping = True
        replica.routable = False
        replica.restart_at = None
        keeper = replica.keeper
        if keeper is not None and replica.interruptible:
            # Only waiting (backoff, readiness): nothing of its own to finish. The process it
            # was probing, if any, is ours to end and to log now.
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            keeper = None
        handle = replica.handle
        if handle is not None and handle.returncode is None:
            replica.state = "stopping"
            self._on_change(replica)
            await handle.terminate(grace)
            if keeper is None:
                replica.exit_code = handle.returncode
                self._log_exit(replica, "stopped", None)
        if keeper is not None:
            # Returns at once now: its process has exited (or it spawns one, sees ``stopping``
            # and kills it).
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if replica.handle is not None:
            await replica.handle.discard()
        shutil.rmtree(replica.run_dir, ignore_errors=True)
        replica.log.retire()  # the file stays, for `shipyard logs`, until pruned
        replica.state = "stopped"
        self.replicas.pop(replica.replica_id, None)
        self._on_change(replica)

    async def stop_all(self, grace: float = 5.0, *, keep_containers: bool = False) -> None:
        """Stop every replica; ``keep_containers``: containers are left running (a clean agent
        shutdown: the next agent adopts them) and only let go of (``release``)."""
        replicas = list(self.replicas.values())
        kept = [r for r in replicas if keep_containers and r.spec.artifact_kind == "oci-image"]
        # Processes first: each stop reports a change (the agent saves its state then), and the
        # state saved must still name the containers kept, for the next agent to adopt.
        await asyncio.gather(*(self.stop(r, grace=grace) for r in replicas if r not in kept))
        for r in kept:
            await self.release(r)

    async def release(self, replica: Replica) -> None:
        """Let go of a replica without stopping what runs it (its container keeps running for
        the next agent to adopt): its keeper ends and its log is no longer followed."""
        replica.stopping = True
        self.replicas.pop(replica.replica_id, None)
        keeper = replica.keeper
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        handle = replica.handle
        if handle is not None and self.containers is not None:
            self.containers.release(handle)
        replica.log.retire()


async def probe_ready(port: int, endpoint: str | None, host: str = "127.0.0.1") -> bool:
    """One readiness probe: ``GET endpoint`` answers 2xx, or (no endpoint) the port accepts a
    connection. Hand-written HTTP/1.1: an HTTP client would bring proxy settings from the
    agent's environment and an INFO log line per probe."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        if endpoint is None:
            return True
        # The manifest allows no whitespace in it (HealthCheck.endpoint); %-encode anyway so that
        # nothing can end the request line early.
        path = urllib.parse.quote(endpoint if endpoint.startswith("/") else "/" + endpoint,
                                  safe="/?&=%:@!$'()*+,;~-._")  # fmt: skip
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: shipyard-agent\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        # Only the status line is read, and at most the stream's limit (64 KiB) of it: a longer
        # line, or a huge body behind it, costs no more than that.
        try:
            status_line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            status_line = exc.partial  # closed before a line end: judge what came
    except (OSError, UnicodeEncodeError, asyncio.LimitOverrunError):
        return False
    finally:
        writer.close()
    parts = status_line.split(None, 2)  # b"HTTP/1.1 200 OK\r\n"
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return False
    code = parts[1]
    return len(code) == 3 and code.isdigit() and code.startswith(b"2")
