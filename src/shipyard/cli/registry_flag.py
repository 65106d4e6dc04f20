"""``shipyard serve --registry``: the OCI registry every built image is pushed to (and deployed
from, by digest). Its own module so ``cli/main.py`` only names the flag. The value is checked
while the command line is parsed (``build.docker.check_registry``, the rule the docker builder's
settings use), so a bad one ends ``serve`` with exit 2 before anything is created.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shipyard.errors import InvalidInput


def _checked(value: str | None) -> str | None:
    """typer's callback for ``--registry``: the value, or ``BadParameter`` with the reason."""
    if not value:
        return None
    from shipyard.build.docker import check_registry  # the docker SDK only when asked for

    try:
        return check_registry(value)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.message) from exc


RegistryFlag = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="SHIPYARD_REGISTRY",
        callback=_checked,
        help="Push every image built to this OCI registry (host\\[:port]\\[/path], no scheme, e.g. "
        "127.0.0.1:5000) and deploy it from there by digest: what agents on other hosts pull.",
    ),
]
