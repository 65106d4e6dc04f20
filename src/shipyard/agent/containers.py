"""Runs image revisions as Docker containers, one per replica, for the agent's supervisor; created
by ``agent.server.Agent`` when a Docker Engine answers, used by ``agent.supervisor.Supervisor``
through the same handle interface as processes (``ReplicaHandle``), so restarts, backoff and
readiness are one piece of code for both.

Every call of the docker SDK blocks: short ones (create, start, stop, remove, inspect) run in
worker threads (``asyncio.to_thread``); the long ones -- following a container's output until it
exits, and waiting for its exit code -- run on daemon threads of their own, on a client without a
read timeout, so they neither hold the loop's thread pool nor keep the process alive at exit.

A container is created from the exact image ID (``spec.artifact_digest``, verified before by
``agent.images.ensure_image``), never from a tag, and labelled (``LABELS``: service, revision,
replica, artifact digest, region, agent, port), which is how a restarted agent finds it again
(``adopt``) and how it recognises the containers that are its own but that no state names
(``Agent.restore`` removes those). Its environment is built here and is never the agent's: ``PORT``,
``SHIPYARD_SERVICE/_REVISION/_REPLICA/_REGION`` and the manifest's ``[run] env`` (on top of the
image's own ``ENV``), with the service's secrets (``agent/secret_files.py``: variables, and files
copied in before the start). It runs with every capability dropped, ``no-new-privileges``, the
limits of ``spec.container`` (memory, with swap the same; nano CPUs), nothing of the host mounted,
and the engine's init as PID 1 (``docker run --init``), so that ``docker stop``'s SIGTERM ends an
app that installs no handler, as it ends a process replica, instead of waiting out the stop timeout.
Its command (``spec.argv``, else the image's ENTRYPOINT/CMD) is looked up in the created container
before it starts, so a command that does not exist is refused like a process's rather than becoming
the init's exit 127. A ``[run] command`` replaces both the image's ENTRYPOINT and its CMD
(Kubernetes' ``command``, Cloud Run's): the manifest says what runs, whatever the image was built
to start.

The image's ``USER`` is kept; an image that names none runs as ``65534:65534`` (nobody) with
``HOME=/tmp`` rather than as root, since nothing an ordinary web app does needs root (binding
a port above 1024, reading its files); an image whose files only root may read must say
``USER root`` -- which, with every capability dropped, is still a weak root.

Networking (``--container-network``): ``publish`` publishes the container's port
(``spec.container.port``, else the image's first ``EXPOSE``d TCP port, else 8080, and ``PORT``
is set to it) on ``127.0.0.1:<free host port>``; ``host`` shares the host's network and gives
the app a free host port in ``PORT``; ``auto`` takes ``host`` when the engine has no ``bridge``
network (``dockerd --bridge=none``), else ``publish``. Either way the router reaches the replica
on ``127.0.0.1:<replica.port>``.

Output goes through the logs API (stdout and stderr followed apart, with the engine's
timestamps) into the replica's ``ReplicaLog``, masked like a process's. Lines keep the engine's
time, so an adopted container's log is followed again ``since`` the last stored line and no line
is stored twice.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import docker
import docker.errors
import requests

from shipyard.agent import secret_files
from shipyard.agent.replica_logs import ReplicaLog
from shipyard.errors import RevisionStartFailed
from shipyard.logs import log_event
from shipyard.runtime.base import LogStream, RevisionSpec

if TYPE_CHECKING:
    from shipyard.agent.supervisor import Replica

log = logging.getLogger("shipyard.agent")

#: ``--container-network``: see the module docstring.
ContainerNetwork = Literal["auto", "host", "publish"]

#: Label keys on every container the agent creates.
LABEL_PREFIX = "dev.shipyard."
LABELS = ("service", "revision", "replica", "artifact-digest", "region", "agent", "port")
#: The port an app listens on inside a published container when neither the manifest nor the
#: image says (Cloud Run's default).
DEFAULT_CONTAINER_PORT = 8080
#: A user the image cannot have been counting on, for images that name none (nobody:nogroup).
NO_USER = "65534:65534"
#: Seconds between attempts to remove a container the engine failed to remove.
REMOVE_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
#: The longest line kept whole (as for processes).
MAX_LINE = 65536
#: Go's ``os.FileMode`` bits in the engine's path stat.
_GO_DIR = 1 << 31
_GO_SYMLINK = 1 << 27
#: The SDK's own default engine address.
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
#: Foreign error text is cut to this.
MAX_ERROR = 300


def label(key: str) -> str:
    return LABEL_PREFIX + key


def connect(address: str | None) -> tuple[docker.DockerClient, docker.DockerClient]:
    """Two clients of the engine at ``address`` (None: the SDK's default, ``DOCKER_HOST`` or
    the local socket): one for calls that answer at once (60 s timeout), one without a read
    timeout for following logs and waiting for exits. DockerException when unreachable."""
    _probe_unix(address or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET)
    kwargs: dict[str, Any] = {"max_pool_size": 64}
    if address:
        kwargs["base_url"] = address
        calls = docker.DockerClient(**kwargs)
        streams = docker.DockerClient(timeout=None, **kwargs)
    else:
        calls = docker.from_env(**kwargs)
        streams = docker.from_env(timeout=None, **kwargs)
    try:
        calls.ping()
    except docker.errors.DockerException:
        calls.close()
        streams.close()
        raise
    except requests.RequestException as exc:
        calls.close()
        streams.close()
        raise docker.errors.DockerException(str(exc)) from exc
    return calls, streams


def _probe_unix(address: str) -> None:
    """DockerException unless the engine on the unix socket ``address`` answers ``GET /_ping``
    (other addresses are left to the SDK). A raw socket, closed every time: an SDK client that
    failed to connect leaks its socket."""
    if not address.startswith("unix://"):
        return
    path = address.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(path)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    except OSError as exc:
        raise docker.errors.DockerException(f"cannot connect to {path}: {exc}") from exc
    if not (status_line.startswith(b"HTTP/1.") and b" 200 " in status_line):
        raise docker.errors.DockerException(
            f"{path} answered {status_line[:100]!r} to GET /_ping, not 200"
        )


class ContainerLauncher:
    """Starts, adopts and lets go of replica containers on one engine, for one agent.

    ``agent_id`` tells this agent's containers from every other's on the same engine (the agent
    passes its directory: two agents never share one); ``mask`` is applied to every line of
    output before it is stored."""

    def __init__(
        self,
        client: docker.DockerClient,
        stream_client: docker.DockerClient,
        *,
        agent_id: str,
        region: str,
        network: ContainerNetwork = "auto",
        mask: Callable[[str], str] | None = None,
        address: str | None = None,
    ) -> None:
        self.client = client
        self._streams = stream_client
        self.agent_id = agent_id
        self.region = region
        self._network: ContainerNetwork = network
        self._mode: Literal["host", "publish"] | None = None
        self._mask = mask or (lambda line: line)
        #: Where the engine is, for messages.
        self.address = address or "the default Docker host"

    async def network_mode(self) -> Literal["host", "publish"]:
        """How containers are networked here (decided on first use, then fixed, and logged)."""
        if self._mode is None:
            if self._network != "auto":
                self._mode = self._network
                why = "configured"
            else:
                networks = await asyncio.to_thread(self.client.networks.list, names=["bridge"])
                bridged = any(n.name == "bridge" for n in networks)
                self._mode = "publish" if bridged else "host"
                why = "the engine has a bridge network" if bridged else "the engine has no bridge"
            log.info("containers use %s networking (%s)", self._mode, why)
        return self._mode

    # --- starting ----------------------------------------------------------------------------

    async def launch(self, replica: Replica) -> ContainerHandle:
        """Create and start the replica's container on ``replica.port`` (the host port the
        router uses) and follow its output; RevisionStartFailed if the engine refuses."""
        spec = replica.spec
        mode = await self.network_mode()
        try:
            config = await asyncio.to_thread(self._image_config, spec.artifact_digest)
            options = self._create_options(replica, config, mode)
            container = await asyncio.to_thread(self.client.containers.create, **options)
        except docker.errors.DockerException as exc:
            raise RevisionStartFailed(
                f"cannot create a container of {spec.artifact_digest} for revision "
                f"{spec.revision}: {_cut(exc)}",
                image=spec.artifact_digest,
            ) from exc
        try:
            await asyncio.to_thread(self._check_command, str(container.id), config, spec)
            if spec.secret_files:
                await asyncio.to_thread(self._put_secrets, str(container.id), options["user"], spec)
            await asyncio.to_thread(container.start)
        except RevisionStartFailed:
            await self._remove(container.id)
            raise
        except docker.errors.DockerException as exc:
            await self._remove(container.id)
            raise RevisionStartFailed(
                f"cannot start the container of revision {spec.revision} "
                f"({spec.artifact_digest}): {_cut(exc)}",
                image=spec.artifact_digest,
            ) from exc
        log_event(
            log,
            "container.started",
            service=spec.service,
            revision=spec.revision,
            replica=replica.replica_id,
            container=container.id[:12],
            port=replica.port,
            network=mode,
        )
        handle = ContainerHandle(self, str(container.id), replica.log, replica.spec)
        handle.follow(since=None)
        return handle

    def _check_command(
        self, container_id: str, image: Mapping[str, Any], spec: RevisionSpec
    ) -> None:
        """Refuse a command the container cannot execute, before it starts (as for processes):
        its init would start, fail to exec it and exit 127, a crash instead of a refusal.
        Looked up in the created container's filesystem (``HEAD .../archive``: a stat, no
        copy), on the image's ``PATH`` for a bare name."""
        argv = (
            list(spec.argv) or list(image.get("Entrypoint") or []) or list(image.get("Cmd") or [])
        )
        command = argv[0] if argv else ""
        if not command:
            raise RevisionStartFailed(
                f"revision {spec.revision} has no command: the manifest gives none and the "
                f"image {spec.artifact_digest} has no ENTRYPOINT or CMD",
                command="",
            )
        env = dict(str(e).partition("=")[::2] for e in image.get("Env") or [])
        workdir = str(image.get("WorkingDir") or "/")
        if "/" in command:
            candidates = [command if command.startswith("/") else f"{workdir}/{command}"]
        else:
            path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            candidates = [f"{d.rstrip('/')}/{command}" for d in path.split(":") if d]
        for candidate in candidates:
            if self._executable(container_id, candidate):
                return
        where = candidates[0] if "/" in command else f"PATH {':'.join(candidates)}"
        raise RevisionStartFailed(
            f"cannot start {command!r} for revision {spec.revision}: not an executable file "
            f"in image {spec.artifact_digest} ({where})",
            command=command,
        )

    def _put_secrets(self, container_id: str, user: str, spec: RevisionSpec) -> None:
        """Copy the secret files into the created container (``agent/secret_files.py``), owned
        by its user: a numeric one as it is, a name looked up in the container's own
        ``/etc/passwd`` (the engine's ``copyUIDGID`` asks the host's, which does not know it)."""
        owner = secret_files.numeric_owner(user) or self._passwd_owner(container_id, user, spec)
        api = self.client.api
        response = api.put(
            api._url("/containers/{0}/archive", container_id),
            params={"path": "/"},
            data=secret_files.archive(spec, owner),
        )
        if response.status_code != 200:
            raise RevisionStartFailed(
                f"cannot put the secret files into the container of revision {spec.revision}: "
                f"the engine answered {response.status_code} {response.text[:300]!r}",
                image=spec.artifact_digest,
            )

    def _passwd_owner(self, container_id: str, user: str, spec: RevisionSpec) -> tuple[int, int]:
        name, _, group = user.partition(":")
        try:
            stream, _ = self.client.api.get_archive(container_id, "/etc/passwd")
            passwd = secret_files.tar_member_text(b"".join(stream), "passwd")
        except (docker.errors.DockerException, KeyError) as exc:
            raise RevisionStartFailed(
                f"revision {spec.revision}: cannot read /etc/passwd of image "
                f"{spec.artifact_digest} to find user {name!r}, who owns the secret files: "
                f"{_cut(exc)}"
            ) from exc
        found = secret_files.passwd_entry(passwd, name)
        if found is None:
            raise RevisionStartFailed(
                f"revision {spec.revision}: the image's user {name!r} is not in its /etc/passwd; "
                "the secret files need an owner (give USER as uid:gid)"
            )
        return found[0], int(group) if group.isdigit() else found[1]

    def _executable(self, container_id: str, path: str) -> bool:
        api = self.client.api
        response = api.head(
            api._url("/containers/{0}/archive", container_id), params={"path": path}
        )
        if response.status_code != 200:
            return False
        try:
            stat = json.loads(base64.b64decode(response.headers["X-Docker-Container-Path-Stat"]))
            mode = int(stat["mode"])
        except (KeyError, ValueError, TypeError):
            return True  # an engine that does not say: let the start find out
        if mode & _GO_SYMLINK:
            return True  # followed by the exec itself; a dangling one fails there
        return not mode & _GO_DIR and bool(mode & 0o111)

    def _image_config(self, digest: str) -> Mapping[str, Any]:
        config: Mapping[str, Any] = self.client.images.get(digest).attrs.get("Config") or {}
        return config

    def _create_options(
        self, replica: Replica, image: Mapping[str, Any], mode: Literal["host", "publish"]
    ) -> dict[str, Any]:
        spec = replica.spec
        limits = spec.container
        env: dict[str, str] = {}
        user = str(image.get("User") or "")
        if not user:
            user = NO_USER
            env["HOME"] = "/tmp"  # noqa: S108 - inside the container; "/" is not writable
        env.update(spec.env)
        secret_env, secret_dir = secret_files.environment(spec, secret_files.CONTAINER_DIR)
        env.update(secret_env)
        inner = container_port(spec, image) if mode == "publish" else replica.port
        env.update(
            PORT=str(inner),
            SHIPYARD_SERVICE=spec.service,
            SHIPYARD_REVISION=spec.revision,
            SHIPYARD_REPLICA=replica.replica_id,
            SHIPYARD_REGION=self.region,
            **secret_dir,
        )
        options: dict[str, Any] = {
            "image": spec.artifact_digest,
            "environment": env,
            "user": user,
            "labels": self.labels(spec, replica.replica_id, replica.port),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            # An init as PID 1 (the engine's docker-init, tini): it passes the stop signal on,
            # so an app without a SIGTERM handler stops at once as a process replica does
            # (PID 1 ignores signals it does not handle), and it reaps zombies.
            "init": True,
            "detach": True,
            "stdin_open": False,
            "tty": False,
        }
        if spec.argv:  # [run] command replaces ENTRYPOINT and CMD (as Kubernetes' command)
            options["entrypoint"] = [spec.argv[0]]
            options["command"] = list(spec.argv[1:])
        if limits is not None and limits.memory_bytes is not None:
            options["mem_limit"] = limits.memory_bytes
            options["memswap_limit"] = limits.memory_bytes  # no swap beyond the limit
        if limits is not None and limits.nano_cpus is not None:
            options["nano_cpus"] = limits.nano_cpus
        if mode == "host":
            options["network_mode"] = "host"
        else:
            options["ports"] = {f"{inner}/tcp": ("127.0.0.1", replica.port)}
        return options

    def labels(self, spec: RevisionSpec, replica_id: str, port: int) -> dict[str, str]:
        """What a replica's container carries (``LABELS``)."""
        values = {
            "service": spec.service,
            "revision": spec.revision,
            "replica": replica_id,
            "artifact-digest": spec.artifact_digest,
            "region": self.region,
            "agent": self.agent_id,
            "port": str(port),
        }
        return {label(k): v for k, v in values.items()}

    # --- adopting ----------------------------------------------------------------------------

    async def adopt(self, replica: Replica, container_id: str) -> ContainerHandle | None:
        """Follow a running container of a previous agent again (not restarted), if it is still
        ``replica``'s: this agent's labels, that replica, that image, that port. Its output is
        followed from just after the last line its log holds."""
        try:
            container = await asyncio.to_thread(self.client.containers.get, container_id)
        except docker.errors.DockerException as exc:
            log.warning("cannot adopt container %s: %s", container_id[:12], _cut(exc))
            return None
        labels = container.labels or {}
        spec = replica.spec
        want = self.labels(spec, replica.replica_id, replica.port)
        image = str(container.attrs.get("Image", ""))
        if labels != {**labels, **want} or image != spec.artifact_digest:
            log.warning(
                "container %s is not replica %s's (labels or image differ); not adopted",
                container_id[:12],
                replica.replica_id,
            )
            return None
        if container.status != "running":
            return None
        last = await asyncio.to_thread(replica.log.last_time)
        handle = ContainerHandle(self, str(container.id), replica.log, replica.spec)
        # The engine's ``since`` is inclusive, and stored stamps are microseconds: a line the
        # engine stamped in the same microsecond as the last stored one is taken as stored.
        handle.follow(since=None if last is None else last + 1e-6)
        log_event(
            log,
            "container.adopted",
            service=spec.service,
            revision=spec.revision,
            replica=replica.replica_id,
            container=container_id[:12],
            port=replica.port,
        )
        return handle

    async def own_containers(self) -> list[tuple[str, dict[str, str]]]:
        """``(id, labels)`` of every container of this agent on the engine, running or not."""
        found = await asyncio.to_thread(
            self.client.containers.list,
            all=True,
            filters={"label": f"{label('agent')}={self.agent_id}"},
        )
        return [(str(c.id), dict(c.labels or {})) for c in found]

    async def remove_orphans(self, keep: set[str]) -> list[str]:
        """Remove every container of this agent but ``keep`` (a revision stopped while no agent
        ran, one whose restore was refused, a restart's dead container); their ids."""
        removed = []
        for container_id, labels in await self.own_containers():
            if container_id not in keep:
                log.warning(
                    "removing container %s (replica %s): no state names it",
                    container_id[:12],
                    labels.get(label("replica")),
                )
                await self._remove(container_id)
                removed.append(container_id)
        return removed

    async def remove(self, container_id: str) -> None:
        """Remove a container, running or not (an orphan no state names)."""
        await self._remove(container_id)

    def release(self, handle: object) -> None:
        """Stop following a container that keeps running (the agent shuts down cleanly)."""
        if isinstance(handle, ContainerHandle):
            handle.release()

    async def _remove(self, container_id: str) -> None:
        """Remove a container, retried with backoff: an engine that fails to delete its
        filesystem (vfs on a busy disk: "device or resource busy") leaves it Dead, and only
        another removal takes it away."""
        for delay in (*REMOVE_BACKOFF, None):
            try:
                await asyncio.to_thread(
                    self.client.api.remove_container, container_id, force=True, v=True
                )
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in str(exc):
                    return  # another call of ours is removing it
                if delay is None:
                    log.warning("cannot remove container %s: %s", container_id[:12], _cut(exc))
                    return
                log.info("removing container %s failed, retrying: %s", container_id[:12], _cut(exc))
                await asyncio.sleep(delay)

    async def _stop(self, container_id: str, grace: float) -> None:
        try:
            await asyncio.to_thread(
                self.client.api.stop, container_id, timeout=max(0, math.ceil(grace))
            )
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("docker stop %s failed: %s", container_id[:12], _cut(exc))

    async def _kill(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            await asyncio.to_thread(self.client.api.kill, container_id)


class ContainerHandle:
    """One container of a replica (``ReplicaHandle``): its output followed on two threads, its
    exit code collected by a third once both streams ended."""

    pid = None

    def __init__(
        self,
        launcher: ContainerLauncher,
        container_id: str,
        out: ReplicaLog,
        spec: RevisionSpec | None = None,
    ) -> None:
        self.launcher = launcher
        self.container_id = container_id
        self._log = out
        #: The agent's mask, and the replica's own secret values (``spec``) masked too.
        self._mask = launcher._mask if spec is None else secret_files.masking(launcher._mask, spec)
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._open: list[Any] = []
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def follow(self, since: float | None) -> None:
        """Start copying its stdout and stderr into the log, and watching for its exit."""
        pumps = [
            threading.Thread(
                target=self._pump,
                args=(stream, since),
                name=f"log-{self.container_id[:12]}-{stream}",
                daemon=True,
            )
            for stream in ("stdout", "stderr")
        ]
        for p in pumps:
            self._log.attach()
            p.start()
        threading.Thread(
            target=self._watch, args=(pumps,), name=f"wait-{self.container_id[:12]}", daemon=True
        ).start()

    def _pump(self, stream: LogStream, since: float | None) -> None:
        out, mask = self._log, self._mask
        pending = b""

        def write(raw: bytes) -> None:
            at, text = _split_stamp(raw)
            out.write(stream, [mask(text.decode("utf-8", errors="replace"))], at=at)

        try:
            kwargs: dict[str, Any] = {
                "stream": True,
                "follow": True,
                "timestamps": True,
                "stdout": stream == "stdout",
                "stderr": stream == "stderr",
            }
            if since is not None:
                kwargs["since"] = since
            chunks = self.launcher._streams.api.logs(self.container_id, **kwargs)
            with self._lock:
                if self._released.is_set():
                    chunks.close()
                    return
                self._open.append(chunks)
            for chunk in chunks:
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > MAX_LINE:
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    write(raw)
        except (docker.errors.DockerException, requests.RequestException, OSError, ValueError):
            if not self._released.is_set():
                log.warning("following the output of container %s ended", self.container_id[:12])
        finally:
            if pending and not self._released.is_set():
                write(pending)
            out.detach()

    def _watch(self, pumps: list[threading.Thread]) -> None:
        for p in pumps:
            p.join()
        if self._released.is_set():
            return
        try:
            result = self.launcher._streams.api.wait(self.container_id)
            code = int(result.get("StatusCode", -1))
        except (docker.errors.DockerException, requests.RequestException) as exc:
            if not isinstance(exc, docker.errors.NotFound):
                log.warning("waiting for container %s failed: %s", self.container_id[:12], exc)
            code = -1  # it is gone: removed behind our back
        if self._released.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._exit, code)

    def _exit(self, code: int) -> None:
        self._returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def reap(self, drain: Callable[[float], Awaitable[object]] | None, grace: float) -> None:
        """The container exited: nothing of it can still hold requests; remove it (a restart
        makes a new one for the same replica id)."""
        await self.launcher._remove(self.container_id)

    async def terminate(self, grace: float) -> None:
        """``docker stop`` with ``grace`` (the image's stop signal, then SIGKILL)."""
        await self.launcher._stop(self.container_id, grace)
        await self.wait()

    async def kill(self) -> None:
        await self.launcher._kill(self.container_id)

    async def discard(self) -> None:
        await self.launcher._remove(self.container_id)

    def release(self) -> None:
        """Stop following it; the container keeps running."""
        with self._lock:
            self._released.set()
            streams, self._open = self._open, []
        for chunks in streams:
            with contextlib.suppress(Exception):
                chunks.close()


