"""HTTP/1.1 framing (routing/http1.py): our parser against llhttp's, decision for decision.

A reverse proxy is open to request smuggling wherever it frames a request differently from the
server behind it. So every generated request (with the classic smuggling shapes: Content-Length
and Transfer-Encoding together, duplicate or conflicting lengths, obs-fold, bare CR or LF, invalid
chunk sizes and extensions, codings other than chunked, whitespace before a colon) goes through
our parser and through llhttp (Node's parser, here through httptools), and both must agree: accept
or reject, and where the request ends (Content-Length, chunked or no body) and whether the
connection stays open. Where we refuse what llhttp accepts, that must be the safe direction and
listed in STRICTER below with the RFC section that allows it. Where we accept what llhttp refuses,
the test fails, except for the two shapes in LENIENT that do not touch framing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard.routing.http1 import (
    MAX_HEAD,
    BadFraming,
    BodyTooLarge,
    ChunkedScanner,
    Forwarding,
    MalformedMessage,
    parse_request_head,
    parse_response_head,
)

#: The router's default body limit (ServiceProxy(max_body_bytes=...)): bigger bodies are a 413.
MAX_BODY = 10 * 2**20
#: A request after the one under test: where each parser starts reading it is where it thinks the
#: first one ended.
NEXT = b"GET /next HTTP/1.1\r\nHost: n\r\n\r\n"


@dataclass(frozen=True)
class Verdict:
    """One parser's decision on a byte stream that starts with a request."""

    outcome: Literal["accept", "reject", "incomplete"]
    end: int | None = None  # where the first request ends (accept only)
    chunked: bool = False
    keep_alive: bool | None = None  # None: not comparable (llhttp: upgrade)
    why: str = ""


def ours(stream: bytes, max_body: int = MAX_BODY) -> Verdict:
    """The router's decision, as routing.client makes it (test_client.py holds the connection
    to this): stray CR/LF before a request line is skipped, the head runs to the first blank line,
    the body is framed by Content-Length or the chunked scanner, the body limit is a 413."""
    data = stream.lstrip(b"\r\n")
    skip = len(stream) - len(data)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Verdict("incomplete")
    hend = end + 4
    if hend > MAX_HEAD:
        return Verdict("reject", why="431")
    try:
        _, keep, length, te, *_ = parse_request_head(data[:hend])
    except MalformedMessage as exc:
        return Verdict("reject", why=exc.reason.decode().strip())
    if te is not None:
        try:
            body_end = ChunkedScanner(max_body).scan(data, hend)
        except BadFraming as exc:
            return Verdict("reject", why=f"chunked: {exc}")
        except BodyTooLarge:
            return Verdict("reject", why="413")
        if body_end < 0:
            return Verdict("incomplete")
        return Verdict("accept", skip + body_end, True, keep)
    if length > max_body:
        return Verdict("reject", why="413")
    total = hend + max(length, 0)
    if total > len(data):
        return Verdict("incomplete")
    return Verdict("accept", skip + total, False, keep)


