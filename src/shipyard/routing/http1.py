"""HTTP/1.1 framing for the router: request and response heads, chunked bodies. No sockets.

``routing.client`` parses each request head here and scans chunked request bodies;
``routing.upstream`` does the same for responses; both answer the router's own errors with
:func:`local_response`. ``tests/routing/test_http1.py`` holds every accept/reject and framing
decision made here against llhttp's (through httptools).

Why hand-written: the router forwards bodies as the raw bytes the client sent and only needs to
know where a message ends, whether the connection stays open, and which fields a proxy must not
pass on (hop-by-hop, RFC 9110 section 7.6.1). A full parser would build what nobody reads. The
whole request head is checked by one regular expression; the parse result, including the head to
forward (origin-form target, hop-by-hop and ``X-Forwarded-*`` fields out; :class:`Forwarding`
supplies the per-client tail), is cached per distinct head (clients and apps repeat the same heads
over and over), so the common request costs one dictionary lookup and one concatenation.

What is refused is refused because the upstream might frame it differently than we do (request
smuggling): obs-fold, whitespace before a colon, bare CR or LF, control bytes, Content-Length
together with Transfer-Encoding, more than one Content-Length, any Transfer-Encoding but a single
``chunked`` (as HAProxy) or one on HTTP/1.0, an HTTP/1.1 request without exactly one valid Host,
more than :data:`MAX_FIELDS` fields, a Connection naming a framing field, a body on a request that
asks for an upgrade, and chunk-size lines, extensions or trailer fields outside RFC 9112's grammar.
Every refusal says what was wrong in the 400's body.
What llhttp refuses (Node's parser, and uvicorn's through httptools) we refuse too; the tests list
where we are stricter still.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_FIELDS",
    "MAX_HEAD",
    "TOKEN",
    "BadFraming",
    "BodyTooLarge",
    "ChunkedScanner",
    "Forwarding",
    "MalformedMessage",
    "RequestHead",
    "ResponseHead",
    "local_response",
    "parse_request_head",
    "parse_response_head",
    "request_cache",
    "response_cache",
]

#: Longest request or response head accepted.
MAX_HEAD = 64 * 1024

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
#: A token (RFC 9110 section 5.6.2): header names, sticky header and cookie names.
TOKEN = re.compile(_TCHAR + rb"+")
# The whole request head: request line and header lines, CRLF line ends, no obs-fold, no
# whitespace before a colon, no control bytes. Anything else is answered 400: what the upstream
# would make of it can differ from what we did (request smuggling).
_REQUEST_HEAD = re.compile(
    rb"(" + _TCHAR + rb"+) ([!-~\x80-\xff]+) HTTP/1\.([01])\r\n"
    rb"(?:" + _TCHAR + rb"+:[\t -~\x80-\xff]*\r\n)*\r\n"
)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])[ \r]")
_RESPONSE_HEADERS = re.compile(rb"\r\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*)")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([!-~\x80-\xff]+) HTTP/1\.([01])")
_FIELD_NAME = re.compile(_TCHAR + rb"+")
# An absolute-form target (RFC 9112 section 3.2.2): scheme, authority, then path and query.
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*:")
# A Host value (RFC 9110 section 7.2): uri-host [ ":" port ]; an IP literal or a reg-name (which
# may be empty). What is outside this could be read as another host by the app.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")

#: More header field lines than this are refused (400), as HAProxy does (``tune.http.maxhdr``).
MAX_FIELDS = 100

# Hop-by-hop fields (RFC 9110 section 7.6.1), never forwarded: they describe the client's
# connection to the router, not the request. Not Trailer: RFC 9110 section 6.6.2 makes it
# end-to-end (RFC 2616's list had "Trailers", TE's token), and the trailer section it announces
# is forwarded as it came, inside the chunked body. ``proxy`` is httpoxy's (an app under CGI would
# read it as its own outbound proxy); every other ``proxy-*`` is for the router, not the app.
_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"te", b"upgrade", b"proxy-connection", b"proxy")
)
# Fields the router sets itself from what it knows of the connection (see Forwarding).
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))
# In a response: the hop-by-hop fields dropped before it reaches the client (Transfer-Encoding
# stays: the router relays a chunked body as it is; Trailer too, RFC 9110 does not make it
# hop-by-hop). The search finds the heads that need a look; most need none.
_RESPONSE_HOP_BY_HOP = frozenset((b"keep-alive", b"proxy-connection", b"te", b"upgrade"))
_RESPONSE_HOP = re.compile(
    rb"\r\n(?:keep-alive|proxy-connection|te|upgrade)[ \t]*:"
    rb"|\r\nconnection[ \t]*:[ \t]*+(?!(?:close|keep-alive)[ \t]*\r\n)",
    re.IGNORECASE,
)
_KEPT_OPTIONS = frozenset((b"close", b"keep-alive"))
_KEPT_OPTIONS_101 = frozenset((b"close", b"keep-alive", b"upgrade"))
# Fields that frame the request or say where it goes: a client listing one in Connection asks the
# router to forward a request whose framing or target differs from what it parsed.
_END_TO_END = frozenset((b"content-length", b"transfer-encoding", b"host"))

_REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class MalformedMessage(ValueError):
    """A request or response head the router refuses; ``status`` is what the client gets.

    Raised by :func:`parse_request_head` / :func:`parse_response_head`; the proxy turns it into
    a 400/405/502 answer, it never reaches callers of ``ServiceProxy``.
    """

    def __init__(self, status: int, reason: bytes) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class BadFraming(Exception):
    """A chunked body that does not parse."""


class BodyTooLarge(Exception):
    """A chunked body over the scanner's size limit."""