def container_port(spec: RevisionSpec, image: Mapping[str, Any]) -> int:
    """The port the app listens on inside a published container: ``spec.container.port``, else
    the image's first ``EXPOSE``d TCP port, else ``DEFAULT_CONTAINER_PORT``."""
    if spec.container is not None and spec.container.port is not None:
        return spec.container.port
    exposed = sorted(image.get("ExposedPorts") or {})
    for entry in exposed:
        number, _, proto = str(entry).partition("/")
        if proto in ("", "tcp") and number.isdigit():
            return int(number)
    return DEFAULT_CONTAINER_PORT


def _split_stamp(raw: bytes) -> tuple[float | None, bytes]:
    """``(engine time, text)`` of a line the logs API sent with ``timestamps=True``
    (``2026-12-02T01:18:50.123456789Z text``); no stamp: ``(None, raw)``."""
    stamp, sep, text = raw.partition(b" ")
    if not sep or len(stamp) < 20 or not stamp.endswith(b"Z"):
        return None, raw
    try:
        whole = calendar.timegm(time.strptime(stamp[:19].decode(), "%Y-%m-%dT%H:%M:%S"))
        fraction = stamp[20:-1].decode()
        return whole + (float("0." + fraction) if fraction.isdigit() else 0.0), text
    except ValueError:
        return None, raw


