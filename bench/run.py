"""`make bench`: runs every bench/bench_*.py module's ``main()`` and writes BENCHMARKS.md.

Each module's ``main() -> str`` measures (starting whatever it needs: nginx, HAProxy, wrk, the
agent) and returns a Markdown section. This runner adds the machine and the command, so every
number in BENCHMARKS.md says where and how it was produced. ``python bench/run.py router`` runs
only bench_router.py.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernel = platform.release()
    py = platform.python_version()
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {kernel}, Python {py}"


def main(argv: list[str]) -> int:
    only = set(argv)
    sys.path.insert(0, str(ROOT / "bench"))  # shared helpers such as wrk_load.py
    modules = sorted((ROOT / "bench").glob("bench_*.py"))
    sections: list[str] = []
    failed = 0
    for path in modules:
        name = path.stem.removeprefix("bench_")
        if only and name not in only:
            continue
        print(f"== bench {name}", flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        try:
            spec.loader.exec_module(mod)
            sections.append(mod.main())
        except Exception as exc:  # a failing bench is reported, the others still run
            failed += 1
            sections.append(f"## {name}\n\nFAILED: {type(exc).__name__}: {exc}\n")
            print(f"bench {name} failed: {exc!r}", file=sys.stderr)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    # the SHIPYARD_BENCH_* settings (baseline, rounds) belong to the command that made the numbers
    settings = "".join(
        f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("SHIPYARD_BENCH_")
    )
    args = "".join(" " + a for a in argv)
    header = (
        f"# Benchmarks\n\nProduced by `make bench` (`{settings}python bench/run.py{args}`"
        + f") on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit or 'uncommitted'}.\n\n"
        f"Machine: {machine()}. The machine is shared; numbers vary run to run, so each "
        "comparison alternates its contenders in the same run.\n\n"
    )
    out = ROOT / "BENCHMARKS.md"
    if only and out.exists():
        # Partial run: replace only the sections that ran, keep the others.
        text = out.read_text()
        stamp = (
            f"\n_This section was re-run alone (`{settings}python bench/run.py{args}`) on "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit or 'uncommitted'}, "
            f"on {machine()}._\n"
        )
        for sec in (sec.rstrip() + "\n" + stamp for sec in sections):
            title = sec.splitlines()[0]
            start = text.find(title)
            if start == -1:
                text += "\n" + sec
            else:
                end = text.find("\n## ", start + 1)
                text = text[:start] + sec.rstrip() + "\n" + (text[end:] if end != -1 else "")
        out.write_text(text)
    else:
        out.write_text(header + "\n".join(sections))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
