"""The ADR-014 section 4 data model as Pydantic models, and its JSON wire format.

The wire format is what the ADR's serde derives write: snake_case fields and *externally tagged*
enums (``{"BlueGreen": {"switch_delay_seconds": 30}}``). Clients written against the ADR work
unchanged; every Shipyard extension is optional and additive. Used by the API (request/response
bodies), the store (persisted as JSON) and the CLI (building requests).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import jsonpath
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from shipyard.domain import expressions, placeholders, repository_urls

#: ADR section 8 targets.
BUILD_TIME_TARGET_MS = 240_000
ROLLBACK_TIME_TARGET_MS = 30_000
HEALTH_CHECK_TIMEOUT_MS = 5_000

DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DnsLabel = Annotated[
    str,
    StringConstraints(pattern=DNS_LABEL, max_length=63),
    Field(description="An RFC 1123 DNS label: lowercase letters, digits and '-', 1-63 characters."),
]


class WireModel(BaseModel):
    """Strict edge model: unknown fields are errors, so typos never pass silently."""

    # hide_input_in_errors: a refused value may be a secret (a repository URL with a token), so
    # a ValidationError's text never repeats what was sent; the API answers with messages only.
    model_config = ConfigDict(
        extra="forbid", frozen=True, str_strip_whitespace=True, hide_input_in_errors=True
    )


# --- source and target ---------------------------------------------------------------------------


_COMMIT = r"^[0-9a-fA-F]{4,64}$"
# A branch: no whitespace, control character or any of ~^:?*[\ ; no leading '-', no '..', no
# trailing '/'. Written without lookarounds (so every regex engine that reads the schema agrees):
# a '.' is always followed by a name character or '/', or ends the name.
_NAME_CHAR = r"[^\s\x00-\x1f\x7f~^:?*\[\\./]"
_FIRST_CHAR = r"[^\s\x00-\x1f\x7f~^:?*\[\\./-]"
_BRANCH = (
    rf"^(?:(?:{_FIRST_CHAR}|\.{_NAME_CHAR}|/|\./)(?:{_NAME_CHAR}|\.{_NAME_CHAR}|/|\./)*"
    rf"(?:{_NAME_CHAR}|\.{_NAME_CHAR}|\.)|{_FIRST_CHAR}|\.{_NAME_CHAR}?)$"
)
#: One path segment: any name of [A-Za-z0-9._-] but "..".
_SEGMENT = r"(?:\.?[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+|\.)"
_DOCKERFILE = rf"^{_SEGMENT}(?:/{_SEGMENT})*$"


class SourceConfig(WireModel):
    # ``\S``: surrounding whitespace is stripped, so the schema says a blank one is no name.
    repository: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"\S")] = Field(
        description="A git URL (https://, ssh://, git://, file://) or a local path to a "
        "repository. Credentials in the URL (https://user:token@...) are refused: configure "
        "git credentials for the server's user instead."
    )
    branch: Annotated[str, Field(min_length=1, max_length=255, pattern=_BRANCH)]
    commit: Annotated[str, Field(min_length=4, max_length=64, pattern=_COMMIT)] = Field(
        description="A commit id (full or abbreviated hex) reachable from `branch`."
    )
    dockerfile: str | None = Field(
        default=None,
        max_length=1024,
        pattern=_DOCKERFILE,
        description="Dockerfile path inside the repository: relative, '/'-separated names of "
        "letters, digits, '.', '_' and '-', no '..'.",
    )

    @field_validator("repository")
    @classmethod
    def _repository_has_no_credentials(cls, v: str) -> str:
        refusal = repository_urls.credentials_refusal(v)
        if refusal is not None:
            raise ValueError(refusal)
        return v

    @field_validator("branch", mode="before")
    @classmethod
    def _branch_is_a_ref_name(cls, v: object) -> object:
        # git check-ref-format's rules that matter for safety; never starts with '-' (no option
        # injection) and no '..' (no range syntax). Before the schema's pattern (the same rule),
        # so the message says what is wrong.
        if isinstance(v, str) and not re.fullmatch(_BRANCH, v.strip()):
            raise ValueError(f"{v!r} is not a valid git branch name")
        return v

    @field_validator("commit", mode="before")
    @classmethod
    def _commit_is_hex(cls, v: object) -> object:
        # Before the pattern, so the message says what a commit is.
        if isinstance(v, str) and not re.fullmatch(_COMMIT, v.strip()):
            raise ValueError("commit must be a hex commit id (4 to 64 characters)")
        return v

    @field_validator("commit")
    @classmethod
    def _commit_lowercase(cls, v: str) -> str:
        return v.lower()

    @field_validator("dockerfile", mode="before")
    @classmethod
    def _dockerfile_inside_repository(cls, v: object) -> object:
        # The schema's pattern, checked first for the message (the pattern alone says "should
        # match pattern ..."): no absolute path, no '..', nothing git or a shell would read.
        if isinstance(v, str) and not re.fullmatch(_DOCKERFILE, v.strip()):
            raise ValueError(
                f"dockerfile {v!r} must be a relative path inside the repository (no '..', no '/')"
            )
        return v


#: How many regions one fleet deployment may span.
MAX_FLEET_REGIONS = 16


class TargetEnvironment(WireModel):
    service_name: DnsLabel
    region: DnsLabel = "local"
    project_id: str | None = Field(default=None, max_length=128)
    #: Shipyard extension: one deployment across several regions in lockstep (the ADR's
    #: ``region`` still means one). ``region`` then defaults to the first of them.
    regions: Annotated[list[DnsLabel], Field(min_length=1, max_length=MAX_FLEET_REGIONS)] | None = (
        Field(
            default=None,
            description="Deploy to every one of these regions in lockstep (a barrier before each "
            "traffic change; a failure in any region rolls every region back). Unique names; "
            "`region`, when also given, must be one of them.",
            # A single-region target serialises exactly as the ADR's (no ``regions: null``);
            # exclude_if, unlike a model serializer, keeps the schema's properties.
            exclude_if=lambda v: v is None,
        )
    )

    @model_validator(mode="after")
    def _one_fleet(self) -> TargetEnvironment:
        if self.regions is None:
            return self
        seen: set[str] = set()
        for name in self.regions:
            if name in seen:
                raise ValueError(f"target.regions names {name!r} twice; list each region once")
            seen.add(name)
        if "region" in self.model_fields_set:
            if self.region not in seen:
                raise ValueError(
                    f"target.region {self.region!r} is not in target.regions; "
                    "leave region out or name one of regions"
                )
        else:
            object.__setattr__(self, "region", self.regions[0])
        return self

    @property
    def all_regions(self) -> list[str]:
        """Every region this target deploys to: ``regions``, or ``[region]``."""
        return list(self.regions) if self.regions is not None else [self.region]

    @property
    def is_fleet(self) -> bool:
        """Whether this target spans more than one region."""
        return self.regions is not None and len(self.regions) > 1


# --- strategies (externally tagged) --------------------------------------------------------------


class BlueGreenParams(WireModel):
    switch_delay_seconds: Annotated[int, Field(ge=0, le=86_400)]
    bake_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=30.0,
        description="Post-switch monitoring window; a failing health check in it rolls back.",
    )
    scale_down_delay_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=30.0,
        description="How long the previous revision stays warm after success (instant rollback).",
    )


InsufficientDataPolicy = Literal["extend", "pause", "fail"]


#: The built-in load step's ceiling: enough to fill any min_requests window quickly, low enough
#: that a typo cannot turn the agent into a load test of the canary's host.
MAX_LOAD_RPS = 1000


class LoadSettings(WireModel):
    """Built-in load during a canary's analysis (Flagger's load tester): the agent sends ``GET
    path`` at ``rps`` through the service's router to the canary revision only, so a canary
    without enough real traffic still gets measured. Never to any other host."""

    rps: Annotated[float, Field(gt=0, le=MAX_LOAD_RPS)] = Field(
        description=f"Requests per second to the canary while analysis runs (at most "
        f"{MAX_LOAD_RPS})."
    )
    path: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^/[!-~]*$")] = Field(
        default="/",
        description="Path (and query) requested: starts with /, printable ASCII, no spaces.",
    )


MetricProvider = Literal["router", "prometheus", "web"]
#: Metrics one analysis may list.
MAX_METRICS = 20
_METRIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
#: JSON-schema ``format``s of the fields whose language a regular expression cannot say: a
#: client (and the API fuzzer) learns the field's language from the format's name.
CONDITION_FORMAT = "shipyard-condition"
URL_TEMPLATE_FORMAT = "shipyard-url-template"
JSONPATH_FORMAT = "jsonpath"


def _known_placeholders(value: str, what: str) -> str:
    bad = placeholders.unknown(value)
    if bad:
        raise ValueError(
            f"unknown placeholder {{{{{bad[0]}}}}} in {what}; known: "
            + ", ".join(f"{{{{{p}}}}}" for p in placeholders.PLACEHOLDERS)
        )
    return value


def _http_url(value: str, what: str) -> str:
    """A URL template a provider may GET: http(s), a host, no credentials (a manifest holds no
    secrets), placeholders only from ``PLACEHOLDERS``."""
    _known_placeholders(value, what)
    parts = urlsplit(placeholders.render(value, dict.fromkeys(placeholders.PLACEHOLDERS, "x"), str))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError(
            f"{what} must not carry credentials: a manifest holds no secrets (put an "
            "authenticating proxy on loopback in front of the provider instead)"
        )
    return value


class _MetricBase(WireModel):
    """What every metric of a canary analysis has (``[[analysis.metrics]]``, Argo Rollouts'
    AnalysisTemplate metric); ``MetricSettings`` is the union of the providers' models."""

    name: Annotated[str, StringConstraints(pattern=_METRIC_NAME)] = Field(
        description="The metric's name in measurements, audit records and errors (letters, "
        "digits, '_', '.', '-'; unique in its list)."
    )
    provider: MetricProvider = Field(
        description="`router` (the built-in check, judged by the `[analysis]` thresholds), "
        "`prometheus` (`address` + `query`) or `web` (`url` + `json_path`)."
    )
    interval_seconds: Annotated[float, Field(gt=0, le=3600)] | None = Field(
        default=None, description="Time between measurements (unset: the analysis interval)."
    )
    count: Annotated[int, Field(ge=0, le=100_000)] | None = Field(
        default=None,
        description="Measurements that complete the metric (0: measure until the stage ends); "
        "the stage is held until every metric is complete.",
    )
    failure_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None, description="Failed measurements beyond this abort (unset: the analysis')."
    )
    consecutive_error_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None,
        description="Consecutive provider errors beyond this abort (unset: the analysis').",
    )
    inconclusive_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None,
        description="Inconclusive measurements beyond this pause for a human (unset: the "
        "analysis').",
    )


