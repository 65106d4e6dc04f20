"""Starts one workload (an app replica or a build command) in its sandbox, then becomes it.

Run by ``shipyard.sandbox.Sandbox.command`` as root (``python -I -S .../launch.py OPTIONS --
ARGV``); ``--check`` is the supervisor's probe of whether overlays work here. Steps, all before
the workload's first instruction runs:

1. A private mount namespace (``unshare(CLONE_NEWNS)``, ``/`` made private so nothing propagates
   back to the host).
2. ``--overlay LOWER UPPER WORK``: an overlay mounted on the artifact directory *on its own path*
   (the app sees its usual working directory and ``__file__`` paths, and may write there); every
   write lands in ``UPPER``, the signed artifact on disk never changes.
3. ``--hide DIR``: a small empty tmpfs over each directory the workload must never see (the data
   directory with the keys, the database, the agent's token and other services' files; the
   server's own ``HOME``). The paths the workload needs inside a hidden directory (``--bind``:
   writable, ``--expose``: read-only, e.g. the Python installation under ``/root/.pyenv``) are
   mounted back at their own paths from descriptors opened before the hiding.
4. ``--user UID:GID``: supplementary groups dropped, then gid and uid: the workload's own
   unprivileged identity, never the server's.
5. ``--bwrap PATH``: ``exec`` bubblewrap, now unprivileged, which builds the rest: the host's
   ``/`` read-only (``--bind`` directories writable again), a fresh ``/dev``, a private ``/tmp``
   and ``/dev/shm``, its own PID namespace (with a fresh ``/proc``: no ``/proc`` of the server),
   IPC and UTS namespaces, no capabilities and ``no_new_privs``. Network stays shared: apps must
   serve, builds may fetch dependencies. Without ``--bwrap`` (``--insecure-no-sandbox``) the
   argv is exec'd directly after the overlay, as before sandboxing existed.

The workload keeps this process's pid (bubblewrap's monitor, which exits with the workload's
status) and its process group, so the supervisor stops and reaps it as a whole. On any failure
before the exec it prints one line saying why to stderr (the replica's or build's log) and exits
125 (setup), 126 (command not executable) or 127 (command not found), the codes shells and
``docker run`` use. It imports only ``ctypes``, ``os`` and ``sys``, and no ``shipyard`` module:
it runs before every replica start, so its start-up time is the replica's. ``bwrap_args`` is also
used by ``shipyard.sandbox`` to run bubblewrap directly when the server is not root.
"""

import ctypes
import os
import sys

# <sched.h> / <sys/mount.h> values (identical on every Linux architecture).
CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

#: Characters that the overlay's comma/colon-separated option string cannot carry unescaped.
UNSAFE_PATH_CHARS = frozenset(",:\\")

CHECK_FILE = ".shipyard-overlay-check"

EXIT_SETUP = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

USAGE = (
    "usage: launch [--check] [--overlay LOWER UPPER WORK] [--private-tmp] [--hide DIR]... "
    "[--bind DIR]... "
    "[--expose DIR]... [--user UID:GID] [--bwrap PATH --chdir DIR] [-- ARGV...]"
)


