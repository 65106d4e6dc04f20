"""The one rule for a member name in a hostile tar stream: used by ``build/archive.py`` (an
artifact fetched from the control plane) and ``security/rootfs.py`` (an image's filesystem being
scanned), which must refuse exactly the same names."""

from __future__ import annotations

#: Longer names than this are refused outright (PATH_MAX on Linux).
MAX_NAME_CHARS = 4096


def safe_name(raw: str) -> str | None:
    """``raw`` as a relative POSIX path inside the tree, or None when it must not be used:
    absolute, with a ``..`` component, a NUL, or absurdly long. ``./`` parts are dropped
    (``docker export`` writes none, other tars do)."""
    if not raw or len(raw) > MAX_NAME_CHARS or "\x00" in raw or raw.startswith("/"):
        return None
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)