def _cut(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "..."


class Engine:
    """The agent's connection to its Docker Engine, made when first needed and tried again (at
    most every ``retry_after`` seconds) while it fails, so an engine started after the agent is
    found. ``Agent`` holds one; ``launcher`` is None while there is no engine."""

    def __init__(
        self,
        address: str | None,
        *,
        agent_id: str,
        region: str,
        network: ContainerNetwork = "auto",
        mask: Callable[[str], str] | None = None,
        retry_after: float = 5.0,
    ) -> None:
        self.address = address
        self._options: dict[str, Any] = {"agent_id": agent_id, "region": region,
                                         "network": network, "mask": mask}  # fmt: skip
        self.retry_after = retry_after
        self.launcher: ContainerLauncher | None = None
        #: Why there is no engine (None: connected, or never tried).
        self.error: str | None = None
        self._tried_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return self.address or "the default Docker host (DOCKER_HOST, else /var/run/docker.sock)"

    async def connect(self) -> ContainerLauncher | None:
        """The launcher, connecting first if there is none and the last try is old enough."""
        async with self._lock:
            if self.launcher is not None:
                return self.launcher
            now = time.monotonic()
            if self._tried_at is not None and now - self._tried_at < self.retry_after:
                return None
            self._tried_at = now
            try:
                calls, streams = await asyncio.to_thread(connect, self.address)
            except docker.errors.DockerException as exc:
                self.error = _cut(exc)
                log.warning("no Docker Engine at %s: %s", self.where, self.error)
                return None
            self.error = None
            self.launcher = ContainerLauncher(calls, streams, address=self.address, **self._options)
            log.info("Docker Engine at %s: image revisions run as containers", self.where)
            return self.launcher

    def client(self) -> docker.DockerClient | None:
        return self.launcher.client if self.launcher is not None else None

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.client.close()
            self.launcher._streams.close()
            self.launcher = None