@dataclass(frozen=True, slots=True)
class Forwarding:
    """The fields the router adds to every request it forwards (RFC 9110 section 7.6.3).

    ``ServiceProxy(forwarding=...)`` takes one per service; ``routing.client`` asks it for the
    tail of each forwarded head (:meth:`tail`). The defaults are nginx's usual ``proxy_set_header``
    lines plus ``Via``:

    - ``via``: appended to the client's ``Via`` (as another field line, which RFC 9110 section
      5.3 makes the same list); ``None`` adds none.
    - ``x_forwarded_for``: ``"append"`` (nginx's ``$proxy_add_x_forwarded_for``) keeps what the
      client sent, joined into one line, and appends the client's address. Only the last entry is
      the router's own observation; the rest is whatever the client claimed. ``"replace"`` drops
      the client's and sends the address alone (the router is the first proxy).
    - ``x_forwarded_proto``: ``"set"`` sends the router's own scheme (``scheme``) and drops
      the client's claim; ``"keep"`` passes the client's on (a TLS terminator in front sets it).
    - ``scheme``: what the client spoke to the router, ``"https"`` on a TLS listener
      (``routing.entry``).
    """

    via: str | None = "1.1 shipyard"
    x_forwarded_for: Literal["append", "replace"] = "append"
    x_forwarded_proto: Literal["set", "keep"] = "set"
    scheme: Literal["http", "https"] = "http"

    def __post_init__(self) -> None:
        if self.via is not None and not re.fullmatch(r"[!-~](?:[ -~]*[!-~])?", self.via):
            raise ValueError(f"via must be printable ASCII without edge spaces, not {self.via!r}")
        if self.x_forwarded_for not in ("append", "replace"):
            raise ValueError("x_forwarded_for must be 'append' or 'replace'")
        if self.x_forwarded_proto not in ("set", "keep"):
            raise ValueError("x_forwarded_proto must be 'set' or 'keep'")
        if self.scheme not in ("http", "https"):
            raise ValueError("scheme must be 'http' or 'https'")

    def tail(self, peer: bytes, prior: tuple[bytes, bytes] | None = None) -> bytes:
        """The field lines ending a forwarded head (through the blank line) for a client at
        ``peer``; ``prior`` is the client's own ``(X-Forwarded-For, X-Forwarded-Proto)`` from
        the :data:`RequestHead` (``None``: it sent neither)."""
        xff, xfp = prior if prior is not None else (b"", b"")
        if xff and self.x_forwarded_for == "append":
            peer = xff + b", " + peer
        out = b"" if self.via is None else b"via: " + self.via.encode() + b"\r\n"
        if self.x_forwarded_proto == "set":
            out += b"x-forwarded-proto: " + self.scheme.encode() + b"\r\n"
        elif xfp:
            out += b"x-forwarded-proto: " + xfp + b"\r\n"
        return out + b"x-forwarded-for: " + peer + b"\r\n\r\n"


# What the router needs from a head. Plain tuples, not NamedTuples: the connections unpack one per
# request, and CPython unpacks an exact tuple about twice as fast as a tuple subclass (30 ns).
#: ``(method, keep_alive, content_length or -1, final transfer coding or None, expect_100,
#: forward, prior)``: the transfer coding is always ``b"chunked"`` when there is one (anything
#: else is refused); ``forward`` is the head to send upstream up to its last field line (origin-
#: form target, hop-by-hop and X-Forwarded-* fields removed), to be ended by
#: :meth:`Forwarding.tail`; ``prior`` is the client's ``(X-Forwarded-For, X-Forwarded-Proto)``
#: values, or None when it sent neither.
RequestHead = tuple[bytes, bool, int, bytes | None, bool, bytes, tuple[bytes, bytes] | None]
#: ``(status, keep_alive, content_length or -1, final transfer coding or None, forward)``:
#: ``forward`` is the head to relay instead when hop-by-hop fields must go, else None.
ResponseHead = tuple[int, bool, int, bytes | None, bytes | None]


