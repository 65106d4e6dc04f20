"""The traffic-router contract (argo-rollouts' TrafficRoutingReconciler, in Python).

The orchestrator sets per-revision weights through it and verifies them after every change.
The local agent's asyncio router implements it (via ``runtime.local``); HAProxy or a mesh can
replace it later. Weights are percentages per revision that sum to 100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class TrafficRouter(Protocol):
    type: str

    async def set_weight(self, service: str, weights: Mapping[str, int]) -> None:
        """Atomically route ``weights`` (revision -> percent, summing to 100) for ``service``."""
        ...

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        """True when what serves is what we asked for; None when the backend cannot tell."""
        ...

    async def remove_managed_routes(self, service: str) -> None: ...
