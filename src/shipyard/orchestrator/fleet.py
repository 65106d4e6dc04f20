"""A fleet deployment's own bookkeeping: each region's state and the skew of every traffic change
in the record (``record.FleetState``), and the checks a fleet's submit makes.

The plan itself runs unchanged through ``runtime/fleet.py``'s ``FleetRuntime`` (the context's
runtime for a fleet record); these helpers write down what it saw. Region states go
``pending`` -> ``deploying`` (the first step) -> ``switched`` (the deployment succeeded) or
``rolled_back``; a region that did not answer in time is ``unreachable`` (left out of the rest of
the rollback: ``FleetRuntime.exclude``) until the reconciler has brought it to the store's serving
revision, then ``converged`` (``note_converged``, audited ``fleet.region_converged``).

Called by the pipeline (``check_submit``), the step executors and ``serving`` (``note_switch``),
the rollback (``note_unreachable``, ``note_end``), the outcome and the reconciler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shipyard.errors import Conflict, InvalidInput, RegionUnreachable, ShipyardError
from shipyard.orchestrator.context import DeploymentContext, Deps, audit_event
from shipyard.orchestrator.record import (
    DeploymentRecord,
    Record,
    RegionPhase,
    SwitchSkew,
    utc,
)
from shipyard.store import db


def set_state(
    ctx: DeploymentContext,
    state: RegionPhase,
    regions: Iterable[str] | None = None,
    *,
    unless: Sequence[RegionPhase] = ("unreachable", "converged"),
) -> None:
    """Every region (or ``regions``) to ``state``, except those ``unless`` (a silent region
    keeps saying so); the caller saves."""
    fleet = ctx.record.fleet
    if fleet is None:
        return
    now = utc(ctx.clock.now())
    for name in regions if regions is not None else fleet.regions:
        region = fleet.regions[name]
        if region.state not in unless and region.state != state:
            region.state = state
            region.updated_at = now


def name_region(ctx: DeploymentContext, exc: ShipyardError) -> ShipyardError:
    """``exc`` (about one fleet replica, ``detail.replica``) with its region in the message and
    detail, so the deployment's error says where the candidate failed."""
    replica = exc.detail.get("replica")
    if ctx.record.fleet is None or not isinstance(replica, str) or "region" in exc.detail:
        return exc
    region = replica.partition("/")[0]
    if region in ctx.record.fleet.regions:
        exc.message = f"region {region}: {exc.message}"
        exc.args = (exc.message,)
        exc.detail["region"] = region
    return exc


def note_urls(ctx: DeploymentContext) -> None:
    """Each region's service URL, as ``ensure_service`` answered it."""
    runtime, fleet = ctx.fleet_runtime, ctx.record.fleet
    if runtime is None or fleet is None:
        return
    for name, url in runtime.urls.items():
        fleet.regions[name].url = url


def url_of(ctx: DeploymentContext, region: str) -> str | None:
    """The service's URL in ``region`` (the record's own URL for one region)."""
    fleet = ctx.record.fleet
    if fleet is None:
        return ctx.record.url
    return fleet.regions[region].url if region in fleet.regions else None


def note_switch(ctx: DeploymentContext, *, step: int | None) -> SwitchSkew | None:
    """The last traffic change's skew into the record (the caller saves)."""
    runtime, fleet = ctx.fleet_runtime, ctx.record.fleet
    if runtime is None or fleet is None or runtime.router.last_switch is None:
        return None
    acks = runtime.router.last_switch
    if not acks.acks:
        return None
    skew = SwitchSkew(
        step=step,
        weights=dict(acks.weights),
        skew_ms=round(acks.skew_ms, 3),
        acks_ms=acks.offsets_ms(),
    )
    fleet.switches.append(skew)
    runtime.router.last_switch = None
    return skew