class _Events:
    """httptools callbacks: where the first message completed, and how it was framed."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.pos = 0
        self.end: int | None = None
        self.chunked = False
        self.keep_alive: bool | None = None

    def on_chunk_header(self) -> None:
        if self.end is None:
            self.chunked = True

    def on_message_complete(self) -> None:
        if self.end is None and self.parser is not None:
            self.end = self.pos + 1
            self.keep_alive = self.parser.should_keep_alive()


def llhttp(stream: bytes) -> Verdict:
    """llhttp's decision (strict: no leniency flags), fed one byte at a time so that the byte
    completing the first message is known exactly."""
    events = _Events()
    parser = httptools.HttpRequestParser(events)
    events.parser = parser
    for i in range(len(stream)):
        events.pos = i
        try:
            parser.feed_data(stream[i : i + 1])
        except httptools.HttpParserUpgrade:  # CONNECT, Upgrade: the message ended before this
            return Verdict("accept", events.end, events.chunked, None, "upgrade")
        except httptools.HttpParserError as exc:
            if events.end is None:
                return Verdict("reject", why=str(exc))
            break  # an error in what follows the first message is not this message's
        if events.end is not None:
            break
    if events.end is None:
        return Verdict("incomplete")
    return Verdict("accept", events.end, events.chunked, events.keep_alive)


def _head(stream: bytes) -> bytes:
    data = stream.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 4]


def _body(stream: bytes) -> bytes:
    return stream.lstrip(b"\r\n")[len(_head(stream)) :]


def _field_values(stream: bytes, name: bytes) -> list[bytes]:
    return [
        m[1].strip(b" \t")
        for m in re.finditer(rb"\r\n" + name + rb":([^\r\n]*)", _head(stream), re.IGNORECASE)
    ]


_LLHTTP_METHODS = (
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY"
).split()
_REQUEST_LINE = re.compile(rb"([^ \r\n]*) ([^ \r\n]*) ([^\r\n]*)\r\n")
_CHUNK_LINE = re.compile(rb"(?:^|\r\n)([0-9A-Fa-f]+)((?:;[^\r\n]*)?)\r\n")


def _request_line(stream: bytes) -> tuple[bytes, bytes, bytes] | None:
    m = _REQUEST_LINE.match(stream.lstrip(b"\r\n"))
    return (m[1], m[2], m[3]) if m else None


def _version_not_1x(s: bytes) -> bool:
    line = _request_line(s)
    return line is not None and line[2] not in (b"HTTP/1.0", b"HTTP/1.1")


def _connect(s: bytes) -> bool:
    line = _request_line(s)
    return line is not None and line[0] == b"CONNECT"


def _spaced_request_line(s: bytes) -> bool:
    first = s.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    return b"  " in first


def _over_body_limit(s: bytes) -> bool:
    return any(v.isdigit() and int(v) > MAX_BODY for v in _field_values(s, b"content-length"))


def _long_chunk_size(s: bytes) -> bool:
    return any(len(m[1]) > 15 for m in _CHUNK_LINE.finditer(_body(s)))


def _empty_chunk_ext_token(s: bytes) -> bool:
    # ``;`` or ``=`` not followed by a token (``;;a``, ``;=v``, ``;n=;``, ``;n=`` at the end), or
    # a token value running into a quote (``;n=v"w"``)
    return any(
        re.search(rb";(?:[;=]|$)|=(?:;|$)|=[^\";]+\"", m[2]) for m in _CHUNK_LINE.finditer(_body(s))
    )


def _chunked_twice(s: bytes) -> bool:
    codings = [
        c.strip(b" \t").lower()
        for v in _field_values(s, b"transfer-encoding")
        for c in v.split(b",")
    ]
    return codings.count(b"chunked") > 1


def _upgrade_with_body(s: bytes) -> bool:
    tokens = {t.strip().lower() for v in _field_values(s, b"connection") for t in v.split(b",")}
    lengths = _field_values(s, b"content-length")
    has_body = bool(_field_values(s, b"transfer-encoding")) or any(v != b"0" for v in lengths)
    return b"upgrade" in tokens and bool(_field_values(s, b"upgrade")) and has_body


def _http10_keep_alive_and_close(s: bytes) -> bool:
    line = _request_line(s)
    tokens = {t.strip().lower() for v in _field_values(s, b"connection") for t in v.split(b",")}
    return line is not None and line[2] == b"HTTP/1.0" and {b"keep-alive", b"close"} <= tokens


_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


def _host_fields_wrong(s: bytes) -> bool:
    line = _request_line(s)
    hosts = _field_values(s, b"host")
    if line is None:
        return False
    missing = not hosts and line[2] == b"HTTP/1.1"
    return missing or len(hosts) > 1 or any(not _VALID_HOST.fullmatch(h) for h in hosts)


def _transfer_codings(s: bytes) -> list[bytes]:
    return [
        c.strip(b" \t").lower()
        for v in _field_values(s, b"transfer-encoding")
        for c in v.split(b",")
    ]


def _coding_not_single_chunked(s: bytes) -> bool:
    codings = _transfer_codings(s)
    return bool(codings) and codings != [b"chunked"]


def _te_on_http10(s: bytes) -> bool:
    line = _request_line(s)
    return line is not None and line[2] == b"HTTP/1.0" and bool(_transfer_codings(s))


def _over_100_fields(s: bytes) -> bool:
    return _head(s).count(b"\r\n") - 2 > 100


def _connection_names_framing(s: bytes) -> bool:
    tokens = {t.strip().lower() for v in _field_values(s, b"connection") for t in v.split(b",")}
    return bool(tokens & {b"content-length", b"transfer-encoding", b"host"})


def _target_not_origin_or_http(s: bytes) -> bool:
    line = _request_line(s)
    if line is None:
        return False
    target = line[1]
    http = re.fullmatch(rb"(?i:https?)://[^/?#@]+(?:[/?].*)?", target, re.DOTALL)
    return not (target[:1] == b"/" or target == b"*" or http)


#: Shapes we refuse (or close after) although llhttp accepts them, each the safe direction.
STRICTER: dict[str, tuple[Callable[[bytes], bool], str]] = {
    "version-not-1.x": (
        _version_not_1x,
        "RFC 9112 section 2.3: we forward HTTP/1.0 and 1.1 only; llhttp also takes 0.9 and 2.0",
    ),
    "connect": (
        _connect,
        "RFC 9110 section 9.3.6: CONNECT asks for a tunnel, which the router does not offer (405)",
    ),
    "spaces-in-request-line": (
        _spaced_request_line,
        "RFC 9112 section 3: request-line = method SP request-target SP HTTP-version; a "
        "recipient MAY split on whitespace runs, we do not",
    ),
    "over-body-limit": (
        _over_body_limit,
        "RFC 9110 section 15.5.14: a body over the router's limit is answered 413",
    ),
    "chunk-size-over-15-digits": (
        _long_chunk_size,
        "RFC 9112 section 7.1: recipients must guard against overflowing sizes; we cap the "
        "numeral at 15 hex digits (llhttp takes leading zeros beyond that)",
    ),
    "empty-chunk-extension-token": (
        _empty_chunk_ext_token,
        "RFC 9112 section 7.1.1: chunk-ext-name is a token and chunk-ext-val a token or "
        "quoted-string, none empty; llhttp lets ';;', ';=v', ';n=' and ';n=v\"w\"' through",
    ),
    "chunked-twice": (
        _chunked_twice,
        "RFC 9112 section 6.1: chunked is applied once; llhttp reads 'chunked<TAB>' as another "
        "coding and so lets 'chunked<TAB>, chunked' through",
    ),
    "upgrade-with-body": (
        _upgrade_with_body,
        "RFC 9110 section 7.8 lets an upgrade request carry content, but httptools makes llhttp "
        "skip it (uvicorn gives the app an empty body and drops the bytes): we refuse it",
    ),
    "http10-keep-alive-and-close": (
        _http10_keep_alive_and_close,
        "RFC 9112 section 9.3: 'close' means close; we close, llhttp keeps an HTTP/1.0 "
        "connection that also says keep-alive",
    ),
    "host-missing-repeated-or-invalid": (
        _host_fields_wrong,
        "RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host, "
        "to more than one Host, and to an invalid Host value; llhttp leaves that to the app",
    ),
    "coding-other-than-chunked": (
        _coding_not_single_chunked,
        "RFC 9112 section 6.1 lets a server refuse codings it does not apply; like HAProxy we "
        "take a single 'chunked' only (llhttp frames 'gzip, chunked' as chunked)",
    ),
    "transfer-encoding-on-http10": (
        _te_on_http10,
        "RFC 9112 section 6.1: a server MUST NOT send chunked to a 1.0 client and a 1.0 "
        "recipient may not know it; a 1.0 request with Transfer-Encoding is a smuggling shape",
    ),
    "over-100-fields": (
        _over_100_fields,
        "RFC 9110 section 5.4: a server may refuse a header section larger than it handles; "
        "like HAProxy (tune.http.maxhdr) we take 100 field lines",
    ),
    "connection-names-framing-field": (
        _connection_names_framing,
        "RFC 9110 section 7.6.1: fields named in Connection are dropped by a proxy; dropping "
        "Content-Length, Transfer-Encoding or Host would reframe or reroute the request",
    ),
    "target-not-origin-or-http": (
        _target_not_origin_or_http,
        "RFC 9112 section 3.2: a server should answer 400 to an invalid target; we forward "
        "origin-form and '*', and turn http(s) absolute-form into origin-form (section 3.2.2)",
    ),
}


def _method_unknown_to_llhttp(s: bytes) -> bool:
    line = _request_line(s)
    return line is not None and line[0] not in _LLHTTP_METHODS


def _target_llhttp_refuses(s: bytes) -> bool:
    line = _request_line(s)
    if line is None:
        return False
    target = line[1]
    origin_or_absolute = target == b"*" or re.match(rb"/|[A-Za-z][A-Za-z0-9+.-]*://", target)
    return not origin_or_absolute or any(b >= 0x7F for b in target)


#: Shapes we accept and llhttp refuses. Neither decides framing (RFC 9112 section 6.3 frames a
#: request by Transfer-Encoding and Content-Length only), and both are forwarded byte for byte.
LENIENT: dict[str, tuple[Callable[[bytes], bool], str]] = {
    "extension-method": (
        _method_unknown_to_llhttp,
        "RFC 9110 section 9.1: any token is a method; llhttp knows a fixed list",
    ),
    "request-target": (
        _target_llhttp_refuses,
        "RFC 9112 section 3.2: the target is forwarded as is; llhttp refuses bytes over 0x7e "
        "and the authority form outside CONNECT",
    ),
}


def _explained(table: dict[str, tuple[Callable[[bytes], bool], str]], stream: bytes) -> list[str]:
    return [name for name, (applies, _) in table.items() if applies(stream)]


def compare(stream: bytes) -> None:
    """Fail unless our decision on ``stream`` matches llhttp's or the difference is listed."""
    a, b = ours(stream), llhttp(stream)
    context = f"\nstream: {stream!r}\nours:   {a}\nllhttp: {b}"
    if a.outcome == "accept" and b.outcome == "accept":
        assert (a.end, a.chunked) == (b.end, b.chunked), "framed differently" + context
        if b.keep_alive is not None and a.keep_alive != b.keep_alive:
            closes_anyway = _http10_keep_alive_and_close(stream)
            assert not a.keep_alive and closes_anyway, "keep-alive differs" + context
    elif a.outcome == "reject" and b.outcome != "reject":
        assert _explained(STRICTER, stream), "we refuse what llhttp takes, unlisted" + context
    elif a.outcome != "reject" and b.outcome == "reject":
        assert _explained(LENIENT, stream), "we take (or wait on) what llhttp refuses" + context
    else:
        assert a.outcome == b.outcome, context