class RouterMetric(_MetricBase):
    """``provider = "router"``: the router's per-revision counters, judged by the thresholds of
    the ``[analysis]`` table (and the stage's)."""

    provider: Literal["router"] = Field(description="The built-in router check.")


class _JudgedMetric(_MetricBase):
    """A metric whose value a provider reads and a condition judges."""

    success_condition: Annotated[
        str, Field(min_length=1, max_length=500, json_schema_extra={"format": CONDITION_FORMAT})
    ] = Field(
        description="prometheus/web: when true the measurement passes, e.g. `result < 0.05` "
        "(`and or not`, `< <= > >= == !=`, `+ - * /`, `result[i]`, `len() isNaN() abs() min() "
        "max()`)."
    )
    failure_condition: (
        Annotated[
            str,
            Field(min_length=1, max_length=500, json_schema_extra={"format": CONDITION_FORMAT}),
        ]
        | None
    ) = Field(
        default=None,
        description="prometheus/web: when true the measurement fails; with it, a measurement "
        "neither condition holds for is inconclusive (without it, not passing is failing).",
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] | None = Field(
        default=None, description="prometheus/web: how long one request may take (default 10)."
    )

    @field_validator("success_condition", "failure_condition")
    @classmethod
    def _condition(cls, v: str | None) -> str | None:
        if v is not None:
            expressions.compile_condition(v)
        return v


