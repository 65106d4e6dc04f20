"""A local fake of the Cloud Build REST API (v1), for the real ``google-cloud-build`` client.

No Google Cloud is reachable from tests or the demo, so ``CloudBuildBuilder`` is pointed at this
server (``client_options={"api_endpoint": fake.url}``, REST transport, anonymous credentials).
It implements exactly what the builder uses, as the public API reference describes it
(https://cloud.google.com/build/docs/api/reference/rest):

- ``POST /v1/projects/{projectId}/builds`` (projects.builds.create): validates the Build, stores
  it as QUEUED and answers a long-running ``Operation`` named ``operations/build/{project}/{id}``
  whose metadata is a ``BuildOperationMetadata``.
- ``GET /v1/operations/**`` (operations.get): the operation; every poll moves the build one step
  along QUEUED -> WORKING -> SUCCESS | FAILURE (the fake's clock is the client's polling, so tests
  never wait on wall time). A finished operation carries the Build as ``response`` or, for a
  failed build, an ``error`` (code 2, "Build failed; check build logs for details"), as the real
  service does.
- ``GET /v1/projects/{projectId}/builds/{id}`` (projects.builds.get) and
  ``POST .../builds/{id}:cancel`` (projects.builds.cancel).

Requests are decoded the way Google's front end does: ``$alt=json;enum-encoding=int`` means enums
arrive (and are answered) as numbers, unknown fields are an INVALID_ARGUMENT, errors are the
standard ``{"error": {"code", "message", "status"}}`` body. A successful kaniko step that was given
``--digest-file=/builder/outputs/output`` reports the image digest in
``results.buildStepOutputs`` (base64), which is where the real service puts a step's
``$BUILDER_OUTPUT/output``. Tests decide which builds fail with ``fail_when``.

Used by ``tests/build/test_cloudbuild_contract.py`` only, so it lives under ``tests/`` and never
ships in the wheel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

STATUSES = {
    "STATUS_UNKNOWN": 0,
    "PENDING": 10,
    "QUEUED": 1,
    "WORKING": 2,
    "SUCCESS": 3,
    "FAILURE": 4,
    "INTERNAL_ERROR": 5,
    "TIMEOUT": 6,
    "CANCELLED": 7,
    "EXPIRED": 9,
}
MACHINE_TYPES = {
    "UNSPECIFIED": 0,
    "N1_HIGHCPU_8": 1,
    "N1_HIGHCPU_32": 2,
    "E2_HIGHCPU_8": 5,
    "E2_HIGHCPU_32": 6,
    "E2_MEDIUM": 7,
}
SUBSTITUTION_OPTIONS = {"MUST_MATCH": 0, "ALLOW_LOOSE": 1}
FAILURE_TYPES = {"FAILURE_TYPE_UNSPECIFIED": 0, "USER_BUILD_STEP": 5}
_ENUMS: dict[str, dict[str, int]] = {
    "status": STATUSES,
    "machineType": MACHINE_TYPES,
    "substitutionOption": SUBSTITUTION_OPTIONS,
    "type": FAILURE_TYPES,
}
BUILTIN_SUBSTITUTIONS = frozenset(
    {
        "PROJECT_ID",
        "PROJECT_NUMBER",
        "BUILD_ID",
        "LOCATION",
        "COMMIT_SHA",
        "SHORT_SHA",
        "REVISION_ID",
        "BRANCH_NAME",
        "TAG_NAME",
        "REPO_NAME",
        "REPO_FULL_NAME",
        "TRIGGER_NAME",
        "TRIGGER_BUILD_CONFIG_PATH",
        "SERVICE_ACCOUNT_EMAIL",
        "SERVICE_ACCOUNT",
    }
)
# Fields of the Build resource and its parts this fake knows (the reference lists them all).
_BUILD_FIELDS = frozenset(
    {
        "name", "id", "projectId", "status", "statusDetail", "source", "steps", "results",
        "createTime", "startTime", "finishTime", "timeout", "images", "queueTtl", "artifacts",
        "logsBucket", "sourceProvenance", "buildTriggerId", "options", "logUrl", "substitutions",
        "tags", "secrets", "timing", "approval", "serviceAccount", "availableSecrets",
        "warnings", "gitConfig", "failureInfo", "dependencies",
    }
)  # fmt: skip
_STEP_FIELDS = frozenset(
    {
        "name", "env", "args", "dir", "id", "waitFor", "entrypoint", "secretEnv", "volumes",
        "timing", "pullTiming", "timeout", "status", "allowFailure", "exitCode", "allowExitCodes",
        "script", "automapSubstitutions", "results",
    }
)  # fmt: skip
_OPTIONS_FIELDS = frozenset(
    {
        "sourceProvenanceHash", "requestedVerifyOption", "machineType", "diskSizeGb",
        "substitutionOption", "dynamicSubstitutions", "automapSubstitutions",
        "logStreamingOption", "workerPool", "pool", "logging", "env", "secretEnv", "volumes",
        "defaultLogsBucketBehavior", "enableStructuredLogging",
    }
)  # fmt: skip
_SOURCE_FIELDS = frozenset(
    {"storageSource", "repoSource", "gitSource", "storageSourceManifest", "connectedRepository",
     "developerConnectConfig"}
)  # fmt: skip
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_USER_SUBSTITUTION = re.compile(r"^_[A-Z0-9_]+$")
_TEMPLATE_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")
MAX_STEPS = 300
MAX_DISK_GB = 4000
MAX_TIMEOUT_S = 86_400
DIGEST_FILE = "--digest-file=/builder/outputs/output"
_OPERATION = re.compile(r"^/v1/operations/build/([^/]+)/([A-Za-z0-9_=-]+)$")
_CREATE = re.compile(r"^/v1/projects/([^/]+)/builds$")
_BUILD = re.compile(r"^/v1/projects/([^/]+)/builds/([^/:]+)$")
_CANCEL = re.compile(r"^/v1/projects/([^/]+)/builds/([^/:]+):cancel$")


class InvalidArgument(ValueError):
    """What the real API answers as 400 INVALID_ARGUMENT."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class _Build:
    project: str
    resource: dict[str, Any]
    failure: str | None = None
    polls: int = 0


