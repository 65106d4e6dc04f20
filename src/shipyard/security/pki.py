"""The fleet's certificates: the CAs the control plane keeps and the TLS contexts both ends use.

Called by the control plane (``api/fleet_control.py`` issues agent certificates at join and
renewal, ``api/fleet.py`` serves the fleet listener, ``api/context.py`` dials joined agents) and
by a joined agent (``agent/joining.py``: its key, CSR and contexts). Everything is EC P-256.

Two CAs, in ``<data>/fleet/`` (dir 0700, keys 0600, every file written atomically by
``private_files``), made on first need under a lock file so ``serve`` and ``shipyard region
add`` (two processes) agree on one:

- the **fleet CA** (``ca.crt``/``ca.key``) signs every agent's certificate (CN = region, DNS SAN
  ``<region>.region.shipyard``, serverAuth + clientAuth, short-lived) and the fleet listener's
  server certificate (``listener.crt``);
- the **controller CA** (``controller-ca.crt``/``.key``) signs only the control plane's client
  certificate (``controller.crt``), presented when it dials an agent. Agents trust only the
  controller CA for client certificates, so one agent's certificate can never drive another
  agent, with no application-level peer check on the agent.

A CA's fingerprint is the SHA-256 of its DER, hex: the join token carries the fleet CA's, so an
agent pins it on first contact (kubeadm's discovery hash).

With several control-plane replicas ``<data>`` is the directory they share (``serve
--shared-dir``): one pair of CAs and one controller certificate for all. Each replica's fleet
listener certificate is its own (its host names), kept in ``listener_dir``, its own data
directory, so no replica ever loads another's.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shipyard.errors import InvalidInput
from shipyard.private_files import ensure_private_dir, write_private

#: Where the control plane keeps the fleet PKI, under its data directory.
FLEET_DIR = "fleet"
#: Every agent certificate names its region under this domain (never a real DNS name).
REGION_DOMAIN = "region.shipyard"
#: The fleet listener's certificate also answers to this name, whatever address it listens on.
LISTENER_NAME = "controller.shipyard"
#: CAs and the controller's client certificate; re-issued on start when a third is left.
CA_LIFETIME = dt.timedelta(days=3650)
CONTROLLER_LIFETIME = dt.timedelta(days=365)
LISTENER_LIFETIME = dt.timedelta(days=90)
#: Agent certificates: one hour unless ``serve --fleet-cert-ttl`` says otherwise.
DEFAULT_AGENT_TTL = 3600.0
JOIN_TOKEN_PREFIX = "syj1"  # noqa: S105 - a format tag, not a secret
_JOIN_TOKEN = re.compile(r"syj1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})\.([0-9a-f]{64})")
#: Clock skew tolerated between the control plane and an agent at issuance.
BACKDATE = dt.timedelta(minutes=5)


def region_hostname(region: str) -> str:
    """The DNS SAN of ``region``'s agent certificate, and the SNI the control plane dials with."""
    return f"{region}.{REGION_DOMAIN}"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (what a join token pins)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_pem(pem: bytes) -> str:
    """``fingerprint`` of a PEM certificate; InvalidInput if it is not one."""
    return fingerprint(load_certificate(pem))


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate: {exc}") from exc


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_csr(key: ec.EllipticCurvePrivateKey, region: str) -> bytes:
    """A PEM CSR for ``region`` signed by ``key`` (the agent's, at join and at each renewal)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, region)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """The CSR, once its signature proves its sender holds the key; InvalidInput otherwise.
    Only its public key is used: the control plane decides every name in the certificate."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > 16384:
        raise InvalidInput("the CSR is larger than 16 KiB; send a PEM certificate request")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise InvalidInput("the CSR's signature does not match its key")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise InvalidInput("the CSR's key must be EC P-256")
    return csr


@dataclass(frozen=True)
class JoinToken:
    """A join token: what the agent sends (id + secret) and pins (the fleet CA's fingerprint).
    Text ``syj1.<id>.<secret>.<fingerprint>`` (``shipyard region add`` prints it)."""

    id: str
    secret: str
    fingerprint: str

    @property
    def text(self) -> str:
        return f"{JOIN_TOKEN_PREFIX}.{self.id}.{self.secret}.{self.fingerprint}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        found = _JOIN_TOKEN.fullmatch(text.strip())
        if found is None:
            raise InvalidInput(
                "not a join token: expected syj1.<id>.<secret>.<CA fingerprint> as printed by "
                "`shipyard region add`"
            )
        return cls(*found.groups())


