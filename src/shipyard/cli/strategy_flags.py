"""``shipyard deploy``'s strategy flags (``--strategy``, ``--stages``, ``--max-surge``, ...) as
the request's externally tagged strategy document (ADR section 4), e.g.
``{"Canary": {"stages": [...]}}``. Called by ``cli/main.py``'s ``deploy``; a bad flag is an
``InvalidInput`` naming it, before anything is sent."""

from __future__ import annotations

from typing import Any

from shipyard.errors import InvalidInput


def int_or_percent(value: str, flag: str) -> int | str:
    if value.isdigit():
        return int(value)
    if value.endswith("%") and value[:-1].isdigit():
        return value
    raise InvalidInput(
        f"{flag} must be a number of replicas or a percentage like 25%, got {value!r}"
    )


def strategy_from_flags(
    kind: str,
    *,
    stages: str,
    max_surge: str,
    max_unavailable: str,
    switch_delay: int,
    bake: float,
    scale_down_delay: float,
) -> dict[str, Any]:
    """The request's externally tagged strategy from the deploy flags."""
    if kind == "blue-green":
        return {
            "BlueGreen": {
                "switch_delay_seconds": switch_delay,
                "bake_seconds": bake,
                "scale_down_delay_seconds": scale_down_delay,
            }
        }
    if kind == "canary":
        parsed = []
        for part in filter(None, (p.strip() for p in stages.split(","))):
            fields = part.split(":")
            try:
                stage: dict[str, Any] = {"weight": int(fields[0])}
                if len(fields) > 1:
                    stage["duration_seconds"] = float(fields[1])
            except ValueError:
                raise InvalidInput(f"--stages: {part!r} is not WEIGHT:SECONDS[:pause]") from None
            if len(fields) > 2:
                if fields[2] != "pause" or len(fields) > 3:
                    raise InvalidInput(f"--stages: {part!r} is not WEIGHT:SECONDS[:pause]")
                stage["pause"] = True
            parsed.append(stage)
        if not parsed:
            raise InvalidInput("--stages: give at least one stage, e.g. 10:60,50:60")
        return {"Canary": {"stages": parsed, "scale_down_delay_seconds": scale_down_delay}}
    if kind == "rolling":
        return {
            "Rolling": {
                "max_surge": int_or_percent(max_surge, "--max-surge"),
                "max_unavailable": int_or_percent(max_unavailable, "--max-unavailable"),
            }
        }
    raise InvalidInput(f"--strategy must be blue-green, canary or rolling, got {kind!r}")
