"""Publishing checkpoints to witnesses outside the data directory.

``shipyard serve --witness PATH_OR_URL`` (repeatable) makes ``api/context.py`` build one
``CheckpointPublisher``; the pipeline runs it (``Pipeline.start``) and asks for a publication at
every deployment's end (orchestrator/outcome.py ``finish`` calls ``request``). It publishes every
``interval`` seconds and whenever asked:

1. catch up: read the records appended since the last pass (in batches) and add their leaves to
   a ``merkle.Frontier``, checking each one's chain link and hash on the way: O(new records) per
   pass, nothing at all on the append path;
2. sign the tree head as a checkpoint (checkpoint.py);
3. hand it to every witness; each acceptance is a row in ``audit_checkpoints`` (log.py, once per
   witness and tree head) and an ``audit.checkpoint_published`` log line.

It never raises and never blocks a deployment: a witness that fails is logged
(``audit.witness_failed``) and tried again next pass. It refuses to sign when the database no
longer extends what it signed before (a gap, a broken link, or the head it published last time no
longer matching after a restart): "a log MUST NOT sign a checkpoint inconsistent with one it
signed", and the log line says to run ``shipyard audit verify --checkpoint``.

Witnesses: ``FileWitness`` (the latest checkpoint written atomically to a file, optionally every
one appended to a history file) and ``HttpWitness`` (POST ``text/plain``). The file must not be
in the data directory: whoever may rewrite the trail may rewrite that too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from shipyard.audit.chain import GENESIS_HASH, ChainBroken, StoredRow, check_next
from shipyard.audit.checkpoint import CheckpointSigner
from shipyard.audit.log import (
    Publication,
    load_publications,
    load_rows_after,
    record_publication,
)
from shipyard.audit.merkle import Frontier
from shipyard.domain.clock import Clock, to_thread
from shipyard.errors import InvalidInput, ShipyardError, TransientError
from shipyard.logs import log_event

log = logging.getLogger("shipyard.audit.publishing")

DEFAULT_INTERVAL_SECONDS = 60.0
#: Records read per catch-up query: bounded memory whatever the trail's length.
BATCH = 5000
#: An HTTP witness's whole answer must come within this.
HTTP_TIMEOUT_SECONDS = 10.0


class WitnessFailed(TransientError):
    """A witness did not take the checkpoint; the next pass tries again."""

    code = "audit_witness_failed"


class Witness(Protocol):
    """Somewhere outside the data directory that keeps the latest checkpoint."""

    #: How logs and ``audit_checkpoints`` name it (never holds a credential).
    target: str

    async def publish(self, note: str) -> None:
        """Hand over the signed checkpoint ``note``; WitnessFailed if it was not taken."""
        ...


class FileWitness:
    """The latest checkpoint in ``path`` (replaced atomically, fsynced, every pass: a lost copy
    comes back); with ``history``, each new checkpoint also appended there (one note after
    another, each followed by a blank line; the same one again is not repeated)."""

    def __init__(self, path: Path, history: Path | None = None) -> None:
        self.path = path
        self.history = history
        self.target = str(path)
        self._last_appended: str | None = None

    async def publish(self, note: str) -> None:
        try:
            await to_thread(self._write, note)
        except OSError as exc:
            raise WitnessFailed(
                f"cannot write checkpoint to {self.path}: {exc.strerror or exc}"
            ) from exc

    def _write(self, note: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(note)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # a checkpoint is public: verifiers elsewhere read it
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.history is not None and note != self._last_appended:
            with open(self.history, "a", encoding="utf-8") as f:
                f.write(note + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._last_appended = note


class HttpWitness:
    """POSTs the checkpoint as ``text/plain`` to ``url``; any 2xx is an acceptance."""

    def __init__(self, url: str, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.target = url
        self._client = client

    async def publish(self, note: str) -> None:
        if self._client is None:  # made on first use: parsing --witness opens nothing
            self._client = httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS)
        try:
            resp = await self._client.post(
                self.url, content=note.encode(), headers={"Content-Type": "text/plain"}
            )
        except httpx.HTTPError as exc:
            raise WitnessFailed(f"POST {self.url} failed: {type(exc).__name__}: {exc}") from exc
        if not resp.is_success:
            raise WitnessFailed(f"POST {self.url} answered {resp.status_code}: {resp.text[:200]!r}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def parse_witness(target: str, data_dir: Path, history: Path | None = None) -> Witness:
    """``--witness``: an ``http(s)://`` URL or a file path outside ``data_dir`` (whose directory
    exists). InvalidInput saying what to change otherwise; nothing is written here."""
    if target.startswith(("http://", "https://")):
        url = urllib.parse.urlsplit(target)
        if not url.hostname:
            raise InvalidInput(f"--witness {target!r} has no host")
        if url.username or url.password:
            raise InvalidInput(
                "--witness URL holds a credential (user:password@); Shipyard never stores or "
                "logs one: let the witness accept unauthenticated checkpoints (they are signed "
                "and public) or put it behind a proxy that adds the credential"
            )
        return HttpWitness(target)
    if "://" in target:
        raise InvalidInput(f"--witness {target!r}: only http(s) URLs or file paths are supported")
    path = Path(target).expanduser().resolve()
    for candidate in (path, *([history.expanduser().resolve()] if history else [])):
        if candidate.is_relative_to(data_dir.resolve()):
            raise InvalidInput(
                f"witness file {candidate} is inside the data directory {data_dir}: whoever can "
                "rewrite the trail could rewrite it too; put it on other storage"
            )
        if not candidate.parent.is_dir():
            raise InvalidInput(f"witness directory {candidate.parent} does not exist")
        if candidate.is_dir():
            raise InvalidInput(f"witness file {candidate} is a directory; name a file in it")
    return FileWitness(path, history.expanduser().resolve() if history else None)


class Checkpoints(Protocol):
    """What the pipeline needs of a publisher: run it, and ask for a publication."""

    def request(self) -> None: ...

    async def run(self) -> None: ...


class CheckpointPublisher:
    """Keeps the audit tree's head, signs it and hands it to the witnesses (module docstring)."""

    def __init__(
        self,
        *,
        engine: Engine,
        signer: CheckpointSigner,
        witnesses: list[Witness],
        clock: Clock,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        on_publish: Callable[[Connection, Publication], None] | None = None,
    ) -> None:
        """``on_publish``: run in the transaction recording a witness's acceptance (the
        notification outbox writer, ``notify/sinks.OutboxWriter.on_publish``)."""
        if interval <= 0:
            raise InvalidInput(f"checkpoint interval must be positive, not {interval}")
        self._engine = engine
        self.signer = signer
        self.witnesses = witnesses
        self._clock = clock
        self.interval = interval
        self._on_publish = on_publish
        self._tree = Frontier()
        self._head_hash = GENESIS_HASH  # chain hash of the newest record in the tree
        #: Set once the database stops extending what was signed: nothing is signed after that.
        self.refusal: str | None = None
        self._expected: tuple[int, str] | None = None  # last published (size, root hex)
        self._loaded = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        #: The last checkpoint signed (None before the first pass).
        self.latest: str | None = None

    def request(self) -> None:
        """Ask for a publication soon (after a deployment ends); returns at once, never fails."""
        self._wake.set()

    async def run(self) -> None:
        """Publish, then wait ``interval`` or for ``request``; until cancelled."""
        while True:
            await self.publish()
            sleep = asyncio.ensure_future(self._clock.sleep(self.interval))
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleep, wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleep, wake):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._wake.clear()

    async def publish(self) -> str | None:
        """One pass (module docstring): the signed checkpoint, or None if none was signed."""
        async with self._lock:
            try:
                await to_thread(self._catch_up)
            except (SQLAlchemyError, ShipyardError) as exc:
                log_event(log, "audit.checkpoint_failed", level=logging.ERROR, error=str(exc)[:300])
                return None
            if self.refusal is not None:
                log_event(log, "audit.checkpoint_refused", level=logging.ERROR, error=self.refusal)
                return None
            size, root = self._tree.size, self._tree.root()
            note = self.signer.sign(size, root)
            self.latest = note
            for witness in self.witnesses:
                await self._publish_to(witness, note, size, root)
            return note

    async def aclose(self) -> None:
        for witness in self.witnesses:
            if isinstance(witness, HttpWitness):
                await witness.aclose()

    async def _publish_to(self, witness: Witness, note: str, size: int, root: bytes) -> None:
        try:
            await witness.publish(note)
        except WitnessFailed as exc:
            log_event(
                log,
                "audit.witness_failed",
                level=logging.ERROR,
                witness=witness.target,
                tree_size=size,
                error=exc.message,
                retry_in_seconds=self.interval,
            )
            return
        except Exception:  # a witness must never take the control plane down
            log.exception(
                "witness %s failed unexpectedly; next try in %g s", witness.target, self.interval
            )
            return
        publication = Publication(
            published_at=dt.datetime.fromtimestamp(self._clock.now(), dt.UTC).isoformat(),
            witness=witness.target,
            tree_size=size,
            root_hash=root.hex(),
            checkpoint=note,
        )
        try:
            new = await to_thread(record_publication, self._engine, publication, self._on_publish)
        except SQLAlchemyError as exc:
            log_event(
                log,
                "audit.checkpoint_unrecorded",
                level=logging.ERROR,
                witness=witness.target,
                tree_size=size,
                error=str(exc)[:300],
            )
            return
        if new:
            log_event(
                log,
                "audit.checkpoint_published",
                witness=witness.target,
                origin=self.signer.name,
                tree_size=size,
                root_hash=base64.b64encode(root).decode(),
            )

    def _catch_up(self) -> None:
        """Add the records appended since the last pass to the tree (in a worker thread)."""
        if not self._loaded:
            published = load_publications(self._engine)
            if published:
                last = max(published, key=lambda p: p.tree_size)
                self._expected = (last.tree_size, last.root_hash)
            self._loaded = True
        while self.refusal is None:
            rows = load_rows_after(self._engine, self._tree.size, BATCH)
            for row in rows:
                self.refusal = self._add(row)
                if self.refusal is not None:
                    return
            if len(rows) < BATCH:
                break
        expected = self._expected
        if self.refusal is None and expected and self._tree.size < expected[0]:
            self.refusal = (
                f"the trail holds {self._tree.size} records but a checkpoint of {expected[0]} "
                "was published: it was truncated; run `shipyard audit verify --checkpoint "
                "<witness>`"
            )

    def _add(self, row: StoredRow) -> str | None:
        """Add one record's leaf; the reason to stop signing if it does not extend the tree."""
        try:
            record, leaf = check_next(row, self._tree.size + 1, self._head_hash)
        except ChainBroken as exc:
            return f"{exc.message}; run `shipyard audit verify --checkpoint <witness>`"
        self._tree.append(leaf)
        self._head_hash = record.hash
        expected = self._expected
        if expected and self._tree.size == expected[0] and self._tree.root().hex() != expected[1]:
            return (
                f"the first {self._tree.size} records no longer match the checkpoint published "
                "for them: the trail was rewritten; run `shipyard audit verify --checkpoint "
                "<witness>`"
            )
        return None
