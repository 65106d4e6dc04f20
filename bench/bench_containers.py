"""Blue-green of a container service on Docker Engine, measured on the real thing.

Makes sure an engine answers (``runtime.docker_engine.ensure_engine``: ``DOCKER_HOST`` or the
default socket, else dockerd of our own: vfs storage, no bridge, host networking), starts
``shipyard serve`` (and its agent) with that engine, and deploys the ``hello-container`` example
(``FROM scratch`` + Debian's static busybox httpd; a good release serves ``/`` and
``/health`` as static files), then:

- runs wrk through the service URL across several blue-green switches, each old container
  drained and stopped while the load runs: failed requests (non-2xx + socket errors) must be 0;
- for each switch, the time from "image ready" (the ``scan`` stage done: built, scanned and
  signed) to "traffic switched" (the stage that put the candidate at 100% done), beside the
  physical floor measured in the same run, alternating with the deployments: ``docker run`` of
  the same image, the way the agent runs it (host network, ``PORT``, nobody, no capabilities),
  until its ``/health`` answers 200;
- deploys broken releases whose health check fails during the bake window and reports the time
  from the unhealthy verdict to 100% of traffic back on the previous revision
  (``detection_to_rollback_ms``, measured by the orchestrator through the router).
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx
from rich.console import Console

import wrk_load
from shipyard.cli.demo import Demo, _git, commit_version
from shipyard.cli.demo_containers import make_container_repo, remove_containers
from shipyard.runtime.docker_engine import ensure_engine

SWITCHES = 4
BROKEN_RELEASES = 3
#: Seconds after its start a broken release's /health starts failing: past the health gate
#: (a container takes a second or more to start on the vfs driver), inside the bake window.
UNHEALTHY_AFTER = 3.0
#: wrk runs until stopped (SIGINT makes it print its report): builds' length is not known ahead.
WRK_SECONDS = 3600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def ready_to_switched_ms(doc: dict[str, Any]) -> int:
    """From the ``scan`` stage's end (the image built, scanned and signed) to the end of the
    first stage that put the candidate at 100% (the switch), from the deployment's stages."""
    stages = doc["stages"]
    ready = next(s for s in stages if s["name"] == "scan" and s["status"] == "succeeded")
    switched = next(
        s
        for s in stages
        if (s.get("detail") or {}).get("candidate_weight") == 100 and s["status"] == "succeeded"
    )
    return int((_when(switched["finished_at"]) - _when(ready["finished_at"])).total_seconds() * 1e3)


def floor_ms(client: docker.DockerClient, image: str) -> int:
    """``docker run`` of ``image`` as the agent runs it, until ``/health`` answers 200."""
    port = _free_port()
    started = time.monotonic()
    container = client.containers.run(
        image,
        detach=True,
        network_mode="host",
        environment={"PORT": str(port)},
        user="65534:65534",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        mem_limit="64m",
        nano_cpus=10**9,
    )
    try:
        deadline = started + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return int((time.monotonic() - started) * 1000)
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{image} did not answer /health within 60 s")
            time.sleep(0.01)
    finally:
        container.remove(force=True)


