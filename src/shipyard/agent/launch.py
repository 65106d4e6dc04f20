"""Starts one app replica on a copy-on-write view of its artifact, then becomes the app.

Run by ``agent.supervisor`` as ``python -I -S .../launch.py --lower ART --upper U --work W --
argv...`` (``python -m shipyard.agent.launch`` works too, but starts slower). It enters a private
mount namespace, mounts an overlay whose lower layer is the artifact directory *on the artifact's
own path* (so the app sees its usual working directory and ``__file__`` paths, and may write
there), chdirs into it and ``execvpe``s the app: the replica's pid stays the app's pid and the
overlay disappears with the app's last process. Every write lands in ``U``; the artifact on disk,
whose digest was verified and signed, is never changed. ``--check`` mounts, writes one file into
the view and exits 0 instead of exec'ing: the supervisor's probe of whether overlays work here.

Needs CAP_SYS_ADMIN (the agent runs as root); the supervisor decides once per agent whether to
use it. On any failure before the exec it prints one line saying why to stderr (the replica's
log) and exits 125 (setup), 126 (command not executable) or 127 (command not found), the codes
shells and ``docker run`` use. It imports only ``ctypes``, ``os`` and ``sys``, and no
``shipyard`` module: it runs before every replica start and restart, so its start-up time is the
replica's.
"""

import ctypes
import os
import sys

# <sched.h> / <sys/mount.h> values (identical on every Linux architecture).
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

#: Characters that the overlay's comma/colon-separated option string cannot carry unescaped.
UNSAFE_PATH_CHARS = frozenset(",:\\")

CHECK_FILE = ".shipyard-overlay-check"

EXIT_SETUP = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

USAGE = "usage: launch [--check] --lower DIR --upper DIR --work DIR [-- ARGV...]"


class LaunchError(Exception):
    """Why the replica could not be started; ``code`` is the launcher's exit status."""

    def __init__(self, message: str, code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code


def parse(args: list[str]) -> tuple[dict[str, str], bool, list[str]]:
    """``(paths, check, argv)`` from the command line (no argparse: it costs start-up time)."""
    paths: dict[str, str] = {}
    check = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg == "--check":
            check = True
            i += 1
        elif arg in ("--lower", "--upper", "--work") and i + 1 < len(args):
            paths[arg[2:]] = args[i + 1]
            i += 2
        else:
            raise LaunchError(f"unexpected argument {arg!r}; {USAGE}")
    argv = args[i + 1 :]
    missing = [k for k in ("lower", "upper", "work") if k not in paths]
    if missing:
        raise LaunchError(f"missing --{missing[0]}; {USAGE}")
    if not check and not argv:
        raise LaunchError(f"no command after '--'; {USAGE}")
    for name, path in paths.items():
        if not os.path.isabs(path) or UNSAFE_PATH_CHARS.intersection(path):
            raise LaunchError(f"--{name} {path!r} must be absolute, without ',' ':' or '\\'")
    return paths, check, argv


def mount_overlay(lower: str, upper: str, work: str) -> None:
    """Mount the overlay on ``lower`` itself, visible only in a new private mount namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
    ]  # fmt: skip

    def fail(what: str) -> LaunchError:
        errno = ctypes.get_errno()
        return LaunchError(f"cannot {what}: [Errno {errno}] {os.strerror(errno)}")

    if libc.unshare(CLONE_NEWNS) != 0:
        raise fail("create a private mount namespace (unshare CLONE_NEWNS; needs root)")
    # Without this, mounts made here would propagate back to the host's shared "/".
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise fail("make / private in the replica's mount namespace")
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    target = lower.encode()
    if libc.mount(b"overlay", target, b"overlay", 0, options) != 0:
        raise fail(f"mount an overlay on {lower} (upper {upper})")


def run(args: list[str]) -> None:
    """Set up the view and exec the app; returns only for ``--check``; raises LaunchError."""
    paths, check, argv = parse(args)
    mount_overlay(paths["lower"], paths["upper"], paths["work"])
    try:
        # The mount hides the directory the process stood in; entering the path again enters
        # the overlay.
        os.chdir(paths["lower"])
    except OSError as exc:
        raise LaunchError(f"cannot enter {paths['lower']}: {exc}") from exc
    if check:
        try:
            with open(CHECK_FILE, "w") as f:
                f.write("ok\n")
        except OSError as exc:
            raise LaunchError(f"the overlay on {paths['lower']} is not writable: {exc}") from exc
        return
    try:
        # The app's argv as given, never through a shell: no word splitting, no injection.
        os.execvpe(argv[0], argv, os.environ)  # noqa: S606
    except FileNotFoundError as exc:
        if "/" in argv[0] and os.path.exists(argv[0]):
            raise LaunchError(
                f"cannot execute {argv[0]!r}: the interpreter on its '#!' line was not found",
                EXIT_NOT_EXECUTABLE,
            ) from exc
        where = "" if "/" in argv[0] else f" on PATH {os.environ.get('PATH', os.defpath)!r}"
        raise LaunchError(f"command {argv[0]!r} not found{where}", EXIT_NOT_FOUND) from exc
    except OSError as exc:
        raise LaunchError(f"cannot execute {argv[0]!r}: {exc}", EXIT_NOT_EXECUTABLE) from exc


def main() -> None:
    try:
        run(sys.argv[1:])
    except LaunchError as exc:
        _fail(str(exc), exc.code)
    except Exception as exc:  # still one line in the replica's log, never a traceback
        _fail(f"unexpected error before starting the app: {exc!r}", EXIT_SETUP)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"shipyard launch: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
