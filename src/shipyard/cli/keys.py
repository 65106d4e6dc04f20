"""``shipyard keys export``: the artifact-signing public key, for anyone who verifies attestations.

The main CLI mounts ``keys_app`` as ``shipyard keys``. ``export`` reads the server's key from the
data directory, or the replicas' ``--shared-dir`` (``security.signing.Ed25519Signer.load``: it
never creates one) and prints:

    --format pem    the SubjectPublicKeyInfo PEM (cryptography, openssl, cosign ``--key``)
    --format json   securesystemslib's key dict plus ``keyid``, the id Shipyard writes into
                    every DSSE signature (``Key.from_dict(d.pop("keyid"), d)`` reads it)

The same key is served by ``GET /api/v1/keys``. Exit 2 when the data directory holds no key or
the key is unusable, with what to check.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer

from shipyard.cli.common import SharedDir
from shipyard.errors import InvalidInput
from shipyard.security import signing

keys_app = typer.Typer(
    name="keys", help="The artifact-signing public key, for verifiers.", no_args_is_help=True
)


class KeyFormat(enum.StrEnum):
    pem = "pem"
    json = "json"


@keys_app.callback()
def _group() -> None:
    """The artifact-signing public key, for verifiers."""


@keys_app.command()
def export(
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            envvar="SHIPYARD_DATA_DIR",
            help="Shipyard's data directory (holds keys/signing.key).",
        ),
    ],
    format: Annotated[KeyFormat, typer.Option("--format", help="pem or json.")] = KeyFormat.pem,
    shared_dir: SharedDir = None,
) -> None:
    """Print the public key that verifies this server's provenance envelopes."""
    try:
        signer = signing.Ed25519Signer.load(shared_dir or data_dir)
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    if format is KeyFormat.json:
        typer.echo(json.dumps(signing.export_key(signer.public_key), indent=2, sort_keys=True))
    else:
        typer.echo(signer.public_key_pem(), nl=False)
