"""One-off runs of a revision for its ``[hooks]`` (a migration before the revision starts, a
smoke test before its first traffic): ``POST /v1/services/{service}/hooks`` (``agent.api``),
called by ``runtime.local.LocalRuntime.run_hook``.

A hook runs exactly as a replica of the revision would, minus the traffic: the API first
localises and verifies the spec's artifact as ``PUT .../revisions/{r}`` does (signature, digest;
an image in the engine as signed), then a directory artifact runs as a process through the
supervisor's own pieces -- its environment builder (``[run] env``, ``SHIPYARD_*``, its own
``HOME``/``TMPDIR``, never the agent's; no ``PORT``: nothing may listen for traffic; plus
``SHIPYARD_HOOK=<point>``), its fresh run directory handed to the service's uid, its sandbox and
isolation mode (overlay or read-only artifact) -- and an image as a one-off container of the
exact image ID with the replicas' options (every capability dropped, no-new-privileges, the
image's user or nobody, its limits, the engine's init; ``docker run --rm``-like: removed once it
ended), on the replicas' network mode but with no port published.

stdout and stderr go, as one stream in the order printed, through the agent's secret masker (the
keys it knows, and the spec's secret values if it carries any) to the caller as NDJSON, line by
line as printed: ``{"line": "..."}`` objects, then one ``{"result": {...}}``
(``runtime.base.HookResult``: exit code, duration, timed_out, dropped lines). At most
``MAX_HOOK_OUTPUT_BYTES`` of lines are sent; the rest is counted, not sent. Nothing of it is
written to the agent's disk.

A watchdog owns the run from its start: it kills the process group (the container) at the hook's
``timeout_seconds`` whatever the caller does, and cleans up (run directory, container) at the
end. A caller that goes away (the control plane died or gave up) kills the hook at once: its
next run starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, cast

import docker.errors

from shipyard.agent import secret_files
from shipyard.agent.containers import ContainerLauncher, _cut
from shipyard.agent.processes import check_command, signal_group
from shipyard.agent.replica_logs import ReplicaLog
from shipyard.agent.supervisor import Replica, Supervisor
from shipyard.errors import RevisionStartFailed
from shipyard.logs import log_event
from shipyard.runtime.base import MAX_HOOK_OUTPUT_BYTES, HookResult, HookRun, RevisionSpec

log = logging.getLogger("shipyard.agent")

#: The longest line sent whole; a longer one is cut into pieces of this size.
MAX_LINE = 16384
#: After the hook's process ended, its output may still be read for this long (what it printed
#: last); a pipe held open by something that escaped its group is then given up.
OUTPUT_GRACE_SECONDS = 2.0


class _Job(Protocol):
    """A started hook: its output lines (None once they ended) and its exit."""

    lines: asyncio.Queue[str | None]

    async def wait(self) -> int: ...

    async def kill(self) -> None: ...

    async def cleanup(self) -> None: ...


class HookRunner:
    """Starts hooks for one agent's supervisor (see the module docstring)."""

    def __init__(self, supervisor: Supervisor, mask: Callable[[str], str]) -> None:
        self.supervisor = supervisor
        self._mask = mask
        self._counter = 0

    async def start(self, spec: RevisionSpec, hook: HookRun) -> RunningHook:
        """Start ``hook`` of the (verified) ``spec``; ``RevisionStartFailed`` if it cannot."""
        if not hook.argv and spec.artifact_kind == "directory":
            raise RevisionStartFailed(f"hook {hook.point} of {spec.revision} has no command")
        self._counter += 1
        hook_id = f"hook-{spec.revision}-{hook.point}-{self._counter}-{os.urandom(2).hex()}"
        # The replicas' own record type, for their environment and run directory: never
        # registered with the supervisor (no routing, no restarts, no log file).
        replica = Replica(
            hook_id,
            spec,
            0,
            cast(ReplicaLog, None),  # unused: the output goes to the caller, not to disk
            self.supervisor._run_dir / hook_id,
        )
        mask = secret_files.masking(self._mask, spec)
        job: _Job
        if spec.artifact_kind == "oci-image":
            launcher = self.supervisor.containers
            if launcher is None:
                raise RevisionStartFailed(
                    f"revision {spec.revision} is an image, and this agent runs no containers "
                    "(it has no Docker Engine)",
                    artifact_kind=spec.artifact_kind,
                )
            job = await _ContainerJob.start(launcher, replica, hook, mask)
        else:
            job = await _ProcessJob.start(self.supervisor, replica, hook, mask)
        log_event(log, "hook.started", service=spec.service, revision=spec.revision,
                  point=hook.point, hook=hook_id)  # fmt: skip
        return RunningHook(job, hook, hook_id)


