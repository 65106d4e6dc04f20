"""The sandbox every workload runs in: build commands, dependency steps and app replicas.

Everything a user's repository brings is hostile code. ``Sandbox.command`` turns a workload's
argv into the command that runs it apart from the control plane and the agent:

* **As root** (the usual server): ``launch.py`` makes a private mount namespace, mounts the
  replica's copy-on-write overlay, covers the data directory (keys, database, agent token, audit
  anchor, other services' files) and the server's ``HOME`` with empty tmpfs, mounts back only the
  workload's own directories, switches to the service's own uid (``uids.UidAllocator``: one uid
  per service from a configured range, the same for its builds and its replicas) and execs
  bubblewrap, which adds the read-only host, private ``/tmp``, a PID namespace, no capabilities
  and ``no_new_privs``.
* **Not root**: bubblewrap directly (it makes an unprivileged user namespace), with the same
  view; the workload keeps the server's uid (there is no other to give it) but cannot see the
  data directory, and apps run in their read-only artifact (no overlay without root).
* **``--insecure-no-sandbox``** (``SandboxPolicy.insecure``): the workloads run as the server,
  as before this module existed; ``shipyard serve`` and ``shipyard agent`` print that loudly.

``Sandbox.check`` runs ``/bin/true`` through the whole chain once at start; a server that cannot
sandbox refuses to start (``SandboxUnavailable`` says why and what to do) unless the operator
opted out. Called by ``build.local.LocalBuilder`` (through ``build.running.run_command``) and
``agent.supervisor.Supervisor``; configured by ``shipyard serve`` / ``shipyard agent``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.errors import PermanentError
from shipyard.sandbox import launch
from shipyard.sandbox.uids import UidAllocator, UidRange

__all__ = ["Identity", "Sandbox", "SandboxPolicy", "SandboxUnavailable", "UidRange"]

log = logging.getLogger("shipyard.sandbox")

#: Where ``UidAllocator`` keeps service -> uid, inside the (hidden) data directory.
UIDS_FILE = "sandbox-uids.json"
#: The uid the start-up check runs as (no service may be named like this).
_CHECK_SERVICE = "<sandbox-check>"


class SandboxUnavailable(PermanentError):
    """No sandbox can be made here and the operator did not opt out of it."""

    code = "sandbox_unavailable"
    http_status = 503


@dataclass(frozen=True)
class Identity:
    """The unprivileged identity a service's workloads run as."""

    uid: int
    gid: int


@dataclass(frozen=True)
class SandboxPolicy:
    """How workloads are confined. ``data_dir`` is hidden from them, with ``hide`` (plus the
    server's own ``HOME``); ``expose`` are read-only paths mounted back inside hidden ones (the
    Python installation by default)."""

    data_dir: Path
    uid_range: UidRange = field(default_factory=UidRange.default)
    insecure: bool = False
    bwrap: str = "bwrap"
    hide: tuple[Path, ...] = ()
    expose: tuple[Path, ...] = ()