_UrlTemplate = Annotated[
    str, Field(min_length=1, max_length=1024, json_schema_extra={"format": URL_TEMPLATE_FORMAT})
]


class PrometheusMetric(_JudgedMetric):
    """``provider = "prometheus"``: an instant PromQL query against ``address``."""

    provider: Literal["prometheus"] = Field(description="Prometheus's HTTP API.")
    address: _UrlTemplate = Field(
        description="prometheus: the server's base URL, e.g. `http://127.0.0.1:9090` (no "
        "credentials: a manifest holds no secrets)."
    )
    query: Annotated[str, Field(min_length=1, max_length=2048)] = Field(
        description='prometheus: a PromQL instant query, e.g. `sum(rate(...{revision="{{canary}}"}'
        "[{{window}}]))`; a substituted value is escaped for a double-quoted string."
    )

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _known_placeholders(v, "query")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _http_url(v, "address")


class WebMetric(_JudgedMetric):
    """``provider = "web"``: GET ``url``, the value at ``json_path`` of the JSON answer."""

    provider: Literal["web"] = Field(description="Any HTTP endpoint answering JSON.")
    url: _UrlTemplate = Field(
        description="web: the URL to GET (placeholders are URL-escaped; no credentials)."
    )
    json_path: Annotated[
        str, Field(min_length=1, max_length=512, json_schema_extra={"format": JSONPATH_FORMAT})
    ] = Field(
        description="web: a JSONPath (RFC 9535) selecting the value in the answer, e.g. "
        "`$.data.error_rate`; several matches make `result` a list."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v, "url")

    @field_validator("json_path")
    @classmethod
    def _json_path(cls, v: str) -> str:
        try:
            jsonpath.compile(v)
        except jsonpath.JSONPathError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"json_path is not a valid JSONPath: {first}") from None
        return v