class RunningHook:
    """A hook from its start to its end: the watchdog, and the NDJSON stream of its output."""

    def __init__(self, job: _Job, hook: HookRun, hook_id: str) -> None:
        self.job = job
        self.hook = hook
        self.hook_id = hook_id
        self.started = time.monotonic()
        self.timed_out = False
        self.result: HookResult | None = None
        self.watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> HookResult:
        try:
            try:
                async with asyncio.timeout(self.hook.timeout_seconds):
                    code: int | None = await self.job.wait()
            except TimeoutError:
                self.timed_out = True
                await self.job.kill()
                await self.job.wait()
                code = None
        finally:
            with contextlib.suppress(Exception):
                await self.job.cleanup()
        self.result = HookResult(
            exit_code=code,
            duration_ms=int((time.monotonic() - self.started) * 1000),
            timed_out=self.timed_out,
        )
        log_event(log, "hook.ended", hook=self.hook_id, exit_code=code, timed_out=self.timed_out,
                  duration_ms=self.result.duration_ms)  # fmt: skip
        return self.result

    async def stream(self) -> AsyncIterator[bytes]:
        """The output lines, then the result (NDJSON); the hook is killed if the reader goes
        away first."""
        budget = MAX_HOOK_OUTPUT_BYTES
        dropped = 0
        try:
            while True:
                if self.watchdog.done():
                    try:  # it ended: what is left in the pipe, for a little while
                        async with asyncio.timeout(OUTPUT_GRACE_SECONDS):
                            line = await self.job.lines.get()
                    except TimeoutError:
                        break
                else:
                    line = await self.job.lines.get()
                if line is None:
                    break
                size = len(line.encode("utf-8", errors="replace")) + 1
                if size > budget:
                    dropped += 1
                    continue
                budget -= size
                yield (json.dumps({"line": line}) + "\n").encode()
            result = await self.watchdog
            if dropped:
                result = HookResult(result.exit_code, result.duration_ms, result.timed_out, dropped)
            yield (json.dumps({"result": result.to_dict()}) + "\n").encode()
        finally:
            if not self.watchdog.done():  # the caller went away: the hook ends with it
                log_event(log, "hook.abandoned", hook=self.hook_id)
                self.watchdog.cancel()
                await self.job.kill()
                with contextlib.suppress(BaseException):
                    await self.job.cleanup()


class _ProcessJob:
    """A directory artifact's hook: a process group in the replicas' sandbox."""

    def __init__(self, process: asyncio.subprocess.Process, run_dir: Path) -> None:
        self.process = process
        self.run_dir = run_dir
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()

    @classmethod
    async def start(
        cls, supervisor: Supervisor, replica: Replica, hook: HookRun, mask: Callable[[str], str]
    ) -> _ProcessJob:
        spec = replica.spec
        argv = list(hook.argv)
        workdir = Path(spec.artifact_location).resolve()  # noqa: ASYNC240 - local disk
        if not workdir.is_dir():
            raise RevisionStartFailed(f"artifact directory {workdir} does not exist")
        env = supervisor._env(replica)
        env.pop("PORT", None)
        env["SHIPYARD_HOOK"] = hook.point
        check_command(argv, workdir, env, spec.revision)
        command, cwd = supervisor.sandboxed(replica, argv, workdir, await supervisor.mode())
        read, write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write,
                stderr=write,
                start_new_session=True,  # its own process group: killed as a whole
            )
        except (OSError, ValueError) as exc:
            os.close(read)
            shutil.rmtree(replica.run_dir, ignore_errors=True)
            raise RevisionStartFailed(
                f"cannot start hook {hook.point} {argv[0]!r} for revision {spec.revision}: {exc}",
                command=argv[0],
            ) from exc
        finally:
            os.close(write)
        job = cls(process, replica.run_dir)
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=_pump, args=(read, job.lines, loop, mask), name=f"hook-{process.pid}",
            daemon=True,
        ).start()  # fmt: skip
        return job

    async def wait(self) -> int:
        code = await self.process.wait()
        # A one-off: whatever it left running in its group ends with it (and lets go of the
        # output pipe).
        signal_group(self.process.pid, signal.SIGKILL)
        return code

    async def kill(self) -> None:
        signal_group(self.process.pid, signal.SIGKILL)

    async def cleanup(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)


