"""A joined agent fetches directory artifacts from the control plane by digest
(``agent/fetching.py``): against the real route (``api/fleet_artifacts.py``) under uvicorn and a
real built artifact, the fetched tree hashes to the digest; whatever is wrong with what arrives
(another tree, a hostile tar, too much of it, an unknown digest) is refused with nothing left in
the cache; a cached artifact is used without the control plane. Then through the agent: a start
runs the fetched copy, a mismatch starts nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from shipyard.agent.fetching import ArtifactFetcher, ArtifactFetchFailed
from shipyard.agent.server import Agent, agent_dir
from shipyard.build.archive import ExtractLimits
from shipyard.build.base import Artifact
from shipyard.build.digest import artifact_dirname, digest_tree
from shipyard.errors import ArtifactVerificationFailed
from shipyard.runtime.base import RevisionSpec
from tests.agent.artifact_server import (
    REGION_HEADER,
    ArtifactServer,
    artifact_server,
    build_artifact,
    copy_tree,
    member,
    tar_of,
)
from tests.agent.helpers import (
    TRUSTED_KEY,
    agent_client,
    eventually,
    get_info,
    make_artifact,
    spec_for,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    return build_artifact(tmp_path_factory.mktemp("built"))


@pytest.fixture
def server(built: Artifact) -> Iterator[ArtifactServer]:
    with artifact_server() as s:
        s.served[built.digest] = Path(built.location)
        yield s


@pytest.fixture
async def client(server: ArtifactServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.url, headers={REGION_HEADER: "eu"}, trust_env=False, timeout=30
    ) as c:
        yield c


def _spec(built: Artifact, location: str = "/nowhere/on/this/host") -> RevisionSpec:
    return RevisionSpec(
        service="svc",
        revision="v1",
        artifact_digest=built.digest,
        artifact_location=location,
        argv=["python3", "app.py"],
    )


def _cache_entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache)) if cache.exists() else []


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "identity"])
async def test_the_fetched_tree_hashes_to_the_digest(
    built: Artifact, client: httpx.AsyncClient, tmp_path: Path, compress: bool
) -> None:
    cache = tmp_path / "cache"
    spec = _spec(built)
    local = await ArtifactFetcher(client, cache, compress=compress).localise(spec)
    where = Path(local.artifact_location)
    assert where == cache / artifact_dirname(built.digest)
    assert local == replace(spec, artifact_location=str(where))
    assert digest_tree(where) == built.digest
    # What the digest covers came through: links verbatim, the executable bit.
    assert os.readlink(where / "data") == "static/data.bin"
    assert os.readlink(where / ".venv" / "bin" / "python") == "python3"
    assert os.readlink(where / ".venv/bin/python3") == os.readlink(
        Path(built.location) / ".venv/bin/python3"
    )
    assert os.stat(where / "bin" / "tool").st_mode & stat.S_IXUSR
    assert not os.stat(where / "app.py").st_mode & 0o222  # read-only, as the builder leaves it
    assert _cache_entries(cache) == [artifact_dirname(built.digest)]  # no scratch left


async def test_another_tree_under_the_digest_is_refused_and_nothing_is_kept(
    built: Artifact, server: ArtifactServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    other = copy_tree(Path(built.location), tmp_path / "other")
    with open(other / "app.py", "r+b") as f:  # one byte
        f.write(b"P")
    server.served[built.digest] = other
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactVerificationFailed) as refused:
        await ArtifactFetcher(client, cache).localise(_spec(built))
    assert refused.value.detail["check"] == "digest"
    assert refused.value.detail["actual"] == digest_tree(other) != built.digest
    assert "nothing was kept" in refused.value.message
    assert _cache_entries(cache) == []


def _dir(name: str) -> tarfile.TarInfo:
    info: tarfile.TarInfo = member(name, tarfile.DIRTYPE, mode=0o755)
    return info


HOSTILE = {
    "dot-dot": ([(member("../evil"), b"x")], "unsafe_path"),
    "dot-dot-inside": ([(_dir("a"), None), (member("a/../../evil"), b"x")], "unsafe_path"),
    "absolute": ([(member("/tmp/evil"), b"x")], "unsafe_path"),
    "symlink-up": ([(member("up", tarfile.SYMTYPE, link="../../etc"), None)], "link_escapes"),
    "symlink-absolute": ([(member("etc", tarfile.SYMTYPE, link="/etc"), None)], "link_escapes"),
    "symlink-escapes-through-a-link": (
        [
            (_dir("d"), None),
            (member("d/up", tarfile.SYMTYPE, link=".."), None),
            (member("x", tarfile.SYMTYPE, link="d/up/.."), None),
        ],
        "link_escapes",
    ),
    "interpreter-link-outside-a-venv": (
        [(_dir("bin"), None), (member("bin/python3", tarfile.SYMTYPE, link="/etc"), None)],
        "link_escapes",
    ),
    "write-through-a-link": (
        [
            (_dir("sub"), None),
            (member("l", tarfile.SYMTYPE, link="sub"), None),
            (member("l/file"), b"x"),
        ],
        "orphan",
    ),
    "hard-link": (
        [(member("a"), b"x"), (member("b", tarfile.LNKTYPE, link="a"), None)],
        "hard_link",
    ),
    "char-device": ([(member("null", tarfile.CHRTYPE), None)], "special_file"),
    "fifo": ([(member("pipe", tarfile.FIFOTYPE), None)], "special_file"),
    "duplicate": ([(member("a"), b"x"), (member("a"), b"y")], "duplicate"),
}


@pytest.mark.parametrize(("members", "reason"), list(HOSTILE.values()), ids=list(HOSTILE))
async def test_a_hostile_tar_is_refused_and_nothing_is_kept(
    built: Artifact,
    server: ArtifactServer,
    client: httpx.AsyncClient,
    tmp_path: Path,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    reason: str,
) -> None:
    server.raw[built.digest] = tar_of(*members)
    cache = tmp_path / "w" / "cache"
    with pytest.raises(ArtifactVerificationFailed) as refused:
        await ArtifactFetcher(client, cache).localise(_spec(built))
    assert (refused.value.detail["check"], refused.value.detail["reason"]) == ("archive", reason)
    assert _cache_entries(cache) == []
    assert sorted(os.listdir(tmp_path / "w")) == ["cache"]  # nothing written beside it
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize(
    "limits",
    [ExtractLimits(max_bytes=50_000), ExtractLimits(max_entries=10)],
    ids=["bytes", "entries"],
)
async def test_an_artifact_over_the_limits_is_refused(
    built: Artifact, client: httpx.AsyncClient, tmp_path: Path, limits: ExtractLimits
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactVerificationFailed, match="more than") as refused:
        await ArtifactFetcher(client, cache, limits=limits).localise(_spec(built))
    assert refused.value.detail["check"] == "archive"
    assert refused.value.detail["reason"] in ("too_large", "too_many_entries")
    assert _cache_entries(cache) == []


async def test_an_endless_stream_is_cut_at_the_limit(
    built: Artifact, server: ArtifactServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A stream longer than any tar within the limits can be is cut off as it arrives (or the
    extractor refuses the member first: whichever sees it first), and nothing is kept."""
    limits = ExtractLimits(max_bytes=10_000, max_entries=2)
    server.raw[built.digest] = tar_of((member("big"), b"x" * 200_000))
    with pytest.raises(ArtifactVerificationFailed, match=r"larger than|more than") as refused:
        await ArtifactFetcher(client, tmp_path / "cache", limits=limits).localise(_spec(built))
    assert refused.value.detail["reason"] == "too_large"
    assert _cache_entries(tmp_path / "cache") == []


