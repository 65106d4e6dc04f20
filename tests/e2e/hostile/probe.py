"""What a hostile repository tries, at build time (``python3 probe.py build``, from the build
command) and at run time (imported by ``app.py``): read the server's keys, tokens, database and
environment, and write its database and audit anchor. Paths come from ``targets.json``, which the
test writes into the repository. Each attempt's outcome is recorded; whatever it manages to read
is also *printed*, so the test sees whether a secret reached a log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def attempt(what: str, action) -> str:  # type: ignore[no-untyped-def]
    try:
        got = action()
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"
    print(f"{what}: {got!r}", flush=True)  # a leak would reach the log here
    return "LEAKED"


def environ_with(secret: str) -> list[str]:
    """Every /proc/<pid>/environ this process can read that holds ``secret`` (the server's and
    the agent's would, if the workload could see their processes)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if secret.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return found


def probe() -> dict[str, object]:
    targets = json.loads((HERE / "targets.json").read_text())
    data = Path(targets["data_dir"])
    report: dict[str, object] = {"uid": os.getuid()}
    for name in targets["secret_files"]:
        report[f"read {name}"] = attempt(name, lambda n=name: (data / n).read_bytes())
    report["list data dir"] = attempt("ls", lambda: sorted(os.listdir(data / "keys")))
    report["read database"] = attempt("db", lambda: (data / "shipyard.db").read_bytes()[:64])
    report["write database"] = attempt("db", lambda: (data / "shipyard.db").open("ab").write(b"x"))
    report["write audit anchor"] = attempt(
        "anchor", lambda: (data / "audit.head").write_text('{"seq": 1, "hash": "0"}')
    )
    report["environs with the server's secret"] = environ_with(targets["env_secret"])
    report["own environment has the secret"] = targets["env_secret"] in str(os.environ)
    return report


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(probe()))
