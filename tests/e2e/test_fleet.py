"""Issue 13's checks, end to end: three agents joined from outside ``serve`` over mutual TLS and
one deployment across all of them in lockstep (``tests/e2e/fleet.py`` starts the fleet).

One fleet (``shipyard serve --fleet-listen`` and three ``shipyard agent --join`` processes on
127.0.0.2-4, regions eu-west, us-east, ap-south) is shared by the module; each test deploys its
own service (the ``notes`` Flask example, its dependencies installed from PyPI by the build and
fetched by every agent with the artifact), so the tests do not depend on each other's order:

- a fleet blue-green with the three service URLs polled continuously: every region switches,
  not one request fails, the skew between the first and the last region answering with the new
  version is measured from outside and the deployment's recorded ``switch_skew_ms`` is there;
- a fleet canary whose candidate is broken in us-east only (``broken_region.txt``: the replica
  whose ``SHIPYARD_REGION`` is us-east answers 500, ``/health`` included): every region rolls
  back, none ever serves the candidate (the barrier before the first traffic change never
  opens), and the deployment ends RolledBack naming us-east;
- ap-south's agent SIGSTOPped while the fleet waits to switch: the deployment never reaches
  Success, no region serves the candidate at the end, and after SIGCONT ap-south converges
  (stable serving, candidate stopped);
- a removed region's agent refused by the control plane, a plain-HTTP client refused by an
  agent's API and by the fleet listener, a TLS client without a certificate or with one from
  another CA refused by an agent.

Region names are long enough never to appear by accident in an error message.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shipyard.cli.demo import _git, commit_version, make_notes_repo, set_replicas
from shipyard.cli.demo_fleet import agent_host
from tests.e2e.fleet import Fleet, region_states
from tests.e2e.support import Recorder, wait_for_state, wait_until

REGIONS = ["eu-west", "us-east", "ap-south"]
#: Answers a window must hold before it is judged: proof that load reached that state.
SEEN = 20
#: The ADR's bound on the lag between regions ("<5 second lag"); the issue's goal is 100 ms,
#: measured by bench/bench_fleet.py, not asserted here on a shared machine.
ADR_SKEW_BOUND_S = 5.0
#: [fleet] region_timeout_seconds of the partition test's service: how long the fleet waits at
#: a barrier for the stopped region before rolling back. Also how long a healthy region may take
#: for one step (a start fetches and verifies the artifact): 5 s was too short for a region on two
#: cores shared with three other test workers, which then rolled back before the stop.
REGION_TIMEOUT_S = 20
FAST_ANALYSIS = {"interval_seconds": 1, "min_requests": 10}
#: The module's fleet (serve + three agents) starts inside the first test's time, and the first
#: build installs flask and gunicorn from PyPI.
# One worker runs the module (tests/conftest.py ONE_WORKER_MODULES): its fleet (a control plane
# and three joined agents) is started once, not once per worker that picks one of its tests.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), REGIONS).start()
    try:
        yield f
    finally:
        f.stop()


def notes_repo(path: Path, service: str, *, region_timeout: int | None = None) -> Path:
    """The notes example as ``service`` with one replica per region (three regions, two
    revisions each, on two shared cores), optionally with ``[fleet] region_timeout_seconds``;
    committed as v1."""
    repo = make_notes_repo(path)
    toml = repo / "shipyard.toml"
    toml.write_text(toml.read_text().replace('name = "notes"', f'name = "{service}"', 1))
    set_replicas(repo, 1)
    if region_timeout is not None:
        toml.write_text(
            toml.read_text() + f"\n[fleet]\nregion_timeout_seconds = {region_timeout}\n"
        )
    commit_version(repo, "v1")
    return repo


def blue_green(**params: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": 1,
            "scale_down_delay_seconds": 1,
            **params,
        }
    }


def deploy_v1(fleet: Fleet, repo: Path, service: str) -> dict[str, Any]:
    """The service's first deployment, everywhere at once; every region answers v1."""
    dep = fleet.wait_final(
        fleet.deploy(repo, _git(repo, "rev-parse", "HEAD"), service, blue_green())
    )
    assert dep["status"] == "Success", f"v1 of {service}: {dep['status']} {dep.get('error')}"
    for region, url in fleet.urls(service).items():
        assert httpx.get(url, timeout=10).text == "notes v1\n", region
    return dep


