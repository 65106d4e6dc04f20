"""HTTP/1.1 framing for the router: request and response heads, chunked bodies. No sockets.

``routing.client`` parses each request head here and scans chunked request bodies;
``routing.upstream`` does the same for responses; both answer the router's own errors with
:func:`local_response`. ``tests/routing/test_http1.py`` holds every accept/reject and framing
decision made here against llhttp's (through httptools).

Why hand-written: the router forwards the raw bytes the client sent and only needs to know where a
message ends and whether the connection stays open, so it looks at the few headers that decide
that (framing, keep-alive, ``Expect``) and nothing else. A full parser would build what nobody
reads. The whole request head is checked by one regular expression, and parse results are cached
per distinct head (clients and apps repeat the same heads over and over), so the common request
costs one dictionary lookup.

What is refused is refused because the upstream might frame it differently than we do (request
smuggling): obs-fold, whitespace before a colon, bare CR or LF, control bytes, Content-Length
together with Transfer-Encoding, more than one Content-Length, a final coding other than chunked,
chunked applied twice, an empty Transfer-Encoding or a tab after one, a body on a request that asks
for an upgrade, and chunk-size lines, extensions or trailer fields outside RFC 9112's grammar.
What llhttp refuses (Node's parser, and uvicorn's through httptools) we refuse too; the tests list
where we are stricter still.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_HEAD",
    "TOKEN",
    "BadFraming",
    "BodyTooLarge",
    "ChunkedScanner",
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
_REQUEST_HEADERS = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|expect|upgrade):[ \t]*([^\r]*)"
)
_RESPONSE_HEADERS = re.compile(rb"\r\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*)")

_REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
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


# What the router needs from a head. Plain tuples, not NamedTuples: the connections unpack one per
# request, and CPython unpacks an exact tuple about twice as fast as a tuple subclass (30 ns).
#: ``(method, keep_alive, content_length or -1, final transfer coding or None, expect_100)``;
#: the transfer coding is always ``b"chunked"`` when there is one (anything else is refused).
RequestHead = tuple[bytes, bool, int, bytes | None, bool]
#: ``(status, keep_alive, content_length or -1, final transfer coding or None)``.
ResponseHead = tuple[int, bool, int, bytes | None]


# Parsed heads, keyed by the exact head bytes: parsing is a pure function of them. Bounded; only
# short heads are kept. The connections look heads up here themselves before calling the parse
# functions (one dictionary lookup on the hot path instead of a call); never rebind these.
_HEAD_CACHE_SIZE = 1024
_HEAD_CACHE_MAX_BYTES = 2048
request_cache: dict[bytes, RequestHead] = {}
response_cache: dict[bytes, ResponseHead] = {}


def parse_request_head(head: bytes) -> RequestHead:
    """Parse ``head`` (through the blank line) into a :data:`RequestHead`.

    Raises :class:`MalformedMessage` for what we refuse to forward: anything the upstream might
    frame differently than we do (request smuggling).
    """
    parsed = request_cache.get(head)
    if parsed is not None:
        return parsed
    m = _REQUEST_HEAD.fullmatch(head)
    if m is None:
        raise MalformedMessage(400, b"malformed request\n")
    method, minor = m.group(1, 3)
    length = -1
    te: bytes | None = None
    close = keep_alive = expect = upgrade_option = upgrade_field = False
    for name, raw in _REQUEST_HEADERS.findall(head.lower()):
        value = raw.rstrip(b" \t")
        if name == b"content-length":
            if not value.isdigit():
                raise MalformedMessage(400, b"invalid Content-Length\n")
            if length >= 0:  # a second one, even an equal one: llhttp refuses both
                if int(value) != length:
                    raise MalformedMessage(400, b"conflicting Content-Length\n")
                raise MalformedMessage(400, b"duplicate Content-Length\n")
            length = int(value)
        elif name == b"transfer-encoding":
            # an empty field, or a tab after the value: llhttp refuses both, so do we
            if not value or b"\t" in raw[len(value) :]:
                raise MalformedMessage(400, b"unsupported Transfer-Encoding\n")
            te = value if te is None else te + b"," + value
        elif name == b"connection":
            tokens = {t.strip() for t in value.split(b",")}
            close = close or b"close" in tokens
            keep_alive = keep_alive or b"keep-alive" in tokens
            upgrade_option = upgrade_option or b"upgrade" in tokens
        elif name == b"expect":
            expect = value == b"100-continue"
        else:
            upgrade_field = True
    if method == b"CONNECT":
        raise MalformedMessage(405, b"CONNECT is not supported\n")
    if te is not None:
        codings = [coding.strip() for coding in te.split(b",")]
        te = codings[-1]  # the final coding decides the framing (RFC 9112 section 6.3)
        # chunked must be final and applied once (RFC 9112 section 6.1)
        if length >= 0 or te != b"chunked" or b"chunked" in codings[:-1]:
            raise MalformedMessage(400, b"unsupported Transfer-Encoding\n")
    if upgrade_field and upgrade_option and (length > 0 or te is not None):
        # httptools (uvicorn's parser) tells llhttp to skip the body of a request that asks for
        # an upgrade: uvicorn 0.54 hands the app an empty body and drops those bytes. The app
        # and we would frame the connection differently: refuse it
        raise MalformedMessage(400, b"upgrade request with a body\n")
    parsed = (method, not close and (keep_alive or minor == b"1"), length, te, expect)
    if len(head) <= _HEAD_CACHE_MAX_BYTES:
        if len(request_cache) >= _HEAD_CACHE_SIZE:
            request_cache.clear()
        request_cache[head] = parsed
    return parsed


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
    for name, raw in _RESPONSE_HEADERS.findall(head.lower()):
        value = raw.rstrip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise MalformedMessage(502, b"invalid Content-Length in response\n")
            length = int(value)
        elif name == b"transfer-encoding":
            te = value if te is None else te + b"," + value
        else:
            tokens = {t.strip() for t in value.split(b",")}
            close = close or b"close" in tokens
            keep_alive = keep_alive or b"keep-alive" in tokens
    if te is not None:
        te = te.rsplit(b",", 1)[-1].strip()  # the final coding decides the framing
    parsed = (int(m[2]), not close and (keep_alive or m[1] == b"1"), length, te)
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
