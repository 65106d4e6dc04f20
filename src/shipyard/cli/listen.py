"""``ADDR:PORT`` options of ``shipyard agent`` (``--http-listen``, ``--https-listen``)."""

from __future__ import annotations

import ipaddress

import typer

__all__ = ["parse_listen"]


def parse_listen(option: str, value: str | None) -> tuple[str, int] | None:
    """``"0.0.0.0:443"``, ``"[::]:443"`` or ``"localhost:8080"`` as ``(host, port)``; None
    and ``"off"`` are None. A BadParameter names the option and what was expected."""
    if value is None or value == "off":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise typer.BadParameter(
            f"{option} expects ADDR:PORT (e.g. 0.0.0.0:443, [::]:443), got {value!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise typer.BadParameter(f"{option}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise typer.BadParameter(f"{option}: write an IPv6 address in brackets, e.g. [::]:443")
    return host, int(port)
