"""A service's secrets for its app: set, remove and list them (the API, ``api/secrets.py``), and
resolve them for a deployment (the orchestrator: ``preflight.resolve_secrets`` pins versions,
``artifacts.spec`` opens exactly those versions for the runtime).

Values are sealed here with ``security/sealing.Sealer`` (the key in
``<shared_dir>/keys/secrets.key``, outside the database) bound to
``secret/<service>/<name>/<version>``, and stored by ``store/secrets.SecretStore``. Nothing here
logs a value; setting and removing are audited (``secret.set`` / ``secret.removed``: who, the
service, the name and the version, never the value). Reading a value back is only
``values``, which only ``orchestrator/artifacts.spec`` calls: no route answers with one.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Protocol

from shipyard.audit.chain import AuditEvent
from shipyard.audit.log import AuditLog
from shipyard.domain.clock import Clock, SystemClock, to_thread
from shipyard.errors import InvalidInput, NotFound, SecretMissing
from shipyard.security.sealing import Sealer
from shipyard.store.secrets import SecretStore, SecretVersion

#: A secret's name: what an environment variable may be called (``[run] secrets``).
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
#: The largest value accepted (bytes of UTF-8): a key or certificate chain fits, a file does not.
MAX_VALUE_BYTES = 64 * 1024
#: The OpenAPI ``format`` of a value (``api/secrets.py``): text an environment variable can carry
#: (no NUL, no lone UTF-16 surrogate), which no JSON-schema pattern can say.
VALUE_FORMAT = "shipyard-secret-value"


def about(service: str, name: str, version: int) -> str:
    """What a sealed value is bound to (``Sealer`` associated data)."""
    return f"secret/{service}/{name}/{version}"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidInput(
            f"secret name {name[:80]!r} is not a valid environment variable name: use letters, "
            "digits and '_', not starting with a digit (e.g. DB_PASSWORD)"
        )
    return name


def check_value(name: str, value: str) -> bytes:
    """``value`` as the bytes to seal; InvalidInput for an empty, NUL-holding or oversized one
    (an environment variable cannot hold a NUL)."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"secret {name}: the value is not valid Unicode text (a lone surrogate)"
        ) from None
    if not raw:
        raise InvalidInput(f"secret {name}: the value is empty; give the value on stdin")
    if b"\0" in raw:
        raise InvalidInput(f"secret {name}: the value holds a NUL byte, which no environment "
                           "variable can carry")  # fmt: skip
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidInput(
            f"secret {name}: the value is {len(raw)} bytes; at most {MAX_VALUE_BYTES} are accepted"
        )
    return raw


class SecretResolver(Protocol):
    """What the orchestrator needs of the secrets (``Deps.secrets``)."""

    async def current_versions(self, service: str, names: Collection[str]) -> dict[str, int]: ...

    async def values(self, service: str, versions: Mapping[str, int]) -> dict[str, str]: ...


class AppSecrets:
    """Secrets of services, sealed at rest; see the module docstring."""

    def __init__(
        self, store: SecretStore, sealer: Sealer, audit: AuditLog, clock: Clock | None = None
    ) -> None:
        self.store = store
        self._sealer = sealer
        self.audit = audit
        self.clock: Clock = clock or SystemClock()

    def __repr__(self) -> str:
        return "AppSecrets()"

    async def set(
        self, service: str, name: str, value: str, *, by: str, token_id: str | None = None
    ) -> SecretVersion:
        """Store ``value`` as the next version of ``service``'s ``name``; audited."""
        raw = check_value(check_name(name), value)
        added = await to_thread(
            self.store.add,
            service,
            name,
            lambda version: self._sealer.seal(raw, about(service, name, version)),
            at=self.clock.now(),
            by=by,
        )
        await self._audit("secret.set", service, by, name=name, version=added.version,
                          token_id=token_id)  # fmt: skip
        return added

    async def remove(self, service: str, name: str, *, by: str, token_id: str | None = None) -> int:
        """Remove ``name`` from ``service``: new deployments no longer get it (a rollback to a
        revision that used it still does). The newest version it had; NotFound when unset."""
        check_name(name)
        newest = await to_thread(self.store.remove, service, name, at=self.clock.now(), by=by)
        if newest is None:
            raise NotFound(
                f"service {service} has no secret {name}; `shipyard secret list {service}` "
                "shows its secrets"
            )
        await self._audit("secret.removed", service, by, name=name, version=newest,
                          token_id=token_id)  # fmt: skip
        return newest

    async def list(self, service: str) -> list[SecretVersion]:
        """The newest version of each of ``service``'s secrets (never a value)."""
        return await to_thread(self.store.list, service)

    async def current_versions(self, service: str, names: Collection[str]) -> dict[str, int]:
        """``{name: newest version}`` for each of ``names``; SecretMissing naming every one
        that is not set, with the command that sets it."""
        found = await to_thread(self.store.current, service, set(names))
        missing = sorted(set(names) - set(found))
        if missing:
            which = ", ".join(missing)
            raise SecretMissing(
                f"secret{'s' if len(missing) > 1 else ''} {which} "
                f"{'are' if len(missing) > 1 else 'is'} not set for service {service}: "
                + "; ".join(f"shipyard secret set {service} {m}" for m in missing),
                service=service,
                missing=missing,
            )
        return found

    async def values(self, service: str, versions: Mapping[str, int]) -> dict[str, str]:
        """The values of exactly these ``{name: version}`` (removed ones too). SecretMissing
        when a version is gone; ``SealingError`` when it does not open with this key."""
        sealed = await to_thread(self.store.sealed, service, dict(versions))
        gone = sorted(set(versions) - set(sealed))
        if gone:
            raise SecretMissing(
                f"service {service}'s revision uses "
                + ", ".join(f"{n} version {versions[n]}" for n in gone)
                + ", which the store no longer holds: set the secret again and deploy",
                service=service,
                missing=gone,
            )
        return {
            name: self._sealer.open(blob, about(service, name, versions[name])).decode("utf-8")
            for name, blob in sealed.items()
        }

    async def _audit(self, event_type: str, service: str, user: str, **detail: object) -> None:
        await self.audit.append(
            AuditEvent(
                event_type=event_type,
                service=service,
                user=user,
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )
