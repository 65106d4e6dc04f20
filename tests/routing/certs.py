"""A private certificate authority for TLS tests (and the TLS router benchmark): it issues
server certificates for host names as the files ``routing.certificates.DirectoryCertificates``
reads (``<dir>/<name>.pem`` with the chain, ``<dir>/<name>.key``), and gives clients a context
that trusts it and nothing else."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A CA made fresh per test: what it signs, only its own clients trust."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shipyard test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, directory: Path, *names: str, file_stem: str | None = None) -> int:
        """A certificate for ``names`` (SANs; the first names the files unless ``file_stem``),
        written as ``<stem>.pem``/``<stem>.key`` in ``directory`` (replacing what is there);
        returns its serial number, so a test can tell which one a server presented."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        stem = file_stem or names[0]
        directory.mkdir(parents=True, exist_ok=True)
        # written beside and renamed in, as a certificate manager would: a reader never sees
        # half a file
        pem = cert.public_bytes(serialization.Encoding.PEM)
        for suffix, data in ((".key", _pem_key(key)), (".pem", pem)):
            tmp = directory / f".{stem}{suffix}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, directory / f"{stem}{suffix}")
        return serial

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA only (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.path))


def presented_serial(sslobj: ssl.SSLObject | ssl.SSLSocket | None) -> int:
    """The serial number of the certificate the server presented on a connection."""
    assert sslobj is not None
    der = sslobj.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