# Parsed heads, keyed by the exact head bytes: parsing is a pure function of them. Bounded; only
# short heads are kept. The connections look heads up here themselves before calling the parse
# functions (one dictionary lookup on the hot path instead of a call); never rebind these.
_HEAD_CACHE_SIZE = 1024
_HEAD_CACHE_MAX_BYTES = 2048
request_cache: dict[bytes, RequestHead] = {}
response_cache: dict[bytes, ResponseHead] = {}


def _bad(reason: bytes) -> MalformedMessage:
    return MalformedMessage(400, reason + b"\n")


def _diagnose(head: bytes) -> MalformedMessage:
    """Why ``head`` failed the request-head expression, in words a client's author can act on
    (only refused heads come here)."""
    if re.search(rb"(?<!\r)\n", head):
        return _bad(b"bare LF in the request head: lines end with CRLF")
    if re.search(rb"\r(?!\n)", head):
        return _bad(b"bare CR in the request head")
    lines = head[:-4].split(b"\r\n")
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        return _bad(b"malformed request line: expected METHOD SP target SP HTTP/1.0 or HTTP/1.1")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return _bad(b"obs-fold: a header line starts with whitespace")
        name, colon, _ = line.partition(b":")
        if not colon:
            return _bad(b"header line without a colon")
        if name.rstrip(b" \t") != name:
            return _bad(b"whitespace before the colon of a header field")
        if _FIELD_NAME.fullmatch(name) is None:
            return _bad(b"invalid character in a header field name")
    return _bad(b"invalid character in a header field value")


def _origin_form(target: bytes) -> tuple[bytes, bytes | None]:
    """``(target to forward, authority or None)``: an absolute-form target becomes origin-form
    (RFC 9112 section 3.2.2); origin-form and ``*`` are kept."""
    if target[:1] == b"/" or target == b"*":
        return target, None
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        if _SCHEME.match(target):
            raise _bad(b"request target is not origin-form or an http(s) absolute URI")
        raise _bad(b"request target must start with /")
    scheme, authority, rest = m.group(1, 2, 3)
    if scheme.lower() not in (b"http", b"https"):
        raise _bad(b"absolute-form target with a scheme other than http or https")
    if not authority or b"@" in authority or _HOST.fullmatch(authority) is None:
        raise _bad(b"absolute-form target without a valid host (userinfo is refused)")
    if rest[:1] == b"?":
        rest = b"/" + rest
    elif not rest:
        rest = b"/"
    elif rest[:1] != b"/":
        raise _bad(b"request target is not origin-form or an http(s) absolute URI")
    return rest, authority