def _stats(values: list[int]) -> str:
    return f"median {statistics.median(values):.0f} ms, max {max(values)} ms"


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-"))
    with ensure_engine() as (address, started):
        client = docker.DockerClient(base_url=address)
        demo = Demo(
            root / "data", 0, Console(stderr=True, quiet=True), env={"DOCKER_HOST": address}
        )
        demo.data_dir.mkdir(parents=True)
        try:
            demo.start_server()
            repo = make_container_repo(root / "repo")
            first = demo.deploy(repo, _git(repo, "rev-parse", "HEAD"), bake=0)
            assert first["status"] == "Success", first.get("error")
            url = first["result"]["url"]

            load = wrk_load.start(url, seconds=WRK_SECONDS)
            time.sleep(2)
            statuses: list[str] = []
            switch_ms: list[int] = []
            floors: list[int] = []
            t0 = time.monotonic()
            for i in range(SWITCHES):
                commit = commit_version(repo, f"v{i + 2}")
                doc = demo.deploy(repo, commit, bake=1, switch_delay=0)
                statuses.append(doc["status"])
                if doc["status"] == "Success":
                    switch_ms.append(ready_to_switched_ms(doc))
                # The floor, alternating with the deployments, of the image just deployed.
                floors.append(floor_ms(client, f"shipyard/hello:{commit[:12]}"))
                time.sleep(3)  # the old container's warm window (2 s) ends: stopped under load
            switching_s = time.monotonic() - t0
            load.send_signal(signal.SIGINT)
            out, _ = load.communicate(timeout=60)
            requests, non2xx, sock, rps = wrk_load.parse(out)

            rollbacks: list[int] = []
            for i in range(BROKEN_RELEASES):
                commit = commit_version(repo, f"broken-{i}", unhealthy_after=UNHEALTHY_AFTER)
                doc = demo.deploy(repo, commit, bake=10)
                took = doc["metrics"].get("detection_to_rollback_ms")
                if doc["status"] != "RolledBack" or took is None:
                    stages = [(s["name"], s["status"]) for s in doc["stages"]]
                    raise RuntimeError(
                        f"broken release ended {doc['status']} (stages {stages}, rollback "
                        f"{took} ms): {doc.get('error')}"
                    )
                rollbacks.append(int(took))
                commit_version(repo, f"fixed-{i}")  # keep the next broken commit distinct
        finally:
            demo.stop()
            if not started:  # an engine of our own is stopped with everything on it
                remove_containers(address, demo.data_dir)
            client.close()
            shutil.rmtree(root, ignore_errors=True)

    if not switch_ms:
        raise RuntimeError(f"no blue-green deployment succeeded: {statuses}")
    ok = all(s == "Success" for s in statuses) and non2xx == 0 and sock == 0
    engine = "dockerd started by the bench" if started else "the engine at DOCKER_HOST"
    return (
        "## Containers: blue-green on Docker Engine\n\n"
        "`bench/bench_containers.py`: `shipyard serve` + agent running the `hello-container` "
        f"example as containers on Docker Engine ({engine}: vfs storage driver, host "
        "networking; a `FROM scratch` image of Debian's static busybox, `httpd` serving `/` and "
        "`/health` as static files), wrk `-t2 -c32` through the service URL across "
        f"{SWITCHES} blue-green switches ({switching_s:.0f} s, image builds included), each old "
        "container drained and stopped while the load ran.\n\n"
        "| requests made | non-2xx | socket errors | failed | requests/s | deployments |\n"
        "|---:|---:|---:|---:|---:|---|\n"
        f"| {requests} | {non2xx} | {sock} | **{non2xx + sock}** | {rps} | "
        f"{', '.join(statuses)} |\n\n"
        f"Zero downtime: {'**met**' if ok else '**NOT met**'} (target: 0 failed requests).\n\n"
        "Image ready (built, scanned, signed) -> traffic switched to the new container, from the "
        f"deployments' stage timestamps: {_stats(switch_ms)} ({len(switch_ms)} switches). "
        "Physical floor in the same run, alternating with the deployments: `docker run` of the "
        "same image (host network, `PORT`, nobody, no capabilities) until `/health` answers "
        f"200: {_stats(floors)} ({len(floors)} runs). The difference is the agent's work: "
        "image ID and signature check, container create/start, the health gate "
        "(`success_threshold = 2` at 0.2 s) and the verified switch.\n\n"
        f"Rollback, {BROKEN_RELEASES} broken releases (health check failing "
        f"{UNHEALTHY_AFTER:.0f} s after start, during the bake window): time from the "
        "unhealthy verdict to 100% of traffic back on the "
        f"previous container, verified through the router: min {min(rollbacks)} ms, "
        f"{_stats(rollbacks)} (ADR target 30 000 ms).\n"
    )


if __name__ == "__main__":
    print(main())
