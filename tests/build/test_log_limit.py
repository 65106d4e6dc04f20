"""Build logs are capped: past ``max_bytes`` one visible notice line, then the command's output
is dropped while the build goes on (a build printing without end must not fill the disk or the
API's log stream). Both the builder's own log (``running.BuildLog``) and the deployment's log
(``preflight.BuildLogSink``) hold the limit."""

from __future__ import annotations

from pathlib import Path

from shipyard.build.base import BuildRequest
from shipyard.build.local import LocalBuilder
from shipyard.build.running import BuildLog, truncation_notice
from shipyard.orchestrator.preflight import BuildLogSink

from .helpers import GitRepo, manifest

NOTICE = truncation_notice(100)


def test_the_notice_names_the_limit_and_the_setting() -> None:
    assert NOTICE.startswith("[shipyard] log truncated at 100 bytes; ")
    assert "--max-build-log-mb" in NOTICE


def test_build_log_keeps_up_to_the_limit_then_one_notice(tmp_path: Path) -> None:
    shown: list[str] = []
    with BuildLog(tmp_path / "b.log", shown.append, max_bytes=100, tail_lines=3) as log:
        for i in range(50):
            log.line(f"line {i:03d} " + "x" * 10)  # 19 bytes with its newline
        log.note("build failed: the end")
    kept = [f"line {i:03d} " + "x" * 10 for i in range(5)]  # 5 * 19 = 95 <= 100
    assert shown == [*kept, NOTICE, "[shipyard] build failed: the end"]
    assert (tmp_path / "b.log").read_text().splitlines() == shown
    assert log.truncated
    # The tail still follows the command to its end (what an error message shows).
    assert log.tail == ["line 048 xxxxxxxxxx", "line 049 xxxxxxxxxx"]


def test_build_log_under_the_limit_is_untouched(tmp_path: Path) -> None:
    with BuildLog(tmp_path / "b.log", None, max_bytes=100) as log:
        log.line("a" * 99)  # exactly 100 bytes with its newline
    assert (tmp_path / "b.log").read_text() == "a" * 99 + "\n"
    assert not log.truncated


def test_masking_still_applies_before_the_count(tmp_path: Path) -> None:
    shown: list[str] = []
    with BuildLog(
        tmp_path / "b.log", shown.append, max_bytes=100, mask=lambda t: t.replace("s3cr3t", "***")
    ) as log:
        log.line("token s3cr3t")
    assert shown == ["token ***"]


def test_deployment_sink_caps_its_file_counting_an_earlier_run(tmp_path: Path) -> None:
    path = tmp_path / "dep" / "build.log"
    first = BuildLogSink(path, max_bytes=100)
    first("a" * 59)  # 60 bytes
    first.close()
    again = BuildLogSink(path, max_bytes=100)  # the same deployment after a restart
    for _ in range(5):
        again("b" * 19)  # 20 bytes each: two fit
    again.close()
    assert path.read_text().splitlines() == ["a" * 59, "b" * 19, "b" * 19, NOTICE]
    assert again.truncated
    assert again.tail()[-1] == "b" * 19  # the stage's tail keeps the last lines


async def test_a_real_build_past_the_limit_goes_on_and_succeeds(
    repo: GitRepo, data_dir: Path
) -> None:
    # 20000 lines of output (~200 kB), a 4 KiB limit, and an artifact written after all of it.
    script = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; echo ok > out.txt"
    repo.write("build.sh", script + "\n")
    repo.write("shipyard.toml", manifest('command = "sh build.sh"'))
    commit = repo.commit("noisy build")
    lines: list[str] = []
    artifact = await LocalBuilder(data_dir).build(
        BuildRequest(repo.source(commit), log_sink=lines.append, max_log_bytes=4096)
    )
    assert (Path(artifact.location) / "out.txt").read_text() == "ok\n"
    notice = truncation_notice(4096)
    assert lines.count(notice) == 1
    command_output = [ln for ln in lines if ln.startswith("line ")]
    assert command_output[0] == "line 0"
    assert sum(len(ln) + 1 for ln in command_output) <= 4096
    assert "line 19999" not in lines
    assert artifact.log_path is not None
    text = artifact.log_path.read_text()
    assert notice in text
    assert len(text.encode()) < 4096 + 2048  # the limit, the notice and Shipyard's few notes
