"""Contract suite: ``FakeCloudBuild`` behaves like the Cloud Build v1 REST API, the real
``google-cloud-build`` client is what talks to it, and ``CloudBuildBuilder`` submits the ADR's
build through that client.

What "like the real API" is checked against: the published API surface as compiled into the
client library (its REST routes and its protobuf schema: every answer of the fake must parse
strictly, unknown fields rejected, into the library's own ``Operation`` / ``Build`` messages) and
the reference documentation's rules for malformed builds and status transitions.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc
from google.api_core import operation as gaoperation
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud.devtools import cloudbuild_v1 as cb
from google.longrunning import operations_pb2
from google.protobuf import json_format

from shipyard.build.base import BuildRequest
from shipyard.build.cloudbuild import KANIKO, CloudBuildBuilder, CloudBuildBuilderConfig
from shipyard.domain.clock import FakeClock
from shipyard.domain.models import SourceConfig
from shipyard.errors import BuildFailed, SourceError, TransientError

from .cloudbuild_fake import FakeCloudBuild
from .helpers import GitRepo, GitServer


@pytest.fixture
def fake() -> Iterator[FakeCloudBuild]:
    with FakeCloudBuild() as service:
        yield service


def _client(fake: FakeCloudBuild) -> cb.CloudBuildClient:
    return cb.CloudBuildClient(
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        transport="rest",
        client_options=ClientOptions(api_endpoint=fake.url),
    )


def _minimal_build(**extra: Any) -> cb.Build:
    return cb.Build(
        steps=[cb.BuildStep(name="gcr.io/cloud-builders/docker", args=["version"])], **extra
    )


def _post(fake: FakeCloudBuild, body: Any, project: str = "p") -> requests.Response:
    return requests.post(f"{fake.url}/v1/projects/{project}/builds", json=body, timeout=10)


# --- the fake speaks the API the client library was generated from ----------------------------


def test_the_real_client_library_talks_to_the_fake(fake: FakeCloudBuild) -> None:
    client = _client(fake)
    op: Any = client.create_build(project_id="proj", build=_minimal_build())

    assert isinstance(op, gaoperation.Operation)
    assert isinstance(op.metadata, cb.BuildOperationMetadata)
    first = fake.requests[0]
    assert first.method == "POST"
    assert first.path == "/v1/projects/proj/builds"
    assert first.query["$alt"] == ["json;enum-encoding=int"]
    assert "gapic/" in first.headers["x-goog-api-client"]  # the generated client, not our code
    assert "authorization" not in first.headers  # anonymous credentials


def test_every_answer_parses_strictly_into_the_published_schema(fake: FakeCloudBuild) -> None:
    created = _post(fake, {"steps": [{"name": "busybox", "args": ["true"]}]}).json()
    name = created["name"]
    answers = [created]
    for _ in range(3):
        answers.append(requests.get(f"{fake.url}/v1/{name}", timeout=10).json())
    for answer in answers:
        json_format.Parse(
            json.dumps(answer), operations_pb2.Operation(), ignore_unknown_fields=False
        )
        meta = answer["metadata"]
        assert meta["@type"].endswith("google.devtools.cloudbuild.v1.BuildOperationMetadata")
        cb.Build.from_json(json.dumps(meta["build"]), ignore_unknown_fields=False)
    build_id = answers[-1]["metadata"]["build"]["id"]
    got = requests.get(f"{fake.url}/v1/projects/p/builds/{build_id}", timeout=10).json()
    cb.Build.from_json(json.dumps(got), ignore_unknown_fields=False)
    assert got["name"] == f"projects/p/locations/global/builds/{build_id}"
    assert name == "operations/build/p/" + base64.urlsafe_b64encode(build_id.encode()).decode()


def test_status_goes_queued_working_success(fake: FakeCloudBuild) -> None:
    client = _client(fake)
    op: Any = client.create_build(project_id="proj", build=_minimal_build())
    seen = [op.metadata.build.status]
    while not op.done():
        seen.append(op.metadata.build.status)
    result = op.result()
    seen.append(result.status)
    S = cb.Build.Status
    assert seen == [S.QUEUED, S.WORKING, S.SUCCESS]
    assert result.start_time and result.finish_time and result.create_time
    assert client.get_build(project_id="proj", id=result.id).status == S.SUCCESS


def test_failed_build_is_an_operation_error_and_a_failure_status(fake: FakeCloudBuild) -> None:
    fake.fail_when = lambda build: "step 1 exited with 1"
    client = _client(fake)
    op: Any = client.create_build(project_id="proj", build=_minimal_build())
    statuses = []
    while not op.done():
        statuses.append(op.metadata.build.status)
    with pytest.raises(gexc.GoogleAPICallError, match="Build failed"):
        op.result()
    final = client.get_build(project_id="proj", id=op.metadata.build.id)
    assert statuses == [cb.Build.Status.WORKING]
    assert final.status == cb.Build.Status.FAILURE
    assert final.failure_info.type_ == cb.Build.FailureInfo.FailureType.USER_BUILD_STEP
    assert final.failure_info.detail == "step 1 exited with 1"


def test_cancel(fake: FakeCloudBuild) -> None:
    client = _client(fake)
    op: Any = client.create_build(project_id="proj", build=_minimal_build())
    cancelled = client.cancel_build(project_id="proj", id=op.metadata.build.id)
    assert cancelled.status == cb.Build.Status.CANCELLED
    assert op.done()
    with pytest.raises(gexc.GoogleAPICallError):
        op.result()


def test_unknown_build_and_operation_are_not_found(fake: FakeCloudBuild) -> None:
    client = _client(fake)
    with pytest.raises(gexc.NotFound):
        client.get_build(project_id="proj", id="no-such-build")
    answer = requests.get(f"{fake.url}/v1/operations/build/proj/bm9wZQ==", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["status"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({}, "at least one step", id="no-steps"),
        pytest.param({"steps": [{"args": ["x"]}]}, "must specify a name", id="unnamed-step"),
        pytest.param(
            {"steps": [{"name": "a"}], "stepz": []}, 'Unknown name "stepz"', id="unknown-field"
        ),
        pytest.param(
            {"steps": [{"name": "a", "argz": []}]}, 'Unknown name "argz"', id="unknown-step-field"
        ),
        pytest.param({"steps": [{"name": "a"}], "timeout": "10m"}, "timeout", id="bad-duration"),
        pytest.param(
            {"steps": [{"name": "a"}], "timeout": "90000s"}, "at most", id="timeout-over-24h"
        ),
        pytest.param(
            {"steps": [{"name": "a"}], "options": {"machineType": "HUGE"}},
            "machine_type",
            id="unknown-machine-type",
        ),
        pytest.param(
            {"steps": [{"name": "a"}], "options": {"diskSizeGb": "9000"}},
            "disk_size_gb",
            id="disk-too-large",
        ),
        pytest.param(
            {"steps": [{"name": "a"}], "substitutions": {"FOO": "x"}},
            "does not match",
            id="bad-substitution-key",
        ),
        pytest.param(
            {"steps": [{"name": "a", "args": ["$_MISSING"]}]},
            '"_MISSING" is not matched',
            id="must-match-unmatched-variable",
        ),
        pytest.param(
            {"steps": [{"name": "a"}], "status": "SUCCESS"}, "output only", id="output-only"
        ),
        pytest.param([1, 2], "Expected an object", id="not-an-object"),
    ],
)
def test_malformed_builds_are_invalid_argument(
    fake: FakeCloudBuild, body: Any, message: str
) -> None:
    answer = _post(fake, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["code"] == 400
    assert message in error["message"]
    assert fake.build_ids == []


def test_allow_loose_accepts_unmatched_variables(fake: FakeCloudBuild) -> None:
    body = {
        "steps": [{"name": "a", "args": ["$_MISSING"]}],
        "options": {"substitutionOption": "ALLOW_LOOSE"},
    }
    assert _post(fake, body).status_code == 200


def test_the_client_maps_a_400_to_its_bad_request_exception(fake: FakeCloudBuild) -> None:
    with pytest.raises(gexc.BadRequest, match="at least one step"):
        _client(fake).create_build(project_id="proj", build=cb.Build())


def test_unknown_route_is_a_google_style_404(fake: FakeCloudBuild) -> None:
    answer = requests.get(f"{fake.url}/v1/projects/p/triggers", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == 404


# --- CloudBuildBuilder through the real client against the fake --------------------------------


DOCKERFILE = "FROM scratch\nCOPY app.py /app.py\n"


@pytest.fixture
def remote(repo: GitRepo, git_server: GitServer) -> tuple[GitRepo, str]:
    repo.write("Dockerfile", DOCKERFILE)
    repo.commit("dockerfile")
    return repo, git_server.url("repo")


def _builder(fake: FakeCloudBuild, data_dir: Path, clock: FakeClock) -> CloudBuildBuilder:
    config = CloudBuildBuilderConfig(
        project_id="shipyard-test",
        registry="europe-docker.pkg.dev/shipyard-test/apps",
        cache_bucket="shipyard-test-build-cache",
        api_endpoint=fake.url,
        anonymous=True,
    )
    return CloudBuildBuilder(data_dir, config, clock=clock)


def _source(remote: tuple[GitRepo, str], **extra: Any) -> SourceConfig:
    repo, url = remote
    return SourceConfig(repository=url, branch="main", commit=repo.head(), **extra)


async def test_builder_submits_the_adr_build_and_reads_the_digest(
    fake: FakeCloudBuild, remote: tuple[GitRepo, str], data_dir: Path
) -> None:
    clock = FakeClock()
    lines: list[str] = []
    artifact = await _builder(fake, data_dir, clock).build(
        BuildRequest(_source(remote), log_sink=lines.append)
    )
    repo, url = remote
    commit = repo.head()

    create = fake.requests[0]
    assert create.path == "/v1/projects/shipyard-test/builds"
    body = create.body
    assert body["source"] == {"gitSource": {"url": url, "revision": commit}}
    assert [s["name"] for s in body["steps"]] == [
        "gcr.io/cloud-builders/gsutil",
        KANIKO,
        "gcr.io/cloud-builders/gsutil",
    ]
    assert body["steps"][0]["args"] == [
        "cp",
        "gs://shipyard-test-build-cache/cache.tar.gz",
        "cache.tar.gz",
    ]
    assert body["steps"][1]["args"][:4] == [
        "--dockerfile=Dockerfile",
        "--cache=true",
        "--cache-ttl=168h",
        "--destination=europe-docker.pkg.dev/shipyard-test/apps/hello:$COMMIT_SHA",
    ]
    assert body["steps"][2]["args"] == [
        "cp",
        "target/release/deps/*",
        "gs://shipyard-test-build-cache/",
    ]
    assert body["options"] == {"machineType": 5, "diskSizeGb": "100", "substitutionOption": 1}
    assert body["timeout"] == "600s"
    assert body["substitutions"] == {"COMMIT_SHA": commit}

    built = fake.build(fake.build_ids[0])
    outputs = built["results"]["buildStepOutputs"]
    assert artifact.digest == base64.b64decode(outputs[1]).decode()
    assert artifact.kind == "oci-image"
    assert artifact.location == f"europe-docker.pkg.dev/shipyard-test/apps/hello@{artifact.digest}"
    assert artifact.commit == commit
    assert artifact.builder == "cloudbuild"
    assert any("WORKING" in line for line in lines)
    assert clock.now() > 1_700_000_000.0  # polled with the injected clock, not wall time


async def test_no_cache_restores_no_cache_and_turns_off_kanikos_layer_cache(
    fake: FakeCloudBuild, remote: tuple[GitRepo, str], data_dir: Path
) -> None:
    lines: list[str] = []
    artifact = await _builder(fake, data_dir, FakeClock()).build(
        BuildRequest(_source(remote), log_sink=lines.append, no_cache=True)
    )
    steps = fake.requests[0].body["steps"]
    assert [s["name"] for s in steps] == [KANIKO, "gcr.io/cloud-builders/gsutil"]
    assert "--cache=false" in steps[0]["args"] and "--cache=true" not in steps[0]["args"]
    assert steps[1]["args"][0] == "cp"  # the save step still refreshes the bucket's cache
    # The digest is still read from the kaniko step's output, now step 0.
    outputs = fake.build(fake.build_ids[0])["results"]["buildStepOutputs"]
    assert artifact.digest == base64.b64decode(outputs[0]).decode()
    assert artifact.cache.no_cache is True
    assert any("no_cache requested" in line for line in lines)


async def test_builder_reports_a_failed_build(
    fake: FakeCloudBuild, remote: tuple[GitRepo, str], data_dir: Path
) -> None:
    fake.fail_when = lambda build: "kaniko: COPY failed: file not found"
    with pytest.raises(BuildFailed, match=r"ended FAILURE: kaniko: COPY failed") as info:
        await _builder(fake, data_dir, FakeClock()).build(BuildRequest(_source(remote)))
    assert info.value.detail["status"] == "FAILURE"
    assert "console.cloud.google.com" in info.value.detail["log_url"]


async def test_builder_uses_the_requested_dockerfile(
    fake: FakeCloudBuild, remote: tuple[GitRepo, str], data_dir: Path
) -> None:
    repo, _ = remote
    repo.write("deploy/Containerfile", DOCKERFILE)
    repo.commit("containerfile")
    await _builder(fake, data_dir, FakeClock()).build(
        BuildRequest(_source(remote, dockerfile="deploy/Containerfile"))
    )
    assert fake.requests[0].body["steps"][1]["args"][0] == "--dockerfile=deploy/Containerfile"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("missing", "not found in commit", id="missing"),
        pytest.param("symlink-out", "outside the repository", id="symlink-escape"),
        pytest.param("symlink-abs", "outside the repository", id="absolute-symlink"),
    ],
)
async def test_builder_refuses_dockerfiles_outside_the_repository(
    setup: str,
    message: str,
    fake: FakeCloudBuild,
    remote: tuple[GitRepo, str],
    data_dir: Path,
) -> None:
    repo, _ = remote
    repo.remove("Dockerfile")
    if setup == "symlink-out":
        repo.symlink("Dockerfile", "../../etc/Dockerfile")
    elif setup == "symlink-abs":
        repo.symlink("Dockerfile", "/etc/passwd")
    repo.commit(setup)
    with pytest.raises(SourceError, match=message):
        await _builder(fake, data_dir, FakeClock()).build(BuildRequest(_source(remote)))
    assert fake.requests == []


async def test_builder_needs_a_url_cloud_build_can_fetch(
    fake: FakeCloudBuild, repo: GitRepo, data_dir: Path
) -> None:
    with pytest.raises(SourceError, match="not a URL Cloud Build can fetch"):
        await _builder(fake, data_dir, FakeClock()).build(BuildRequest(repo.source()))


async def test_unreachable_cloud_build_is_transient(
    remote: tuple[GitRepo, str], data_dir: Path
) -> None:
    stopped = FakeCloudBuild().start()
    url = stopped.url
    stopped.stop()
    config = CloudBuildBuilderConfig(
        project_id="p",
        registry="gcr.io/p",
        cache_bucket="bucket",
        api_endpoint=url,
        anonymous=True,
    )
    builder = CloudBuildBuilder(data_dir, config, clock=FakeClock())
    with pytest.raises(TransientError, match="cannot reach Cloud Build"):
        await builder.build(BuildRequest(_source(remote)))