def running_revisions(fleet: Fleet, service: str, region: str) -> set[str]:
    return {r["revision"] for r in fleet.service(service, region)["replicas"]}


def assert_region_serves(
    fleet: Fleet, service: str, region: str, revision: str, version: str
) -> None:
    """``region`` serves ``revision`` only: 100% on it, the candidate stopped, its URL
    answers ``version`` (waits for the candidate's replicas to be gone)."""
    svc = wait_for_state(
        lambda: fleet.service(service, region),
        lambda s: {r["revision"] for r in s["replicas"]} == {revision},
        120,
        f"{region} to run only {revision}",
    )
    assert svc["weights"] == {revision: 100}, f"{region}: weights {svc['weights']}"
    assert svc["serving_revision"] == revision, f"{region}: {svc}"
    assert httpx.get(svc["url"], timeout=10).text == f"notes {version}\n", region


def first_answer(rec: Recorder, body: str) -> float:
    """When ``rec``'s URL first answered ``body`` (the answer's arrival, time.monotonic())."""
    times = [a.done for a in rec.answers() if a.ok and a.body == body]
    assert times, f"{rec.host}:{rec.port} never answered {body!r}: {dict(rec.bodies())}"
    return min(times)


def test_fleet_blue_green_switches_every_region_in_lockstep_without_a_failed_request(
    fleet: Fleet, tmp_path: Path
) -> None:
    service = "notes-bg"
    repo = notes_repo(tmp_path / "repo", service)
    d1 = deploy_v1(fleet, repo, service)
    r1 = d1["green_revision"]
    urls = fleet.urls(service)
    for i, region in enumerate(REGIONS):  # each region's service listens on its agent's host
        assert httpx.URL(urls[region]).host == agent_host(i), urls

    recorders = {region: Recorder(url, connections=2).start() for region, url in urls.items()}
    try:
        before = min(rec.step("v1") for rec in recorders.values())
        for region, rec in recorders.items():
            wait_until(
                lambda rec=rec: len(rec.answers(since=before)) >= SEEN, 60, f"load on {region}"
            )
        d2 = fleet.wait_final(fleet.deploy(repo, commit_version(repo, "v2"), service, blue_green()))
        assert d2["status"] == "Success", f"v2: {d2['status']} {d2.get('error')}"
        r2 = d2["green_revision"]
        assert d2["blue_revision"] == r1
        after = min(rec.step("v2 serving") for rec in recorders.values())
        for region, rec in recorders.items():
            wait_until(
                lambda rec=rec: rec.bodies(since=after)["notes v2"] >= SEEN,
                60,
                f"load on {region} after the switch",
            )
    finally:
        for rec in recorders.values():
            rec.stop()

    for region, rec in recorders.items():
        assert not rec.failures(), f"{region}: {rec.describe_failures()}"
        assert set(rec.bodies(since=after)) == {"notes v2"}, f"{region}: {rec.bodies(since=after)}"
    # Each region switched once and for good: no request sent after its first v2 answer arrived
    # was answered by v1.
    switched = {region: first_answer(rec, "notes v2") for region, rec in recorders.items()}
    for region, rec in recorders.items():
        late_v1 = [a for a in rec.answers(since=switched[region]) if a.body == "notes v1"]
        assert not late_v1, f"{region} answered v1 after it had switched: {late_v1[:3]}"
    skew_s = max(switched.values()) - min(switched.values())
    recorded = d2["result"].get("switch_skew_ms")
    print(f"switch skew measured from outside: {skew_s * 1000:.1f} ms; recorded: {recorded} ms")
    assert isinstance(recorded, int | float) and recorded >= 0, d2["result"]
    assert skew_s <= ADR_SKEW_BOUND_S, f"regions switched {skew_s:.2f} s apart: {switched}"

    assert region_states(d2) == dict.fromkeys(REGIONS, "switched"), d2.get("fleet")
    for region in REGIONS:
        svc = fleet.service(service, region)
        assert svc["serving_revision"] == r2, f"{region}: {svc}"
        assert svc["weights"] == {r2: 100}, f"{region}: {svc['weights']}"


