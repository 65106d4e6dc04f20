"""The routing table (routing/table.py): weighted round-robin, sticky buckets, weight rules.

The socket-level tests route real requests through ServiceProxy to conftest.py's upstreams and count
who answered; the others ask the table directly.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.proxy import Backend, ServiceProxy
from shipyard.routing.table import Route, Table, effective_weights, smooth_schedule

from .conftest import MakeClient, MakeProxy, MakeUpstream


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 100},
        {"a": 50, "b": 50},
        {"a": 50, "b": 30, "c": 20},
        {"a": 1, "b": 99},
        {"a": 33, "b": 33, "c": 34},
        {"a": 10, "b": 0, "c": 90},
    ],
    ids=lambda w: "-".join(f"{k}{v}" for k, v in w.items()),
)
async def test_weights_are_exact_over_100_requests(
    weights: dict[str, int], upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    apps = {name: await upstreams(name) for name in weights}
    proxy, port = await proxies()
    proxy.configure(weights, [app.backend() for app in apps.values()])
    client = await clients(port)
    seen: Counter[str] = Counter()
    for _ in range(100):
        response = await client.request()
        assert response.status == 200
        assert response.revision == response.body.decode()  # header names who answered
        seen[response.body.decode()] += 1
    assert seen == Counter({rev: w for rev, w in weights.items() if w})
    assert proxy.weights == weights


async def test_round_robin_within_a_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    replicas = [await upstreams(f"r{i}") for i in range(3)]
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [r.backend("v1", r.name) for r in replicas])
    client = await clients(port)
    bodies = Counter([(await client.request()).body.decode() for _ in range(30)])
    assert bodies == Counter({"r0": 10, "r1": 10, "r2": 10})


async def test_revision_without_backends_gives_its_share_away(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    proxy, port = await proxies()
    proxy.configure({"a": 50, "b": 30, "c": 20}, [a.backend(), b.backend()])
    # 50:30 of the 80 that can be served, rounded to whole percent (largest remainder)
    assert proxy.weights == {"a": 63, "b": 37, "c": 0}
    client = await clients(port)
    seen = Counter([(await client.request()).body.decode() for _ in range(100)])
    assert seen == Counter({"a": 63, "b": 37})


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 50, "b": 40},
        {"a": 101},
        {"a": -10, "b": 110},
        {"a": True},
        {"a": 50.0, "b": 50},
        {"": 100},
        {"bad name": 100},
    ],
    ids=["sum-90", "over-100", "negative", "bool", "float", "empty-name", "space-in-name"],
)
async def test_bad_weights_are_refused_and_keep_the_old_table(
    weights: dict[str, int], upstreams: MakeUpstream, proxies: MakeProxy
) -> None:
    a = await upstreams("a")
    proxy, _ = await proxies()
    proxy.configure({"a": 100}, [a.backend()])
    with pytest.raises(ValueError, match=r"weight|revision"):
        proxy.configure(weights, [a.backend()])
    assert proxy.weights == {"a": 100}


async def test_sticky_header_and_cookie_keep_a_user_on_one_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    canary, stable = await upstreams("canary"), await upstreams("stable")
    proxy, port = await proxies()
    proxy.configure(
        {"canary": 30, "stable": 70},
        [canary.backend(), stable.backend()],
        sticky_header="X-User",
        sticky_cookie="uid",
    )
    client = await clients(port)
    for user in ("alice", "bob", "carol", "dave", "erin"):
        expected = proxy.sticky_revision(user)
        via_header = {
            (await client.request(headers=f"x-user: {user}\r\n")).revision for _ in range(5)
        }
        via_cookie = {
            (await client.request(headers=f"cookie: a=1; uid={user}; b=2\r\n")).revision
            for _ in range(5)
        }
        assert via_header == via_cookie == {expected}
    no_key = Counter([(await client.request()).revision for _ in range(100)])
    assert no_key == Counter({"canary": 30, "stable": 70})


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=30),
    steps=st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=8),
)
def test_sticky_keys_only_move_from_stable_to_canary_as_canary_grows(
    keys: list[bytes], steps: list[int]
) -> None:
    proxy = ServiceProxy("svc")
    backends = [Backend("c", "canary", "127.0.0.1", 1), Backend("s", "stable", "127.0.0.1", 2)]
    on_canary: set[bytes] = set()
    for weight in sorted(steps):
        proxy.configure(
            {"canary": weight, "stable": 100 - weight}, backends, sticky_header="x-user"
        )
        now = {key for key in keys if proxy.sticky_revision(key) == "canary"}
        assert on_canary <= now  # nobody who reached the canary is sent back
        on_canary = now
    if sorted(steps)[-1] == 100:
        assert on_canary == set(keys)


@pytest.mark.parametrize(
    "weights",
    [{"canary": 10, "stable": 90}, {"canary": 50, "stable": 50}, {"a": 20, "b": 30, "c": 50}],
    ids=["canary10", "canary50", "three-way"],
)
def test_sticky_buckets_are_cumulative_ranges_in_weights_order(weights: dict[str, int]) -> None:
    """bucket = crc32(key) % 100 (stable across restarts), ranges in the order given."""
    proxy = ServiceProxy("svc")
    backends = [Backend(rev, rev, "127.0.0.1", i + 1) for i, rev in enumerate(weights)]
    proxy.configure(weights, backends, sticky_cookie="uid")
    bounds, start = [], 0
    for revision, weight in weights.items():
        bounds.append((start, start + weight, revision))
        start += weight
    for n in range(500):
        key = f"user-{n}".encode()
        bucket = zlib.crc32(key) % 100
        expected = next(rev for lo, hi, rev in bounds if lo <= bucket < hi)
        assert proxy.sticky_revision(key) == expected


# -- the table itself, without sockets -------------------------------------------------------------


@dataclass
class Target:
    """What the table routes to, as far as it cares."""

    down_until: float = 0.0


def _route(revision: str, *targets: Target) -> Route[Target]:
    return Route(revision, list(targets), routing_metrics.RevisionCounters(revision))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 5, "b": 1, "c": 1}, "aabacaa"),  # nginx's own example
        ({"a": 60, "b": 40}, "ababa"),
        ({"a": 50, "b": 50}, "ab"),
        ({"a": 100}, "a"),
        ({"a": 0, "b": 100}, "b"),
        ({}, ""),
    ],
    ids=["nginx-5-1-1", "60-40", "even", "one", "zero-weight-skipped", "nothing"],
)
def test_smooth_weighted_round_robin_schedule(weights: dict[str, int], expected: str) -> None:
    assert "".join(smooth_schedule(list(weights.items()))) == expected


@settings(max_examples=200, deadline=None)
@given(weights=st.dictionaries(st.sampled_from("abcde"), st.integers(0, 100), max_size=5))
def test_a_schedule_cycle_gives_each_revision_its_exact_share(weights: dict[str, int]) -> None:
    schedule = smooth_schedule(list(weights.items()))
    live = {rev: w for rev, w in weights.items() if w}
    g = math.gcd(*live.values()) if live else 1
    assert Counter(schedule) == Counter({rev: w // g for rev, w in live.items()})


@pytest.mark.parametrize(
    ("requested", "served", "expected"),
    [
        ({"a": 50, "b": 30, "c": 20}, {"a", "b"}, {"a": 63, "b": 37, "c": 0}),
        ({"a": 33, "b": 33, "c": 34}, {"a", "b"}, {"a": 50, "b": 50, "c": 0}),
        ({"a": 10, "b": 0, "c": 90}, {"a", "b"}, {"a": 100, "b": 0, "c": 0}),
        ({"a": 50, "b": 50}, {"a", "b"}, {"a": 50, "b": 50}),
        ({"a": 50, "b": 50}, set(), {"a": 0, "b": 0}),
    ],
    ids=[
        "largest-remainder",
        "even-split",
        "zero-weight-gets-nothing",
        "all-served",
        "none-served",
    ],
)
def test_effective_weights(
    requested: dict[str, int], served: set[str], expected: dict[str, int]
) -> None:
    assert effective_weights(requested, served) == expected
    assert list(effective_weights(requested, served)) == list(requested)  # order kept


def test_sticky_key_prefers_the_header_then_the_cookie() -> None:
    table = Table({"v1": 100}, [_route("v1", Target())], "X-User", "uid")
    both = b'GET / HTTP/1.1\r\nCookie: a=1; uid="bob"\r\nx-user: alice\r\n\r\n'
    assert table.sticky_key(both) == b"alice"
    assert table.sticky_key(b'GET / HTTP/1.1\r\nCookie: a=1; uid="bob"\r\n\r\n') == b"bob"
    assert table.sticky_key(b"GET / HTTP/1.1\r\nX-User:  \r\nCookie: uid=\r\n\r\n") is None


def test_a_backend_marked_down_is_skipped_until_its_time_is_up() -> None:
    up, down = Target(), Target(down_until=time.monotonic() + 60)
    route = _route("v1", down, up)
    assert [route.next_pool() for _ in range(4)] == [up] * 4
    down.down_until = time.monotonic() - 1
    assert [route.next_pool() for _ in range(4)] == [down, up, down, up]
    assert down.down_until == 0.0
    up.down_until = down.down_until = time.monotonic() + 60  # all down: try the scheduled one
    assert [route.next_pool() for _ in range(2)] == [down, up]
