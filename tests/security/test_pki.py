"""security/pki.py with real certificates and real TLS sockets (asyncio servers on loopback):
who may talk to whom is decided by the handshake, so that is what these tests exercise."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shipyard.errors import InvalidInput
from shipyard.security import pki


@pytest.fixture
def fleet(tmp_path: Path) -> pki.FleetPki:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    return pki.FleetPki.for_data_dir(data)


def _agent_pem(fleet: pki.FleetPki, region: str, tmp: Path, ttl: float = 3600.0) -> Path:
    """An agent's certificate + key in one file, as a joined agent stores it."""
    key = pki.new_key()
    issued = fleet.issue_agent(pki.make_csr(key, region), region, ttl)
    path = tmp / f"{region}-{issued.serial}.pem"
    path.write_bytes(issued.pem + pki.key_pem(key))
    return path


def test_ensure_creates_private_files_once(fleet: pki.FleetPki) -> None:
    fleet.ensure()
    assert stat.S_IMODE(fleet.dir.stat().st_mode) == 0o700
    for name in ("ca.key", "controller-ca.key", "controller.key"):
        assert stat.S_IMODE((fleet.dir / name).stat().st_mode) == 0o600, name
    first = fleet.fingerprint()
    ca_der = pki.load_certificate(fleet.ca_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert first == hashlib.sha256(ca_der).hexdigest()
    fleet.ensure()
    assert pki.FleetPki(fleet.dir).fingerprint() == first  # made once, then reused


def test_agent_certificate_names_its_region_only(fleet: pki.FleetPki) -> None:
    key = pki.new_key()
    issued = fleet.issue_agent(pki.make_csr(key, "whatever-the-agent-says"), "eu-west", 600)
    cert = pki.load_certificate(issued.pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "eu-west"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["eu-west.region.shipyard"]
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 600 <= life.total_seconds() <= 660  # the TTL plus at most a tenth of backdating
    assert pki.renewal_due(cert) < cert.not_valid_after_utc
    assert cert.public_key() == key.public_key()
    ca = pki.load_certificate(fleet.ca_path.read_bytes())
    controller_ca = pki.load_certificate(fleet.controller_ca_path.read_bytes())
    assert pki.check_signature(cert, ca)
    assert not pki.check_signature(cert, controller_ca)
    assert pki.peer_identity(cert.public_bytes(serialization.Encoding.DER)) == (
        "eu-west",
        issued.serial,
    )


def test_bad_csrs_are_refused(fleet: pki.FleetPki) -> None:
    with pytest.raises(InvalidInput, match="not a PEM certificate signing request"):
        fleet.issue_agent(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "eu", 60)
    # A CSR whose signature does not match its key (one byte of the signature flipped).
    der = bytearray(
        x509.load_pem_x509_csr(pki.make_csr(pki.new_key(), "eu")).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidInput, match="signature"):
        fleet.issue_agent(tampered, "eu", 60)
    assert not list(fleet.dir.glob("*.pem"))


def test_join_token_round_trip_and_refusal() -> None:
    token = pki.JoinToken("0123456789abcdef", "s" * 43, "a" * 64)
    assert pki.JoinToken.parse(token.text + "\n") == token
    for bad in ("", "syj1.x.y.z", token.text.replace("syj1", "syj2"), token.text + "0"):
        with pytest.raises(InvalidInput, match="not a join token"):
            pki.JoinToken.parse(bad)


# --- real TLS --------------------------------------------------------------------------------


@asynccontextmanager
async def tls_server(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[bytes | None]]]:
    """An echo-ish TLS server on 127.0.0.1: answers each line with the serial the server sees
    for the peer ("none" without a client certificate); records each peer's DER."""
    peers: list[bytes | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        peers.append(der)
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        await server.wait_closed()


async def _talk(port: int, context: ssl.SSLContext, hostname: str | None) -> x509.Certificate:
    """Connect, exchange one line, return the server's certificate."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=hostname
    )
    try:
        writer.write(b"ping\n")
        await writer.drain()
        assert await reader.readline() == b"ping\n"
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def _refused(port: int, context: ssl.SSLContext, hostname: str | None) -> None:
    """The connection fails: at the handshake, or (TLS 1.3: the server checks the client's
    certificate after the client's side finished) at the first read."""
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        await _talk(port, context, hostname)


async def test_controller_dials_agent_only_with_its_region_name(
    fleet: pki.FleetPki, tmp_path: Path
) -> None:
    fleet.ensure()
    agent = _agent_pem(fleet, "eu", tmp_path)
    server = pki.agent_server_context(agent, agent, fleet.controller_ca_path)
    client = pki.controller_client_context(fleet)
    async with tls_server(server) as (port, peers):
        cert = await _talk(port, client, pki.region_hostname("eu"))
        assert pki.peer_identity(cert.public_bytes(serialization.Encoding.DER))[0] == "eu"
        controller = x509.load_der_x509_certificate(peers[-1] or b"")
        assert controller.subject.rfc4514_string() == "CN=shipyard-controller"
        # The same agent cannot pass for another region: the host name is checked.
        await _refused(port, client, pki.region_hostname("us"))


async def test_agent_refuses_clients_that_are_not_the_controller(
    fleet: pki.FleetPki, tmp_path: Path
) -> None:
    fleet.ensure()
    agent = _agent_pem(fleet, "eu", tmp_path)
    other_agent = _agent_pem(fleet, "us", tmp_path)
    server = pki.agent_server_context(agent, agent, fleet.controller_ca_path)
    async with tls_server(server) as (port, peers):
        # Another agent's certificate (signed by the fleet CA, not the controller CA).
        as_agent = pki.agent_client_context(fleet.ca_path, other_agent, other_agent)
        await _refused(port, as_agent, pki.region_hostname("eu"))
        # No client certificate at all.
        await _refused(port, pki.agent_client_context(fleet.ca_path), pki.region_hostname("eu"))
        # A controller certificate of another installation.
        stranger = pki.FleetPki(tmp_path / "other" / "fleet")
        (tmp_path / "other").mkdir(mode=0o700)
        foreign = pki.controller_client_context(stranger)
        foreign.load_verify_locations(cafile=fleet.ca_path)  # it even trusts our agent
        await _refused(port, foreign, pki.region_hostname("eu"))
        assert peers == []  # no handshake completed


async def test_listener_takes_no_certificate_or_a_fleet_one_never_a_foreign_one(
    fleet: pki.FleetPki, tmp_path: Path
) -> None:
    server = pki.listener_context(fleet, ["127.0.0.1"])
    agent = _agent_pem(fleet, "eu", tmp_path)
    async with tls_server(server) as (port, peers):
        anonymous = pki.agent_client_context(fleet.ca_path)
        cert = await _talk(port, anonymous, "127.0.0.1")
        assert cert.subject.rfc4514_string() == f"CN={pki.LISTENER_NAME}"
        await _talk(port, pki.agent_client_context(fleet.ca_path, agent, agent), "127.0.0.1")
        assert peers[0] is None
        assert peers[1] is not None and pki.peer_identity(peers[1])[0] == "eu"
        # An agent certificate from another fleet CA: refused at the handshake.
        (tmp_path / "other").mkdir(mode=0o700)
        stranger = pki.FleetPki(tmp_path / "other" / "fleet")
        foreign = _agent_pem(stranger, "eu", tmp_path)
        await _refused(port, pki.agent_client_context(fleet.ca_path, foreign, foreign), "127.0.0.1")
        assert len(peers) == 2
        # A client pinning another CA does not trust this listener.
        await _refused(port, pki.agent_client_context(stranger.ca_path), "127.0.0.1")


async def test_reloading_the_server_context_serves_the_new_certificate_to_new_handshakes(
    fleet: pki.FleetPki, tmp_path: Path
) -> None:
    fleet.ensure()
    first = _agent_pem(fleet, "eu", tmp_path)
    second = _agent_pem(fleet, "eu", tmp_path)
    serial: Callable[[x509.Certificate], str] = pki.serial_hex
    server = pki.agent_server_context(first, first, fleet.controller_ca_path)
    client = pki.controller_client_context(fleet)
    async with tls_server(server) as (port, _):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=pki.region_hostname("eu")
        )
        old = x509.load_der_x509_certificate(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        )
        server.load_cert_chain(second)
        new = await _talk(port, client, pki.region_hostname("eu"))
        assert serial(old) != serial(new)
        assert serial(new) == serial(pki.load_certificate(second.read_bytes()))
        # The connection opened before the reload still works.
        writer.write(b"still here\n")
        await writer.drain()
        assert await reader.readline() == b"still here\n"
        writer.close()
