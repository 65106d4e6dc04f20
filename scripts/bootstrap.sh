#!/usr/bin/env bash
# Sets up everything `make demo` / `make test` / `make bench` need on a fresh Debian machine:
# system packages (when missing and we may install them), then .venv from the lock file.
# Idempotent: a second run with nothing to do finishes in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages: git (sources), wrk (load generator), haproxy + nginx (router benchmark),
# docker.io + busybox-static (Docker builder/runtime tests), docker-registry (the CNCF
# Distribution server the registry tests push to), sqlite3 (inspecting the store),
# bubblewrap (the sandbox every build command and app replica runs in), postgresql (the HA
# control plane's store; tests run initdb/pg_ctl into a temporary directory, never the service),
# prometheus (+ promtool: the tests start their own server scraping Shipyard's /metrics, and
# check the example alert rules).
want=(git wrk haproxy nginx-light docker.io docker-registry busybox-static sqlite3 ca-certificates
  bubblewrap postgresql prometheus)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian packages enable their own services; Shipyard starts what it needs itself.
    for svc in nginx haproxy docker containerd docker-registry postgresql prometheus; do
      (command -v systemctl >/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1) || true
    done
  else
    echo "bootstrap: missing Debian packages (${missing[*]}); install them as root for the full suite" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.lock
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