def test_fleet_canary_broken_in_one_region_rolls_back_every_region(
    fleet: Fleet, tmp_path: Path
) -> None:
    service = "notes-canary"
    broken = "us-east"
    repo = notes_repo(tmp_path / "repo", service)
    r1 = deploy_v1(fleet, repo, service)["green_revision"]
    recorders = {
        region: Recorder(url, connections=2).start() for region, url in fleet.urls(service).items()
    }
    try:
        canary = {
            "Canary": {
                "stages": [{"weight": 50, "duration_seconds": 2, "analysis": FAST_ANALYSIS}],
                "scale_down_delay_seconds": 1,
            }
        }
        v2 = commit_version(repo, "v2", broken_region=broken)
        dep = fleet.wait_final(fleet.deploy(repo, v2, service, canary))
        for region in REGIONS:
            assert_region_serves(fleet, service, region, r1, "v1")
        after = min(rec.step("after the rollback") for rec in recorders.values())
        for region, rec in recorders.items():
            wait_until(lambda rec=rec: len(rec.answers(since=after)) >= SEEN, 60, region)
    finally:
        for rec in recorders.values():
            rec.stop()

    assert dep["status"] == "RolledBack", f"{dep['status']}: {dep.get('error')}"
    assert "Success" not in dep["seen_statuses"], dep["seen_statuses"]
    message = str((dep.get("error") or {}).get("message", ""))
    assert broken in message, f"the error does not name {broken}: {dep.get('error')}"
    assert region_states(dep) == dict.fromkeys(REGIONS, "rolled_back"), dep.get("fleet")
    for region, rec in recorders.items():
        # The candidate never took traffic anywhere: the barrier before the first weight change
        # waits for every region's health gate, and us-east's never passes.
        assert "notes v2" not in rec.bodies(), f"{region} served the candidate: {rec.bodies()}"
        assert not rec.failures(), f"{region}: {rec.describe_failures()}"


def test_fleet_deployment_with_a_stopped_agent_rolls_back_and_the_region_converges(
    fleet: Fleet, tmp_path: Path
) -> None:
    service = "notes-partition"
    stopped = "ap-south"
    agent = fleet.agents[stopped]
    repo = notes_repo(tmp_path / "repo", service, region_timeout=REGION_TIMEOUT_S)
    r1 = deploy_v1(fleet, repo, service)["green_revision"]
    urls = fleet.urls(service)

    # The fleet waits switch_delay_seconds before the switch, with the candidate healthy in
    # every region: ap-south stops answering right there, so the switch's barrier cannot pass.
    dep_id = fleet.deploy(
        repo, commit_version(repo, "v2"), service, blue_green(switch_delay_seconds=4)
    )
    try:
        fleet.wait_status(dep_id, ["AwaitingSwitch"])
        agent.sigstop()
        dep = fleet.wait_final(dep_id)
        assert dep["status"] == "RolledBack", f"{dep['status']}: {dep.get('error')}"
        assert "Success" not in dep["seen_statuses"], dep["seen_statuses"]
        assert stopped in str(dep.get("error")), f"the error does not name {stopped}: {dep}"
        assert region_states(dep).get(stopped) == "unreachable", region_states(dep)
        r2 = dep["green_revision"]
        for region in REGIONS:
            if region != stopped:
                assert_region_serves(fleet, service, region, r1, "v1")
                assert r2 not in running_revisions(fleet, service, region)
    finally:
        if agent.stopped:
            agent.sigcont()

    # Back: the control plane brings ap-south to the decided state (stable serving, candidate
    # stopped) and says so in the deployment's record.
    assert_region_serves(fleet, service, stopped, r1, "v1")
    assert httpx.get(urls[stopped], timeout=10).text == "notes v1\n"
    final = wait_for_state(
        lambda: fleet.deployment(dep_id),
        lambda d: region_states(d).get(stopped) == "converged",
        120,
        f"{stopped} to be recorded as converged",
    )
    assert final["status"] == "RolledBack", final["status"]