def _pump(
    fd: int,
    lines: asyncio.Queue[str | None],
    loop: asyncio.AbstractEventLoop,
    mask: Callable[[str], str],
) -> None:
    """Copy the hook's output pipe into ``lines``, line by line through ``mask`` (a thread)."""

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
            loop.call_soon_threadsafe(lines.put_nowait, item)

    pending = b""
    try:
        while chunk := os.read(fd, 65536):
            *whole, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE:
                whole.append(pending)
                pending = b""
            for raw in whole:
                for i in range(0, max(len(raw), 1), MAX_LINE):
                    put(mask(raw[i : i + MAX_LINE].decode("utf-8", errors="replace")))
        if pending:
            put(mask(pending.decode("utf-8", errors="replace")))
    except OSError:
        log.exception("reading a hook's output failed")
    finally:
        os.close(fd)
        put(None)


class _ContainerJob:
    """An image's hook: a one-off container of the exact image ID (see the module docstring)."""

    def __init__(self, launcher: ContainerLauncher, container_id: str) -> None:
        self.launcher = launcher
        self.container_id = container_id
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @classmethod
    async def start(
        cls,
        launcher: ContainerLauncher,
        replica: Replica,
        hook: HookRun,
        mask: Callable[[str], str],
    ) -> _ContainerJob:
        spec = replica.spec
        mode = await launcher.network_mode()
        try:
            config = await asyncio.to_thread(launcher._image_config, spec.artifact_digest)
            hook_spec = _replace_argv(spec, hook)
            hook_replica = Replica(replica.replica_id, hook_spec, 0, replica.log, replica.run_dir)
            options = launcher._create_options(hook_replica, config, mode)
            options["environment"].pop("PORT", None)
            options["environment"]["SHIPYARD_HOOK"] = hook.point
            options.pop("ports", None)  # nothing listens for traffic
            container = await asyncio.to_thread(launcher.client.containers.create, **options)
        except docker.errors.DockerException as exc:
            raise RevisionStartFailed(
                f"cannot create a container of {spec.artifact_digest} for hook {hook.point} of "
                f"revision {spec.revision}: {_cut(exc)}",
                image=spec.artifact_digest,
            ) from exc
        job = cls(launcher, str(container.id))
        try:
            await asyncio.to_thread(launcher._check_command, job.container_id, config, hook_spec)
            await asyncio.to_thread(container.start)
        except RevisionStartFailed:
            await launcher._remove(job.container_id)
            raise
        except docker.errors.DockerException as exc:
            await launcher._remove(job.container_id)
            raise RevisionStartFailed(
                f"cannot start the container of hook {hook.point} of revision {spec.revision}: "
                f"{_cut(exc)}",
                image=spec.artifact_digest,
            ) from exc
        loop = asyncio.get_running_loop()
        threading.Thread(target=job._follow, args=(loop, mask), daemon=True,
                         name=f"hook-{job.container_id[:12]}").start()  # fmt: skip
        return job

    def _follow(self, loop: asyncio.AbstractEventLoop, mask: Callable[[str], str]) -> None:
        """Its output (both streams, as printed) into ``lines``, then its exit code."""

        def put(item: str | None) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.lines.put_nowait, item)

        api = self.launcher._streams.api
        pending = b""
        try:
            for chunk in api.logs(self.container_id, stream=True, follow=True,
                                  stdout=True, stderr=True):  # fmt: skip
                *whole, pending = (pending + chunk).split(b"\n")
                for raw in whole:
                    put(mask(raw[:MAX_LINE].decode("utf-8", errors="replace")))
            if pending:
                put(mask(pending[:MAX_LINE].decode("utf-8", errors="replace")))
            code = int(api.wait(self.container_id).get("StatusCode", -1))
        except Exception as exc:  # the container was removed under us (killed at its timeout)
            log.info("following hook container %s ended: %r", self.container_id[:12], exc)
            code = -1
        put(None)

        def exited() -> None:
            if not self._exit.done():
                self._exit.set_result(code)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(exited)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def kill(self) -> None:
        await self.launcher._kill(self.container_id)

    async def cleanup(self) -> None:
        await self.launcher._remove(self.container_id)


def _replace_argv(spec: RevisionSpec, hook: HookRun) -> RevisionSpec:
    """``spec`` running the hook's command instead of the replicas' (``[run] command``)."""
    return dataclasses.replace(spec, argv=list(hook.argv))