# -- generated requests ----------------------------------------------------------------------------
# Mostly well-formed, with a smuggling shape now and then: a request refused for its first flaw says
# nothing about the second, so each place goes wrong only rarely.


def _mostly(
    good: st.SearchStrategy[bytes], bad: st.SearchStrategy[bytes], one_in: int = 10
) -> st.SearchStrategy[bytes]:
    """``good``, except one time in ``one_in``."""
    return st.integers(1, one_in).flatmap(lambda n: bad if n == 1 else good)


def _cases(word: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([word, word.lower(), word.upper()])


_EOL = _mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r", b""]), 80)
_OWS = _mostly(st.sampled_from([b"", b" "]), st.sampled_from([b"\t", b"  ", b" \t", b"\t "]), 10)
_CONTENT_LENGTH = _mostly(
    st.integers(0, 40).map(lambda n: b"%d" % n),
    st.sampled_from(
        [b"", b"05", b"+5", b"-1", b"5, 5", b"5,5", b"5 5", b"0x5", b"5.0", b"\xd9\xa5"]
    )
    | st.integers(MAX_BODY - 1, 2**70).map(lambda n: b"%d" % n),
)
_CODING = st.sampled_from([b"gzip", b"deflate", b"gzip", b"deflate", b"chunked"]) | _mostly(
    st.just(b"gzip"),
    st.sampled_from([b"identity", b"", b"xchunked", b"chunked;q=1", b"chunked\t", b"chunk"]),
    3,
)


@st.composite
def _transfer_encoding(draw: st.DrawFn) -> bytes:
    """Usually ends in chunked, sometimes after other codings (or chunked itself)."""
    codings = draw(st.lists(_CODING, max_size=2))
    if draw(_mostly(st.just(b"y"), st.just(b""), 5)):
        codings.append(draw(_cases(b"chunked")))
    sep = draw(_mostly(st.sampled_from([b", ", b","]), st.sampled_from([b" ,", b",,", b"\t,"])))
    return sep.join(codings or [b""])


@st.composite
def _other_header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    kind = draw(st.sampled_from(["connection", "expect", "other", "other"] * 3 + ["weird-name"]))
    if kind == "connection":
        tokens = st.sampled_from([b"close", b"keep-alive", b"Close", b"upgrade", b"x"])
        return draw(_cases(b"Connection")), b", ".join(draw(st.lists(tokens, max_size=2)))
    if kind == "expect":
        return b"Expect", draw(st.sampled_from([b"100-continue", b"x"]))
    if kind == "other":
        name = draw(st.sampled_from([b"Via", b"X-A", b"Cookie", b"Accept", b"Upgrade"]))
        value = _mostly(
            st.sampled_from([b"a", b"b c", b"\x80\xff", b"a\tb", b""]),
            st.sampled_from([b"\x7f", b"\x00", b"a\x0bb", b"a\rb", b"a\nb"]),
        )
        return name, draw(value)
    names = [b"Content-Length ", b"Transfer-Encoding ", b" Host", b"Ho\tst", b"X\x00", b""]
    return draw(st.sampled_from(names)), draw(st.sampled_from([b"5", b"chunked", b"a"]))


_CHUNK_EXTENSION = _mostly(
    st.sampled_from([b""] * 6 + [b";a", b";a=b", b';a="b c"', b";a=b;c", b';a="\\"x"', b";!~=1"]),
    st.sampled_from(
        [b" ", b"\t", b" ;a", b"; a", b";a =b", b";", b";;a", b";=b", b";a=", b";a=b=c", b';a="x']
    )
    | st.sampled_from(
        [b";a\x01", b";a\rb", b";\x80", b';a="\\\x01"', b';a="x"y', b';a=x"y"', b";a=b;"]
    ),
    8,
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Chunked bodies, mostly valid, else broken at one place or another."""
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=12), max_size=3)):
        size = len(data) + draw(st.sampled_from([0] * 20 + [-1, 1]))
        digits = _mostly(
            st.sampled_from([b"%x" % size, b"%X" % size, b"%04x" % size]),
            st.sampled_from([b"%016x" % size, b" %x" % size, b"0x%x" % size, b""]),
            20,
        )
        out += draw(digits) + draw(_CHUNK_EXTENSION) + draw(_EOL) + data + draw(_EOL)
    last = _mostly(st.sampled_from([b"0", b"000"]), st.sampled_from([b"", b"-0", b"0" * 17]), 20)
    out += draw(last) + draw(_CHUNK_EXTENSION) + draw(_EOL)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        trailer = _mostly(
            st.sampled_from([b"X: y", b"X:y", b"X: \x80", b"X: a\tb", b"X:", b"Trailer: z"]),
            st.sampled_from([b"X: \x7f", b"X :y", b" X: y", b"bad line", b"Content-Length: 5"])
            | st.sampled_from([b"transfer-encoding: chunked", b"X: y\rZ: w"]),
            4,
        )
        out += draw(trailer) + draw(_EOL)
    return out + draw(_EOL)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request (maybe after stray line ends), then NEXT."""
    method = _mostly(
        st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"PATCH", b"DELETE"]),
        st.sampled_from([b"CONNECT", b"get", b"FOO", b"G\x00T"]),
        30,
    )
    target = _mostly(
        st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/p", b"/a#f", b"/%7e"]),
        st.sampled_from([b"h:443", b"/a b", b"/\x80"])
        | st.binary(min_size=1, max_size=4).map(lambda t: b"/" + t),
        30,
    )
    version = _mostly(
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
        st.sampled_from([b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1"]),
        30,
    )
    sep = draw(_mostly(st.just(b" "), st.sampled_from([b"  ", b"\t"]), 30))
    head = draw(method) + sep + draw(target) + sep + draw(version) + draw(_EOL)
    # the framing headers: usually one kind, sometimes the combinations smuggling relies on
    framing = draw(
        st.sampled_from(["none", "cl", "cl", "te", "te", "te", "cl+te", "te+te", "cl+cl"])
    )
    fields = [
        (draw(_cases(b"Content-Length")), draw(_CONTENT_LENGTH)) for _ in range(framing.count("cl"))
    ]
    fields += [
        (draw(_cases(b"Transfer-Encoding")), draw(_transfer_encoding()))
        for _ in range(framing.count("te"))
    ]
    fields += draw(st.lists(_other_header(), max_size=2))
    # one Host, mostly valid (RFC 9112 section 3.2): none, two or a bad value now and then
    host = _mostly(
        st.sampled_from([b"h", b"h:8080", b"[::1]:80", b""]),
        st.sampled_from([b"b c", b"\x80\xff", b"a\tb", b"a/b", b"u@h"]),
    )
    hosts = draw(st.sampled_from([1] * 28 + [0, 2]))
    fields += [(draw(_cases(b"Host")), draw(host)) for _ in range(hosts)]
    for name, value in draw(st.permutations(fields)):
        head += name + b":" + draw(_OWS) + value + draw(_OWS) + draw(_EOL)
        if draw(st.integers(0, 60)) == 0:
            head += draw(st.sampled_from([b" folded", b"\tfolded"])) + draw(_EOL)  # obs-fold
    head += draw(_EOL)
    lengths = [int(v) for _, v in fields if v.isdigit() and int(v) < 64]
    if "te" in framing and draw(st.integers(0, 9)):
        body = draw(chunked_bodies())
    else:
        size = draw(st.sampled_from([*lengths, 0, 5]))
        body = b"x" * (size + draw(st.sampled_from([0] * 20 + [-1, 1])))
    lead = _mostly(st.just(b""), st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n", b" \r\n"]), 20)
    return draw(lead) + head + body + NEXT


_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

#: What the differential test found: shapes our parser took (or framed differently) where llhttp
#: refused them, before http1.py was fixed. They run by name every time.
FOUND = {
    "duplicate-content-length": (
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "chunked-twice": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "empty-transfer-encoding-then-chunked": (
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "tab-after-chunked": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
    "upgrade-with-a-body": (
        b"PUT / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "space-after-chunk-size": _CHUNKED_HEAD + b"5 \r\nhello\r\n0\r\n\r\n",
    "bare-cr-in-chunk-extension": _CHUNKED_HEAD + b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "control-byte-in-chunk-extension": _CHUNKED_HEAD + b"5;a\x01\r\nhello\r\n0\r\n\r\n",
    "space-in-chunk-extension": _CHUNKED_HEAD + b"5; a = b\r\nhello\r\n0\r\n\r\n",
    "trailer-not-a-field": _CHUNKED_HEAD + b"0\r\nbad line\r\n\r\n",
    "trailer-space-before-colon": _CHUNKED_HEAD + b"0\r\nX : y\r\n\r\n",
    "trailer-obs-fold": _CHUNKED_HEAD + b"0\r\nX: y\r\n z\r\n\r\n",
    "trailer-content-length": _CHUNKED_HEAD + b"0\r\nContent-Length: 5\r\n\r\n",
}


#: One request per listed difference, so that no entry outlives the difference it excuses.
DIFFERENCES = {
    "version-not-1.x": b"GET / HTTP/2.0\r\n\r\n",
    "connect": b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    "spaces-in-request-line": b"GET  / HTTP/1.1\r\n\r\n",
    "over-body-limit": b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
    "chunk-size-over-15-digits": _CHUNKED_HEAD + b"0000000000000005\r\nhello\r\n0\r\n\r\n",
    "empty-chunk-extension-token": _CHUNKED_HEAD + b"5;;a\r\nhello\r\n0\r\n\r\n",
    "chunked-twice": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\t, chunked\r\n\r\n0\r\n\r\n",
    "upgrade-with-body": FOUND["upgrade-with-a-body"],
    "http10-keep-alive-and-close": b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
    "extension-method": b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n",
    "request-target": b"GET /\x80 HTTP/1.1\r\nHost: h\r\n\r\n",
    "host-missing-repeated-or-invalid": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "coding-other-than-chunked": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-on-http10": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "over-100-fields": b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 100 + b"\r\n",
    "connection-names-framing-field": (
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\nx"
    ),
    "target-not-origin-or-http": b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("name", DIFFERENCES)
def test_every_listed_difference_is_real(name: str) -> None:
    stream = DIFFERENCES[name] + NEXT
    a, b = ours(stream), llhttp(stream)
    if name in STRICTER:
        assert STRICTER[name][0](stream)
        assert (a.outcome == "reject" and b.outcome != "reject") or (
            a.outcome == b.outcome == "accept" and not a.keep_alive and b.keep_alive
        )
    else:
        assert LENIENT[name][0](stream)
        assert a.outcome == "accept" and b.outcome == "reject"
    compare(stream)
    assert set(DIFFERENCES) == set(STRICTER) | set(LENIENT)


@pytest.mark.parametrize("message", FOUND.values(), ids=FOUND.keys())
def test_shapes_the_differential_test_found(message: bytes) -> None:
    assert ours(message + NEXT).outcome == "reject"
    compare(message + NEXT)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=requests())
def test_requests_are_decided_and_framed_like_llhttp(stream: bytes) -> None:
    compare(stream)


@settings(max_examples=600, deadline=None)
@given(body=chunked_bodies())
def test_chunked_bodies_end_where_llhttp_ends_them(body: bytes) -> None:
    compare(_CHUNKED_HEAD + body + NEXT)


@settings(max_examples=200, deadline=None)
@given(body=chunked_bodies(), data=st.data())
def test_chunked_scanner_gives_the_same_answer_however_the_bytes_arrive(
    body: bytes, data: st.DataObject
) -> None:
    """The scanner keeps partial lines between reads: any split answers as one whole read."""

    def scan(pieces: list[bytes]) -> int | str:
        scanner = ChunkedScanner(MAX_BODY)
        offset = 0
        try:
            for piece in pieces:
                end = scanner.scan(piece, 0)
                if end >= 0:
                    return offset + end
                offset += len(piece)
        except BadFraming:
            return "bad"
        return "incomplete"

    stream = body + NEXT
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert scan(pieces) == scan([stream])


# -- named cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", (b"GET", True, -1, None, False)),
        (b"GET / HTTP/1.0\r\n\r\n", (b"GET", False, -1, None, False)),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", (b"GET", True, -1, None, False)),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            (b"GET", False, -1, None, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12 \r\n\r\n",
            (b"POST", True, 12, None, False),
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n\r\n",
            (b"PUT", True, -1, b"chunked", True),
        ),
    ],
    ids=["get", "http10", "http10-keepalive", "close", "length", "chunked-expect"],
)
def test_request_head_parsing(
    head: bytes, expected: tuple[bytes, bool, int, bytes | None, bool]
) -> None:
    assert parse_request_head(head)[:5] == expected
    assert parse_request_head(head)[:5] == expected  # and again from the cache


#: What the upstream gets for a request head: (client head, forwarded head up to the tail, the
#: client's (X-Forwarded-For, X-Forwarded-Proto) or None). RFC 9110 section 7.6.1 (hop-by-hop),
#: RFC 9112 section 3.2.2 (absolute form).
FORWARDED = {
    "unchanged": (
        b"GET /a?b HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
        b"GET /a?b HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n",
        None,
    ),
    "hop-by-hop": (
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nProxy: evil\r\n"
        b"X-Kept: k\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nTrailer: X\r\nX-Kept: k\r\n",
        None,
    ),
    "upgrade-kept-when-upgrading": (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nconnection: upgrade\r\n",
        None,
    ),
    "absolute-form": (
        b"GET http://x.example:8080/health?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        b"GET /health?q=1 HTTP/1.1\r\nhost: x.example:8080\r\n",
        None,
    ),
    "absolute-form-no-path": (
        b"GET HTTPS://x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        None,
    ),
    "framing-canonical": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 005\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\n",
        None,
    ),
    "chunked-canonical": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked \r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked\r\n",
        None,
    ),
    "http10-keep-alive": (
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n",
        None,
    ),
    "forwarded-fields-lifted": (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nVia: 1.0 a\r\n"
        b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nX-Forwarded-Proto: https\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.0 a\r\n",
        (b"1.1.1.1, 2.2.2.2, 3.3.3.3", b"https"),
    ),
}


@pytest.mark.parametrize("name", FORWARDED)
def test_forwarded_head(name: str) -> None:
    head, forward, prior = FORWARDED[name]
    assert parse_request_head(head)[5:] == (forward, prior)


@pytest.mark.parametrize(
    ("forwarding", "prior", "tail"),
    [
        (
            Forwarding(),
            None,
            b"via: 1.1 shipyard\r\nx-forwarded-proto: http\r\nx-forwarded-for: 10.0.0.9\r\n\r\n",
        ),
        (
            Forwarding(),
            (b"1.1.1.1, 2.2.2.2", b"https"),
            b"via: 1.1 shipyard\r\nx-forwarded-proto: http\r\n"
            b"x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n\r\n",
        ),
        (
            Forwarding(via=None, x_forwarded_for="replace", x_forwarded_proto="keep"),
            (b"1.1.1.1", b"https"),
            b"x-forwarded-proto: https\r\nx-forwarded-for: 10.0.0.9\r\n\r\n",
        ),
        (
            Forwarding(via="1.1 edge", x_forwarded_proto="keep"),
            (b"1.1.1.1", b""),
            b"via: 1.1 edge\r\nx-forwarded-for: 1.1.1.1, 10.0.0.9\r\n\r\n",
        ),
    ],
    ids=["defaults", "append", "replace-keep-proto", "custom-via-no-proto"],
)
def test_forwarding_tail(
    forwarding: Forwarding, prior: tuple[bytes, bytes] | None, tail: bytes
) -> None:
    assert forwarding.tail(b"10.0.0.9", prior) == tail


@pytest.mark.parametrize("via", ["", " x", "1.1 a\r\nX-Evil: 1", "é"])
def test_forwarding_refuses_a_via_that_is_not_a_field_value(via: str) -> None:
    with pytest.raises(ValueError, match="via"):
        Forwarding(via=via)


#: Every framing case the router answers 400 (and then closes: test_client.py), with the words
#: the client reads. RFC 9112 sections 2.2, 3, 3.2, 5, 6.1, 6.3; RFC 9110 section 8.6.
REFUSED = {
    "no-request-line": (b"GARBAGE\r\n\r\n", b"malformed request line"),
    "conflicting-lengths": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"conflicting Content-Length",
    ),
    # RFC 9110 section 8.6 allows merging identical ones; llhttp and nginx refuse them: so do we
    "duplicate-length": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"duplicate Content-Length",
    ),
    "length-list": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\n",
        b"invalid Content-Length",
    ),
    "length-plus": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n",
        b"invalid Content-Length",
    ),
    "length-hex": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n",
        b"invalid Content-Length",
    ),
    "length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"Content-Length together with Transfer-Encoding",
    ),
    "chunked-twice": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "chunked-in-two-fields": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "gzip-then-chunked": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "chunked-not-final": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "identity": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    # RFC 9112 section 6.1 would have an unknown coding answered 501; HAProxy answers 400, as we do
    "unknown-coding": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: zstd\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "empty-transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "tab-after-chunked": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "te-on-http10": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"Transfer-Encoding in an HTTP/1.0 request",
    ),
    "upgrade-with-body": (
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 3\r\n\r\n",
        b"upgrade request with a body",
    ),
    "missing-host": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", b"missing Host"),
    "missing-host-absolute-form": (b"GET http://h/ HTTP/1.1\r\n\r\n", b"missing Host"),
    "duplicate-host": (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"more than one Host",
    ),
    "invalid-host": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", b"invalid Host"),
    "101-fields": (
        b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
        b"more than 100 header fields",
    ),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", b"whitespace before the colon"),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n", b"obs-fold"),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\nHost: a\r\n\tb\r\n\r\n", b"obs-fold"),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", b"bare LF"),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", b"bare CR"),
    "bad-name-character": (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n", b"field name"),
    "control-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", b"field value"),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", b"field value"),
    "no-colon": (b"GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n", b"without a colon"),
    "connection-names-length": (
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\n",
        b"Connection names a field",
    ),
    "absolute-form-ftp": (b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n", b"scheme other"),
    "absolute-form-userinfo": (
        b"GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"without a valid host",
    ),
    "target-not-a-path": (b"GET a HTTP/1.1\r\nHost: h\r\n\r\n", b"must start with /"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_request_heads(name: str) -> None:
    head, words = REFUSED[name]
    with pytest.raises(MalformedMessage) as refused:
        parse_request_head(head)
    assert refused.value.status == 400
    assert words in refused.value.reason


def test_connect_is_405() -> None:
    with pytest.raises(MalformedMessage) as refused:
        parse_request_head(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n")
    assert refused.value.status == 405


def test_100_fields_are_accepted() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 99 + b"Host: h\r\n\r\n"
    assert parse_request_head(head)[0] == b"GET"


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", None),
        (b"5;a=b;c\r\nhello\r\n0\r\n\r\n", None),
        (b'5;a="b \\" c"\r\nhello\r\n0;x\r\nX: y\r\nZ:\r\n\r\n', None),
        (b"5 \r\nhello\r\n0\r\n\r\n", BadFraming),
        (b"5\t;a=b\r\nhello\r\n0\r\n\r\n", BadFraming),
        (b"5;a\rb\r\nhello\r\n0\r\n\r\n", BadFraming),
        (b"5; a=b\r\nhello\r\n0\r\n\r\n", BadFraming),
        (b"5\nhello\r\n0\r\n\r\n", BadFraming),
        (b"5\r\nhello\r\n0\r\nbad line\r\n\r\n", BadFraming),
        (b"5\r\nhello\r\n0\r\nX : y\r\n\r\n", BadFraming),
        (b"5\r\nhello\r\n0\r\ncontent-length: 5\r\n\r\n", BadFraming),
        (b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", BadFraming),
    ],
    ids=[
        "plain",
        "extensions",
        "quoted-extension-and-trailers",
        "space-after-size",
        "tab-before-extension",
        "bare-cr-in-extension",
        "space-in-extension",
        "bare-lf",
        "trailer-not-a-field",
        "trailer-space-before-colon",
        "trailer-content-length",
        "trailer-transfer-encoding",
    ],
)
def test_chunked_scanner(body: bytes, refused: type[Exception] | None) -> None:
    scanner = ChunkedScanner(MAX_BODY)
    if refused is None:
        assert scanner.scan(body + NEXT, 0) == len(body)  # NEXT is not part of it
    else:
        with pytest.raises(refused):
            scanner.scan(body + NEXT, 0)


def test_chunked_scanner_enforces_the_body_limit() -> None:
    scanner = ChunkedScanner(10)
    assert scanner.scan(b"a\r\n0123456789\r\n", 0) == -1  # exactly the limit: fine so far
    with pytest.raises(BodyTooLarge):
        scanner.scan(b"1\r\nx\r\n", 0)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", (200, True, 3, None)),
        (b"HTTP/1.0 200 OK\r\n\r\n", (200, False, -1, None)),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            (200, True, -1, b"chunked"),
        ),
        (b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\n\r\n", (101, True, -1, None)),
    ],
    ids=["length", "http10", "chunked", "switching"],
)
def test_response_head_parsing(head: bytes, expected: tuple[int, bool, int, bytes | None]) -> None:
    assert parse_response_head(head)[:4] == expected


#: Response heads and what the client gets instead (None: relayed as they are, the usual case).
RESPONSES = {
    "plain": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", None),
    "keep-alive": (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\n\r\n", None),
    "close": (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", None),
    "chunked-and-trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n",
        None,
    ),
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2\r\n"
        b"X-End: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nX-End: 2\r\n\r\n",
    ),
    "only-named": (
        b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ),
    "switching-keeps-upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Hop\r\nUpgrade: ws\r\n"
        b"X-Hop: 1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nUpgrade: ws\r\n\r\n",
    ),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_response_hop_by_hop_fields_are_dropped(name: str) -> None:
    head, forward = RESPONSES[name]
    assert parse_response_head(head)[4] == forward


def test_unusable_response_heads_are_502() -> None:
    for head in (b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"):
        with pytest.raises(MalformedMessage) as refused:
            parse_response_head(head)
        assert refused.value.status == 502