#: One ``[[analysis.metrics]]`` entry: its ``provider`` says which model (and which keys).
MetricSettings = Annotated[
    RouterMetric | PrometheusMetric | WebMetric, Field(discriminator="provider")
]
MetricList = Annotated[list[MetricSettings], Field(min_length=1, max_length=MAX_METRICS)]


class AnalysisSettings(WireModel):
    """Canary analysis thresholds (Argo Rollouts' AnalysisTemplate semantics, flattened).

    Every field is optional: a stage's settings override the service's ``[analysis]`` table in
    ``shipyard.toml``, which overrides the built-in defaults (``analysis.verdicts.DEFAULTS``).
    """

    enabled: bool | None = Field(
        default=None, description="false: hold the stage for its duration without measuring."
    )
    min_success_rate: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="Non-5xx responses / all responses, per measurement."
    )
    max_p99_latency_ms: Annotated[float, Field(gt=0, le=600_000)] | None = Field(
        default=None,
        description="p99 latency of a measurement window must be at most this (unset: "
        "reported, not judged).",
    )
    min_requests: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None,
        description="Fewer responses in a measurement window make it insufficient_data (never "
        "a pass; `insufficient_data` decides what follows).",
    )
    interval_seconds: Annotated[float, Field(gt=0, le=3600)] | None = Field(
        default=None, description="Length of one measurement window."
    )
    failure_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None, description="The analysis fails when failed measurements exceed this."
    )
    consecutive_error_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None,
        description="It fails when consecutive measurement errors (metrics unavailable) "
        "exceed this.",
    )
    inconclusive_limit: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None, description="Inconclusive measurements beyond this pause for a human."
    )
    insufficient_data: InsufficientDataPolicy | None = Field(
        default=None,
        description="What a window with fewer than `min_requests` responses does: `extend` "
        "the stage by one interval (at most `max_extensions` times, then fail), `pause` for a "
        "human (`shipyard promote` or `abort`), or `fail` at once. A low-traffic canary never "
        "passes silently: drive traffic to it, lower `min_requests`, or pick `pause`.",
    )
    max_extensions: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        default=None,
        description='With `insufficient_data = "extend"`: at most this many extra intervals '
        "at the end of a stage; still too little traffic after them fails the analysis.",
    )
    compare_with_stable: bool | None = Field(
        default=None, description="Also judge the canary against stable over the same window."
    )
    max_success_rate_drop: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="With `compare_with_stable`: the canary's success rate may be at most this "
        "much below stable's.",
    )
    max_p99_latency_ratio: Annotated[float, Field(ge=1, le=1000)] | None = Field(
        default=None,
        description="With `compare_with_stable`: the canary's p99 may be at most this many "
        "times stable's (plus a few ms of slack).",
    )
    load: LoadSettings | None = Field(
        default=None,
        description='Drive traffic to the canary during analysis, e.g. {rps = 20, path = "/"}; '
        "a stage's load replaces the service's.",
    )
    metrics: MetricList | None = Field(
        default=None,
        description="`[[analysis.metrics]]`: when listed, these metrics are the analysis (a "
        "stage's list replaces the service's); the built-in router check runs only if listed "
        'as `provider = "router"` or when no metrics are listed.',
    )

    @field_validator("metrics")
    @classmethod
    def _distinct_metrics(cls, v: list[MetricSettings] | None) -> list[MetricSettings] | None:
        if v is None:
            return v
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"two metrics are named {m.name!r}: names must be unique")
            seen.add(m.name)
        if sum(m.provider == "router" for m in v) > 1:
            raise ValueError('at most one metric may have provider = "router"')
        return v