async def note_unreachable(ctx: DeploymentContext, cause: ShipyardError | None) -> list[str]:
    """Every region that did not answer in time (the runtime's ``timed_out``, and the one
    ``cause`` names) is marked ``unreachable``, saved, and left out of what follows; returns the
    newly marked ones."""
    runtime, fleet = ctx.fleet_runtime, ctx.record.fleet
    if runtime is None or fleet is None:
        return []
    silent = set(runtime.timed_out)
    if isinstance(cause, RegionUnreachable) and cause.detail.get("region") in fleet.regions:
        silent.add(str(cause.detail["region"]))
    marked = [r for r in fleet.regions if r in silent and fleet.regions[r].state != "unreachable"]
    for name in marked:
        region = fleet.regions[name]
        region.state = "unreachable"
        region.error = (
            cause.message
            if isinstance(cause, RegionUnreachable) and cause.detail.get("region") == name
            else f"region {name} did not answer within {runtime.timeout:g} s"
        )
        region.updated_at = utc(ctx.clock.now())
        runtime.exclude(name)
    if marked:
        await ctx.save()
        for name in marked:
            await ctx.audit(
                "fleet.region_unreachable", region=name, error=fleet.regions[name].error
            )
    return marked


async def note_converged(deps: Deps, service: str, region: str, serving: str | None) -> None:
    """``region`` now serves what the store says (the reconciler checked): every finished
    fleet deployment of ``service`` that left it ``unreachable`` says ``converged``."""
    for record in await deps.records.history(service, limit=50):
        fleet = record.fleet
        if not record.terminal or fleet is None or region not in fleet.regions:
            continue
        state = fleet.regions[region]
        if state.state != "unreachable":
            continue
        state.state = "converged"
        state.updated_at = utc(deps.clock.now())
        if record.result is not None and record.result.regions is not None:
            record.result.regions[region] = "converged"
        record.updated_at = utc(deps.clock.now())
        await deps.records.save(record)
        await deps.audit.append(
            audit_event(
                record,
                "fleet.region_converged",
                {"region": region, "serving_revision": serving},
                user="shipyard",
            )
        )


async def awaiting_convergence(deps: Deps) -> set[tuple[str, str]]:
    """(service, region) pairs a finished fleet deployment left ``unreachable``."""
    out: set[tuple[str, str]] = set()
    for record in await deps.records.history(limit=100):
        if record.terminal and record.fleet is not None:
            out |= {(record.service, r) for r in record.fleet.unreachable()}
    return out


async def check_regions_free(deps: Deps, record: Record) -> None:
    """409 ``DeploymentInProgress`` naming the deployment in flight in any region ``record``
    acts on (a fleet's, which the store's index keys by its first region only, included)."""
    for region in record.all_regions:
        active = await deps.records.active_for(record.service, region)
        if active is not None and active.id != record.id:
            raise db.in_progress(record.service, region, active.id)


async def check_submit(deps: Deps, record: DeploymentRecord) -> None:
    """A fleet may start only if every region is known, no deployment of the service is in
    flight in any of them, and all serve the same stable revision (or none: a first deploy
    everywhere). Called under the pipeline's submit lock after ``check_regions_free``, so two
    submits cannot both pass."""
    regions = record.all_regions
    for region in regions:
        deps.runtime(region)  # UnknownRegion (422) names it
    if record.request.strategy.kind == "Rolling":
        raise InvalidInput(
            "a rolling update cannot span several regions yet (its batches count one region's "
            "replicas); deploy each region on its own, or use BlueGreen or Canary"
        )
    serving: dict[str, str | None] = {}
    for region in regions:
        svc = await deps.store.get_service(record.service, region)
        serving[region] = svc.serving_revision if svc else None
    if len(set(serving.values())) > 1:
        seen = ", ".join(f"{r}: {rev or 'nothing'}" for r, rev in serving.items())
        raise Conflict(
            f"the regions of this fleet serve different revisions of {record.service} ({seen}); "
            "a fleet deployment needs one stable revision everywhere (or none): deploy the "
            "regions that differ on their own first",
            serving=serving,
        )