class Sandbox:
    """Wraps workload commands per ``SandboxPolicy``; one per server process."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy
        self.root = os.geteuid() == 0
        self._uids = UidAllocator(policy.data_dir / UIDS_FILE, policy.uid_range)
        self._bwrap = shutil.which(policy.bwrap) or policy.bwrap

    @property
    def enabled(self) -> bool:
        return not self.policy.insecure

    def describe(self) -> str:
        """One line for the server's start-up output."""
        if not self.enabled:
            return "INSECURE: workloads run unsandboxed, as the server's own user"
        if self.root:
            return (
                f"workloads run sandboxed (bubblewrap) as per-service uids "
                f"{self.policy.uid_range}, without the data directory"
            )
        return "workloads run sandboxed (bubblewrap) without the data directory (not root: no uid)"

    def identity(self, service: str) -> Identity | None:
        """The service's own uid/gid (allocated on first use); None when not root or insecure."""
        if not self.enabled or not self.root:
            return None
        uid = self._uids.uid_for(service)
        return Identity(uid, uid)

    def hidden(self) -> list[str]:
        paths = [self.policy.data_dir, *self.policy.hide]
        home = Path.home()
        if home != Path("/"):
            paths.append(home)
        return _unique(str(p.resolve()) for p in paths)

    def _invisible(self) -> list[Path]:
        """What a workload cannot see of the host: the hidden directories and ``/tmp`` (its own
        is private)."""
        return [Path(h) for h in self.hidden()] + [Path("/tmp")]  # noqa: S108

    def exposed(self) -> list[str]:
        """Read-only paths to mount back: the Python installation the server runs (apps and
        builds use ``python`` from the server's PATH), when it lies in a hidden directory."""
        candidates = [*self.policy.expose, Path(sys.base_prefix), Path(sys.prefix)]
        hidden = self._invisible()
        data = self.policy.data_dir.resolve()
        out = []
        for c in candidates:
            real = c.resolve()
            if any(real.is_relative_to(h) for h in hidden) and not real.is_relative_to(data):
                out.append(str(real))
        return _unique(out)

    def visible_path(self, path: str) -> str:
        """``path`` (a ``PATH`` value) without the directories a workload cannot see (inside a
        hidden directory and not exposed: e.g. pyenv's shims under the server's ``HOME``), so a
        command is looked up -- and refused with a clear message -- as the sandbox will."""
        if not self.enabled:
            return path
        hidden = self._invisible()
        exposed = [Path(e) for e in self.exposed()]
        kept = []
        for entry in path.split(os.pathsep):
            real = Path(entry).resolve() if entry else None
            if real is None:
                continue
            if any(real.is_relative_to(h) for h in hidden) and not any(
                real.is_relative_to(e) for e in exposed
            ):
                continue
            kept.append(entry)
        return os.pathsep.join(kept)

    def command(
        self,
        argv: Sequence[str],
        *,
        service: str,
        cwd: Path,
        writable: Sequence[Path],
        readonly: Sequence[Path] = (),
        overlay: tuple[Path, Path, Path] | None = None,
    ) -> list[str]:
        """The command that runs ``argv`` in ``cwd`` for ``service``: writable only in
        ``writable`` (and, with ``overlay`` = (artifact, upper, work), in a copy-on-write view
        of the artifact), ``readonly`` visible. The caller prepares ownership with
        ``hand_over``."""
        argv = list(argv)
        if not self.enabled:
            if overlay is None:
                return argv
            return [*_launcher(), "--overlay", *map(str, overlay), "--chdir", str(cwd), "--", *argv]
        if self.root:
            ident = self.identity(service)
            assert ident is not None
            out = [*_launcher(), "--private-tmp"]
            if overlay is not None:
                out += ["--overlay", *map(str, overlay)]
            for h in self.hidden():
                out += ["--hide", h]
            for w in ([overlay[0]] if overlay is not None else []) + list(writable):
                out += ["--bind", str(w)]
            for r in [*readonly, *map(Path, self.exposed())]:
                out += ["--expose", str(r)]
            out += ["--user", f"{ident.uid}:{ident.gid}", "--bwrap", self._bwrap]
            return [*out, "--chdir", str(cwd), "--", *argv]
        ro = [str(p) for p in readonly] + self.exposed()
        if overlay is not None:
            ro.append(str(overlay[0]))  # no overlay without root: the artifact read-only
        return launch.bwrap_args(
            self._bwrap,
            writable=[str(w) for w in writable],
            readonly=ro,
            hide=self.hidden(),
            chdir=str(cwd),
            argv=argv,
        )

    def hand_over(self, service: str, *paths: Path) -> None:
        """Make ``paths`` (and everything below them) the service's own, so its sandboxed
        workload may write there (root only; a no-op otherwise)."""
        ident = self.identity(service)
        if ident is not None:
            for path in paths:
                chown_tree(path, ident.uid, ident.gid)

    def hand_over_dirs(self, service: str, path: Path) -> None:
        """Like ``hand_over`` but only for directories: files in them (hard links into a cache
        the server owns) stay the server's, so a workload may add files but not edit those."""
        ident = self.identity(service)
        if ident is not None:
            os.lchown(path, ident.uid, ident.gid)
            for root, dirs, _files in os.walk(path):
                for name in dirs:
                    os.lchown(os.path.join(root, name), ident.uid, ident.gid)

    def take_back(self, *paths: Path) -> None:
        """Give ``paths`` back to the server's own user once the workload is done with them (a
        sealed artifact or a cache entry must not stay writable by the service's uid)."""
        if self.enabled and self.root:
            for path in paths:
                chown_tree(path, os.geteuid(), os.getegid())

    def check(self) -> None:
        """Run ``true`` through the whole chain once; ``SandboxUnavailable`` if it fails."""
        if not self.enabled:
            return
        if shutil.which(self._bwrap) is None:
            raise SandboxUnavailable(
                f"cannot sandbox workloads: bubblewrap ({self.policy.bwrap}) is not installed; "
                "install it (apt-get install bubblewrap) or, only for a trusted local "
                "experiment, pass --insecure-no-sandbox"
            )
        self.policy.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.policy.data_dir, prefix="sandbox-check-") as d:
            work = Path(d) / "work"
            work.mkdir()
            self.hand_over(_CHECK_SERVICE, work)
            argv = ["/bin/sh", "-c", "echo ok > sandbox-ok"]
            cmd = self.command(argv, service=_CHECK_SERVICE, cwd=work, writable=[work])
            try:
                proc = subprocess.run(  # argv built here, never a shell
                    cmd, capture_output=True, timeout=30, env={"PATH": os.defpath}, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxUnavailable(f"cannot sandbox workloads: {exc}") from exc
            if proc.returncode != 0 or not (work / "sandbox-ok").is_file():
                why = proc.stderr.decode(errors="replace").strip()[-400:] or "no output"
                raise SandboxUnavailable(
                    f"cannot sandbox workloads: the check exited {proc.returncode} ({why}); "
                    "user namespaces may be disabled (sysctl user.max_user_namespaces) or "
                    "bubblewrap too old. Fix that, or only for a trusted local experiment pass "
                    "--insecure-no-sandbox"
                )


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """``lchown`` ``path`` and everything below it (never following a symlink out)."""
    os.lchown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _launcher() -> list[str]:
    # -I: the workload's PYTHON* variables and working directory must not change the launcher.
    # Run as a file with -S (no site, no runpy), not with -m: it needs only the standard
    # library, and that halved its start-up here (25 ms instead of 50 ms per replica start).
    return [sys.executable, "-I", "-S", launch.__file__]


def _unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