async def test_an_unknown_digest_is_a_clear_error(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    spec = _spec_for_digest("sha256:" + "a" * 64)
    says = r"has no artifact sha256:a{64} to send"
    with pytest.raises(ArtifactFetchFailed, match=says) as unknown:
        await ArtifactFetcher(client, tmp_path / "cache").localise(spec)
    assert unknown.value.detail["reason"] == "unknown_digest"
    assert unknown.value.detail["status"] == 404
    assert unknown.value.code == "artifact_verification_failed"  # what the CP's runtime maps
    assert _cache_entries(tmp_path / "cache") == []


async def test_a_refused_client_certificate_is_a_clear_error(
    built: Artifact, server: ArtifactServer, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as anonymous:
        with pytest.raises(ArtifactFetchFailed, match=r"refused to send .* \(403: ") as refused:
            await ArtifactFetcher(anonymous, tmp_path / "cache").localise(_spec(built))
    assert refused.value.detail["reason"] == "forbidden"


def _spec_for_digest(digest: str) -> RevisionSpec:
    return RevisionSpec("svc", "v1", digest, "/nowhere", ["python3", "app.py"])


async def test_the_cache_is_used_without_the_control_plane_and_healed_when_changed(
    built: Artifact, server: ArtifactServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fetcher = ArtifactFetcher(client, cache)
    first = await fetcher.localise(_spec(built))
    fetches = server.requests
    del server.served[built.digest]  # the control plane no longer has it
    again = await fetcher.localise(_spec(built))
    assert again.artifact_location == first.artifact_location
    assert server.requests == fetches  # not asked
    # Changed on disk: it no longer verifies, so it is fetched again.
    server.served[built.digest] = Path(built.location)
    where = Path(first.artifact_location)
    where.chmod(0o755)
    (where / "extra.py").write_text("print('not built')\n")
    healed = await fetcher.localise(_spec(built))
    assert server.requests == fetches + 1
    assert digest_tree(Path(healed.artifact_location)) == built.digest


async def test_an_image_passes_through_unchanged(
    client: httpx.AsyncClient, server: ArtifactServer, tmp_path: Path
) -> None:
    spec = replace(
        _spec_for_digest("sha256:" + "b" * 64),
        artifact_kind="oci-image",
        artifact_location="registry.example/svc@sha256:" + "b" * 64,
    )
    assert await ArtifactFetcher(client, tmp_path / "cache").localise(spec) is spec
    assert server.requests == 0


# --- through the agent ------------------------------------------------------------------------


async def test_an_agent_with_a_fetcher_starts_the_fetched_copy_and_restores_it_without_the_cp(
    tmp_path: Path,
) -> None:
    artifact = make_artifact(tmp_path, "v1")
    signed = spec_for(artifact)
    spec = replace(signed, artifact_location=str(tmp_path / "not-on-this-host"))
    data = tmp_path / "data"
    with artifact_server() as server:
        server.served[spec.artifact_digest] = artifact
        async with httpx.AsyncClient(
            base_url=server.url, headers={REGION_HEADER: "eu"}, trust_env=False
        ) as cp:
            agent = Agent(data, "eu", trusted_key=TRUSTED_KEY, fetcher=_fetcher(cp, data))
            try:
                async with agent_client(agent) as client:
                    r = await client.put("/v1/services/svc/revisions/v1", json=spec.to_dict())
                assert r.status_code == 200, r.text
                [replica] = r.json()["replicas"]
                info = await eventually(lambda: get_info(replica["port"]), what="the replica")
                cached = agent.dir / "artifacts" / artifact_dirname(spec.artifact_digest)
                assert info["cwd"] == str(cached)
                left_behind = (agent.dir / "state.json").read_text()  # what a killed agent leaves
                saved = json.loads(left_behind)
                assert saved["revisions"][0]["spec"]["artifact_location"] == info["cwd"]
            finally:
                await agent.close()
        fetches = server.requests
    (agent.dir / "state.json").write_text(left_behind)
    # The control plane is gone; a restarted agent runs the revision from its cache.
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as gone:
        second = Agent(data, "eu", trusted_key=TRUSTED_KEY, fetcher=_fetcher(gone, data))
        try:
            await second.restore()
            [restored] = second.supervisor.replicas.values()
            assert restored.spec.artifact_location == info["cwd"]
            await eventually(lambda: get_info(restored.port), what="the restored replica")
        finally:
            await second.close()
    assert server.requests == fetches


async def test_an_agent_refuses_a_served_tree_that_does_not_match_and_starts_nothing(
    tmp_path: Path,
) -> None:
    artifact = make_artifact(tmp_path, "v1")
    spec = replace(spec_for(artifact), artifact_location=str(tmp_path / "not-on-this-host"))
    data = tmp_path / "data"
    with artifact_server() as server:
        server.served[spec.artifact_digest] = make_artifact(tmp_path, "v2")  # another tree
        async with httpx.AsyncClient(
            base_url=server.url, headers={REGION_HEADER: "eu"}, trust_env=False
        ) as cp:
            agent = Agent(data, "eu", trusted_key=TRUSTED_KEY, fetcher=_fetcher(cp, data))
            try:
                async with agent_client(agent) as client:
                    r = await client.put("/v1/services/svc/revisions/v1", json=spec.to_dict())
                assert r.status_code == 422
                problem = r.json()
                assert problem["code"] == "artifact_verification_failed"
                assert problem["check"] == "digest"
                assert agent.supervisor.replicas == {} and agent.routes == {}
                assert not (agent.dir / "state.json").exists()
                assert _cache_entries(agent.dir / "artifacts") == []
            finally:
                await agent.close()


def _fetcher(client: httpx.AsyncClient, data: Path) -> ArtifactFetcher:
    """What the joined agent is given: its cache in its own directory."""
    return ArtifactFetcher(client, agent_dir(data, "eu") / "artifacts")


async def test_a_cache_that_cannot_be_written_is_a_clear_error(
    built: Artifact, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Not the artifact's fault: the error says where it could not be stored."""
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be\n")
    with pytest.raises(ArtifactFetchFailed, match="cannot store artifact") as failed:
        await ArtifactFetcher(client, cache).localise(_spec(built))
    assert failed.value.detail["reason"] == "local_storage"


async def test_an_agent_fetches_nothing_for_an_unsigned_spec(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path, "v1")
    spec = replace(
        spec_for(artifact), artifact_location=str(tmp_path / "not-on-this-host"), provenance=None
    )
    data = tmp_path / "data"
    with artifact_server() as server:
        server.served[spec.artifact_digest] = artifact
        async with httpx.AsyncClient(
            base_url=server.url, headers={REGION_HEADER: "eu"}, trust_env=False
        ) as cp:
            agent = Agent(data, "eu", trusted_key=TRUSTED_KEY, fetcher=_fetcher(cp, data))
            try:
                async with agent_client(agent) as client:
                    r = await client.put("/v1/services/svc/revisions/v1", json=spec.to_dict())
                assert r.status_code == 422
                assert (r.json()["check"], r.json()["reason"]) == ("signature", "unsigned")
                assert server.requests == 0
                assert agent.supervisor.replicas == {}
            finally:
                await agent.close()


async def test_a_tar_made_by_tar_itself_is_accepted(
    built: Artifact, server: ArtifactServer, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """GNU tar's own stream of the tree (``./`` names, its modes and owners) unpacks to the
    same digest: the rules refuse what is unsafe, not what another writer does differently."""
    made = subprocess.run(
        ["tar", "-C", built.location, "-cf", "-", "."], capture_output=True, check=True
    )
    server.raw[built.digest] = made.stdout
    local = await ArtifactFetcher(client, tmp_path / "cache").localise(_spec(built))
    assert digest_tree(Path(local.artifact_location)) == built.digest
