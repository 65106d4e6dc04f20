"""Running build commands: argv only, scrubbed environment, own process group, timeout, logs.

Used by the local builder for ``[build] dependencies`` and ``[build] command``. A command runs in
a new session (its own process group) so a timeout or a cancelled build kills everything it
started, not just the first process; whatever the command leaves running in its group after it
exits is killed too. Output (stdout and stderr merged) is split into lines, each written to the
per-build log file and to the request's ``log_sink``; the last lines are kept for the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from shipyard.build.base import DEFAULT_MAX_LOG_BYTES, LogSink
from shipyard.errors import BuildFailed
from shipyard.private_files import open_log
from shipyard.sandbox import Sandbox

#: Seconds to keep reading output after the command exited (a daemon that left its own session
#: may still hold the pipe; we stop listening rather than wait for it).
_DRAIN_S = 5.0
_MAX_LINE = 64 * 1024


def truncation_notice(limit: int) -> str:
    """The one line a capped build log ends with (here and in the deployment's log)."""
    return (
        f"[shipyard] log truncated at {limit} bytes; further output dropped (the build goes "
        "on; shipyard serve --max-build-log-mb sets the limit)"
    )


class BuildLog:
    """One build's log: the per-build file, the live sink, and the tail for error messages.

    The command's output is kept up to ``max_bytes`` (file and sink alike): the line that would
    cross it is replaced by ``truncation_notice`` and later lines are dropped, while the build
    goes on and the tail keeps following (the error message shows how it ended). Shipyard's own
    notes (``note``: a bounded handful per build: what failed, timeouts) are always kept."""

    def __init__(
        self,
        path: Path,
        sink: LogSink | None,
        *,
        tail_lines: int = 30,
        mask: Callable[[str], str] | None = None,
        max_bytes: int = DEFAULT_MAX_LOG_BYTES,
    ) -> None:
        self.path = path
        self._file = os.fdopen(open_log(path), "a", encoding="utf-8")
        #: Every line passes through it before it is stored or shown (``logs.SecretMasker``).
        self._mask = mask
        self._sink = sink
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self.max_bytes = max_bytes
        #: Bytes of the command's output kept so far.
        self.written = 0
        #: True once output was dropped.
        self.truncated = False

    def line(self, text: str) -> None:
        if self._mask is not None:
            text = self._mask(text)
        self._tail.append(text)
        if self.truncated:
            return
        size = len(text.encode("utf-8", errors="replace")) + 1
        if self.written + size > self.max_bytes:
            self.truncated = True
            self._emit(truncation_notice(self.max_bytes))
            return
        self.written += size
        self._emit(text)

    def note(self, text: str) -> None:
        """A line from Shipyard itself (not the command), marked so readers can tell; kept
        even past the limit."""
        text = f"[shipyard] {text}"
        if self._mask is not None:
            text = self._mask(text)
        self._tail.append(text)
        self._emit(text)

    def _emit(self, text: str) -> None:
        self._file.write(text + "\n")
        self._file.flush()
        if self._sink is not None:
            self._sink(text)

    @property
    def tail(self) -> list[str]:
        return [t for t in self._tail if not t.startswith("[shipyard] ")]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    sandbox: Sandbox,
    service: str,
    writable: Sequence[Path],
    env: Mapping[str, str],
    limit_s: float,
    log: BuildLog,
    what: str,
    budget_s: float | None = None,
) -> int:
    """Run ``argv`` in ``cwd`` inside ``sandbox`` as ``service``'s identity, writable only in
    ``writable``; return its exit code. ``BuildFailed`` when it cannot start or
    runs longer than ``limit_s`` (the whole process group is killed first). ``budget_s`` is the
    configured build timeout the message names (``limit_s`` may be what is left of it)."""
    budget = limit_s if budget_s is None else budget_s
    # One line: a shell script written as a TOML multi-line string holds newlines.
    log.note(f"{what}: {' '.join(argv).replace(chr(10), ' ')}")
    # Checked here, with the message users know: inside the sandbox only bubblewrap would say it.
    path = env.get("PATH", "")
    tool = argv[0]
    if "/" not in tool and shutil.which(tool, path=path) is None:
        raise BuildFailed(f"{what} {tool!r} not found (PATH={path})", command=list(argv))
    try:
        proc = await asyncio.create_subprocess_exec(
            *sandbox.command(argv, service=service, cwd=cwd, writable=writable),
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise BuildFailed(
            f"{what} {argv[0]!r} not found (PATH={env.get('PATH', '')})", command=list(argv)
        ) from exc
    except PermissionError as exc:
        raise BuildFailed(f"{what} {argv[0]!r} is not executable", command=list(argv)) from exc
    assert proc.stdout is not None
    pump = asyncio.create_task(_pump(proc.stdout, log))
    try:
        async with asyncio.timeout(limit_s):
            code = await proc.wait()
    except TimeoutError as exc:
        _kill_group(proc.pid)
        await proc.wait()
        await _finish(pump)
        log.note(f"{what} timed out (build timeout {budget:g} s); killed its process group")
        raise BuildFailed(
            f"{what} timed out: the build exceeded its timeout of {budget:g} s "
            "([build] timeout_seconds) and was killed",
            command=list(argv),
            timeout_seconds=budget,
            log_tail=log.tail,
        ) from exc
    except BaseException:
        _kill_group(proc.pid)  # the leader is in its own group: this kills it too
        await proc.wait()
        pump.cancel()
        raise
    _kill_group(proc.pid)  # whatever it left running in its group
    await _finish(pump)
    return code


async def _pump(stream: asyncio.StreamReader, log: BuildLog) -> None:
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            log.line(_decode(raw))
        while len(pending) > _MAX_LINE:  # a very long line without newline: cut it up
            log.line(_decode(pending[:_MAX_LINE]))
            pending = pending[_MAX_LINE:]
    if pending:
        log.line(_decode(pending))


async def _finish(pump: asyncio.Task[None]) -> None:
    try:
        async with asyncio.timeout(_DRAIN_S):
            await pump
    except TimeoutError:
        pass


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
