"""Fakes for the security plug-points, for tests of the gate's callers (the orchestrator).

``FakeScanner`` returns the findings it was given for the packages it is shown (located and
ordered as ``OsvScanner`` reports them; tests/contract/test_scanner_contract.py runs one suite
against both, the real one on the PyPA advisory database); ``FakeSigner``
signs with a throwaway in-memory Ed25519 key and remembers what it signed. Both keep the contract
of ``scanning.Scanner`` / ``signing.Signer``, so ``signing.verify`` accepts the fake's envelopes
with ``fake.public_key_pem()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from shipyard.security.inventory import Inventory
from shipyard.security.scanning import Finding, ScanResult, worst_first
from shipyard.security.signing import Ed25519Signer


class FakeScanner:
    name = "fake"

    def __init__(self, findings: Iterable[Finding] = ()) -> None:
        self.findings = tuple(findings)
        self.scanned: list[Inventory] = []

    def scan(self, inventory: Inventory) -> ScanResult:
        self.scanned.append(inventory)
        present = {p.key: p for p in inventory.packages}
        # Like OsvScanner: a finding says where *this* inventory found the package, and results
        # come worst first whatever order the findings were given in.
        hits = sorted(
            (
                dataclasses.replace(f, location=present[key].location)
                for f in self.findings
                if (key := (f.ecosystem, f.package, f.version)) in present
            ),
            key=worst_first,
        )
        return ScanResult(scanner=self.name, inventory=inventory, findings=tuple(hits))


class FakeSigner:
    def __init__(self) -> None:
        self._inner = Ed25519Signer.generate()
        self.signed: list[bytes] = []

    @property
    def keyid(self) -> str:
        return self._inner.keyid

    def public_key_pem(self) -> str:
        return self._inner.public_key_pem()

    def sign_envelope(self, payload_type: str, payload: bytes) -> dict[str, Any]:
        self.signed.append(payload)
        return self._inner.sign_envelope(payload_type, payload)
