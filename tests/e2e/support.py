"""Helpers for end-to-end tests: a real ``shipyard serve`` (and its agent), the example app's git
repository, wrk as the load generator, and ``Recorder``: load that remembers which version
answered every request (``tests/e2e/test_real_app.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from shipyard.cli.token import issue_local

ALL = ["deployment:create", "deployment:read", "deployment:rollback"]
T = TypeVar("T")

#: The bound on waiting for a process of ours to come up (``shipyard serve``, a restarted
#: agent): the wait ends as soon as it answers, or fails at once with its log when it exits, so
#: this only catches a hang, and sits just under the test's own timeout (pyproject's
#: ``timeout = 300``) so the failure still names what it waited for. Not a guess of how long a
#: start takes: under ``make test`` four pytest-xdist workers share two cores with whatever
#: else runs there, and a Python process importing FastAPI can take a minute.
STARTUP_BOUND = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``shipyard ARGS`` as a user runs it (a process of its own; ``env`` added to ours); with
    ``check``, a failure raises with the command's output tails."""
    done = subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"shipyard {' '.join(args)} exited {done.returncode}: "
            f"{done.stdout[-1000:]}{done.stderr[-2000:]}"
        )
    return done


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_state(
    observe: Callable[[], T], accept: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Poll ``observe()`` until ``accept`` takes its value; on timeout the failure shows the last
    value seen, so it says what the state was instead of only that it never changed."""
    deadline = time.monotonic() + timeout
    while True:
        value = observe()
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(0.05)


#: The test clients' connections to ``shipyard serve``: idle ones are dropped after 2 s, under
#: uvicorn's 5 s keep-alive. At equal timeouts a request could go out on a connection the
#: server was closing (CI: "Connection reset by peer" while polling the fleet's regions).
API_LIMITS = httpx.Limits(keepalive_expiry=2.0)


class Server:
    """``shipyard serve`` as a child process, killable like in production."""

    def __init__(
        self,
        data_dir: Path,
        *extra_args: str,
        shared_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: Added to our environment for the server (``OTEL_*`` in tests/e2e/test_observability.py).
        self.env = dict(env or {})
        #: ``--shared-dir``: where the keys are (the data directory without).
        self.shared_dir = shared_dir
        #: More ``shipyard serve`` options (``--witness PATH``, ...).
        self.extra_args = (
            extra_args if shared_dir is None else ("--shared-dir", str(shared_dir), *extra_args)
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shipyard.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited: {(self.data_dir / 'serve.log').read_text()[-3000:]}"
                )
            try:
                return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, STARTUP_BOUND, "shipyard serve to answer /healthz")
        except AssertionError:
            self.stop()  # never leave a half-started server (and its Popen) behind
            self.stop_agent()
            raise
        token = self.issue_token()
        if self.client is not None:
            self.client.close()
        self.client = httpx.Client(
            base_url=self.base,
            timeout=60,
            headers={"authorization": f"Bearer {token}"},
            limits=API_LIMITS,
        )
        return self

    def issue_token(self) -> str:
        """The API token ``client`` carries (``ALL``), issued from the data directory once the
        server answers; a replica of a shared store (tests/e2e/ha.py) issues it there instead."""
        return issue_local(
            self.data_dir, "e2e", ALL, ttl_seconds=12 * 3600, shared_dir=self.shared_dir
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop_agent(self) -> None:
        info = self.data_dir / "agents" / "local" / "agent.json"
        if not info.exists():
            return
        pid = int(json.loads(info.read_text())["pid"])
        try:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not _alive(pid), 20, "the agent to stop")
        except ProcessLookupError:
            pass

    def deploy(self, repo: Path, commit: str, service: str = "hello", **bg: Any) -> str:
        assert self.client is not None
        params = {"switch_delay_seconds": 0, "bake_seconds": 1, "scale_down_delay_seconds": 1, **bg}
        r = self.client.post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": service, "region": "local"},
                "strategy": {"BlueGreen": params},
            },
        )
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])

    def deploy_with(
        self, repo: Path, commit: str, strategy: dict[str, Any], service: str = "hello"
    ) -> str:
        """Submit a deployment with any strategy (the request body's ``strategy``)."""
        assert self.client is not None
        r = self.client.post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": service, "region": "local"},
                "strategy": strategy,
            },
        )
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])

    def rollback(self, dep_id: str) -> str:
        """``POST /api/v1/rollback/{dep_id}``; returns the rollback's own deployment id."""
        assert self.client is not None
        r = self.client.post(f"/api/v1/rollback/{dep_id}")
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])

    def promote(self, dep_id: str) -> None:
        assert self.client is not None
        r = self.client.post(f"/api/v1/deployments/{dep_id}/promote")
        assert r.status_code == 202, r.text

    def deployment(self, dep_id: str) -> dict[str, Any]:
        assert self.client is not None
        doc: dict[str, Any] = self.client.get(f"/api/v1/deployments/{dep_id}").json()
        return doc

    def wait_final(self, dep_id: str, timeout: float = 90) -> dict[str, Any]:
        return dict(
            wait_until(
                lambda: (
                    (d := self.deployment(dep_id))["status"] in ("Success", "Failed", "RolledBack")
                    and d
                ),
                timeout,
                f"deployment {dep_id} to finish",
                interval=0.1,
            )
        )

    def router_requests(self, service: str = "hello") -> float:
        """Requests the service's router has routed so far (``GET /metrics``, every revision)."""
        assert self.client is not None
        text = self.client.get("/metrics").text
        pattern = re.compile(
            r'^shipyard_router_requests_total\{[^}]*service="' + re.escape(service) + r'"[^}]*\}'
            r" (\S+)$",
            re.M,
        )
        return sum(float(v) for v in pattern.findall(text))

    def wait_for_traffic(self, above: float, service: str = "hello", requests: int = 20) -> None:
        """Until the router has routed ``requests`` more than ``above`` (the count read before
        the load generator started): the load really reaches the service, no guessing."""
        wait_until(
            lambda: self.router_requests(service) >= above + requests,
            30,
            f"{requests} requests through {service}'s router",
        )

    def service(self, name: str = "hello") -> dict[str, Any]:
        assert self.client is not None
        doc: dict[str, Any] = self.client.get(f"/api/v1/services/{name}").json()
        return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class WrkResult:
    requests: int
    non_2xx: int
    socket_errors: int
    output: str

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors


