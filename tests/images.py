"""Container images for tests, built without any registry: a Python base image assembled from this
host's own Python, and app images built on it through the test session's Docker Engine.

Nothing can be pulled here, so ``python_base_image`` (a session fixture, with ``docker_engine``
from tests/docker_engine.py) puts together a root filesystem from the host:

- ``/usr/bin/python3.11`` (also as ``python3`` and ``python``) and every shared library it and
  its extension modules (``lib-dynload``) need, found with ``ldd``, with the dynamic loader;
- ``/usr/lib/python3.11`` without what no app needs (``test/``, ``idlelib``, ``tkinter``,
  ``lib2to3``, ``ensurepip``, ``config-*`` with its 25 MB static library, ``__pycache__``,
  Debian's ``EXTERNALLY-MANAGED`` marker so pip installs);
- pip, copied from the virtualenv running the tests into ``/usr/local/lib/python3.11/dist-
  packages`` (on Debian's Python's path), so an app image can ``RUN python3 -m pip install
  --no-index --find-links /wheels ...``;
- ``/bin/busybox`` (Debian's static one) as ``/bin/sh`` and its usual applets;
- ``/etc/passwd`` and ``/etc/group`` with ``root`` and a non-root ``app`` (uid/gid 1000, home
  ``/home/app``), and ``/tmp`` (mode 1777).

The base image has no ``USER``: an app image says ``USER app`` after its ``RUN`` steps
(``app_dockerfile`` does). It is imported as one layer (``POST /images/create?fromSrc``, no
build) and tagged ``shipyard-test/python:3.11`` and ``shipyard-test/python:3.11-<inputs hash>``;
the hash covers the names, sizes and mtimes of every input, so a session (or a later one on an
engine that kept its images) reuses it instead of importing it again.

``build_image(client, directory, tag)`` builds any directory with a Dockerfile through the
engine and returns the image ID; ``build_app_image`` writes the Dockerfile for a Python app
first. Used by tests/agent/test_containers.py and the runtime contract suite's ``docker``
harness; meant for the end-to-end container tests too.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
BUSYBOX = Path("/bin/busybox")
BASE_REPOSITORY = "shipyard-test/python"
BASE_TAG = f"{BASE_REPOSITORY}:3.11"
#: The non-root user of the base image (``USER app``).
APP_USER = "app"
APP_UID = 1000
#: Left out of the standard library: tests, GUI, the build configuration, bytecode caches.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
               "pydoc_data", "__pycache__", "EXTERNALLY-MANAGED"}  # fmt: skip
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "env", "sleep", "id", "mkdir", "rm", "cp", "true",
                   "false", "wget", "ps", "kill", "grep", "printf", "test", "[")  # fmt: skip
INPUTS_LABEL = "dev.shipyard.test.inputs"
#: Extension modules left out: test modules, and ones that would bring large libraries no web
#: app needs (Berkeley DB, NIS/Kerberos, curses, readline, audio).
DYNLOAD_SKIP = ("_test", "_ctypes_test", "xxlimited", "_xx", "_dbm", "nis", "_curses",
                "readline", "audioop", "ossaudiodev")  # fmt: skip


def _pip_dir() -> Path:
    import pip

    return Path(pip.__file__).parent


def _files(root: Path, skip: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("config-"))
        for name in sorted(filenames):
            if name not in skip:
                yield Path(dirpath, name)


def _shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    """Every library ``ldd`` resolves for ``binaries`` (the loader included)."""
    libs: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=False
        ).stdout
        for line in out.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                libs.add(Path(match.group(1)))
    return libs


def rootfs_inputs() -> list[tuple[str, Path]]:
    """``(path in the image, host file)`` of every file of the base image (see module doc)."""
    for needed in (PYTHON, STDLIB, BUSYBOX):
        if not needed.exists():
            pytest.fail(f"the container tests build their Python image from {needed}")
    stdlib = [
        p
        for p in _files(STDLIB, STDLIB_SKIP)
        if not (p.parent.name == "lib-dynload" and p.name.startswith(DYNLOAD_SKIP))
    ]
    dynload = [p for p in stdlib if p.suffix == ".so"]
    entries = [(str(PYTHON), PYTHON)]
    entries += [(str(p), p) for p in stdlib]
    entries += [(str(lib), lib) for lib in sorted(_shared_libraries([PYTHON, *dynload]))]
    pip = _pip_dir()
    target = "/usr/local/lib/python3.11/dist-packages/pip"
    entries += [(f"{target}/{p.relative_to(pip)}", p) for p in _files(pip, {"__pycache__"})]
    entries.append(("/bin/busybox", BUSYBOX))
    return entries


def inputs_hash(entries: list[tuple[str, Path]]) -> str:
    """Names, sizes and mtimes of the inputs (cheap; a changed file changes its mtime)."""
    h = hashlib.sha256(b"shipyard-test-python-2\n")
    for name, path in entries:
        st = path.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _rootfs_tar(entries: list[tuple[str, Path]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def directory(name: str, mode: int = 0o755, uid: int = 0) -> None:
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
            tar.addfile(info)

        def text(name: str, content: str) -> None:
            data = content.encode()
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        def link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)

        for d in ("/bin", "/etc", "/usr", "/usr/bin", "/home", "/app", "/root"):
            directory(d)
        directory("/tmp", 0o1777)
        directory(f"/home/{APP_USER}", 0o755, APP_UID)
        # Every parent directory explicitly: the engine creates missing ones with mode 0600, which
        # no user but root could enter.
        made = {"/bin", "/etc", "/usr", "/usr/bin", "/home", "/app", "/root", "/tmp"}
        for name, _ in entries:
            parents = list(Path(name).parents)[:-1]  # without "/"
            for parent in reversed(parents):
                if str(parent) not in made:
                    made.add(str(parent))
                    directory(str(parent))
        seen: set[str] = set()
        for name, path in entries:
            if name in seen:
                continue
            seen.add(name)
            info = tar.gettarinfo(str(path.resolve()), arcname=name.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)
        for applet in BUSYBOX_APPLETS:
            link(f"/bin/{applet}", "busybox")
        link("/usr/bin/python3", "python3.11")
        link("/usr/bin/python", "python3.11")
        text(
            "/etc/passwd",
            f"root:x:0:0:root:/root:/bin/sh\n"
            f"{APP_USER}:x:{APP_UID}:{APP_UID}:app:/home/{APP_USER}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        text("/etc/group", f"root:x:0:\n{APP_USER}:x:{APP_UID}:\nnogroup:x:65534:\n")
    return buf.getvalue()


def ensure_python_base(client: docker.DockerClient) -> str:
    """The base image's ID, imported into the engine unless it holds the same inputs already."""
    entries = rootfs_inputs()
    digest = inputs_hash(entries)
    hashed = f"{BASE_TAG}-{digest}"
    try:
        image = client.images.get(hashed)
    except docker.errors.ImageNotFound:
        client.api.import_image_from_data(
            _rootfs_tar(entries),
            repository=BASE_REPOSITORY,
            tag=f"3.11-{digest}",
            changes=[
                "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                "ENV LANG=C.UTF-8",
                "ENV PYTHONDONTWRITEBYTECODE=1",
                f"LABEL {INPUTS_LABEL}={digest}",
                'CMD ["python3"]',
            ],
        )
        image = client.images.get(hashed)
    image.tag(BASE_REPOSITORY, "3.11")
    return str(image.id)