@dataclass
class FakeCloudBuild:
    """The fake service; ``with FakeCloudBuild() as fake: ... fake.url``."""

    host: str = "127.0.0.1"
    #: Decides a build's fate when it finishes: a failure detail string, or None for SUCCESS.
    fail_when: Callable[[dict[str, Any]], str | None] = lambda build: None
    #: Operation polls per status step (QUEUED -> WORKING -> done).
    polls_per_step: int = 1
    requests: list[RecordedRequest] = field(default_factory=list)
    _builds: dict[str, _Build] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeCloudBuild:
        fake = self

        class Handler(_Handler):
            service = fake

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast stop() returns
            name="fake-cloudbuild",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeCloudBuild:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def build(self, build_id: str) -> dict[str, Any]:
        """The stored Build resource (JSON, enum names) as builds.get would answer it."""
        with self._lock:
            return _clone(self._builds[build_id].resource)

    @property
    def build_ids(self) -> list[str]:
        with self._lock:
            return list(self._builds)

    # --- the API, called by the handler under the lock ------------------------------------

    def _create(self, project: str, body: Any) -> dict[str, Any]:
        build = validate_build(body)
        build_id = str(uuid.uuid4())
        now = _now()
        build.update(
            id=build_id,
            projectId=project,
            name=f"projects/{project}/locations/global/builds/{build_id}",
            status="QUEUED",
            createTime=now,
            logsBucket=f"gs://{project}_cloudbuild/logs",
            logUrl=(
                f"https://console.cloud.google.com/cloud-build/builds/{build_id}?project={project}"
            ),
        )
        build.setdefault("timeout", "600s")
        build.setdefault("queueTtl", "3600s")
        build.setdefault("options", {}).setdefault("logging", "LEGACY")
        for step in build["steps"]:
            step.setdefault("status", "QUEUED")
        stored = _Build(project=project, resource=build)
        self._builds[build_id] = stored
        return _operation(stored)

    def _poll(self, project: str, op_id: str) -> dict[str, Any]:
        build_id = _b64decode(op_id)
        stored = self._builds.get(build_id or "")
        if stored is None or stored.project != project:
            raise _NotFound(f"Operation operations/build/{project}/{op_id} not found.")
        stored.polls += 1
        if stored.polls % self.polls_per_step == 0:
            self._advance(stored)
        return _operation(stored)

    def _advance(self, stored: _Build) -> None:
        build = stored.resource
        if build["status"] == "QUEUED":
            build["status"] = "WORKING"
            build["startTime"] = _now()
            for step in build["steps"]:
                step["status"] = "WORKING"
        elif build["status"] == "WORKING":
            self._finish(stored)

    def _finish(self, stored: _Build) -> None:
        build = stored.resource
        build["finishTime"] = _now()
        failure = self.fail_when(_clone(build))
        if failure is not None:
            build["status"] = "FAILURE"
            build["statusDetail"] = f"Build step failure: {failure}"
            build["failureInfo"] = {"type": "USER_BUILD_STEP", "detail": failure}
            for step in build["steps"]:
                step["status"] = "FAILURE"
            return
        outputs: list[str] = []
        for step in build["steps"]:
            step["status"] = "SUCCESS"
            args = step.get("args", [])
            if DIGEST_FILE in args:
                digest = "sha256:" + hashlib.sha256(json.dumps(build["steps"]).encode()).hexdigest()
                outputs.append(base64.b64encode(digest.encode()).decode())
            else:
                outputs.append("")
        build["status"] = "SUCCESS"
        build["results"] = {
            "buildStepImages": [
                "sha256:" + hashlib.sha256(s["name"].encode()).hexdigest() for s in build["steps"]
            ],
            "buildStepOutputs": outputs,
        }

    def _get(self, project: str, build_id: str) -> dict[str, Any]:
        stored = self._builds.get(build_id)
        if stored is None or stored.project != project:
            raise _NotFound(f"Requested entity was not found: build {build_id}.")
        return stored.resource

    def _cancel(self, project: str, build_id: str) -> dict[str, Any]:
        build = self._get(project, build_id)
        if build["status"] in ("QUEUED", "WORKING", "PENDING"):
            build["status"] = "CANCELLED"
            build["finishTime"] = _now()
        return build