class CanaryStage(WireModel):
    weight: Annotated[int, Field(ge=0, le=100)] = Field(description="Canary share, percent.")
    duration_seconds: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    pause: bool = Field(
        default=False, description="Hold the stage until POST /deployments/{id}/promote."
    )
    analysis: AnalysisSettings | None = Field(
        default=None, description="Overrides the service's [analysis] defaults for this stage."
    )
    sticky: bool = Field(
        default=False,
        description="Requests with the same key (the manifest's [routing] sticky header or "
        "cookie) land on the same side; keys only move stable -> canary as the weight rises.",
    )


class CanaryParams(WireModel):
    stages: Annotated[list[CanaryStage], Field(min_length=1, max_length=100)]
    scale_down_delay_seconds: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=30.0,
        description="How long the stable revision stays warm after promotion (instant rollback).",
    )


IntOrPercent = (
    Annotated[int, Field(ge=0)]
    | Annotated[str, StringConstraints(pattern=r"^(?:100|0\d{2}|\d{1,2})%$")]
)
#: Both at zero, in any spelling the fields accept: ``_not_both_zero``, said in the schema.
_ZERO: JsonDict = {"anyOf": [{"const": 0}, {"type": "string", "pattern": r"^0{1,3}%$"}]}


class RollingParams(WireModel):
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["max_surge", "max_unavailable"],
                "properties": {"max_surge": _ZERO, "max_unavailable": _ZERO},
            }
        }
    )

    max_surge: IntOrPercent = Field(description="Extra replicas allowed: N or 'P%' (rounded up).")
    max_unavailable: IntOrPercent = Field(description="Unready allowed: N or 'P%' (rounded down).")

    @field_validator("max_surge", "max_unavailable")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0")
        if isinstance(v, str) and int(v[:-1]) > 100:
            raise ValueError("a percentage must be between 0% and 100%")
        return v

    @model_validator(mode="after")
    def _not_both_zero(self) -> RollingParams:
        if _zero(self.max_surge) and _zero(self.max_unavailable):
            raise ValueError("max_surge and max_unavailable cannot both be zero")
        return self