@pytest.fixture(scope="session")
def python_base_image(docker_engine: str) -> Iterator[str]:
    """``shipyard-test/python:3.11`` in the session's engine (imported once); yields its ID."""
    client = docker.DockerClient(base_url=docker_engine)
    try:
        yield ensure_python_base(client)
    finally:
        client.close()


def build_image(client: docker.DockerClient, directory: Path, tag: str) -> str:
    """Build ``directory`` (it holds a Dockerfile) through the engine as ``tag``; the image ID.
    A failed build fails the test with the build's output."""
    try:
        image, _ = client.images.build(path=str(directory), tag=tag, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        output = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
        pytest.fail(f"building {tag} from {directory} failed: {exc}\n{output[-3000:]}")
    return str(image.id)


def app_dockerfile(command: list[str] | None, *, extra: str = "") -> str:
    """A Dockerfile for a Python app in the build context's ``app/`` directory, on the base
    image, run as ``app``; ``command`` becomes its CMD (None: the base's)."""
    lines = [f"FROM {BASE_TAG}", "COPY app/ /app/", "WORKDIR /app"]
    if extra:
        lines.append(extra)
    lines.append(f"USER {APP_USER}")
    if command is not None:
        lines.append("CMD [" + ", ".join(f'"{c}"' for c in command) + "]")
    return "\n".join(lines) + "\n"


def build_app_image(
    client: docker.DockerClient,
    context: Path,
    files: dict[str, str],
    tag: str,
    *,
    command: list[str] | None = None,
    extra: str = "",
) -> str:
    """Write ``files`` (name -> text) into ``context/app/`` and a Dockerfile beside it, build
    it on ``shipyard-test/python:3.11`` (the ``python_base_image`` fixture must have run) as
    ``tag``; the image ID."""
    app = context / "app"
    app.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (app / name).write_text(content)
    (context / "Dockerfile").write_text(app_dockerfile(command, extra=extra))
    return build_image(client, context, tag)


if __name__ == "__main__":  # a quick look: python -m tests.images prints the inputs' size
    found = rootfs_inputs()
    total = sum(p.stat().st_size for _, p in found)
    print(f"{len(found)} files, {total / 1e6:.1f} MB, inputs {inputs_hash(found)}", file=sys.stderr)