class _NotFound(LookupError):
    pass


class _Handler(BaseHTTPRequestHandler):
    service: FakeCloudBuild
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read .requests
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        numeric = any("enum-encoding=int" in v for v in query.get("$alt", []))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        svc = self.service
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        with svc._lock:
            svc.requests.append(
                RecordedRequest(
                    method, path, query, {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
            try:
                if isinstance(body, str):
                    raise InvalidArgument("Invalid JSON payload received. Unexpected token.")
                answer = self._route(method, path, body, numeric)
            except InvalidArgument as exc:
                self._send(HTTPStatus.BAD_REQUEST, _error(400, str(exc), "INVALID_ARGUMENT"))
                return
            except _NotFound as exc:
                self._send(HTTPStatus.NOT_FOUND, _error(404, str(exc), "NOT_FOUND"))
                return
            payload = _encode_enums(answer) if numeric else answer
        self._send(HTTPStatus.OK, payload)

    def _route(self, method: str, path: str, body: Any, numeric: bool) -> dict[str, Any]:
        svc = self.service
        if method == "POST" and (m := _CREATE.match(path)):
            return svc._create(m.group(1), _decode_enums(body) if numeric else body)
        if method == "GET" and (m := _OPERATION.match(path)):
            return svc._poll(m.group(1), m.group(2))
        if method == "GET" and (m := _BUILD.match(path)):
            return svc._get(m.group(1), m.group(2))
        if method == "POST" and (m := _CANCEL.match(path)):
            return svc._cancel(m.group(1), m.group(2))
        raise _NotFound(f"The requested URL {path} was not found on this server.")

    def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --- validation (the INVALID_ARGUMENT cases the builder can trigger) -----------------------------


def validate_build(body: Any) -> dict[str, Any]:
    """Check a Build the way projects.builds.create does; return a copy to store."""
    if not isinstance(body, dict):
        raise InvalidArgument("Invalid JSON payload received. Expected an object for 'build'.")
    _known(body, _BUILD_FIELDS, "build")
    for readonly in ("id", "status", "results", "createTime", "startTime", "finishTime"):
        if readonly in body and body[readonly] not in (None, "", 0, {}, []):
            raise InvalidArgument(f"invalid build: {readonly} is output only")
    steps = body.get("steps")
    if not isinstance(steps, list) or not steps:
        raise InvalidArgument("invalid build: must have at least one step")
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"invalid build: too many steps (maximum {MAX_STEPS})")
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise InvalidArgument(f"invalid build: step {i} is not an object")
        _known(step, _STEP_FIELDS, f"build.steps[{i}]")
        if not step.get("name"):
            raise InvalidArgument(f"invalid build: step {i} must specify a name")
        if not all(isinstance(a, str) for a in step.get("args", [])):
            raise InvalidArgument(f"invalid build: step {i} args must be strings")
    if "timeout" in body:
        _duration(body["timeout"], "build.timeout", MAX_TIMEOUT_S)
    if "queueTtl" in body:
        _duration(body["queueTtl"], "build.queue_ttl", 10 * MAX_TIMEOUT_S)
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise InvalidArgument("Invalid value at 'build.options': expected an object")
    _known(options, _OPTIONS_FIELDS, "build.options")
    if "machineType" in options and options["machineType"] not in MACHINE_TYPES:
        raise InvalidArgument(
            f"Invalid value at 'build.options.machine_type' ({options['machineType']!r})"
        )
    if "diskSizeGb" in options:
        try:
            disk = int(options["diskSizeGb"])
        except (TypeError, ValueError):
            raise InvalidArgument("Invalid value at 'build.options.disk_size_gb'") from None
        if not 0 <= disk <= MAX_DISK_GB:
            raise InvalidArgument(
                f"invalid build: disk_size_gb must be at most {MAX_DISK_GB} GB (got {disk})"
            )
    option = options.get("substitutionOption", "MUST_MATCH")
    if option not in SUBSTITUTION_OPTIONS:
        raise InvalidArgument(f"Invalid value at 'build.options.substitution_option' ({option!r})")
    source = body.get("source", {})
    if not isinstance(source, dict):
        raise InvalidArgument("Invalid value at 'build.source': expected an object")
    _known(source, _SOURCE_FIELDS, "build.source")
    if "gitSource" in source and not (source["gitSource"] or {}).get("url"):
        raise InvalidArgument("invalid build: source.git_source.url must be set")
    subs = body.get("substitutions", {})
    if not isinstance(subs, dict):
        raise InvalidArgument("Invalid value at 'build.substitutions': expected a map")
    for key in subs:
        if not (_USER_SUBSTITUTION.match(key) or key in BUILTIN_SUBSTITUTIONS):
            raise InvalidArgument(
                f'invalid build: key in the substitution map "{key}" does not match the '
                'pattern "^_[A-Z0-9_]+$" and is not a built-in substitution'
            )
    if option == "MUST_MATCH":
        for step in steps:
            for arg in step.get("args", []):
                for m in _TEMPLATE_VAR.finditer(arg):
                    var = m.group(1) or m.group(2)
                    if var not in subs and var not in BUILTIN_SUBSTITUTIONS:
                        raise InvalidArgument(
                            f'invalid build: key in the template "{var}" is not matched in '
                            "the substitution list"
                        )
    return _clone(body)


def _known(obj: dict[str, Any], fields: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in fields:
            raise InvalidArgument(
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': "
                "Cannot find field."
            )


def _duration(value: Any, where: str, maximum: float) -> None:
    if not isinstance(value, str) or not _DURATION.match(value):
        raise InvalidArgument(
            f"Invalid value at '{where}' (type.googleapis.com/google.protobuf.Duration)"
        )
    if float(value[:-1]) > maximum:
        raise InvalidArgument(f"invalid build: {where} must be at most {maximum:g}s")


# --- encoding ------------------------------------------------------------------------------------


def _operation(stored: _Build) -> dict[str, Any]:
    build = stored.resource
    op_id = base64.urlsafe_b64encode(build["id"].encode()).decode()
    op: dict[str, Any] = {
        "name": f"operations/build/{stored.project}/{op_id}",
        "metadata": {
            "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
            "build": build,
        },
        "done": False,
    }
    status = build["status"]
    if status == "SUCCESS":
        op["done"] = True
        op["response"] = {
            "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.Build",
            **build,
        }
    elif status in ("FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"):
        op["done"] = True
        op["error"] = {"code": 2, "message": "Build failed; check build logs for details"}
        if status == "CANCELLED":
            op["error"] = {"code": 1, "message": "Build was cancelled"}
    return _clone(op)


def _encode_enums(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (_ENUMS[k].get(v, v) if k in _ENUMS and isinstance(v, str) else _encode_enums(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_encode_enums(v) for v in value]
    return value


def _decode_enums(value: Any) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in _ENUMS and isinstance(v, int):
                names = {n: name for name, n in _ENUMS[k].items()}
                out[k] = names.get(v, v)
            else:
                out[k] = _decode_enums(v)
        return out
    if isinstance(value, list):
        return [_decode_enums(v) for v in value]
    return value


def _clone(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(value))
    return copied


def _error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _b64decode(op_id: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(op_id.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