class Wrk:
    """wrk running in the background for ``seconds``; ``result()`` waits and parses its report."""

    def __init__(self, url: str, seconds: int, connections: int = 16, threads: int = 2) -> None:
        wrk = shutil.which("wrk")
        assert wrk, "wrk is not installed (scripts/bootstrap.sh installs it)"
        self.proc = subprocess.Popen(
            [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self) -> WrkResult:
        out, _ = self.proc.communicate(timeout=300)
        m = re.search(r"(\d+) requests in", out)
        assert m, f"cannot parse wrk output:\n{out}"
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        return WrkResult(
            requests=int(m.group(1)),
            non_2xx=int(non2xx.group(1)) if non2xx else 0,
            socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
            output=out,
        )


#: How long each of a ``Recorder``'s connections waits after an answer before it sends the next
#: request. Unpaced, four connections ran about 1,100 requests a second through the router and
#: the app for the whole of a story (123,545 answers in test_containers.py's 110 s), which on
#: two cores shared by four xdist workers took the CPU that the builds, containers and control
#: planes of every other test were waiting for (that module's story: 100 s alone, 625 s in CI).
#: At 10 ms a connection still sends about 100 requests a second, so every transition a test
#: judges (a switch, a drain lasting at least a scale-down delay, a takeover, an outage of
#: seconds) is crossed by requests on every connection, and a 30-answer window fills in well
#: under a second; the assertions on those requests are unchanged.
RECORDER_PAUSE = 0.01


@dataclass(frozen=True)
class Answer:
    """One request the ``Recorder`` made: ``status`` None means no HTTP answer (``body`` then
    names the error)."""

    sent: float  # time.monotonic() when the request was written
    done: float
    step: str  # the recorder's step label when it was sent
    status: int | None
    body: str  # stripped
    revision: str  # x-shipyard-revision, "" if absent

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Recorder:
    """Steady keep-alive GET load through a service URL from its own thread, remembering every
    answer: when it was sent, in which step of the test, its status, its body (the example apps
    answer with their version) and the revision the router says served it.

    Unlike wrk it can tell *which version* answered at every moment, so a test can assert that
    exactly the right one served between two points (``answers(since=...)``), and it counts a
    reset connection or a timeout as a failed request, like a user would.

    Each connection waits ``pause`` seconds after an answer before its next request
    (``RECORDER_PAUSE``): the load is continuous, not as fast as it can go.
    """

    def __init__(
        self,
        url: str,
        connections: int = 4,
        timeout: float = 10.0,
        pause: float | None = None,
    ) -> None:
        u = urlsplit(url)
        self.host, self.port, self.path = u.hostname or "127.0.0.1", u.port or 80, u.path or "/"
        self.connections = connections
        self.timeout = timeout
        self.pause = RECORDER_PAUSE if pause is None else pause
        self._answers: list[Answer] = []
        self._step = "start"
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="recorder", daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        assert not self._thread.is_alive(), "the recorder did not stop"
        if self._crash is not None:
            raise AssertionError(f"the recorder crashed: {self._crash!r}") from self._crash

    def step(self, name: str) -> float:
        """Label the requests sent from now on; returns now (``time.monotonic()``)."""
        self._step = name
        return time.monotonic()

    def answers(self, since: float | None = None, until: float | None = None) -> list[Answer]:
        """Answers to requests sent at or after ``since`` and finished by ``until``."""
        return [
            a
            for a in list(self._answers)
            if (since is None or a.sent >= since) and (until is None or a.done <= until)
        ]

    def bodies(self, since: float | None = None, until: float | None = None) -> Counter[str]:
        return Counter(
            a.body if a.ok else f"FAILED {a.status}: {a.body}" for a in self.answers(since, until)
        )

    def failures(self) -> list[Answer]:
        return [a for a in list(self._answers) if not a.ok]

    def describe_failures(self, limit: int = 10) -> str:
        """Failed requests grouped by step and cause, with the first few in full."""
        failed = self.failures()
        if not failed:
            return "no failed requests"
        groups = Counter(f"{a.step}: {a.status or 'no answer'} {a.body[:80]}" for a in failed)
        t0 = self._answers[0].sent if self._answers else 0.0
        first = "; ".join(
            f"+{a.sent - t0:.2f}s {a.step} -> {a.status or 'no answer'} {a.body[:80]!r}"
            for a in failed[:limit]
        )
        return f"{len(failed)} failed requests: {dict(groups)}; first: {first}"

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by stop()
            self._crash = exc

    async def _run(self) -> None:
        await asyncio.gather(*(self._connection() for _ in range(self.connections)))

    async def _connection(self) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not self._stop.is_set():
            step, sent = self._step, time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                assert reader is not None
                writer.write(request)
                async with asyncio.timeout(self.timeout):
                    status, body, revision, close = await _read_response(reader)
                self._answers.append(Answer(sent, time.monotonic(), step, status, body, revision))
                if close:
                    writer.close()
                    writer = None
                if self.pause:
                    await asyncio.sleep(self.pause)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self._answers.append(
                    Answer(sent, time.monotonic(), step, None, f"{type(exc).__name__}: {exc}", "")
                )
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)  # do not spin on a refused connection
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, str, bool]:
    """(status, stripped body, revision header, server closes) of one HTTP/1.1 response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    status = int(status_line.split()[1])
    length: int | None = None
    chunked = close = False
    revision = ""
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        key, value = name.strip().lower(), value.strip()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif key == "x-shipyard-revision":
            revision = value
        elif key == "connection" and value.lower() == "close":
            close = True
    if chunked:
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readline()
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body, close = await reader.read(), True
    return status, body.decode("utf-8", errors="replace").strip(), revision, close