def _zero(v: int | str) -> bool:
    return v == 0 if isinstance(v, int) else int(v[:-1]) == 0


class BlueGreen(WireModel):
    kind: ClassVar[str] = "BlueGreen"
    BlueGreen: BlueGreenParams


class Canary(WireModel):
    kind: ClassVar[str] = "Canary"
    Canary: CanaryParams


class Rolling(WireModel):
    kind: ClassVar[str] = "Rolling"
    Rolling: RollingParams


STRATEGY_KINDS = ("BlueGreen", "Canary", "Rolling")


def _strategy_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return next(iter(value)) if len(value) == 1 else None
    return getattr(value, "kind", None)


DeploymentStrategy = Annotated[
    Annotated[BlueGreen, Tag("BlueGreen")]
    | Annotated[Canary, Tag("Canary")]
    | Annotated[Rolling, Tag("Rolling")],
    Discriminator(
        _strategy_tag,
        custom_error_type="unknown_strategy",
        custom_error_message=(
            "strategy must be an object with exactly one key: BlueGreen, Canary or Rolling, "
            'e.g. {"BlueGreen": {"switch_delay_seconds": 30}}'
        ),
    ),
]


def strategy_params(strategy: BlueGreen | Canary | Rolling) -> Any:
    """The parameters inside the tag, e.g. ``BlueGreenParams``."""
    return getattr(strategy, strategy.kind)


# --- health --------------------------------------------------------------------------------------


class HealthCheck(WireModel):
    """ADR HealthCheck; fractional seconds allowed. Used by the manifest's ``[health]``."""

    endpoint: Annotated[str, Field(pattern=r"^/[^\s]*$", max_length=1024)] = Field(
        default="/health",
        description="Path probed with GET on each replica; any 2xx is healthy.",
    )
    interval_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=1.0, description="Time between probes."
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=HEALTH_CHECK_TIMEOUT_MS / 1000)] = Field(
        default=1.0, description="One probe's deadline (at most 5 s, the ADR's target)."
    )
    success_threshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=1, description="Consecutive successes that make a replica healthy."
    )
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="Consecutive failures that make it unhealthy."
    )
    start_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0,
        description="Refused connections before the first success mean 'still starting' "
        "until then.",
    )


# --- request -------------------------------------------------------------------------------------


class DeploymentMetadata(WireModel):
    triggered_by: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=2048)
    labels: dict[
        Annotated[str, StringConstraints(max_length=63)],
        Annotated[str, StringConstraints(max_length=256)],
    ] = Field(default_factory=dict, max_length=64)


class DeploymentRequest(WireModel):
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    source: SourceConfig
    target: TargetEnvironment
    strategy: DeploymentStrategy
    metadata: DeploymentMetadata = Field(default_factory=DeploymentMetadata)
    #: Shipyard extension (``shipyard deploy --rebuild``).
    rebuild: bool = Field(
        default=False,
        description="Build afresh: reuse no cached artifact, dependency environment or image "
        "layer (the build's BuildRequest.no_cache). Optional; default false.",
    )


# --- deployment resource -------------------------------------------------------------------------


