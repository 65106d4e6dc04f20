"""The local runtime: a client of the region's ``shipyard agent`` (agent/server.py).

``LocalRuntime`` implements ``Runtime`` and, through ``AgentRouter``, ``TrafficRouter`` by calling
the agent's authenticated loopback API. ``attach_or_start_agent`` finds a running agent for the
region (``agent.json``) or starts one detached, in its own session, so it outlives the control
plane. Used by the orchestrator wiring in ``api/app.py`` and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from shipyard.errors import (
    AgentUnavailable,
    ArtifactVerificationFailed,
    InvalidInput,
    NotFound,
    RevisionStartFailed,
    TrafficSwitchFailed,
)
from shipyard.logs import log_event
from shipyard.private_files import open_log
from shipyard.runtime.base import (
    HookResult,
    HookRun,
    LogBatch,
    LogQuery,
    ReplicaStatus,
    RevisionSpec,
    ServiceState,
    StickyKey,
)

log = logging.getLogger("shipyard.runtime.local")

AGENT_START_TIMEOUT = 15.0
#: A hook's answer may be silent for its timeout and this long (the agent kills it at its
#: timeout, then sends the result).
HOOK_ANSWER_MARGIN_SECONDS = 30.0
#: Seconds an idle connection to an agent is kept for the next call (below the agent's 5 s).
KEEPALIVE_EXPIRY_SECONDS = 2.0


def _agent_dir(data_dir: Path, region: str) -> Path:
    return data_dir / "agents" / region


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_agent_info(data_dir: Path, region: str) -> tuple[str, str] | None:
    """(api_url, token) of a live agent for the region, or None."""
    d = _agent_dir(data_dir, region)
    try:
        info = json.loads((d / "agent.json").read_text())
        token = (d / "agent.token").read_text().strip()
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(info.get("pid", 0))):
        return None
    return str(info["api_url"]), token


async def _answers(url: str, token: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0) as c:
            r = await c.get(f"{url}/v1/health", headers={"authorization": f"Bearer {token}"})
            return r.status_code == 200
    except httpx.HTTPError:
        return False


#: One start at a time per agent directory in this process: every call that found the agent gone
#: (the janitor's, an API read's, a deployment's) comes here at once after a ``kill -9``, and
#: each spawning its own agent started several (the agent's lock now stops all but one) while
#: each spawn's removal of ``agent.json`` hid the agent that did start.
_starting: dict[Path, asyncio.Lock] = {}


async def attach_or_start_agent(data_dir: Path, region: str) -> tuple[str, str]:
    """Re-attach to the region's agent, or start it detached and wait until it answers."""
    found = read_agent_info(data_dir, region)
    if found and await _answers(*found):
        return found
    d = _agent_dir(data_dir, region)
    async with _starting.setdefault(d.resolve(), asyncio.Lock()):
        return await _start_agent(data_dir, region, d)


async def _start_agent(data_dir: Path, region: str, d: Path) -> tuple[str, str]:
    found = read_agent_info(data_dir, region)
    if found and await _answers(*found):
        return found  # started by the call that held the lock before this one
    await asyncio.to_thread(_spawn_agent, data_dir, region, d)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        found = read_agent_info(data_dir, region)
        if found and await _answers(*found):
            return found
        await asyncio.sleep(0.05)
    tail = (d / "agent.log").read_text(errors="replace")[-2000:]
    raise AgentUnavailable(f"agent for region {region} did not start; agent.log ends:\n{tail}")


def _spawn_agent(data_dir: Path, region: str, d: Path) -> None:
    """Start ``shipyard agent --detach``: it forks into its own session (so it outlives the
    control plane) and the command returns at once, leaving no child for us to reap."""
    # agent.json stays: a stale one names a dead pid or a URL that does not answer, and is
    # rewritten; removing it could hide an agent that had just written it (a slow restore).
    d.mkdir(parents=True, exist_ok=True, mode=0o700)  # the agent keeps its token in it
    argv = [sys.executable, "-m", "shipyard.cli.main", "agent", "--detach",
            "--data-dir", str(data_dir), "--region", region]  # fmt: skip
    with os.fdopen(open_log(d / "agent.log"), "ab") as log:
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            close_fds=True, check=True, timeout=60,
        )  # fmt: skip


