"""A virtualenv made by a build still works after the artifact moves (build/venvs.py).

Real ``python3 -m venv`` and real ``pip install`` of a wheel with a console script (written here,
so nothing comes from the network), then the script is run from where the artifact ended up."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from shipyard.build.base import BuildRequest
from shipyard.build.local import LocalBuilder, verify_artifact
from shipyard.build.venvs import find_venvs, interpreter_link, relocate, venv_bins
from shipyard.errors import BuildFailed

from .helpers import GitRepo

PYTHON = "/usr/bin/python3"
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
WHEEL = "hello_tool-1.0-py3-none-any.whl"

pytestmark = pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs /usr/bin/python3")


def write_wheel(directory: Path) -> Path:
    """A wheel of ``hello-tool`` 1.0 whose console script ``hello-tool`` prints its prefix."""
    files = {
        "hello_tool.py": "import sys\n\ndef main():\n    print('hello-tool in', sys.prefix)\n",
        "hello_tool-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-tool\n"
        "Version: 1.0\n",
        "hello_tool-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        "hello_tool-1.0.dist-info/entry_points.txt": "[console_scripts]\n"
        "hello-tool = hello_tool:main\n",
    }
    record = []
    for name, content in files.items():
        digest = hashlib.sha256(content.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(content.encode())}")
    record.append("hello_tool-1.0.dist-info/RECORD,,")
    files["hello_tool-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WHEEL
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def _run(argv: list[str]) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=CLEAN_ENV, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _make_venv(root: Path) -> Path:
    venv = root / ".venv"
    _run([PYTHON, "-m", "venv", "--without-pip", str(venv)])
    wheel = write_wheel(root / "wheels")
    _run([PYTHON, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
          "--no-index", str(wheel)])  # fmt: skip
    return venv


def test_console_scripts_run_after_the_tree_moves(tmp_path: Path) -> None:
    build = tmp_path / "builds" / "b-1234" / "src"
    venv = _make_venv(build)
    script = venv / "bin" / "hello-tool"
    assert script.read_text().startswith(f"#!{venv}/bin/python")  # what pip wrote
    # distlib's form for a long interpreter path, and a script that is not the venv's
    (venv / "bin" / "long-tool").write_text(
        f"#!/bin/sh\n'''exec' \"{venv}/bin/python\" \"$0\" \"$@\"\n' '''\n"
        "import hello_tool\nhello_tool.main()\n"
    )
    (venv / "bin" / "long-tool").chmod(0o755)
    (venv / "bin" / "other").write_text("#!/usr/bin/env python3\nprint('other')\n")
    (venv / "bin" / "other").chmod(0o755)
    # `pip install -e .` leaves the build path in a .pth file
    (build / "src").mkdir()
    (build / "src" / "editable_mod.py").write_text("WHERE = __file__\n")
    [site] = list(venv.glob("lib/python*/site-packages"))
    (site / "__editable__.app.pth").write_text(f"{build}/src\n")
    # a hard link into a cache: it must keep its content when the script is rewritten
    cache_copy = tmp_path / "cache-copy"
    os.link(script, cache_copy)
    original = cache_copy.read_bytes()

    done = relocate(build, old_roots=[build])

    assert sorted(done.scripts) == [".venv/bin/hello-tool", ".venv/bin/long-tool"]
    assert done.pth_files == [(site / "__editable__.app.pth").relative_to(build).as_posix()]
    assert cache_copy.read_bytes() == original
    assert (venv / "bin" / "other").read_text().startswith("#!/usr/bin/env python3")
    assert relocate(build, old_roots=[build]).scripts == []  # idempotent

    moved = tmp_path / "artifacts" / "sha256-abc"
    moved.parent.mkdir()
    shutil.move(build, moved)
    shutil.rmtree(tmp_path / "builds")
    new_venv = moved / ".venv"
    assert _run([str(new_venv / "bin/hello-tool")]).strip() == f"hello-tool in {new_venv}"
    assert _run([str(new_venv / "bin/long-tool")]).strip() == f"hello-tool in {new_venv}"
    where = _run([str(new_venv / "bin/python"), "-c", "import editable_mod as m; print(m.WHERE)"])
    assert where.strip() == str(moved / "src" / "editable_mod.py")


def test_finding_venvs(tmp_path: Path) -> None:
    for rel in (".venv", "app/venv", "a/b/too-deep"):
        (tmp_path / rel / "bin").mkdir(parents=True)
        (tmp_path / rel / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "not-a-venv" / "bin").mkdir(parents=True)
    assert find_venvs(tmp_path) == [tmp_path / ".venv", tmp_path / "app/venv"]
    assert venv_bins(tmp_path) == [tmp_path / ".venv" / "bin"]


def test_interpreter_links(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "python3").symlink_to(PYTHON)
    (venv / "bin" / "python3.99").symlink_to("/nonexistent/python3.99")
    (tmp_path / "leak").symlink_to("/etc/passwd")
    assert interpreter_link(venv / "bin" / "python3", tmp_path) == "ok"
    assert interpreter_link(tmp_path / "leak", tmp_path) is None
    refusal = interpreter_link(venv / "bin" / "python3.99", tmp_path)
    assert refusal is not None
    assert "/nonexistent/python3.99" in refusal and "python3 -m venv --copies .venv" in refusal


@pytest.mark.parametrize("step", ["command", "dependencies"])
async def test_a_build_made_venv_runs_from_the_artifact(
    repo: GitRepo, data_dir: Path, step: str
) -> None:
    """The dependency step's venv is cached and copied into later builds: both paths move."""
    write_wheel(repo.path / "wheels")
    make = (
        "python3 -m venv --without-pip .venv && "
        "python3 -m pip --python .venv/bin/python install -q --no-index wheels/" + WHEEL
    )
    extra = 'cache_key_files = ["wheels/*"]\n' if step == "dependencies" else ""
    repo.write(
        "shipyard.toml",
        f'[service]\nname = "hello"\n[build]\nshell = true\n{extra}{step} = "{make}"\n'
        '[run]\ncommand = "hello-tool"\n',
    )
    first = repo.commit("a venv")
    builder = LocalBuilder(data_dir)
    lines: list[str] = []
    artifact = await builder.build(BuildRequest(repo.source(first), log_sink=lines.append))
    assert any("relocatable" in line and ".venv/bin/hello-tool" in line for line in lines)

    location = Path(artifact.location)
    script = location / ".venv" / "bin" / "hello-tool"
    assert script.read_text().startswith("#!/bin/sh\n")
    assert str(data_dir / "builds") not in script.read_text()
    assert _run([str(script)]).strip() == f"hello-tool in {location / '.venv'}"
    assert os.readlink(location / ".venv" / "bin" / "python3") == PYTHON
    verify_artifact(location, artifact.digest)

    if step == "dependencies":  # a source-only change: the cached venv, hard-linked in
        repo.write("app.py", "print('changed')\n")
        second = await builder.build(BuildRequest(repo.source(repo.commit("source only"))))
        assert second.cache.dependencies_hit is True
        again = Path(second.location) / ".venv"
        assert _run([str(again / "bin" / "hello-tool")]).strip() == f"hello-tool in {again}"


async def test_a_venv_whose_interpreter_is_missing_fails_with_how_to_fix(
    repo: GitRepo, data_dir: Path
) -> None:
    repo.write(
        "shipyard.toml",
        '[service]\nname = "hello"\n[build]\nshell = true\ncommand = "mkdir -p .venv/bin && '
        "echo 'home = /opt/gone' > .venv/pyvenv.cfg && "
        'ln -s /opt/gone/python3 .venv/bin/python3"\n[run]\ncommand = "python3 app.py"\n',
    )
    commit = repo.commit("broken venv")
    with pytest.raises(BuildFailed) as exc:
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert "links to /opt/gone/python3" in exc.value.message
    assert "python3 -m venv --copies .venv" in exc.value.message