class LaunchError(Exception):
    """Why the workload could not be started; ``code`` is the launcher's exit status."""

    def __init__(self, message: str, code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.check = False
        self.overlay: tuple[str, str, str] | None = None
        self.hide: list[str] = []
        self.bind: list[str] = []
        self.expose: list[str] = []
        self.user: tuple[int, int] | None = None
        self.bwrap: str | None = None
        self.chdir: str | None = None
        self.private_tmp = False
        self.argv: list[str] = []


def parse(args: list[str]) -> Options:
    """Options from the command line (no argparse: it costs start-up time)."""
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts.argv = args[i + 1 :]
            break
        if arg == "--check":
            opts.check = True
            i += 1
        elif arg == "--private-tmp":
            opts.private_tmp = True
            i += 1
        elif arg == "--overlay" and i + 3 < len(args):
            opts.overlay = (args[i + 1], args[i + 2], args[i + 3])
            i += 4
        elif arg in (
            "--hide",
            "--bind",
            "--expose",
            "--user",
            "--bwrap",
            "--chdir",
        ) and i + 1 < len(args):
            value = args[i + 1]
            if arg == "--user":
                opts.user = _parse_user(value)
            elif arg in ("--bwrap", "--chdir"):
                setattr(opts, arg[2:], value)
            else:
                getattr(opts, arg[2:]).append(value)
            i += 2
        else:
            raise LaunchError(f"unexpected argument {arg!r}; {USAGE}")
    if not opts.check and not opts.argv:
        raise LaunchError(f"no command after '--'; {USAGE}")
    if opts.check and opts.overlay is None:
        raise LaunchError(f"--check needs --overlay; {USAGE}")
    paths = [*(opts.overlay or ()), *opts.hide, *opts.bind, *opts.expose]
    for path in paths + ([opts.chdir] if opts.chdir else []):
        if not os.path.isabs(path):
            raise LaunchError(f"{path!r} must be an absolute path")
    for path in opts.overlay or ():
        if UNSAFE_PATH_CHARS.intersection(path):
            raise LaunchError(f"overlay path {path!r} must not hold ',' ':' or '\\'")
    return opts


def _parse_user(value: str) -> tuple[int, int]:
    uid, _, gid = value.partition(":")
    if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0 or int(gid) == 0:
        raise LaunchError(f"--user {value!r} must be UID:GID, neither of them 0")
    return int(uid), int(gid)


def bwrap_args(
    bwrap: str,
    *,
    writable: list[str],
    chdir: str,
    argv: list[str],
    readonly: list[str] | None = None,
    hide: list[str] | None = None,
    private_tmp: bool = True,
) -> list[str]:
    """Bubblewrap's command line for one workload: the host read-only, ``writable`` writable,
    ``hide`` replaced by empty directories (then ``readonly`` mounted back, read-only), private
    ``/tmp`` (unless ``private_tmp`` is False: the launcher made it), ``/dev`` and ``/dev/shm``,
    own PID/IPC/UTS namespaces, no capabilities."""
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # Fresh, private mounts inside the sandbox, not shared host temp dirs.
    args += ["--tmpfs", "/dev/shm"]  # noqa: S108
    if private_tmp:
        args += ["--tmpfs", "/tmp"]  # noqa: S108
    for path in hide or ():
        args += ["--tmpfs", path]
    for path in readonly or ():
        args += ["--ro-bind", path, path]
    for path in writable:
        args += ["--bind", path, path]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--cap-drop", "ALL", "--chdir", chdir, "--", *argv]
    return args


class _Libc:
    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.unshare.argtypes = [ctypes.c_int]
        self.libc.mount.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
        ]  # fmt: skip

    def fail(self, what: str) -> LaunchError:
        errno = ctypes.get_errno()
        return LaunchError(f"cannot {what}: [Errno {errno}] {os.strerror(errno)}")

    def unshare_mounts(self) -> None:
        if self.libc.unshare(CLONE_NEWNS) != 0:
            raise self.fail("create a private mount namespace (unshare CLONE_NEWNS; needs root)")
        # Without this, mounts made here would propagate back to the host's shared "/".
        if self.libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise self.fail("make / private in the workload's mount namespace")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        if (
            self.libc.mount(
                None if source is None else source.encode(),
                target.encode(),
                None if fstype is None else fstype.encode(),
                flags,
                None if data is None else data.encode(),
            )
            != 0
        ):
            raise self.fail(f"mount {fstype or 'a bind'} on {target}")


def _same_dir(path: str, fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    ref = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino)