def _client_cert(key_path: Path, cert_path: Path, common_name: str) -> None:
    """A self-signed client certificate for ``common_name``: a CA Shipyard never heard of."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _refused(call: Any) -> str:
    """What refused ``call()``: the connection or the TLS handshake failing, or 401/403; fails
    if anything else answered."""
    try:
        answer = call()
    except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    assert answer.status_code in (401, 403), f"answered {answer.status_code}: {answer.text}"
    return f"HTTP {answer.status_code}"


def _identity(agent_dir: Path, region: str) -> Path:
    """The agent's certificate and key (``identity/agent.pem``, agent/joining.py), checked to be
    the one the fleet CA issued for ``region``."""
    pem = agent_dir / "identity" / "agent.pem"
    text = pem.read_bytes()
    assert b"PRIVATE KEY" in text, f"no key in {pem}"
    cn = x509.load_pem_x509_certificate(text).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [region], f"{pem} is not {region}'s certificate: {cn}"
    return pem


def _tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca`` (by CA, not by name: the agents' names are
    ``<region>.region.shipyard``), presenting ``cert`` (with ``key``, or a PEM holding both)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def _csr(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_removed_region_plain_http_and_foreign_certificates_are_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    pki = fleet.data_dir / "fleet"
    fleet_ca = pki / "ca.crt"
    agent = fleet.agents[REGIONS[0]]
    health = f"https://{agent.address}/v1/health"
    # The control: the control plane's own client certificate opens the agent's API.
    assert httpx.get(health, verify=fleet.controller_tls(), timeout=10).status_code == 200

    # A fourth region joins, then is removed: its agent's certificate no longer opens anything.
    gone = fleet.join("gone-region", agent_host(len(REGIONS)))
    fleet.wait_joined(gone)
    identity = _identity(gone.data_dir, "gone-region")
    fleet.cli("region", "remove", "gone-region", "--data-dir", str(fleet.data_dir))
    assert "gone-region" not in fleet.region_names()
    with httpx.Client(verify=_tls(fleet_ca, identity), timeout=10) as removed:
        answer = removed.post(
            f"{fleet.fleet_url}/fleet/v1/renew",
            json={"csr": _csr("gone-region"), "agent_url": f"https://{gone.address}"},
        )
    assert answer.status_code == 403, f"{answer.status_code}: {answer.text}"
    # `shipyard region remove` works on the data directory; the running server drops the
    # region's runtime at its next registry sync (every few seconds): wait for that, then a
    # deployment naming the region is refused at submission.
    wait_until(lambda: not fleet.serves_region("gone-region"), 60, "the server to drop the region")
    assert fleet.client is not None
    refused = fleet.client.post(
        "/api/v1/deploy",
        json={
            "source": {"repository": str(tmp_path), "branch": "main", "commit": "0" * 40},
            "target": {"service_name": "notes-gone", "regions": ["eu-west", "gone-region"]},
            "strategy": blue_green(),
        },
    )
    assert 400 <= refused.status_code < 500, refused.text
    assert "gone-region" in refused.text, refused.text

    # Plain HTTP: to an agent's API, and to the fleet listener.
    print("agent, plain HTTP:", _refused(lambda: httpx.get(health.replace("https", "http"))))
    print(
        "fleet listener, plain HTTP:",
        _refused(lambda: httpx.get(f"http://127.0.0.1:{fleet.fleet_port}/fleet/v1/ca")),
    )
    # TLS to an agent's API: no client certificate; one from another CA; another agent's.
    print("agent, no certificate:", _refused(lambda: httpx.get(health, verify=_tls(fleet_ca))))
    _client_cert(tmp_path / "foreign.key", tmp_path / "foreign.crt", REGIONS[0])
    foreign = _tls(fleet_ca, tmp_path / "foreign.crt", tmp_path / "foreign.key")
    print("agent, foreign CA:", _refused(lambda: httpx.get(health, verify=foreign)))
    peer = _tls(fleet_ca, _identity(fleet.agents[REGIONS[1]].data_dir, REGIONS[1]))
    print("agent, another agent's certificate:", _refused(lambda: httpx.get(health, verify=peer)))