class AgentClient:
    """Thin authenticated HTTP client for one agent; maps transport errors to AgentUnavailable.

    With ``data_dir``, an agent that is gone (nothing listening) is started again and the call
    retried once: the new agent restores the region from its state file (same service ports,
    same revisions and weights), so the data plane heals itself on the control plane's next
    call (the orchestrator's janitor makes one every second).
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        region: str,
        data_dir: Path | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sni_hostname: str | None = None,
    ) -> None:
        """``ssl_context``, ``sni_hostname``: a joined agent, dialed over mutual TLS (the
        controller's certificate, the fleet CA, the host name checked against ``sni_hostname``,
        ``<region>.region.shipyard``) with no token (api/fleet_control.py builds these)."""
        self.region = region
        self.data_dir = data_dir
        self.api_url = api_url
        self._ssl = ssl_context
        self._extensions = {"sni_hostname": sni_hostname} if sni_hostname else {}
        self._client = self._make_client(api_url, token)

    def _make_client(self, api_url: str, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=api_url,
            headers={"authorization": f"Bearer {token}"} if token else None,
            timeout=httpx.Timeout(10.0, read=120.0),
            # Idle connections are dropped well before the agent's uvicorn closes them (its
            # keep-alive timeout, 5 s): at equal timeouts a call could go out on a connection
            # the agent was closing at that moment.
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS),
            verify=self._ssl if self._ssl is not None else True,
        )

    async def _request(self, method: str, path: str, body: Any) -> httpx.Response:
        """One request; sent again once if a kept-alive connection was closed under it before
        any answer (every agent call is idempotent: the orchestrator's steps are)."""
        try:
            return await self._client.request(method, path, json=body, extensions=self._extensions)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):
                raise
            log_event(log, "agent.call_retried", region=self.region, path=path, error=str(exc))
            return await self._client.request(method, path, json=body, extensions=self._extensions)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = await self._request(method, path, body)
        except httpx.ConnectError as exc:
            if self.data_dir is None:
                raise self._unavailable(exc) from exc
            # Nothing listening: the request was never sent, so starting the agent again and
            # retrying cannot do anything twice.
            log_event(log, "agent.restarting", region=self.region, error=repr(exc)[:200])
            url, token = await attach_or_start_agent(self.data_dir, self.region)
            await self._client.aclose()
            self._client = self._make_client(url, token)
            try:
                r = await self._request(method, path, body)
            except httpx.HTTPError as again:
                raise self._unavailable(again) from again
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from exc
        if r.status_code >= 400:
            _refused(r.status_code, r.text)
        return r.json()

    async def stream(
        self, path: str, body: Any, *, read_timeout: float
    ) -> AsyncGenerator[dict[str, Any], None]:
        """``POST path`` whose answer is NDJSON: each object as it arrives (the agent's hook
        output). ``read_timeout``: the longest silence between two lines. An agent that is
        gone is started again as for ``call`` (nothing was sent: the retry runs nothing twice);
        one that dies mid-answer is ``AgentUnavailable``."""
        timeout = httpx.Timeout(10.0, read=read_timeout)
        for attempt in (1, 2):
            try:
                async with self._client.stream(
                    "POST", path, json=body, timeout=timeout, extensions=self._extensions
                ) as r:
                    if r.status_code >= 400:
                        _refused(r.status_code, (await r.aread()).decode(errors="replace"))
                    async for line in r.aiter_lines():
                        if line.strip():
                            yield json.loads(line)
                return
            except httpx.ConnectError as exc:
                if self.data_dir is None or attempt == 2:
                    raise self._unavailable(exc) from exc
                url, token = await attach_or_start_agent(self.data_dir, self.region)
                await self._client.aclose()
                self._client = self._make_client(url, token)
            except (httpx.HTTPError, ValueError) as exc:
                raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> AgentUnavailable:
        return AgentUnavailable(
            f"agent for region {self.region} did not answer: {exc!r}"[:500], retry_after=1.0
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _refused(status: int, text: str) -> NoReturn:
    """Raise what the agent's error answer means (its problem's code, else ``_AgentError``)."""
    try:
        detail = json.loads(text)
        if not isinstance(detail, dict):
            raise ValueError("not an object")
    except ValueError:
        detail = {"detail": text[:500]}
    message = str(detail.get("message") or detail.get("detail") or detail)[:1000]
    if status == 422 and detail.get("code") == "revision_start_failed":
        raise RevisionStartFailed(message)
    if status == 422 and detail.get("code") == "artifact_verification_failed":
        # The agent's own check (agent/verify.py), with its detail: check, reason, ...
        extra = {k: v for k, v in detail.items() if k not in ("type", "code", "message")}
        raise ArtifactVerificationFailed(message, **extra)
    raise _AgentError(status, message)


class _AgentError(InvalidInput):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"agent refused ({status}): {message}", status=status)
        self.status = status
        #: The agent's own words.
        self.reason = message