def prepare(opts: Options, libc: _Libc) -> None:
    """Steps 1-3 of the module docstring (root only)."""
    libc.unshare_mounts()
    if opts.overlay is not None:
        lower, upper, work = opts.overlay
        libc.mount(
            "overlay", lower, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}"
        )
    hide = list(opts.hide)
    if opts.private_tmp:
        # Root's tmpfs, not bubblewrap's: the directories made in it to mount the workload's
        # own back (a data directory under /tmp) are then root's, not writable by the workload.
        hide.insert(0, "/tmp")  # noqa: S108
    if opts.user is not None:
        # A directory the workload needs may lie below one its uid cannot enter (a 0700 parent
        # such as pytest's /tmp/pytest-of-root): hide that parent too and mount the directory
        # back, rather than opening the parent's permissions on the host.
        for path in opts.bind + opts.expose:
            blocked = _first_closed_ancestor(path, opts.user[0])
            if blocked is not None and blocked not in hide:
                hide.append(blocked)
    if not hide:
        return
    wanted = [(p, False) for p in opts.bind] + [(p, True) for p in opts.expose]
    fds: list[tuple[str, bool, int]] = []
    for path, readonly in wanted:
        try:
            fds.append((path, readonly, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
        except OSError as exc:
            raise LaunchError(f"cannot open {path} for the sandbox: {exc}") from exc
    for path in sorted(hide, key=len):
        if not os.path.isdir(path):
            continue  # inside an already hidden directory, or absent: nothing to hide
        if path == "/tmp":  # noqa: S108 - the workload's private /tmp, writable by all
            libc.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        else:
            libc.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755")
    for path, readonly, fd in fds:
        if not _same_dir(path, fd):  # hidden: mount it back at its own path
            os.makedirs(path, mode=0o755, exist_ok=True)
            libc.mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            if readonly:
                libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.close(fd)


def _first_closed_ancestor(path: str, uid: int) -> str | None:
    """The outermost proper ancestor of ``path`` that ``uid`` may not enter, if any."""
    parts = path.rstrip("/").split("/")[1:-1]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            st = os.stat(current)
        except OSError:
            return None
        if not st.st_mode & 0o001 and st.st_uid != uid:
            return current
    return None


def become(uid: int, gid: int) -> None:
    """Step 4: drop to the workload's identity (supplementary groups first, uid last)."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise LaunchError(f"cannot switch to uid {uid} gid {gid}: {exc}") from exc
    if os.getuid() != uid or os.geteuid() != uid:
        raise LaunchError(f"still running as uid {os.geteuid()} after switching to {uid}")


def run(args: list[str]) -> None:
    """Set up the sandbox and exec the workload; returns only for ``--check``."""
    opts = parse(args)
    prepare(opts, _Libc())
    if opts.check:
        assert opts.overlay is not None
        try:
            with open(os.path.join(opts.overlay[0], CHECK_FILE), "w") as f:
                f.write("ok\n")
        except OSError as exc:
            raise LaunchError(f"the overlay on {opts.overlay[0]} is not writable: {exc}") from exc
        return
    if opts.user is not None:
        become(*opts.user)
    argv = opts.argv
    if opts.bwrap is not None:
        chdir = opts.chdir or (opts.overlay[0] if opts.overlay else "/")
        argv = bwrap_args(
            opts.bwrap,
            writable=opts.bind,
            chdir=chdir,
            argv=argv,
            private_tmp=not opts.private_tmp,
        )
    else:
        target = opts.chdir or (opts.overlay[0] if opts.overlay else None)
        if target is not None:
            try:
                # The overlay hides the directory the process stood in; entering the path
                # again enters the overlay.
                os.chdir(target)
            except OSError as exc:
                raise LaunchError(f"cannot enter {target}: {exc}") from exc
    _exec(argv)


def _exec(argv: list[str]) -> None:
    try:
        # The argv as given, never through a shell: no word splitting, no injection.
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
    except Exception as exc:  # still one line in the workload's log, never a traceback
        _fail(f"unexpected error before starting the workload: {exc!r}", EXIT_SETUP)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"shipyard launch: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