class DeploymentStatus(StrEnum):
    PENDING = "Pending"
    BUILDING = "Building"
    SCANNING = "Scanning"
    DEPLOYING = "Deploying"
    AWAITING_SWITCH = "AwaitingSwitch"
    SWITCHING = "Switching"
    BAKING = "Baking"
    ANALYSING = "Analysing"  # a canary stage holds its weight while analysis measures it
    PAUSED = "Paused"  # waiting for POST /deployments/{id}/promote (or .../abort)
    #: ``[deploy] on_failure = "freeze"``: a check failed and traffic stays where it was until a
    #: human promotes (goes on) or aborts (rolls back), with a reason.
    FROZEN = "Frozen"
    ROLLING_BACK = "RollingBack"
    SUCCESS = "Success"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {DeploymentStatus.SUCCESS, DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK}
)


class ReadModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StageRecord(ReadModel):
    name: str
    status: Literal["running", "succeeded", "failed", "skipped"]
    started_at: datetime
    finished_at: datetime | None = None
    duration_ms: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class PerformanceValidation(ReadModel):
    """ADR section 8 ``ValidationResult``: each figure against its target."""

    build_time_ok: bool | None = None
    rollback_time_ok: bool | None = None
    health_check_ok: bool | None = None


class DeploymentMetrics(ReadModel):
    build_duration_ms: int | None = None
    health_check_duration_ms: int | None = None
    rollback_duration_ms: int | None = None
    detection_to_rollback_ms: int | None = Field(
        default=None,
        description="From the unhealthy verdict to 100% of traffic on the previous revision.",
    )
    abort_latency_ms: int | None = Field(
        default=None,
        description="From the failing analysis verdict (or the abort request) to canary weight 0 "
        "verified on the router.",
    )
    total_duration_ms: int | None = None
    validation: PerformanceValidation = Field(default_factory=PerformanceValidation)


def validate_performance(metrics: DeploymentMetrics) -> PerformanceValidation:
    """ADR section 8 ``PerformanceValidator.validate_deployment_performance``."""
    return PerformanceValidation(
        build_time_ok=None
        if metrics.build_duration_ms is None
        else metrics.build_duration_ms <= BUILD_TIME_TARGET_MS,
        rollback_time_ok=None
        if metrics.rollback_duration_ms is None
        else metrics.rollback_duration_ms <= ROLLBACK_TIME_TARGET_MS,
        health_check_ok=None
        if metrics.health_check_duration_ms is None
        else metrics.health_check_duration_ms <= HEALTH_CHECK_TIMEOUT_MS,
    )


def _absent(value: object) -> bool:
    return value is None


class DeploymentResult(ReadModel):
    """What ``POST /deploy?wait=true`` answers on success (the ADR's ``Ok(deployment.into())``)."""

    deployment_id: uuid.UUID
    status: DeploymentStatus
    service: str
    region: str
    revision: str | None
    previous_revision: str | None
    url: str | None
    duration_ms: int | None
    metrics: DeploymentMetrics
    #: Shipyard extension, fleet deployments only: a single-region result serialises exactly as
    #: the ADR's (``exclude_if`` rather than a model serializer keeps the schema's properties).
    regions: dict[str, str] | None = Field(
        default=None,
        exclude_if=_absent,
        description="Fleet deployments: each region's final state (switched, rolled_back, "
        "unreachable, converged).",
    )
    switch_skew_ms: float | None = Field(
        default=None,
        exclude_if=_absent,
        description="Fleet deployments: the largest time between the first and the last "
        "region's acknowledgement of one traffic change.",
    )


class PlannedStep(ReadModel):
    """One step of a deployment's plan as the API shows it: its type (``strategies/steps.py``),
    its stage name, and the fields that type has (a canary stage's ``weight``, a ``SetWeight``'s
    ``candidate`` percent, an ``Analyse`` step's resolved ``policy``, ...)."""

    type: str
    name: str
    seconds: float | None = None
    stage: int | None = None
    weight: int | None = None
    candidate: int | None = None
    replicas: int | None = None
    policy: dict[str, Any] | None = None


class PlanRead(ReadModel):
    steps: list[PlannedStep] = Field(default_factory=list)


class FrozenRead(ReadModel):
    """Why a deployment is Frozen (``[deploy] on_failure = "freeze"``): the failure, the index
    of the step that failed, and when."""

    cause: dict[str, Any]
    step: int
    at: datetime