@dataclass(frozen=True)
class Issued:
    """A certificate the fleet CA just signed."""

    pem: bytes
    serial: str  # hex, as the region registry stores it
    not_after: dt.datetime


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(key: ec.EllipticCurvePrivateKey, cn: str, now: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    cn: str,
    sans: Sequence[x509.GeneralName],
    usages: Sequence[x509.ObjectIdentifier],
    lifetime: dt.timedelta,
    now: dt.datetime,
    backdate: dt.timedelta = BACKDATE,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class FleetPki:
    """The control plane's fleet PKI in one directory (``<data>/fleet``); see the module
    docstring. ``ensure`` makes what is missing; the other methods call it."""

    def __init__(
        self,
        directory: Path,
        *,
        now: type[dt.datetime] = dt.datetime,
        listener_dir: Path | None = None,
    ) -> None:
        self.dir = directory
        self._now = now
        #: Where this replica's fleet listener certificate goes (``directory`` by default).
        self.listener_dir = listener_dir or directory

    @classmethod
    def for_data_dir(cls, shared_dir: Path, data_dir: Path | None = None) -> FleetPki:
        """The PKI in ``<shared_dir>/fleet``; the listener certificate in ``<data_dir>/fleet``
        (this replica's own) when ``data_dir`` is given."""
        return cls(
            shared_dir / FLEET_DIR,
            listener_dir=data_dir / FLEET_DIR if data_dir is not None else None,
        )

    def now(self) -> dt.datetime:
        return self._now.now(dt.UTC)

    # --- files --------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def controller_ca_path(self) -> Path:
        return self.dir / "controller-ca.crt"

    @property
    def controller_paths(self) -> tuple[Path, Path]:
        return self.dir / "controller.crt", self.dir / "controller.key"

    @property
    def listener_paths(self) -> tuple[Path, Path]:
        return self.listener_dir / "listener.crt", self.listener_dir / "listener.key"

    def ensure(self) -> None:
        """Create the directory (0700), both CAs and the controller's client certificate if
        missing (or the latter near its end), under an exclusive lock: a second process waits
        and then finds them made."""
        ensure_private_dir(self.dir)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = self.now()
            for stem, cn in (
                ("ca", "Shipyard fleet CA"),
                ("controller-ca", "Shipyard controller CA"),
            ):
                if not (self.dir / f"{stem}.crt").is_file():
                    key = new_key()
                    write_private(self.dir / f"{stem}.key", key_pem(key))
                    write_private(self.dir / f"{stem}.crt", cert_pem(_ca_cert(key, cn, now)))
            crt, key_path = self.controller_paths
            if not crt.is_file() or third_left(load_certificate(crt.read_bytes()), now):
                ca_cert, ca_key = self._ca("controller-ca")
                key = new_key()
                cert = _leaf(
                    ca_cert,
                    ca_key,
                    key.public_key(),
                    "shipyard-controller",
                    (),
                    (ExtendedKeyUsageOID.CLIENT_AUTH,),
                    CONTROLLER_LIFETIME,
                    now,
                )
                write_private(key_path, key_pem(key))
                write_private(crt, cert_pem(cert))
        finally:
            os.close(fd)  # releases the lock

    def _ca(self, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = load_certificate((self.dir / f"{stem}.crt").read_bytes())
        key = serialization.load_pem_private_key((self.dir / f"{stem}.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInput(f"{self.dir / stem}.key is not an EC key")
        return cert, key

    def ca_pem(self) -> bytes:
        """The fleet CA certificate (PEM): what ``GET /fleet/v1/ca`` serves."""
        self.ensure()
        return self.ca_path.read_bytes()

    def controller_ca_pem(self) -> bytes:
        self.ensure()
        return self.controller_ca_path.read_bytes()

    def fingerprint(self) -> str:
        """The fleet CA's fingerprint (SHA-256 of its DER, hex), carried by join tokens."""
        return fingerprint_pem(self.ca_pem())

    # --- issuing ------------------------------------------------------------------------------

    def issue_agent(self, csr_pem: bytes | str, region: str, ttl_seconds: float) -> Issued:
        """Sign the agent certificate of ``region`` for the key in ``csr_pem`` (checked with
        ``check_csr``): CN = region, DNS SAN ``<region>.region.shipyard``, serverAuth +
        clientAuth, valid ``ttl_seconds``. Called at join and at renewal."""
        if ttl_seconds <= 0:
            raise InvalidInput("an agent certificate's lifetime must be positive")
        csr = check_csr(csr_pem)
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)  # check_csr made sure
        self.ensure()
        ca_cert, ca_key = self._ca("ca")
        lifetime = dt.timedelta(seconds=ttl_seconds)
        cert = _leaf(
            ca_cert,
            ca_key,
            public,
            region,
            (x509.DNSName(region_hostname(region)),),
            (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            lifetime,
            self.now(),
            # Backdated for clock skew, but by a tenth at most: renewal comes at 2/3 of the
            # whole validity, which five minutes would bring forward to "now" for a short TTL.
            backdate=min(BACKDATE, lifetime / 10),
        )
        return Issued(cert_pem(cert), serial_hex(cert), cert.not_valid_after_utc)

    def listener_certificate(self, hosts: Sequence[str]) -> tuple[Path, Path]:
        """(cert, key) of the fleet listener for ``hosts`` (its address and names) plus
        ``controller.shipyard``, signed by the fleet CA; issued anew at each ``serve`` start."""
        self.ensure()
        ca_cert, ca_key = self._ca("ca")
        key = new_key()
        names = list(dict.fromkeys([*hosts, LISTENER_NAME]))
        cert = _leaf(
            ca_cert,
            ca_key,
            key.public_key(),
            LISTENER_NAME,
            [_san(h) for h in names],
            (ExtendedKeyUsageOID.SERVER_AUTH,),
            LISTENER_LIFETIME,
            self.now(),
        )
        crt_path, key_path = self.listener_paths
        ensure_private_dir(self.listener_dir)
        write_private(key_path, key_pem(key))
        write_private(crt_path, cert_pem(cert))
        return crt_path, key_path


def third_left(cert: x509.Certificate, now: dt.datetime) -> bool:
    """Whether less than a third of ``cert``'s life is left at ``now`` (time to re-issue)."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < life / 3


def renewal_due(cert: x509.Certificate) -> dt.datetime:
    """When an agent renews ``cert``: at two thirds of its life."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + life * 2 / 3


def peer_identity(der: bytes) -> tuple[str, str]:
    """(region, serial hex) of a verified peer certificate (DER, as the TLS layer gives it):
    its CN, which must equal the region its SAN names. InvalidInput for anything else."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise InvalidInput("the client certificate cannot be parsed") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise InvalidInput("the client certificate names no single region")
    region = cns[0].value
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = sans.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if dns != [region_hostname(region)]:
        raise InvalidInput("the client certificate is not an agent certificate")
    return region, serial_hex(cert)


# --- TLS contexts ---------------------------------------------------------------------------


def _base(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def listener_context(pki: FleetPki, hosts: Sequence[str]) -> ssl.SSLContext:
    """The control plane's fleet listener (server): its certificate from the fleet CA; client
    certificates optional at the TLS level (``/join`` has none) but, when sent, verified against
    the fleet CA, so a certificate of another CA never completes a handshake."""
    crt, key = pki.listener_certificate(hosts)
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cafile=pki.ca_path)
    return context


def controller_client_context(pki: FleetPki) -> ssl.SSLContext:
    """The control plane dialing agents (client): presents the controller certificate, trusts
    only the fleet CA, checks the host name (the SNI ``<region>.region.shipyard``)."""
    pki.ensure()
    context = _base(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    context.load_verify_locations(cafile=pki.ca_path)
    context.load_cert_chain(*pki.controller_paths)
    return context


def agent_server_context(cert: Path, key: Path, controller_ca: Path) -> ssl.SSLContext:
    """A joined agent's API listener (server): its own certificate; a client certificate
    REQUIRED and verified against the controller CA only. Renewal calls ``load_cert_chain``
    on this same context: new handshakes get the new certificate, open connections keep theirs."""
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=controller_ca)
    return context


def agent_client_context(
    fleet_ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    cadata: str | None = None,
) -> ssl.SSLContext:
    """A joined agent dialing the control plane (client): trusts only the fleet CA (a file, or
    ``cadata`` PEM at join, before anything is stored), checks the listener's host name,
    presents the agent certificate when given (not at join)."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=fleet_ca, cadata=cadata)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def check_signature(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert`` (tests and the agent's sanity check)."""
    public = issuer.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
