"""A replica's app secrets on the agent (``RevisionSpec.secret_env`` / ``secret_files``, which
``orchestrator/artifacts.spec`` filled in from the control plane's sealed store).

Called by ``agent/supervisor.py`` for process replicas (``environment``, ``write``, ``masking``)
and by ``agent/containers.py`` for image replicas (``environment``, ``archive``); a hook's
one-off process (``agent/hooks.py``) gets the same through the same functions.

- Environment: ``secret_env`` after the manifest's ``[run] env``, before ``PORT`` and
  ``SHIPYARD_*`` (which still win); with files, ``SHIPYARD_SECRETS_DIR`` names their directory.
- Process replicas: the files are written into ``<run_dir>/<replica>/secrets`` (0700, each
  file 0400), handed to the service's uid when the agent sandboxes as root, exposed read-only
  in the sandbox; the run directory is made afresh at every process start and removed when the
  replica stops, so the files live exactly as long as the process that reads them.
- Image replicas: the same directory, ``/run/shipyard-secrets``, is copied into the created
  container before it starts (the engine's archive API; owned by the container's user: a
  numeric one as is, a name looked up in the image's own ``/etc/passwd``), so it works with an
  engine on another host as well; it lives in the container's writable layer
  until the container is removed. The environment is the container's (``docker inspect``
  shows it to whoever may talk to the engine, as for any container's environment).
- Output: ``masking`` adds the replica's own secret values to the agent's log mask, so a value
  the app prints reaches its log (and ``shipyard logs``) as ``[redacted]``.

The values are in ``state.json`` too (the agent restarts replicas from the specs it holds):
that file is 0600 in the agent's 0700 directory (``private_files.write_private``). Nothing here
logs a value: only names and file names are ever logged.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from shipyard.errors import RevisionStartFailed
from shipyard.logs import SecretMasker
from shipyard.runtime.base import RevisionSpec
from shipyard.sandbox import Sandbox

#: The variable naming the directory of a replica's secret files (set only when it has some).
DIR_ENV = "SHIPYARD_SECRETS_DIR"
#: Its name in a process replica's run directory.
DIR_NAME = "secrets"
#: Where an image replica finds them.
CONTAINER_DIR = "/run/shipyard-secrets"
#: What a file name may be (the manifest's ``[run] secret_files`` values): no path, no dotfile.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def environment(spec: RevisionSpec, directory: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(what goes after ``[run] env``, what goes with ``SHIPYARD_*``): the secret variables,
    and ``SHIPYARD_SECRETS_DIR`` = ``directory`` when the spec has secret files."""
    last = {DIR_ENV: directory} if spec.secret_files and directory is not None else {}
    return dict(spec.secret_env), last


def check_names(spec: RevisionSpec) -> None:
    """RevisionStartFailed for a file name that is not a plain name (it comes over the wire)."""
    for name in spec.secret_files:
        if not _FILE_NAME.fullmatch(name):
            raise RevisionStartFailed(
                f"revision {spec.revision}: secret file name {name[:130]!r} is not a plain file "
                "name (letters, digits, '_', '.', '-'; not starting with '.')"
            )


def write(directory: Path, spec: RevisionSpec, sandbox: Sandbox) -> None:
    """Write ``spec.secret_files`` into ``directory`` (made here, 0700; files 0400), then hand
    it to the service's uid (root agents; a no-op otherwise)."""
    check_names(spec)
    directory.mkdir(mode=0o700)
    for name, value in spec.secret_files.items():
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            os.write(fd, value.encode("utf-8"))
        finally:
            os.close(fd)
    sandbox.hand_over(spec.service, directory)


def archive(spec: RevisionSpec, owner: tuple[int, int]) -> bytes:
    """``CONTAINER_DIR`` with ``spec.secret_files`` in it, as a tar to extract at ``/``: the
    directory 0700, the files 0400, owned by ``owner`` (uid, gid). Its parents are not in it:
    the engine makes a missing one as it makes any, and an existing ``/run`` keeps its owner
    and mode."""
    check_names(spec)
    out = io.BytesIO()
    now = time.time()
    root = CONTAINER_DIR.strip("/")
    uid, gid = owner
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(root)
        info.type, info.mode, info.mtime, info.uid, info.gid = tarfile.DIRTYPE, 0o700, now, uid, gid
        tar.addfile(info)
        for name, value in spec.secret_files.items():
            data = value.encode("utf-8")
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o400, now, uid, gid
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def numeric_owner(user: str) -> tuple[int, int] | None:
    """A container's ``user`` as (uid, gid) when it is numeric (``1000``, ``65534:65534``);
    None for a name (``passwd_entry`` finds it in the image's ``/etc/passwd``)."""
    uid, _, gid = user.partition(":")
    if uid.isdigit() and (not gid or gid.isdigit()):
        return int(uid), int(gid or uid)
    return None


def tar_member_text(blob: bytes, name: str) -> str:
    """The text of the member called ``name`` (its base name) in the tar ``blob`` (what the
    engine's archive API answers); KeyError when there is none."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == name:
                data = tar.extractfile(member)
                if data is not None:
                    return data.read().decode("utf-8", errors="replace")
    raise KeyError(name)


def passwd_entry(passwd: str, user: str) -> tuple[int, int] | None:
    """(uid, gid) of ``user`` in an ``/etc/passwd`` text; None when it is not there."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user and fields[2].isdigit() and fields[3].isdigit():
            return int(fields[2]), int(fields[3])
    return None


def masking(mask: Callable[[str], str], spec: RevisionSpec) -> Callable[[str], str]:
    """``mask`` followed by masking ``spec``'s own secret values (every form ``SecretMasker``
    knows: the text, its lines, hex, base64); ``mask`` itself when it has none."""
    values = [v.encode("utf-8") for v in (*spec.secret_env.values(), *spec.secret_files.values())]
    if not values:
        return mask
    own = SecretMasker(values)

    def both(line: str) -> str:
        return own(mask(line))

    return both
