"""Optional TLS for the API (``shipyard serve --tls-cert/--tls-key``, ``api.edge.check_tls``)
with a certificate the test makes: served over HTTPS to a client trusting it, plain HTTP to the
TLS port fails without harming the server, bad files are refused before anything binds, and the
CLI's client trusts a private CA through ``--ca-cert``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from shipyard.api import edge
from shipyard.api.app import create_app
from shipyard.cli.client import ApiClient
from shipyard.cli.main import app as cli
from shipyard.errors import InvalidInput
from tests.api.live import LiveServer
from tests.api.test_api import Harness


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (SAN), and its key, as PEM files."""
    key = _key(directory / "key.pem")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shipyard test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "cert.pem", directory / "key.pem"


def test_the_api_answers_https_and_refuses_plain_http(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    h = Harness(tmp_path)
    settings = h.settings.model_copy(update={"tls_cert": cert, "tls_key": key})
    trusting = ssl.create_default_context(cafile=str(cert))
    with LiveServer(create_app(settings, context_factory=h.context), settings) as port:
        r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusting, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"

        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=30)  # system CAs only

        again = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusting, timeout=30)
        assert again.status_code == 200, "a plain-HTTP client harms nobody else"

        token = h.issue("deployment:read").token
        client = ApiClient(f"https://127.0.0.1:{port}", token, ca_cert=cert)
        assert client.request("GET", "/api/v1/services").status_code == 200
        client.close()
        untrusting = ApiClient(f"https://127.0.0.1:{port}", token)
        with pytest.raises(InvalidInput, match="--ca-cert"):
            untrusting.request("GET", "/api/v1/services")
        untrusting.close()

        history = ["history", "api", "--server", f"https://127.0.0.1:{port}", "--token", token]
        trusted = CliRunner().invoke(cli, ["--ca-cert", str(cert), *history, "--format", "json"])
        assert trusted.exit_code == 0, trusted.output
        assert json.loads(trusted.stdout) == {"deployments": []}
        refused = CliRunner().invoke(cli, history)  # `main()` turns this into exit 2
        assert isinstance(refused.exception, InvalidInput), refused.output
        assert "SHIPYARD_CA_CERT" in refused.exception.message


def test_bad_tls_files_are_refused_saying_what_to_fix(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    other = _key(tmp_path / "other.pem")
    assert other is not None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (cert, None, "go together"),
        (None, key, "go together"),
        (tmp_path / "missing.pem", key, "--tls-cert .*missing.pem: cannot read it"),
        (cert, tmp_path / "other.pem", "the key does not belong to the certificate"),
        (garbage, key, "not a PEM certificate"),
    ]
    for c, k, message in cases:
        with pytest.raises(InvalidInput, match=message):
            edge.check_tls(c, k)
    assert edge.check_tls(None, None) is None
    assert isinstance(edge.check_tls(cert, key), ssl.SSLContext)


def test_serve_exits_2_before_binding_on_a_mismatched_key(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    _key(tmp_path / "other.pem")
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(tmp_path / "other.pem"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "does not belong to the certificate" in result.output
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_a_ca_cert_that_is_not_one_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("nope\n")
    with pytest.raises(InvalidInput, match=r"--ca-cert .*ca\.pem: cannot load it"):
        ApiClient("https://127.0.0.1:1", "t", ca_cert=bogus)