def parse_request_head(head: bytes) -> RequestHead:
    """Parse ``head`` (through the blank line) into a :data:`RequestHead`.

    Raises :class:`MalformedMessage` for what we refuse to forward: anything the upstream might
    frame differently than we do (request smuggling), or route by another host.
    """
    parsed = request_cache.get(head)
    if parsed is not None:
        return parsed
    if _REQUEST_HEAD.fullmatch(head) is None:
        raise _diagnose(head)
    lines = head[:-4].split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    assert m is not None  # the head expression matched
    method, target, minor = m.group(1, 2, 3)
    if method == b"CONNECT":
        raise MalformedMessage(405, b"CONNECT is not supported\n")
    if len(lines) - 1 > MAX_FIELDS:
        raise _bad(b"more than %d header fields" % MAX_FIELDS)
    length = -1
    te: bytes | None = None
    expect = upgrade_field = False
    options: set[bytes] = set()
    hosts: list[bytes] = []
    xff: list[bytes] = []
    xfp = b""
    for line in lines[1:]:
        name, _, raw = line.partition(b":")
        name = name.lower()
        value = raw.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit():
                raise _bad(b"invalid Content-Length")
            if length >= 0:  # a second one, even an equal one: llhttp refuses both
                if int(value) != length:
                    raise _bad(b"conflicting Content-Length")
                raise _bad(b"duplicate Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            # one field, exactly "chunked": anything else (another coding before it, chunked
            # twice, a coding we do not know) the app might frame differently; HAProxy refuses
            # the same. An empty field or a tab after the value: llhttp refuses both, so do we
            if te is not None or value.lower() != b"chunked" or b"\t" in raw[len(raw.rstrip()) :]:
                raise _bad(b"unsupported Transfer-Encoding: only a single 'chunked' is accepted")
            te = b"chunked"
        elif name == b"connection":
            options.update(t.strip(b" \t") for t in value.lower().split(b","))
        elif name == b"host":
            hosts.append(value)
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
        elif name == b"upgrade":
            upgrade_field = True
        elif name == b"x-forwarded-for":
            if value:
                xff.append(value)
        elif name == b"x-forwarded-proto":
            xfp = value
    options.discard(b"")
    if te is not None:
        if length >= 0:
            raise _bad(b"Content-Length together with Transfer-Encoding")
        if minor == b"0":
            raise _bad(b"Transfer-Encoding in an HTTP/1.0 request")
    if len(hosts) > 1:
        raise _bad(b"more than one Host header field")
    if not hosts and minor == b"1":
        raise _bad(b"missing Host header field (required in HTTP/1.1)")
    if hosts and _HOST.fullmatch(hosts[0]) is None:
        raise _bad(b"invalid Host header field")
    if options & _END_TO_END:
        raise _bad(b"Connection names a field that frames or routes the request")
    upgrade = upgrade_field and b"upgrade" in options
    if upgrade and (length > 0 or te is not None):
        # httptools (uvicorn's parser) tells llhttp to skip the body of a request that asks for
        # an upgrade: uvicorn 0.54 hands the app an empty body and drops those bytes. The app
        # and we would frame the connection differently: refuse it
        raise _bad(b"upgrade request with a body")
    forward_target, authority = _origin_form(target)
    keep = b"close" not in options and (b"keep-alive" in options or minor == b"1")
    # The forwarded head: the client's field lines in order, less the hop-by-hop ones, with the
    # framing fields re-written in their canonical form and Host taken from an absolute target.
    out = [method + b" " + forward_target + b" HTTP/1." + minor]
    for line in lines[1:]:
        name = line.partition(b":")[0].lower()
        if (
            name in _HOP_BY_HOP
            or name in options
            or name in _FORWARDED
            or name.startswith(b"proxy-")
        ):
            if name == b"upgrade" and upgrade:
                out.append(line)
            continue
        if name == b"content-length":
            line = b"content-length: %d" % length
        elif name == b"transfer-encoding":
            line = b"transfer-encoding: chunked"
        elif name == b"host" and authority is not None:
            line = b"host: " + authority
        out.append(line)
    if upgrade:
        out.append(b"connection: upgrade")
    elif keep and minor == b"0":
        out.append(b"connection: keep-alive")  # so the app keeps our pooled connection open
    out.append(b"")
    prior = (b", ".join(xff), xfp) if xff or xfp else None
    parsed = (method, keep, length, te, expect, b"\r\n".join(out), prior)
    if len(head) <= _HEAD_CACHE_MAX_BYTES:
        if len(request_cache) >= _HEAD_CACHE_SIZE:
            request_cache.clear()
        request_cache[head] = parsed
    return parsed


def _response_forward(head: bytes, status: int, options: set[bytes]) -> bytes | None:
    """The response head the client gets, when the app's differs from it: hop-by-hop fields
    (``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Upgrade`` but on a 101, and the fields
    ``Connection`` names) dropped. ``Connection`` keeps only the options the router acts on
    itself (``close``, ``keep-alive``, and ``upgrade`` on a 101), which decide the client's
    connection as they decide ours. None when nothing is dropped (the usual case)."""
    kept_options = _KEPT_OPTIONS_101 if status == 101 else _KEPT_OPTIONS
    named = options - kept_options
    lines = head[:-4].split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name = line.partition(b":")[0].strip(b" \t").lower()
        if name == b"connection":
            tokens = [t.strip(b" \t") for t in line.partition(b":")[2].split(b",")]
            kept = [t for t in tokens if t.lower() in kept_options]
            if kept:
                out.append(b"connection: " + b", ".join(kept))
            continue
        if name in named or (
            name in _RESPONSE_HOP_BY_HOP and not (status == 101 and name == b"upgrade")
        ):
            continue
        out.append(line)
    out += [b"", b""]
    forward = b"\r\n".join(out)
    return None if forward == head else forward


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse ``head`` (through the blank line) into a :data:`ResponseHead`.

    Raises :class:`MalformedMessage` (502) if unusable.
    """
    parsed = response_cache.get(head)
    if parsed is not None:
        return parsed
    m = _STATUS_LINE.match(head)
    if m is None:
        raise MalformedMessage(502, b"malformed response status line\n")
    length = -1
    te: bytes | None = None
    close = keep_alive = False
    options: set[bytes] = set()
    for name, raw in _RESPONSE_HEADERS.findall(head.lower()):
        value = raw.rstrip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise MalformedMessage(502, b"invalid Content-Length in response\n")
            length = int(value)
        elif name == b"transfer-encoding":
            te = value if te is None else te + b"," + value
        else:
            tokens = {t.strip(b" \t") for t in value.split(b",")}
            close = close or b"close" in tokens
            keep_alive = keep_alive or b"keep-alive" in tokens
            options |= tokens
    if te is not None:
        te = te.rsplit(b",", 1)[-1].strip()  # the final coding decides the framing
    status = int(m[2])
    forward = _response_forward(head, status, options) if _RESPONSE_HOP.search(head) else None
    parsed = (status, not close and (keep_alive or m[1] == b"1"), length, te, forward)
    if len(head) <= _HEAD_CACHE_MAX_BYTES:
        if len(response_cache) >= _HEAD_CACHE_SIZE:
            response_cache.clear()
        response_cache[head] = parsed
    return parsed


def local_response(status: int, body: bytes, extra: bytes, keep: bool, head_only: bool) -> bytes:
    """A complete plain-text response the router answers itself (errors, no backend)."""
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % len(body),
            extra,
            b"" if keep else b"connection: close\r\n",
            b"\r\n",
            b"" if head_only else body,
        )
    )


# A chunk-size line without its CRLF (RFC 9112 section 7.1.1), with no whitespace anywhere: BWS
# is refused as llhttp refuses it. At most 15 hex digits, so the size fits any int we compare.
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:;" + _TCHAR + rb"+(?:=(?:" + _TCHAR + rb"+|" + _QUOTED + rb"))?)*"
)
# A trailer field line. Framing fields are refused there: a recipient that merges trailers into
# the header section would reframe the message (RFC 9110 section 6.5.1).
_TRAILER_FIELD = re.compile(
    rb"(?!(?i:content-length|transfer-encoding):)" + _TCHAR + rb"+:[\t -~\x80-\xff]*"
)

# chunked scanner states
_CS_SIZE = 0
_CS_DATA = 1
_CS_DATA_END = 2
_CS_TRAILER = 3


class ChunkedScanner:
    """Finds where a chunked body ends, scanning the raw bytes as they arrive (nothing decoded).

    ``routing.client`` runs one over a chunked request body (``limit`` = the router's body
    limit), ``routing.upstream`` over a chunked response (no limit). Feed it any split of the
    bytes: :meth:`scan` keeps a partial line between calls.
    """

    __slots__ = ("left", "limit", "line", "state", "total")

    def __init__(self, limit: int) -> None:
        self.state = _CS_SIZE
        self.left = 0
        self.line = b""
        self.total = 0
        self.limit = limit

    def scan(self, data: bytes | bytearray, pos: int) -> int:
        """Advance over ``data[pos:]``; the index just past the body's end, or -1 (need more).

        Raises :class:`BadFraming` or :class:`BodyTooLarge`.
        """
        n = len(data)
        while pos < n:
            state = self.state
            if state == _CS_DATA:
                if n - pos < self.left:
                    self.left -= n - pos
                    return -1
                pos += self.left
                self.left = 0
                self.state = _CS_DATA_END
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.line += bytes(data[pos:])
                if len(self.line) > 8192:
                    raise BadFraming("chunk line too long")
                return -1
            line = bytes(data[pos:nl])
            if self.line:
                line = self.line + line
                self.line = b""
            pos = nl + 1
            if not line.endswith(b"\r"):
                raise BadFraming("chunk line without CRLF")
            line = line[:-1]
            if state == _CS_SIZE:
                m = _CHUNK_SIZE_LINE.fullmatch(line)
                if m is None:
                    raise BadFraming("bad chunk size")
                size = int(m[1], 16)
                if size == 0:
                    self.state = _CS_TRAILER
                else:
                    self.total += size
                    if self.total > self.limit:
                        raise BodyTooLarge
                    self.left = size
                    self.state = _CS_DATA
            elif state == _CS_DATA_END:
                if line:
                    raise BadFraming("chunk data longer than its size")
                self.state = _CS_SIZE
            elif not line:  # the empty line after the trailers: done
                return pos
            elif _TRAILER_FIELD.fullmatch(line) is None:
                raise BadFraming("malformed trailer field")
        return -1
