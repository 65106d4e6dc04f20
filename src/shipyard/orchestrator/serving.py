"""Which revision serves: traffic switches, the service record's serving revision, and stopping a
revision. The invariants of issue 7 live here, in one place each:

- ``switch`` sets weights and verifies that the router serves what was asked;
- ``mark_serving`` is the one way a revision becomes the service's serving revision, and clears a
  warm mark on it in the same write (an instant rollback): left marked warm, the janitor would
  retire it when the window ends, or the next deployment would stop it before its own candidate
  is up (``Store.upsert_service`` refuses the record otherwise);
- ``stop_revision`` never stops the revision the store says serves, whoever asks.

Service records stay per (service, region): for a fleet deployment ``mark_serving`` writes every
region's (also a region that did not answer: the store then says what it must converge to), and
``stop`` refuses a revision any of the fleet's regions serves. ``switch`` records a fleet's skew.

Called by the step executors, the rollback and the janitor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from shipyard.errors import InvariantViolation, TrafficSwitchFailed
from shipyard.logs import log_event
from shipyard.orchestrator import fleet
from shipyard.orchestrator.context import DeploymentContext
from shipyard.runtime.base import Runtime
from shipyard.store.db import AsyncStore

log = logging.getLogger("shipyard.orchestrator")


async def switch(
    ctx: DeploymentContext, weights: Mapping[str, int], *, sticky: bool = False
) -> None:
    """Route ``weights`` (sticky by the manifest's key when asked), then verify it."""
    key = None
    if sticky and ctx.record.progress.plan is not None:
        key = ctx.record.progress.plan.sticky
    step = None if ctx.record.progress.rolling_back else ctx.record.progress.step
    try:
        await ctx.router.set_weight(ctx.service, weights, sticky=key)
    finally:
        fleet.note_switch(ctx, step=step)
    ok = await ctx.router.verify_weight(ctx.service, weights)
    if ok is False:
        raise TrafficSwitchFailed(f"router does not serve the weights we set: {dict(weights)}")


async def mark_serving(ctx: DeploymentContext, revision: str) -> None:
    """Record that ``revision`` now takes 100% of the service's traffic (see the module
    docstring: a warm mark on it is cleared in the same write)."""
    for region in ctx.regions:
        svc = await ctx.store.get_service(ctx.service, region)
        values: dict[str, object] = {"serving_revision": revision}
        url = fleet.url_of(ctx, region)
        if url:
            values["url"] = url
        if svc is not None and svc.warm_revision == revision:
            values.update(warm_revision=None, warm_until=None)
        await ctx.store.upsert_service(ctx.service, region, **values)


async def note_serving(ctx: DeploymentContext, weights: Mapping[str, int]) -> None:
    """The store's serving revision follows whoever holds 100% of traffic."""
    full = [rev for rev, w in weights.items() if w == 100]
    if full:
        await mark_serving(ctx, full[0])


async def stop_revision(
    store: AsyncStore, runtime: Runtime, service: str, revision: str, *, drain_timeout: float
) -> None:
    """Drain and stop ``revision``; never the one the store says serves (that would be an
    outage Shipyard made itself), whoever asks."""
    svc = await store.get_service(service, runtime.region)
    if svc is not None and svc.serving_revision == revision:
        raise InvariantViolation(
            f"refusing to stop {revision}: it is the revision {service}@{runtime.region} serves",
            service=service,
            revision=revision,
        )
    await runtime.stop_revision(service, revision, drain_timeout=drain_timeout)
    log_event(log, "revision.stopped", service=service, region=runtime.region, revision=revision)


async def stop(ctx: DeploymentContext, revision: str) -> None:
    """``stop_revision`` for the deployment's service (in every region of a fleet)."""
    for region in ctx.regions:
        if region == ctx.runtime.region:
            continue  # stop_revision checks the runtime's own region
        svc = await ctx.store.get_service(ctx.service, region)
        if svc is not None and svc.serving_revision == revision:
            raise InvariantViolation(
                f"refusing to stop {revision}: it is the revision {ctx.service}@{region} serves",
                service=ctx.service,
                revision=revision,
            )
    await stop_revision(
        ctx.store, ctx.runtime, ctx.service, revision, drain_timeout=ctx.deps.drain_timeout
    )
