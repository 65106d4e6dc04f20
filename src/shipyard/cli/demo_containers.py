"""``shipyard demo --containers`` (``make demo-containers``): ``make demo``'s story on Docker
Engine. Called by ``cli.main.demo``; the story itself is ``cli.demo.run_demo``, given the
``Example`` built here.

What is container-specific lives here:

- an engine: ``DOCKER_HOST`` (or the default socket) when it answers, else one of our own
  (``runtime.docker_engine.ensure_engine``: dockerd with the vfs driver and no bridge, stopped at
  the end); its address goes to ``shipyard serve``, and so to its agent, as ``DOCKER_HOST``;
- the repository: the bundled ``hello-container`` example (a ``FROM scratch`` image of Debian's
  static busybox, whose httpd serves the hello example's behaviour: the version on ``/``,
  ``/health``, and the same files that make a release broken) plus ``/bin/busybox`` itself;
- after each deployment, the service's containers as the engine reports them: ID, image ID and
  the agent's labels (revision, replica, port), found by the ``dev.shipyard.service`` label;
- at the end, the containers of the demo's agent are removed: containers outlive an agent that
  stops cleanly (it adopts them when it starts again), and on an engine that was already
  running nothing else would remove them. An engine of our own goes with them.

``make_container_repo`` and ``BUSYBOX`` are shared with the container benchmark
(``bench/bench_containers.py``) and the tests (``tests/cli/test_demo_containers.py``).
"""

from __future__ import annotations

from pathlib import Path

import docker
import docker.errors
import requests
from rich.console import Console

from shipyard.cli.demo import Demo, Example, _example_repo, run_demo
from shipyard.cli.safe import shown
from shipyard.runtime.docker_engine import EngineUnavailable, ensure_engine

#: Debian's statically linked busybox (package busybox-static): the image's only binary.
BUSYBOX = Path("/bin/busybox")
#: The label the agent puts on every container of a service (agent/containers.py's LABELS).
SERVICE_LABEL = "dev.shipyard.service"
#: The labels shown per container (besides its image ID, checked against the artifact label).
SHOWN_LABELS = ("revision", "replica", "port")
#: The label naming the agent (its directory) that made a container.
AGENT_LABEL = "dev.shipyard.agent"


def make_container_repo(path: Path) -> Path:
    """A git repository holding the ``hello-container`` example at v1 on branch main, with
    ``/bin/busybox`` copied in as ``busybox`` (the Dockerfile's only binary). RuntimeError
    naming the package when there is no static busybox."""
    if not BUSYBOX.is_file():
        raise RuntimeError(
            f"{BUSYBOX} is missing: the container example needs Debian's busybox-static"
        )
    return _example_repo("hello-container", path, {"busybox": BUSYBOX})


def container_lines(address: str, service: str) -> list[str]:
    """One line per container of ``service`` on the engine at ``address``: short ID, status,
    image ID and the agent's labels. Never raises: an engine error is one line saying so."""
    try:
        client = docker.DockerClient(base_url=address)
    except docker.errors.DockerException as exc:
        return [f"(cannot list containers: {str(exc)[:200]})"]
    try:
        found = client.containers.list(all=True, filters={"label": f"{SERVICE_LABEL}={service}"})
        lines = []
        for c in found:
            labels = c.labels or {}
            image = str(c.attrs.get("Image", "?"))
            pinned = labels.get("dev.shipyard.artifact-digest") == image
            lines.append(
                f"{c.short_id} {c.status}: "
                + " ".join(f"{k}={labels.get('dev.shipyard.' + k, '?')}" for k in SHOWN_LABELS)
                + f", image {image[:19]}{' (= the signed artifact)' if pinned else ''}"
            )
        return lines or ["(no containers)"]
    except (docker.errors.DockerException, requests.RequestException) as exc:
        return [f"(cannot list containers: {str(exc)[:200]})"]
    finally:
        client.close()


def remove_containers(address: str, data_dir: Path) -> int:
    """Remove every container of the agents under ``data_dir`` (their ``dev.shipyard.agent``
    label is their directory) from the engine at ``address``; how many. Never raises."""
    try:
        client = docker.DockerClient(base_url=address)
    except docker.errors.DockerException:
        return 0
    removed = 0
    try:
        for c in client.containers.list(all=True, filters={"label": AGENT_LABEL}):
            agent = Path((c.labels or {}).get(AGENT_LABEL, "/"))
            if agent.is_relative_to(data_dir.resolve()):
                c.remove(force=True)
                removed += 1
    except (docker.errors.DockerException, requests.RequestException):
        pass
    finally:
        client.close()
    return removed


def run_container_demo(data_dir: Path | None, port: int, console: Console) -> int:
    """Make sure an engine answers (start one if need be), then run the story on containers;
    0 when every step met its goal."""
    say = console.print
    log = None
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        log = data_dir / "dockerd.log"
    try:
        with ensure_engine(log) as (address, started):
            say(
                f"[bold]0.[/bold] Docker Engine at {shown(address)} "
                + ("(started for this demo: vfs storage, host networking)" if started else "")
            )

            def show(_demo: Demo) -> None:
                for line in container_lines(address, "hello"):
                    say(f"      container {shown(line)}")

            def cleanup(demo: Demo) -> None:
                if not started:  # an engine of our own is stopped with everything on it
                    removed = remove_containers(address, demo.data_dir)
                    say(f"    removed the demo's {removed} container(s) from {shown(address)}")

            example = Example(
                "containers",
                make_container_repo,
                env={"DOCKER_HOST": address},
                show=show,
                unhealthy_after=3.0,
                cleanup=cleanup,
            )
            return run_demo(data_dir, port, console, example)
    except EngineUnavailable as exc:
        say(f"[red]no Docker Engine: {shown(str(exc), multiline=True)}[/red]")
        return 1