class DeploymentProgress(ReadModel):
    """Where a deployment stands in its plan: what ``shipyard status --watch`` shows as the
    stages still to come, and why it is paused. Read from the record's ``progress``."""

    phase: Literal["build", "steps"] = "build"
    plan: PlanRead | None = Field(default=None, description="None until pre-flight planned it.")
    step: int = Field(default=0, description="Index in plan.steps of the step running (or next).")
    paused: str | None = Field(default=None, description="Why it waits for a human (Paused).")
    rolling_back: bool = False
    frozen: FrozenRead | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Why it waits for a human's promote or abort (Frozen; Shipyard extension).",
    )


class RegionRead(ReadModel):
    """One region of a fleet deployment as the API shows it."""

    state: Literal["pending", "deploying", "switched", "rolled_back", "unreachable", "converged"]
    url: str | None = None
    error: str | None = None
    updated_at: datetime | None = None


class SwitchSkewRead(ReadModel):
    step: int | None = None
    weights: dict[str, int]
    skew_ms: float
    acks_ms: dict[str, float] = Field(default_factory=dict)


class FleetRead(ReadModel):
    """A fleet deployment's regions and the skew of each traffic change (Shipyard extension)."""

    regions: dict[str, RegionRead]
    region_timeout_seconds: float
    switches: list[SwitchSkewRead] = Field(default_factory=list)


class DriverRead(ReadModel):
    """The control-plane replica driving a deployment in flight (it holds its lease)."""

    replica: str
    lease_expires_at: datetime


class NotificationRead(ReadModel):
    """One notification of a deployment to one sink, and how its delivery went (issue 16)."""

    sink: str
    event: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None = None
    delivered_at: datetime | None = None


class Deployment(ReadModel):
    """The deployment resource (``GET /api/v1/deployments/{id}``)."""

    id: uuid.UUID
    kind: Literal["deploy", "rollback"] = "deploy"
    service: str
    region: str
    status: DeploymentStatus
    strategy: dict[str, Any]
    source: SourceConfig | None
    triggered_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    blue_revision: str | None = None
    green_revision: str | None = None
    artifact_digest: str | None = None
    rollback_of: uuid.UUID | None = None
    rolled_back_by: uuid.UUID | None = None
    rollback_count: int = 0
    stages: list[StageRecord] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    result: DeploymentResult | None = None
    metrics: DeploymentMetrics = Field(default_factory=DeploymentMetrics)
    progress: DeploymentProgress | None = None
    # Fleet deployments only: a single-region document reads exactly as before fleets.
    regions: list[str] | None = Field(
        default=None,
        exclude_if=lambda v: v is None or len(v) < 2,
        description="A fleet deployment's regions (Shipyard extension).",
    )
    fleet: FleetRead | None = Field(
        default=None,
        exclude_if=_absent,
        description="Fleet deployments only: each region's state and the skews.",
    )
    driver: DriverRead | None = Field(
        default=None,
        description="The replica driving it and when its lease expires unless renewed (it is "
        "taken over then); null once it is over, or while no replica holds it (Shipyard "
        "extension).",
    )
    secrets: dict[str, int] = Field(
        default_factory=dict,
        exclude_if=lambda v: not v,
        description="The version of each app secret its revision runs with, e.g. "
        '`{"DB_PASSWORD": 3}` (`shipyard secret list`); never a value. Absent when it uses '
        "none (Shipyard extension).",
    )
    trace_id: str | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="The deployment's OpenTelemetry trace id (32 hex digits): its spans, and "
        "every audit record of it (detail.trace_id), carry it; absent for deployments "
        "recorded before tracing (Shipyard extension).",
    )
    notifications: list[NotificationRead] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Its notifications to the server's sinks and their delivery state: "
        "pending, delivered or failed (Shipyard extension).",
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