class AgentRouter:
    """``TrafficRouter`` backed by the agent's router."""

    type = "shipyard-agent"

    def __init__(self, agent: AgentClient) -> None:
        self._agent = agent

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        body: dict[str, Any] = {"weights": dict(weights)}  # insertion order matters (sticky)
        if sticky is not None:
            body["sticky_header"] = sticky.header
            body["sticky_cookie"] = sticky.cookie
        try:
            await self._agent.call("PUT", f"/v1/services/{service}/weights", body)
        except _AgentError as exc:
            raise TrafficSwitchFailed(
                f"router refused weights {dict(weights)}: {exc.message}"
            ) from exc

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        state = await self._agent.call("GET", f"/v1/services/{service}")
        want = {k: v for k, v in weights.items() if v > 0}
        have = {k: v for k, v in state["weights"].items() if v > 0}
        return want == have

    async def remove_managed_routes(self, service: str) -> None:
        await self._agent.call("DELETE", f"/v1/services/{service}")

    async def metrics(self, service: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._agent.call("GET", f"/v1/services/{service}/metrics")
        return result

    async def drive_load(
        self, service: str, revision: str, rps: float, path: str, *, lease_seconds: float
    ) -> dict[str, Any]:
        """``LoadDriver``: the agent's built-in load step (agent/loading.py)."""
        body = {"revision": revision, "rps": rps, "path": path, "lease_seconds": lease_seconds}
        out = await self._agent.call("PUT", f"/v1/services/{service}/load", body)
        return dict(out["load"])

    async def stop_load(self, service: str) -> dict[str, Any] | None:
        out = await self._agent.call("DELETE", f"/v1/services/{service}/load")
        return None if out["load"] is None else dict(out["load"])


class LocalRuntime:
    """``Runtime`` for one region of the local agent."""

    kind = "local"

    def __init__(self, region: str, agent: AgentClient) -> None:
        self.region = region
        self.agent = agent
        self.router = AgentRouter(agent)
        #: What the agent can run (``orchestrator.preflight.check_runnable`` reads it): images
        #: too once its Docker Engine answers (``refresh_kinds``).
        self.artifact_kinds: tuple[str, ...] = ("directory",)
        #: Why a kind is missing, for preflight's message (kind -> reason).
        self.artifact_kind_problems: dict[str, str] = {}

    @classmethod
    async def connect(cls, data_dir: Path, region: str) -> LocalRuntime:
        url, token = await attach_or_start_agent(data_dir, region)
        runtime = cls(region, AgentClient(url, token, region, data_dir))
        await runtime.refresh_kinds()
        return runtime

    async def refresh_kinds(self) -> tuple[str, ...]:
        """Ask the agent what it can run now (``GET /v1/health``; an agent from before images
        reports nothing and runs directories only)."""
        health = await self.agent.call("GET", "/v1/health")
        self.artifact_kinds = tuple(health.get("artifact_kinds") or ("directory",))
        docker = health.get("docker") or {}
        self.artifact_kind_problems = {}
        if "oci-image" not in self.artifact_kinds:
            self.artifact_kind_problems["oci-image"] = (
                f"the agent of region {self.region} cannot run images: the Docker Engine is "
                f"unreachable at {docker.get('address', 'its default address')}"
                + (f" ({docker['error']})" if docker.get("error") else "")
                + "; start it, or give `shipyard agent --docker-host`"
            )
        return self.artifact_kinds

    async def ensure_service(self, service: str) -> str:
        state = await self.agent.call("PUT", f"/v1/services/{service}")
        return str(state["url"])

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        try:
            out = await self.agent.call(
                "PUT", f"/v1/services/{spec.service}/revisions/{spec.revision}", spec.to_dict()
            )
        except _AgentError as exc:
            raise RevisionStartFailed(exc.message) from exc
        return [ReplicaStatus.from_dict(r) for r in out["replicas"]]

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        await self.agent.call(
            "POST",
            f"/v1/services/{service}/routable",
            {"replica_ids": list(replica_ids), "routable": routable},
        )

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        if replica_ids:
            await self.agent.call(
                "POST",
                f"/v1/services/{service}/stop",
                {"replica_ids": list(replica_ids), "drain_timeout": drain_timeout},
            )

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        state = await self.service_state(service)
        if state is None:
            return
        ids = [r.replica_id for r in state.replicas if r.revision == revision]
        await self.stop_replicas(service, ids, drain_timeout=drain_timeout)

    async def service_state(self, service: str) -> ServiceState | None:
        try:
            s = await self.agent.call("GET", f"/v1/services/{service}")
        except _AgentError as exc:
            if exc.status == 404:
                return None
            raise
        return ServiceState(
            service=s["service"],
            url=s["url"],
            weights=s["weights"],
            replicas=[ReplicaStatus.from_dict(r) for r in s["replicas"]],
        )

    async def list_services(self) -> list[str]:
        if "oci-image" not in self.artifact_kinds:
            # The janitor calls this every second: an engine started after the agent is seen
            # within seconds (the agent tries it again at most every 5 s).
            await self.refresh_kinds()
        return list(await self.agent.call("GET", "/v1/services"))

    async def read_logs(self, service: str, query: LogQuery) -> LogBatch:
        try:
            out = await self.agent.call("POST", f"/v1/services/{service}/logs", query.to_dict())
        except _AgentError as exc:
            if exc.status == 404:
                raise NotFound(exc.reason) from exc
            raise
        return LogBatch.from_dict(out)

    async def run_hook(
        self, spec: RevisionSpec, hook: HookRun, on_output: Callable[[str], None]
    ) -> HookResult:
        """``POST /v1/services/{s}/hooks`` (``agent.hooks``): its output lines to ``on_output``
        as the agent streams them, then its result. The agent kills the hook at its timeout;
        this waits that long and a margin for the answer."""
        body = {"spec": spec.to_dict(), **hook.to_dict()}
        path = f"/v1/services/{spec.service}/hooks"
        answer = self.agent.stream(
            path, body, read_timeout=hook.timeout_seconds + HOOK_ANSWER_MARGIN_SECONDS
        )
        try:
            async with contextlib.aclosing(answer):  # the connection is let go of at once
                async for item in answer:
                    if "line" in item:
                        on_output(str(item["line"]))
                    elif "result" in item:
                        return HookResult.from_dict(item["result"])
        except _AgentError as exc:
            raise RevisionStartFailed(
                f"the agent refused hook {hook.point} of {spec.revision}: {exc.reason}"
            ) from exc
        raise AgentUnavailable(
            f"agent for region {self.region} ended hook {hook.point}'s answer without its result",
            retry_after=1.0,
        )

    async def aclose(self) -> None:
        await self.agent.aclose()
