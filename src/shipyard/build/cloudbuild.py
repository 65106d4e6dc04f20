"""``CloudBuildBuilder``: builds an OCI image on Google Cloud Build with kaniko (ADR-014 §5).

Chosen by ``[build] builder = "cloudbuild"`` through ``registry.builder_for``. The commit is
resolved and checked locally first (``source.resolve_source``: it exists, it is on the branch,
its Dockerfile stays inside the repository), then the ADR's build is submitted with the real
``google-cloud-build`` client (blocking calls through ``asyncio.to_thread``)::

    source   git_source {url: <repository>, revision: <full commit>}
    steps    1. gcr.io/cloud-builders/gsutil  cp gs://<bucket>/cache.tar.gz cache.tar.gz
             2. gcr.io/kaniko-project/executor --dockerfile=<path> --cache=true --cache-ttl=168h
                --destination=<registry>/<service>:$COMMIT_SHA --digest-file=/builder/outputs/output
             3. gcr.io/cloud-builders/gsutil  cp <cache_save_path> gs://<bucket>/
    options  machine_type E2_HIGHCPU_8, disk_size_gb 100, substitution_option ALLOW_LOOSE
    timeout  [build] timeout_seconds (ADR default 600s)

Two deliberate additions to the ADR's listing: the gsutil cache steps may fail
(``allow_failure``: the first build has no cache to restore, and a cache is an optimisation, not
a requirement), and kaniko writes the pushed image's digest to ``$BUILDER_OUTPUT/output`` so it
comes back in ``results.build_step_outputs`` (kaniko pushes the image itself, so
``results.images`` stays empty). ``COMMIT_SHA`` is passed as a substitution as well, so the tag is
right whichever way the build was started.

``BuildRequest.no_cache`` leaves out step 1 (nothing restored from the bucket) and runs kaniko
with ``--cache=false`` (no layer read from, or pushed to, its cache repository); step 3 still
saves, so the bucket's cache is refreshed from this build.

The long-running operation is polled with the injected ``Clock``; tests point the client at
``tests/build/cloudbuild_fake.FakeCloudBuild`` (``api_endpoint`` + anonymous credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Literal

import requests
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud.devtools import cloudbuild_v1 as cb
from pydantic import BaseModel, ConfigDict, Field

from shipyard.build.base import Artifact, BuildRequest, CacheReport
from shipyard.build.running import BuildLog
from shipyard.build.source import (
    ResolvedSource,
    read_manifest_at,
    repository_file,
    resolve_source,
)
from shipyard.domain.clock import Clock, SystemClock
from shipyard.domain.manifest import Manifest
from shipyard.errors import BuildFailed, ShipyardError, SourceError, TransientError
from shipyard.logs import SecretMasker

KANIKO = "gcr.io/kaniko-project/executor"
GSUTIL = "gcr.io/cloud-builders/gsutil"
DIGEST_OUTPUT = "/builder/outputs/output"
_MAX_ERROR_CHARS = 800
_GOOGLE = "cloudbuild.googleapis.com"
_REMOTE_PREFIXES = ("https://", "http://", "ssh://", "git://")


class CloudBuildBuilderConfig(BaseModel):
    """Server-side settings of the Cloud Build builder (the registry's config for "cloudbuild")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cloudbuild"] = "cloudbuild"
    project_id: str = Field(min_length=1, max_length=128)
    #: Image registry prefix, e.g. "europe-docker.pkg.dev/my-project/apps" or "gcr.io/my-project".
    registry: str = Field(min_length=1, max_length=512)
    cache_bucket: str = Field(min_length=3, max_length=222)
    #: What the ADR's third step saves to the bucket.
    cache_save_path: str = "target/release/deps/*"
    machine_type: Literal["E2_HIGHCPU_8", "E2_HIGHCPU_32", "N1_HIGHCPU_8", "N1_HIGHCPU_32"] = (
        "E2_HIGHCPU_8"
    )
    disk_size_gb: int = Field(default=100, ge=10, le=4000)
    #: None: Google's endpoint with application-default credentials. Set (with ``anonymous``)
    #: to talk to ``FakeCloudBuild``.
    api_endpoint: str | None = None
    anonymous: bool = False
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    #: Extra wait on top of the build timeout for the build to leave the queue.
    queue_timeout_seconds: float = Field(default=600.0, ge=0)
    request_timeout_seconds: float = Field(default=60.0, gt=0)


class CloudBuildBuilder:
    kind = "cloudbuild"

    def __init__(
        self,
        data_dir: Path,
        config: CloudBuildBuilderConfig,
        *,
        clock: Clock | None = None,
        client: cb.CloudBuildClient | None = None,
        shared_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: Where logs/ go (``serve --shared-dir``); the data directory without.
        self.shared_dir = shared_dir or data_dir
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._client = client
        (self.shared_dir / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def client(self) -> cb.CloudBuildClient:
        if self._client is None:
            options = ClientOptions(api_endpoint=self.config.api_endpoint)
            self._client = cb.CloudBuildClient(
                credentials=_anonymous() if self.config.anonymous else None,
                transport="rest",
                client_options=options,
            )
        return self._client

    async def build(self, request: BuildRequest) -> Artifact:
        started = time.monotonic()
        log_path = self.shared_dir / "logs" / f"cloudbuild-{time.time_ns()}.log"
        with BuildLog(
            log_path,
            request.log_sink,
            mask=SecretMasker.from_data_dir(self.data_dir, shared_dir=self.shared_dir),
            max_bytes=request.max_log_bytes,
        ) as log:
            try:
                resolved = await resolve_source(request.source, cache_dir=self.data_dir)
                if not resolved.location.startswith(_REMOTE_PREFIXES):
                    raise SourceError(
                        f"repository {resolved.repository!r} is not a URL Cloud Build can fetch; "
                        "use an https://, ssh:// or git:// URL"
                    )
                manifest = await read_manifest_at(resolved)
                dockerfile = await repository_file(
                    resolved,
                    request.source.dockerfile or manifest.build.dockerfile or "Dockerfile",
                    what="dockerfile",
                )
                build = self.build_config(resolved, manifest, dockerfile, no_cache=request.no_cache)
                if request.no_cache:
                    log.note("no_cache requested: no cache restore step, kaniko --cache=false")
                log.note(
                    f"submitting Cloud Build for {resolved.commit} to {self.config.project_id}"
                )
                result = await self._run(build, manifest, log)
                digest = _image_digest(result)
                duration = int((time.monotonic() - started) * 1000)
                log.note(f"built {digest} in {duration} ms (Cloud Build {result.id})")
                return Artifact(
                    digest=digest,
                    kind="oci-image",
                    location=f"{self._repository(manifest)}@{digest}",
                    commit=resolved.commit,
                    manifest=manifest,
                    builder=self.kind,
                    duration_ms=duration,
                    cache=CacheReport(durations_ms={"total": duration}, no_cache=request.no_cache),
                    log_path=log_path,
                    tree=resolved.tree,
                )
            except ShipyardError as exc:
                log.note(f"build failed: {exc.message}")
                exc.detail.setdefault("log_path", str(log_path))
                raise

    def build_config(
        self,
        resolved: ResolvedSource,
        manifest: Manifest,
        dockerfile: str,
        *,
        no_cache: bool = False,
    ) -> cb.Build:
        """The ADR §5 build for this commit (pure; the contract tests inspect it). With
        ``no_cache`` the restore step is left out and kaniko runs with ``--cache=false``."""
        cfg = self.config
        bucket = f"gs://{cfg.cache_bucket}"
        restore = cb.BuildStep(
            name=GSUTIL,
            args=["cp", f"{bucket}/cache.tar.gz", "cache.tar.gz"],
            allow_failure=True,
        )
        kaniko = cb.BuildStep(
            name=KANIKO,
            args=[
                f"--dockerfile={dockerfile}",
                "--cache=false" if no_cache else "--cache=true",
                "--cache-ttl=168h",
                f"--destination={self._repository(manifest)}:$COMMIT_SHA",
                f"--digest-file={DIGEST_OUTPUT}",
            ],
        )
        save = cb.BuildStep(
            name=GSUTIL,
            args=["cp", cfg.cache_save_path, f"{bucket}/"],
            allow_failure=True,
        )
        return cb.Build(
            source=cb.Source(
                git_source=cb.GitSource(url=resolved.location, revision=resolved.commit)
            ),
            steps=[kaniko, save] if no_cache else [restore, kaniko, save],
            options=cb.BuildOptions(
                machine_type=getattr(cb.BuildOptions.MachineType, cfg.machine_type),
                disk_size_gb=cfg.disk_size_gb,
                substitution_option=cb.BuildOptions.SubstitutionOption.ALLOW_LOOSE,
            ),
            substitutions={"COMMIT_SHA": resolved.commit},
            timeout={"seconds": int(manifest.build.timeout_seconds)},
            tags=["shipyard", manifest.service.name],
        )

    def _repository(self, manifest: Manifest) -> str:
        return f"{self.config.registry.rstrip('/')}/{manifest.service.name}"

    async def _run(self, build: cb.Build, manifest: Manifest, log: BuildLog) -> cb.Build:
        cfg = self.config
        operation = await self._call(
            self.client.create_build,
            project_id=cfg.project_id,
            build=build,
            timeout=cfg.request_timeout_seconds,
        )
        build_id = operation.metadata.build.id
        log.note(f"Cloud Build {build_id} queued; logs: {operation.metadata.build.log_url}")
        limit = manifest.build.timeout_seconds + cfg.queue_timeout_seconds
        status = None
        try:
            async with asyncio.timeout(limit):
                while not await self._call(operation.done):
                    current = operation.metadata.build.status
                    if current != status:
                        status = current
                        log.note(f"Cloud Build {build_id}: {cb.Build.Status(current).name}")
                    await self.clock.sleep(cfg.poll_interval_seconds)
        except TimeoutError as exc:
            with contextlib.suppress(gexc.GoogleAPIError, requests.RequestException):
                await asyncio.to_thread(
                    self.client.cancel_build, project_id=cfg.project_id, id=build_id
                )
            raise BuildFailed(
                f"Cloud Build {build_id} did not finish within {limit:g} s "
                f"([build] timeout_seconds + queue); cancelled",
                build_id=build_id,
            ) from exc
        try:
            result: cb.Build = operation.result()
        except gexc.GoogleAPICallError as exc:
            final = await self._call(self.client.get_build, project_id=cfg.project_id, id=build_id)
            detail = final.failure_info.detail or final.status_detail or exc.message
            raise BuildFailed(
                f"Cloud Build {build_id} ended {cb.Build.Status(final.status).name}: "
                f"{_cut(str(detail))}; logs: {final.log_url}",
                build_id=build_id,
                status=cb.Build.Status(final.status).name,
                log_url=final.log_url,
            ) from exc
        log.note(f"Cloud Build {build_id}: {cb.Build.Status(result.status).name}")
        return result

    async def _call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """One blocking client call in a thread, its errors translated."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.TooManyRequests) as exc:
            raise TransientError(
                f"Cloud Build is unavailable: {_cut(str(exc))}", retry_after=30.0
            ) from exc
        except requests.RequestException as exc:
            raise TransientError(
                f"cannot reach Cloud Build at {self.config.api_endpoint or _GOOGLE}: "
                f"{_cut(str(exc))}",
                retry_after=30.0,
            ) from exc
        except gexc.GoogleAPICallError as exc:
            raise BuildFailed(
                f"Cloud Build rejected the request ({exc.code}): {_cut(exc.message or str(exc))}"
            ) from exc
        except gexc.GoogleAPIError as exc:
            raise BuildFailed(f"Cloud Build client error: {_cut(str(exc))}") from exc


def _anonymous() -> Any:
    return AnonymousCredentials()  # type: ignore[no-untyped-call]


def _image_digest(result: cb.Build) -> str:
    """The kaniko step's ``$BUILDER_OUTPUT/output`` (its ``--digest-file``), else results.images."""
    for index, step in enumerate(result.steps):
        if step.name == KANIKO and index < len(result.results.build_step_outputs):
            text = result.results.build_step_outputs[index].decode("utf-8", "replace").strip()
            if text.startswith("sha256:") and len(text) == 71:
                return text
    for image in result.results.images:
        if image.digest.startswith("sha256:"):
            return str(image.digest)
    raise BuildFailed(
        f"Cloud Build {result.id} succeeded but reported no image digest "
        "(no kaniko --digest-file output, no results.images)"
    )


def _cut(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."
