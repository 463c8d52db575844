"""gateway.py - a small HTTP/1.1 server for WSGI and ASGI apps, written to be read.

One file, standard library only. It serves WSGI apps (PEP 3333) from a
`selectors` event loop with a small thread pool, and ASGI 3 apps from
`asyncio.start_server`. Both share one hand-written, I/O-free HTTP/1.1 parser
and one response writer.

Read it beside:  RFC 9112 (HTTP/1.1 message syntax)   RFC 9110 (HTTP semantics)
                 RFC 6455 (WebSocket)   RFC 7692 (WebSocket compression)
                 RFC 7239 (Forwarded)
                 PEP 3333 (WSGI)    ASGI "HTTP & WebSocket" and "Lifespan" specs

    §1 Imports, limits and constants    §7  ASGI HTTP adapter
    §2 Errors                           §8  ASGI server   (asyncio streams)
    §3 Reading requests   (pure)        §9  WebSocket     (pure codec, then ASGI)
    §4 Writing responses  (pure)        §10 Lifespan      (ASGI)
    §5 WSGI adapter   (a worker thread) §11 Operations    (logs, --trace, TLS, workers)
    §6 WSGI server    (selectors loop)  §12 Command line

§3, §4 and the first half of §9 never touch a socket, a thread, a clock or an
event loop: bytes go in, values come out. The rest does the I/O and calls
down into them.

Run:   python gateway.py --wsgi echo_wsgi:application
       python gateway.py --asgi echo_asgi:app
Grep:  "Policy:" marks a choice where the RFC allows several, "Leniency:"
       something accepted that a strict reading would refuse, and "Limit:" a
       refusal that comes from a constant in §1.
Not here, on purpose: HTTP/2 and HTTP/3 (put a proxy such as nginx in front).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import dataclasses
import errno
import functools
import hashlib
import importlib
import inspect
import io
import ipaddress
import itertools
import logging
import os
import re
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

try:
    import ssl
    WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
except ImportError:     # a Python built without OpenSSL: no TLS, all else works
    ssl = None
    WOULD_BLOCK = (BlockingIOError,)
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, unquote_to_bytes
import zlib

__all__ = [
    "Config", "HTTPError", "Request", "RequestParser", "Response", "END",
    "parse_head", "error_response", "WSGIServer", "ASGIServer", "serve",
    "make_listener", "main",
]

log = logging.getLogger("gateway")   # configured by the command line (§9)

# =============================================================================
# §1  Imports, limits and constants
#
# Every number the server uses lives here, with its unit and the status code
# that going over it produces. Config (below) lets the command line change them.
# =============================================================================

SERVER_NAME = b"gateway"

# Precedents for the head limits: h11 allows 16 KiB, waitress 256 KiB.
MAX_REQUEST_LINE = 8 * 1024      # bytes, request-line          -> 414 (RFC 9112 §3)
MAX_HEAD_BYTES = 64 * 1024       # bytes, request-line + fields -> 431 (RFC 6585 §5)
MAX_FIELD_LINES = 100            # field lines in one head      -> 431
MAX_METHOD_BYTES = 32            # longer than any method we know -> 501 (RFC 9112 §3)
MAX_EMPTY_LINES = 8              # empty lines before a request-line -> 400 (RFC 9112 §2.2)
MAX_CHUNK_LINE = 4 * 1024        # bytes, chunk-size + chunk-ext -> 400 (RFC 9112 §7.1.1)
MAX_SIZE_DIGITS = 16             # hex digits in a chunk-size, so it cannot overflow
MAX_LENGTH_DIGITS = 18           # decimal digits in a Content-Length -> 413

RECV_BYTES = 64 * 1024           # size asked of each recv()
HIGH_WATER = 256 * 1024          # bytes buffered for one side before we pause it
LOW_WATER = 64 * 1024            # ... and the level at which we resume it
BACKLOG = 2048                   # pending connections the kernel may queue
# When it cannot take one more connection (the selector is full, or accept()
# ran out of descriptors) the server stops watching its listener for a while;
# new clients wait in that backlog meanwhile (§6 accept, §8 on_loop_error).
SELECT_SOCKETS = 512 if os.name == "nt" else 1024   # FD_SETSIZE: select() watches
#                                  this many sockets (Windows), or descriptors below
#                                  it (POSIX) -> the WSGI loop stops accepting
ACCEPT_PAUSE_SECONDS = 0.5       # after accept() ran out of descriptors (`ulimit -n`)
#                                  -> no accept() for this long (ASGI: asyncio's
#                                  constants.ACCEPT_RETRY_DELAY, 1 s)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#                                  accept() errors that mean "pause", as above
SPOOL_BYTES = 1024 * 1024        # a chunked WSGI body past this goes to a temp file
MAX_SPOOL_BYTES = 1024 ** 3      # bytes, a chunked WSGI body on disk -> 413
# The errors of a full disk or file table: a spool that fails so -> 503.
STORAGE_FULL = {errno.ENOSPC, errno.EMFILE, errno.ENFILE, getattr(errno, "EDQUOT", 0)}
SENDFILE_BYTES = 1024 * 1024     # most bytes one os.sendfile() call may send
# Eight threads: enough that a few slow app calls (a database, an upstream API)
# do not hold up the rest, few enough that GIL hand-offs stay cheap.
WSGI_THREADS = 8                 # worker threads that call WSGI applications
# Policy: a queued app call waits this long for a busy worker before one more
# sleeping worker is woken (§6 WorkerPool). So a request that comes while every
# awake worker is inside a slow app call starts up to 2 ms late; waking a thread
# for every request instead made them fight over the GIL (hello: -20% req/s).
WORKER_WAIT_SECONDS = 0.002

# Timeouts, in seconds. Each one bounds how long one client can hold on to a
# connection (and, on the WSGI path, a worker thread) without making progress.
KEEP_ALIVE_SECONDS = 5.0         # idle between requests            -> close
HEAD_SECONDS = 10.0              # first byte to end of head        -> 408 (slowloris)
READ_SECONDS = 30.0              # no body bytes while we wait      -> 408, or close
WRITE_SECONDS = 30.0             # response unread by the client    -> close
LINGER_SECONDS = 2.0             # read-and-discard after our last response
DRAIN_BYTES = 1024 * 1024        # unread body we still skip to keep a connection
GRACEFUL_SECONDS = 30.0          # in-flight requests may finish during shutdown
MEMORY_TRIM_SECONDS = 10.0       # free heap pages go back to the system this often

WS_MAX_SIZE = 16 * 1024 * 1024   # bytes in one WebSocket message -> close 1009
WS_QUEUE = 16                    # messages waiting for the app before we stop reading
WS_PING_SECONDS = 20.0           # a ping this often, and as long to wait for the pong
WS_CLOSE_SECONDS = 5.0           # to wait for the peer's Close (RFC 6455 §7.1.1)


@dataclass
class Config:
    """The knobs of one server; the defaults are the constants above."""

    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = WSGI_THREADS
    root_path: str = ""
    server_header: bool = True
    date_header: bool = True
    backlog: int = BACKLOG
    limit_request_line: int = MAX_REQUEST_LINE
    limit_request_head: int = MAX_HEAD_BYTES
    limit_request_fields: int = MAX_FIELD_LINES
    limit_request_body: int | None = None     # bytes -> 413; None: no limit
    limit_spool: int = MAX_SPOOL_BYTES        # bytes of a chunked WSGI body -> 413
    limit_concurrency: int | None = None      # connections -> 503; None: no limit
    timeout_keep_alive: float = KEEP_ALIVE_SECONDS
    timeout_request_head: float = HEAD_SECONDS
    timeout_read: float = READ_SECONDS
    timeout_write: float = WRITE_SECONDS
    timeout_graceful_shutdown: float = GRACEFUL_SECONDS
    lifespan: str = "auto"                     # ASGI: "auto", "on" or "off"
    interface: str = "auto"                    # ASGI: "auto", "asgi3" or "asgi2"
    ws_max_size: int = WS_MAX_SIZE
    ws_ping_interval: float | None = WS_PING_SECONDS   # None: no pings
    ws_ping_timeout: float = WS_PING_SECONDS
    ws_per_message_deflate: bool = True
    workers: int = 1
    uds: str | None = None                     # listen on a unix socket
    fd: int | None = None                      # serve an inherited socket
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    access_log: bool = True
    access_log_format: str = ""                # "" means ACCESS_LOG_FORMAT (§11)
    headers: list = field(default_factory=list)   # (name, value) bytes, every response
    trace: bool = False                        # log the protocol as it happens (§11)

    def __post_init__(self) -> None:
        """Refuse what no server could run with: no threads, or extra headers
        (--header) that would break every response head.

        RFC 9112 §11.1: extra headers get the check an app's fields get
        (field_line, §4), once here rather than on each response. Policy: the
        fields that frame the body or describe the connection are the
        server's (RFC 9112 §6, RFC 9110 §7.6.1), so they are refused as well.
        """
        if self.threads < 1:
            # A pool of no threads would queue every WSGI request for ever.
            raise ValueError(f"--threads must be 1 or more (1: one app call at a time), "
                             f"not {self.threads}")
        for name, value in self.headers:
            if type(name) is not bytes or type(value) is not bytes:
                raise TypeError(f"extra header (--header): name and value must be "
                                f"bytes: {name!r}: {value!r}")
            try:
                field_line(name, value)
                if name.lower() in CONNECTION_FIELDS or name.lower() == b"content-length":
                    raise ValueError(f"{name.decode('latin-1')} is the server's to send")
            except ValueError as error:
                raise ValueError(f"extra header (--header): {error}") from None


DEFAULTS = Config()


# =============================================================================
# §2  Errors
#
# One exception means "the client broke HTTP". Only §3 raises it; each server
# catches it in one place, answers with its status, and closes the connection.
# =============================================================================


class HTTPError(Exception):
    """The request is unacceptable; `status` is what the client will be told."""

    def __init__(self, status: int, reason: str, headers: tuple = ()) -> None:
        """The status and reason to answer with, and any extra response fields."""
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers    # extra response fields, e.g. for a 426


class ClientDisconnected(ConnectionError):
    """The client went away (ASGI HTTP spec 2.4: an OSError subclass)."""


def printable(text: str) -> str:
    """Escape what the client sent before it goes into a log line.

    A path may hold "%0A" (a newline, once decoded) or terminal escape codes;
    written raw, they could forge log lines (log injection).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# =============================================================================
# §3  Reading requests - RFC 9112 §2-§7
#
# Bytes in, events out. RequestParser.feed() takes bytes as they arrive, and
# next_event() hands back, in order: one Request (the head), the body as
# `bytes` pieces, then END; or None when it needs more bytes. Any split of the
# input, down to one byte at a time, gives the same events. The parser only
# moves on to the next pipelined request when asked for the next event, so the
# server decides when to read it.
# =============================================================================

# Limit: these patterns run on client bytes, so each must take time linear in
# its input. Where two neighbouring parts can both take a run of bytes (OWS
# before a value that may hold blanks too), a failing match tries every way
# of splitting the run between them: quadratic time. So each byte has one
# part to go to (or, for the BWS in a chunk-ext, one of two), and alternatives
# differ in their first byte.

# RFC 9110 §5.6.2   token = 1*tchar
#   tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#           "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"

# RFC 9112 §3   request-line = method SP request-target SP HTTP-version
# RFC 9112 §3.2 the target has no whitespace, no CTL and no "#" (a fragment is
#               never sent), so: visible ASCII except "#".
REQUEST_LINE = re.compile(
    rb"(?P<method>" + TOKEN + rb") "
    rb"(?P<target>[!-\"$-~]+) "
    rb"(?P<version>HTTP/[0-9]\.[0-9])"
)

# RFC 9112 §5   field-line = field-name ":" OWS field-value OWS
# RFC 9110 §5.5 field-value: visible characters, SP, HTAB and obs-text
#   (%x80-FF); never NUL, CR, LF or another CTL. The OWS on both sides is
#   matched as part of the value and stripped afterwards: a separate OWS
#   pattern would compete with the value for the same blanks.
FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
FIELD_LINE = re.compile(rb"(?P<name>" + TOKEN + rb"):(?P<value>" + FIELD_VALUE + rb")")
# All the field lines of a head at once: "field-line *( CRLF field-line )".
# One match for the whole head costs less than one per line (8.9 -> 7.7 us to
# parse a 10-field request); the per-line pattern then only says what is wrong.
FIELD_LINES = re.compile(rb"%s:%s(?:\r\n%s:%s)*" % (TOKEN, FIELD_VALUE, TOKEN, FIELD_VALUE))

# RFC 9112 §3.2 + RFC 3986 §3.2.2: Host = uri-host [ ":" port ]
HOST = re.compile(
    rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?"
)

# RFC 9112 §7.1    chunk      = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#                  chunk-size = 1*HEXDIG
# RFC 9112 §7.1.1  chunk-ext  = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
#                  ext-val    = token / quoted-string
# Blanks after an ext-name are tried for "=", then for the next ";": twice at
# most. In a quoted-string, "\" always starts a quoted-pair, never qdtext.
QUOTED_STRING = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
CHUNK_LINE = re.compile(
    rb"(?P<size>[0-9A-Fa-f]+)"
    rb"(?:[ \t]*;[ \t]*" + TOKEN +
    rb"(?:[ \t]*=[ \t]*(?:" + TOKEN + rb"|" + QUOTED_STRING + rb"))?)*"
)


@dataclass       # not frozen: frozen=True makes __init__ 4x slower (1.1 -> 0.25 us)
class Request:
    """A parsed request head: RFC 9112 §3 request-line plus §5 field lines."""

    method: str                           # "GET", case kept (RFC 9110 §9.1)
    target: bytes                         # b"/search?q=1", as sent
    path: bytes                           # b"/search", still percent-encoded
    query: bytes                          # b"q=1", without the "?"
    version: str                          # "1.0" or "1.1"
    headers: list[tuple[bytes, bytes]]    # (lower-cased name, value), wire order
    chunked: bool                         # body framing: chunked ...
    content_length: int                   # ... or this many bytes (0 if chunked)
    keep_alive: bool                      # may the connection stay open after?
    expect_continue: bool                 # "Expect: 100-continue" was sent


class EndOfMessage:
    """The event after the last body byte of a request."""

    def __repr__(self) -> str:
        """Shown as END, the name of its one instance."""
        return "END"


END = EndOfMessage()


def field_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """All values of one field, in order; `name` must be lower-case."""
    return [value for key, value in headers if key == name]


def comma_list(values: list[bytes]) -> list[bytes]:
    """RFC 9110 §5.6.1: split "a, b" lists, drop empty members, lower-case them."""
    items = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if item:
                items.append(item)
    return items


def parse_request_line(line: bytes) -> tuple[str, bytes, str]:
    """RFC 9112 §3: split the request-line into method, target and version."""
    match = REQUEST_LINE.fullmatch(line)
    if match is None:
        # RFC 9112 §3: exactly one SP between the three parts, nothing else.
        raise HTTPError(400, "malformed request line")
    method, target, version = match.group("method", "target", "version")
    if version[:7] != b"HTTP/1.":
        # RFC 9110 §15.6.6: 505 for a major version we do not speak. This also
        # answers an HTTP/2 connection preface ("PRI * HTTP/2.0").
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if version != b"HTTP/1.0":
        # RFC 9110 §2.5: a higher minor version "SHOULD" be processed as the
        # highest minor version we implement, so HTTP/1.2 is handled as 1.1.
        version = b"HTTP/1.1"
    if len(method) > MAX_METHOD_BYTES:
        raise HTTPError(501, "method too long")    # Limit: RFC 9112 §3
    return method.decode("ascii"), target, version[5:].decode("ascii")


def split_target(method: str, target: bytes) -> tuple[bytes, bytes, bytes | None]:
    """RFC 9112 §3.2: the four forms of request-target -> (path, query, authority).

    `authority` is None unless the target is in absolute-form.
    """
    if method == "CONNECT":
        # Policy: authority-form (RFC 9112 §3.2.3) is for proxies; this is not one.
        raise HTTPError(501, "CONNECT is not supported")
    if target == b"*":
        if method != "OPTIONS":      # RFC 9112 §3.2.4: asterisk-form is for OPTIONS only
            raise HTTPError(400, "'*' is only allowed with OPTIONS")
        return b"*", b"", None
    authority = None
    if target[:1] != b"/":
        # RFC 9112 §3.2.2: absolute-form, "http://host/path?q", MUST be accepted by a
        # server, and its authority then stands in for Host (RFC 9112 §3.2.2, §3.3).
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise HTTPError(400, "malformed request target")
        slash = min(i for i in (rest.find(b"/"), rest.find(b"?"), len(rest)) if i >= 0)
        authority, target = rest[:slash], rest[slash:]
        # RFC 9110 §4.2.1: an empty host MUST be rejected; §4.2.4: userinfo
        # SHOULD be treated as an error; and the port must be digits (RFC 9112 §3.2).
        if not authority or b"@" in authority or HOST.fullmatch(authority) is None \
                or authority.startswith(b":"):
            raise HTTPError(400, "malformed authority in the request target")
        if target[:1] != b"/":
            target = b"/" + target   # an empty path means "/" (RFC 9112 §3.2.2)
    path, _, query = target.partition(b"?")   # RFC 9112 §3.2.1: split at the first "?"
    return path, query, authority


def parse_field_line(line: bytes) -> tuple[bytes, bytes]:
    """RFC 9112 §5: one "Name: value" line -> (lower-case name, value)."""
    match = FIELD_LINE.fullmatch(line)
    if match is None:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: obs-fold is deprecated; we may reject it with 400.
            raise HTTPError(400, "obsolete line folding is not accepted")
        # Covers "Name : v" (RFC 9112 §5.1 MUST reject), a missing colon, and
        # CR, LF, NUL or other control characters in a value (RFC 9110 §5.5).
        raise HTTPError(400, "malformed header field")
    return match["name"].lower(), match["value"].strip(b" \t")   # RFC 9112 §5: OWS


def body_framing(version: str, fields: dict[bytes, list[bytes]]) -> tuple[bool, int]:
    """Where does this request's body end? RFC 9112 §6.3, items (3) to (7).

    `fields` maps the lower-case names of FRAMING_FIELDS to their values.
    Returns (chunked, content_length).
    """
    te_fields = fields[b"transfer-encoding"]
    te = comma_list(te_fields)
    cl = fields[b"content-length"]
    if te_fields and cl:
        # (3) Policy: the RFC lets Transfer-Encoding win and says the message
        # "ought to be handled as an error". A proxy in front may have used the
        # other one (request smuggling, RFC 9112 §11.2), so we refuse and close.
        raise HTTPError(400, "both Transfer-Encoding and Content-Length")
    if te_fields:
        if not te:
            raise HTTPError(400, "empty Transfer-Encoding")
        if version == "1.0":     # RFC 9112 §6.1: TE in a 1.0 request means faulty framing
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te[-1] != b"chunked":  # (4) MUST answer 400: the length is unknowable
            raise HTTPError(400, "chunked is not the final transfer coding")
        if te.count(b"chunked") > 1:      # RFC 9112 §7.1: chunked only once
            raise HTTPError(400, "chunked applied twice")
        if len(te) > 1:   # RFC 9112 §6.1: a coding we do not implement -> 501
            raise HTTPError(501, "only the chunked transfer coding is supported")
        return True, 0
    if cl:
        # (5) Content-Length = 1*DIGIT. Several equal values ("5, 5" or two
        # lines) are allowed; different or malformed ones are an error. We check
        # isdigit() first: int() would also take "+5", " 5" and "1_0".
        value = cl[0]
        if len(cl) > 1 or b"," in value:
            values = {item.strip(b" \t") for value in cl for item in value.split(b",")}
            if len(values) != 1:
                raise HTTPError(400, "conflicting Content-Length values")
            value = values.pop()
        if not (value.isdigit() and value.isascii()):
            raise HTTPError(400, "malformed Content-Length")
        if len(value.lstrip(b"0")) > MAX_LENGTH_DIGITS:
            raise HTTPError(413, "Content-Length too large")   # Limit
        return False, int(value)
    return False, 0      # (7) neither: a request has no body


def check_host(version: str, hosts: list[bytes]) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request carries exactly one valid Host."""
    # "A server MUST respond with a 400 (Bad Request) status code to any
    # HTTP/1.1 request message that lacks a Host header field and to any
    # request message that contains more than one Host header field line or a
    # Host header field with an invalid field value."
    if len(hosts) > 1 or (version == "1.1" and not hosts):
        raise HTTPError(400, "exactly one Host header is required")
    if hosts and HOST.fullmatch(hosts[0]) is None:
        raise HTTPError(400, "malformed Host header")


# The fields that decide how a request is framed and answered (RFC 9112 §3.2, §6, §9).
FRAMING_FIELDS = (b"host", b"content-length", b"transfer-encoding", b"connection",
                  b"expect")


def parse_head(head: bytes, limits: Config = DEFAULTS) -> Request:
    """Parse one request head (without its empty last line) into a Request."""
    # RFC 9112 §2.2: lines end in CRLF. Leniency: a bare LF also ends a line, as
    # the RFC allows; a CR anywhere else fails the patterns below (400). The
    # head stops before its last LF, so a CR at its very end is the last line's
    # CRLF. Exactly one CR is taken off each line: a second one is a bare CR.
    end = len(head) - 1 if head[-1:] == b"\r" else len(head)
    lines = head[:end].split(b"\r\n")
    bare_lf = len(lines) <= head.count(b"\n")    # some LF without its CR
    if bare_lf:
        lines = [line[:-1] if line[-1:] == b"\r" else line for line in head.split(b"\n")]
    if len(lines[0]) > limits.limit_request_line:
        raise HTTPError(414, "request line too long")   # Limit: RFC 9112 §3
    method, target, version = parse_request_line(lines[0])
    path, query, authority = split_target(method, target)
    if len(lines) - 1 > limits.limit_request_fields:
        raise HTTPError(431, "too many header fields")    # Limit: RFC 6585 §5
    if len(lines) > 1 and not bare_lf and FIELD_LINES.fullmatch(head, len(lines[0]) + 2, end):
        # RFC 9112 §5: all well-formed, so "name:" OWS value OWS splits simply.
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip(b" \t")))
    else:
        headers = [parse_field_line(line) for line in lines[1:]]   # finds the bad one
    fields = {name: [] for name in FRAMING_FIELDS}   # one pass, not one per rule
    for name, value in headers:
        if name in FRAMING_FIELDS:
            fields[name].append(value)
    check_host(version, fields[b"host"])
    if authority is not None:
        # RFC 9112 §3.2.2: the server "MUST ignore the received Host header
        # field (if any) and instead use the host information of the target".
        headers = [(name, value) for name, value in headers if name != b"host"]
        headers.append((b"host", authority))
    chunked, content_length = body_framing(version, fields)
    connection = comma_list(fields[b"connection"])
    if version == "1.1":   # RFC 9112 §9.3: persistent unless "close"
        keep_alive = b"close" not in connection
    else:                  # HTTP/1.0: only with an explicit "keep-alive"
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    # RFC 9110 §10.1.1: 100-continue only means something for HTTP/1.1.
    expect_continue = False
    if fields[b"expect"] and version == "1.1":
        expect = comma_list(fields[b"expect"])
        if any(item != b"100-continue" for item in expect):
            raise HTTPError(417, "only 'Expect: 100-continue' is supported")
        expect_continue = chunked or content_length > 0   # no 100 for an empty body
    return Request(method, target, path, query, version, headers,
                   chunked, content_length, keep_alive, expect_continue)


class RequestParser:
    """Incremental HTTP/1.1 request parser: feed() bytes, take next_event()s."""

    def __init__(self, limits: Config = DEFAULTS) -> None:
        """An empty buffer, waiting for the head of the first request."""
        self.buffer = bytearray()
        self.state = "head"   # head, body, chunk-size, chunk-data, chunk-end,
        #                       trailers, or error
        self.remaining = 0    # body or chunk bytes still to come
        self.body_size = 0    # bytes of this request's body seen so far
        self.limits = limits
        self.search_from = 0  # where to resume looking for the end of the head,
        #                       or of a chunk-size or trailer line
        self.trailer_bytes = self.trailer_lines = 0
        self.empty_lines = 0  # empty lines skipped before this request-line
        self.last_head = b""

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client."""
        self.buffer += data

    def next_event(self) -> Request | bytes | EndOfMessage | None:
        """The next event, or None if more bytes are needed. Raises HTTPError."""
        if self.state == "error":
            raise HTTPError(400, "the connection is in an error state")
        try:
            if self.state == "head":
                return self._read_head()
            if self.state == "body":
                return self._read_body()
            return self._read_chunked()
        except HTTPError:
            self.state = "error"    # nothing after a framing error is trusted
            raise

    def unread_body(self) -> int | None:
        """Bytes of this request's body not even received yet (None: unknown)."""
        if self.state == "body":
            return max(0, self.remaining - len(self.buffer))
        return 0 if self.state == "head" else None

    def drop_body(self) -> int | None:
        """Read and drop the body bytes in the buffer; None once the body has ended.

        RFC 9112 §9.3: the next request on a connection starts after this
        request's body, so a body the app left unread is skipped this way
        (while can_drain() allows) before the next head is parsed. Returns
        how many body bytes it dropped, or None at the end of the body.
        """
        dropped = 0
        while True:
            event = self.next_event()
            if event is None:
                return dropped
            if type(event) is not bytes:
                return None
            dropped += len(event)

    @property
    def has_partial_request(self) -> bool:
        """True if some bytes of an unfinished request have arrived."""
        return self.state != "head" or bool(self.buffer)

    # -- the head -------------------------------------------------------------

    def _read_head(self) -> Request | None:
        """The next request head, parsed, or None until its empty line arrives.

        RFC 9112 §2.2: empty lines before the request-line are skipped. The limits
        are checked before the head is whole; once parsed, its body comes next."""
        buffer = self.buffer
        if not buffer:
            return None            # the usual case between requests
        # RFC 9112 §2.2: "a server SHOULD ignore at least one empty line (CRLF)
        # received prior to the request-line". Policy: at most MAX_EMPTY_LINES.
        while buffer.startswith((b"\r\n", b"\n")):
            del buffer[: 2 if buffer[:1] == b"\r" else 1]
            self.empty_lines += 1
            if self.empty_lines > MAX_EMPTY_LINES:
                raise HTTPError(400, "too many empty lines before the request")
        end, size = self._find_end_of_head()
        self._check_head_limits(end)
        if end < 0:
            return None
        head = self.last_head = self._take(end)   # kept for --trace
        del buffer[:size]
        self.search_from = 0
        self.empty_lines = 0
        request = parse_head(head, self.limits)
        self._start_body(request)
        return request

    def _find_end_of_head(self) -> tuple[int, int]:
        """Find the empty line that ends the head: (index, its length) or (-1, 0)."""
        buffer = self.buffer
        crlf = buffer.find(b"\n\r\n", self.search_from)   # the usual "\r\n\r\n"
        stop = crlf if crlf >= 0 else len(buffer)
        lf = buffer.find(b"\n\n", self.search_from, stop + 1)   # bare LF lines
        if lf >= 0:
            return lf, 2
        if crlf >= 0:
            return crlf, 3
        self.search_from = max(0, len(buffer) - 2)
        return -1, 0

    def _check_head_limits(self, end: int) -> None:
        """Limit: refuse a head that is, or can only become, too long.

        `end` is where the head ends, or -1 while it is incomplete. The checks
        allow for the line endings still to come, so that any split of the
        same bytes gets the same answer.
        """
        buffer = self.buffer
        max_line = self.limits.limit_request_line
        newline = buffer.find(b"\n", 0, max_line + 2)
        if newline < 0:           # the request-line is at least this long:
            line_length = len(buffer) - 1 if buffer[-1:] == b"\r" else len(buffer)
        else:
            line_length = newline - 1 if buffer[newline - 1:newline] == b"\r" else newline
        first_line = buffer[: max(0, min(line_length, MAX_METHOD_BYTES + 1))]
        if len(first_line) > MAX_METHOD_BYTES and b" " not in first_line:
            raise HTTPError(501, "method too long")   # Limit: RFC 9112 §3, before 414
        if line_length > max_line:
            raise HTTPError(414, "request line too long")     # RFC 9112 §3
        # The head ends at `end`; while incomplete, no earlier than 2 bytes
        # before the end of the buffer (a "\n\r" may have arrived already).
        if (end if end >= 0 else len(buffer) - 2) > self.limits.limit_request_head:
            raise HTTPError(431, "request header fields too large")   # RFC 6585 §5

    def _start_body(self, request: Request) -> None:
        """Reset the body counters and go to chunked framing or a Content-Length body.

        A Content-Length body (0: none) is counted against the body limit at once."""
        self.body_size = 0
        self.trailer_bytes = self.trailer_lines = 0
        if request.chunked:
            self.state = "chunk-size"
        else:
            self._count_body(request.content_length)
            self.state = "body"
            self.remaining = request.content_length

    def _count_body(self, size: int) -> None:
        """Limit: the configured maximum body size -> 413 (RFC 9110 §15.5.14)."""
        self.body_size += size
        limit = self.limits.limit_request_body
        if limit is not None and self.body_size > limit:
            raise HTTPError(413, "request body too large")

    # -- a Content-Length body (RFC 9112 §6.2) ---------------------------------

    def _read_body(self) -> bytes | EndOfMessage | None:
        """RFC 9112 §6.2: the next piece of a Content-Length body, END after its
        last byte, or None until more bytes come."""
        if self.remaining == 0:
            self.state = "head"
            return END
        if not self.buffer:
            return None
        data = self._take(self.remaining)
        self.remaining -= len(data)
        return data

    def _take(self, size: int) -> bytes:
        """Cut up to `size` bytes off the front of the buffer, copying them once.

        bytes(buffer[:size]) would copy them twice: parsing a 256 KiB body that
        arrives in 64 KiB pieces took 38 us that way, 20.5 us this way.
        """
        buffer = self.buffer
        if size >= len(buffer):
            data = bytes(buffer)      # the usual case in a body: all we have
            buffer.clear()
        else:
            data = bytes(memoryview(buffer)[:size])
            del buffer[:size]
        return data

    # -- a chunked body (RFC 9112 §7.1) ----------------------------------------

    def _read_chunked(self) -> bytes | EndOfMessage | None:
        """RFC 9112 §7.1: the next piece of chunk-data, END after the trailers, or None.

        The states go chunk-size -> chunk-data -> chunk-end (the CRLF after the
        data) -> chunk-size, until a chunk of size 0 leads to the trailers."""
        while True:
            if self.state == "chunk-size":
                if not self._read_chunk_size():
                    return None
            elif self.state == "chunk-data":
                if not self.buffer:
                    return None
                data = self._take(self.remaining)
                self.remaining -= len(data)
                if self.remaining == 0:
                    self.state = "chunk-end"
                return data
            elif self.state == "chunk-end":
                if len(self.buffer) < 2:
                    return None
                if self.buffer[:2] != b"\r\n":   # chunk-data CRLF, exactly
                    raise HTTPError(400, "chunk data not followed by CRLF")
                del self.buffer[:2]
                self.state = "chunk-size"
            else:
                return self._read_trailers()

    def _take_crlf_line(self, limit: int, error: HTTPError) -> bytes | None:
        """Cut one CRLF-terminated line off the buffer, or None if incomplete."""
        end = self.buffer.find(b"\r\n", self.search_from, limit + 2)
        if end < 0:
            if len(self.buffer) > limit + 1:    # room for a line and its CR
                raise error                     # Limit: §1
            # Bytes already searched are not searched again, but the last one
            # may be the CR of a CRLF whose LF is still to come.
            self.search_from = max(0, len(self.buffer) - 1)
            return None
        self.search_from = 0
        line = self._take(end)
        del self.buffer[:2]
        if b"\n" in line:
            # Policy: a bare LF is accepted in the head, but inside chunked
            # framing only CRLF is (lenient chunk parsing enables smuggling).
            raise HTTPError(400, "bare LF in chunked framing")
        return line

    def _read_chunk_size(self) -> bool:
        """Read one chunk-size line (RFC 9112 §7.1); False until it is whole.

        RFC 9112 §7.1.1: its chunk extensions are checked and then ignored. Size 0
        is the last-chunk: the trailer section comes next."""
        line = self._take_crlf_line(MAX_CHUNK_LINE,
                                    HTTPError(400, "chunk size line too long"))
        if line is None:
            return False
        match = CHUNK_LINE.fullmatch(line)
        if match is None:
            raise HTTPError(400, "malformed chunk size line")
        size = match["size"]
        if len(size) > MAX_SIZE_DIGITS:
            raise HTTPError(400, "chunk size too large")   # Limit: no overflow
        self.remaining = int(size, 16)     # checked to be 1*HEXDIG above
        self._count_body(self.remaining)
        self.state = "chunk-data" if self.remaining else "trailers"
        return True

    def _read_trailers(self) -> EndOfMessage | None:
        """The trailer section up to its empty line: END, or None until it is whole."""
        # RFC 9112 §7.1.2: trailer fields are read, checked like header fields,
        # and dropped: RFC 9110 §6.5.1 forbids merging them into the headers.
        while True:
            line = self._take_crlf_line(self.limits.limit_request_head,
                                        HTTPError(431, "trailer field too large"))
            if line is None:
                return None
            if not line:
                self.state = "head"
                return END
            self.trailer_bytes += len(line) + 2
            self.trailer_lines += 1
            if self.trailer_lines > self.limits.limit_request_fields:
                raise HTTPError(431, "too many trailer fields")   # Limit, as for heads
            if self.trailer_bytes > self.limits.limit_request_head:
                raise HTTPError(431, "trailer section too large")   # Limit
            parse_field_line(line)


# =============================================================================
# §4  Writing responses - RFC 9112 §4, §6, §7.1, §9
#
# Response is the one response serializer: it picks the framing, adds the
# headers the server owns, and turns app bytes into wire bytes. It is pure:
# it returns bytes and takes the clock as an argument.
# =============================================================================

REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
STATUS_LINES = {status: b"HTTP/1.1 %d %s" % (status, reason)
                for status, reason in REASONS.items()}

# RFC 9110 §7.6.1: these describe one connection, not the message. The server
# writes its own; the app's are dropped (ASGI) or refused (PEP 3333, §5).
CONNECTION_FIELDS = {b"connection", b"keep-alive", b"transfer-encoding"}

# RFC 9112 §11.1 (response splitting): nothing from the app may end a line, so
# a field line the app gives us is a token, ": ", and a value without NUL, CR, LF.
SAFE_FIELD_LINE = re.compile(TOKEN + rb": [^\x00\r\n]*")


def field_line(name: bytes, value: bytes) -> bytes:
    """b"Name: value" for a field from the app; ValueError if it is unsafe."""
    line = name + b": " + value
    # A ":" in the name is checked apart: the pattern alone would take the
    # name b"X: Y" as the token X and a value "Y: ...".
    if b":" in name or SAFE_FIELD_LINE.fullmatch(line) is None:
        raise ValueError(f"invalid header field: {name!r}: {value!r}")
    return line


# RFC 9110 §5.6.7: the names are English whatever the locale, so not strftime().
DAY_NAMES = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")  # tm_wday 0..6
MONTH_NAMES = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
               b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
# [second, its IMF-fixdate]; None matches no second, 0 (1970-01-01) included.
_date_cache = [None, b""]


def http_date(now: float) -> bytes:
    """RFC 9110 §5.6.7: IMF-fixdate, e.g. b"Sun, 06 Nov 1994 08:49:37 GMT"."""
    second = int(now)
    if second > now:               # int() rounds -1.5 up to -1; the date is of -2
        second -= 1
    if _date_cache[0] != second:   # formatted once a second, not per request
        t = time.gmtime(second)
        _date_cache[:] = [second, b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
            DAY_NAMES[t.tm_wday], t.tm_mday, MONTH_NAMES[t.tm_mon - 1], t.tm_year,
            t.tm_hour, t.tm_min, t.tm_sec)]
    return _date_cache[1]


def can_drain(unread: int | None) -> bool:
    """Policy: after a response, is the rest of an unread body cheap to skip?

    RFC 9112 §9.3: the next request starts after this body. Up to DRAIN_BYTES
    we read and drop it to keep the connection; beyond that the response says
    "Connection: close" instead. A chunked body's size is unknown (None): we
    try, and close if more than DRAIN_BYTES come.
    """
    return unread is None or unread <= DRAIN_BYTES


def must_close(stopping: bool, body_done: bool, continue_pending: bool,
               unread: int | None) -> bool:
    """Must a response that starts now say "Connection: close"?

    The one close decision of both servers, taken as the head goes out:
    a server that is stopping answers no more requests; RFC 9110 §10.1.1:
    a client still waiting for "100 Continue" will not send the body we
    never asked for, so the connection cannot find the next request; and
    RFC 9112 §9.3: a large unread body is not worth skipping (can_drain).
    """
    return stopping or not body_done and (continue_pending or not can_drain(unread))


def encode_chunk(data: bytes) -> bytes:
    """RFC 9112 §7.1: chunk = chunk-size CRLF chunk-data CRLF."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Response:
    """Frames one response: status line, fields, then body bytes (RFC 9112 §4-§7)."""

    def __init__(self, method: str, version: str, keep_alive: bool,
                 config: Config | None = None) -> None:
        """A response not yet started, for a request with this method and version."""
        self.method = method
        self.version = version          # the request's: "1.0" or "1.1"
        self.keep_alive = keep_alive    # may turn False in head() and end()
        self.config = config or Config()
        self.framing = ""               # "none", "length", "chunked" or "close"
        self.length = 0                 # Content-Length still owed (if "length")
        self.status = 0                 # for the access log ...
        self.sent = 0                   # ... and the body bytes sent
        self.dropped = 0                # body bytes past Content-Length, not sent

    def head(self, status: int, headers: list[tuple[bytes, bytes]],
             now: float, reason: bytes | None = None) -> bytes:
        """The status line and header section for a final (>= 200) response."""
        if reason is None and status in STATUS_LINES:
            lines = [STATUS_LINES[status]]     # made once: Response.head 3.0 -> 2.3 us
        else:
            lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"") if reason is None
                                          else reason)]
        self.status = status
        length = None
        own = set()     # names of the app's fields that the server also adds
        for name, value in headers:
            line = field_line(name, value)
            lname = name.lower()
            if lname in CONNECTION_FIELDS:
                if lname == b"connection" and b"close" in comma_list([value]):
                    self.keep_alive = False      # the app asked us to close
                continue
            if lname == b"content-length":
                if status < 200 or status == 204:
                    continue     # RFC 9110 §8.6: never on 1xx and 204
                if not value.isdigit() or length not in (None, int(value)):
                    raise ValueError(f"invalid Content-Length: {value!r}")
                length = int(value)
            own.add(lname)
            lines.append(line)
        self.framing = self._choose_framing(status, length)
        lines += self._server_fields(own, now)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _choose_framing(self, status: int, length: int | None) -> str:
        """RFC 9112 §6.3: how the client will find the end of this body."""
        if self.method == "HEAD" or status < 200 or status in (204, 304):
            return "none"       # (1) never a body, whatever the app sends
        if length is not None:
            self.length = length
            return "length"     # (6) the app gave the size
        if self.version == "1.1":
            return "chunked"    # (4) HTTP/1.1 clients understand chunked
        self.keep_alive = False
        return "close"          # (8) HTTP/1.0: closing the connection ends it

    def _server_fields(self, own: set[bytes], now: float) -> list[bytes]:
        """The fields the server adds: Date, Server, framing and Connection."""
        lines = []
        if self.config.date_header and b"date" not in own:
            lines.append(b"Date: " + http_date(now))    # RFC 9110 §6.6.1
        if self.config.server_header and b"server" not in own:
            lines.append(b"Server: " + SERVER_NAME)     # RFC 9110 §10.2.4
        lines += [name + b": " + value for name, value in self.config.headers
                  if name.lower() not in own]           # --header
        if self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append(b"Connection: close")          # RFC 9112 §9.6
        elif self.version == "1.0":
            lines.append(b"Connection: keep-alive")     # RFC 9112 App. C.2.2
        return lines

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the body; b"" for nothing to send."""
        if not data or self.framing == "none":
            return b""           # an empty chunk would end a chunked body
        if self.framing == "length" and len(data) > self.length:
            data = data[: self.allow(len(data))]
        self.sent += len(data)   # count(), written out: body() is on every response's path
        if self.framing == "chunked":
            return encode_chunk(data)
        if self.framing == "length":
            self.length -= len(data)
        return data

    def allow(self, size: int) -> int:
        """How many of `size` more body bytes may go out (bytes or a file region)."""
        if self.framing == "none":
            return 0
        if self.framing == "length" and size > self.length:
            # RFC 9112 §6.3: bytes past Content-Length would be read as the
            # next response. Drop them, and close once this one is done.
            log.error("response body longer than its Content-Length; "
                      "%d bytes dropped", size - self.length)
            self.dropped += size - self.length
            self.keep_alive = False
            return self.length
        return size

    def count(self, size: int) -> None:
        """Count `size` body bytes as sent; end() checks them against Content-Length."""
        self.sent += size
        if self.framing == "length":
            self.length -= size

    def end(self, trailers: list[tuple[bytes, bytes]] = ()) -> bytes:
        """The bytes that end the body; settles whether the connection stays."""
        if self.framing == "chunked":
            # RFC 9112 §7.1.2: last-chunk, trailer field lines, then CRLF
            lines = [b"0"] + [field_line(name, value) for name, value in trailers]
            return b"\r\n".join(lines) + b"\r\n\r\n"
        if self.framing == "length" and self.length:
            # RFC 9112 §8: the client will see an incomplete message; all we
            # can do is close so it does not wait for the missing bytes.
            log.error("response ended %d bytes short of its Content-Length",
                      self.length)
            self.keep_alive = False
        return b""


def error_response(status: int, message: str, now: float,
                   config: Config | None = None, headers: tuple = ()) -> bytes:
    """A short text/plain response that the server writes itself, then closes."""
    body = f"{status} {REASONS.get(status, b'').decode()}: {message}\n".encode()
    response = Response("GET", "1.1", keep_alive=False, config=config)
    head = response.head(status, [(b"Content-Type", b"text/plain; charset=utf-8"),
                                  (b"Content-Length", b"%d" % len(body)), *headers], now)
    return head + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"   # RFC 9110 §15.2.1


# =============================================================================
# §5  WSGI adapter - PEP 3333
#
# What a worker thread does for one request: build the environ, call the app,
# hand the response bytes to the connection, and always close() the result.
# Nothing here touches a socket: bytes go to the loop thread through
# WSGIConnection.put() and WSGIConnection.finish() (§6).
# =============================================================================


def split_root_path(root_path: str, path: str) -> tuple[str, str]:
    """Split a decoded request path at the mount point: (script_name, path_info).

    One rule for both adapters. PEP 3333 "environ Variables": SCRIPT_NAME +
    PATH_INFO is the whole path, SCRIPT_NAME never ends in "/", and PATH_INFO
    is empty or starts with "/". ASGI HTTP "Connection Scope": root_path is
    WSGI's SCRIPT_NAME and path is the whole path, root_path included; so
    build_scope (§7) uses script_name and script_name + path_info.
    """
    script_name = root_path.rstrip("/")       # "/api/" and "/api" are one mount point
    # The prefix counts only as whole segments: "/apix" is not under "/api".
    if script_name and (path == script_name or path.startswith(script_name + "/")):
        return script_name, path[len(script_name):]
    # Policy: a path without the prefix comes from a proxy that stripped the
    # mount point; it is all PATH_INFO, so both kinds of proxy work.
    return script_name, path


def build_environ(request: Request, body, server: tuple, client: tuple | None,
                  config: Config, scheme: str = "http") -> dict:
    """The PEP 3333 environ for one request ("environ Variables")."""
    # PEP 3333, "Unicode Issues": native strings hold the bytes as latin-1.
    script_name, path_info = split_root_path(
        config.root_path, unquote_to_bytes(request.path).decode("latin-1"))
    environ = {
        "REQUEST_METHOD":        request.method,
        "SCRIPT_NAME":           script_name,
        "PATH_INFO":             path_info,
        "QUERY_STRING":          request.query.decode("latin-1"),
        "SERVER_NAME":           str(server[0]),
        "SERVER_PORT":           str(server[1] or 0),   # 0: a unix socket
        "SERVER_PROTOCOL":       "HTTP/" + request.version,
        "SERVER_SOFTWARE":       SERVER_NAME.decode(),
        "wsgi.version":          (1, 0),
        "wsgi.url_scheme":       scheme,
        "wsgi.input":            body,
        "wsgi.errors":           sys.stderr,
        # PEP 3333 "Thread Support": true if another thread may call the app
        # while this call runs; --threads 1 calls it on one thread only.
        "wsgi.multithread":      config.threads > 1,
        "wsgi.multiprocess":     config.workers > 1,
        "wsgi.run_once":         False,
        "wsgi.input_terminated": True,   # wsgi.input ends where the body ends
        "wsgi.file_wrapper":     FileWrapper,
    }
    if client is not None:       # PEP 3333 leaves out what does not apply
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(client[0]), str(client[1])
    if scheme == "https":
        environ["HTTPS"] = "on"
    add_header_variables(environ, request.headers)
    return environ


def add_header_variables(environ: dict, headers: list[tuple[bytes, bytes]]) -> None:
    """PEP 3333 (after CGI): CONTENT_TYPE, CONTENT_LENGTH and HTTP_* variables."""
    for name, value in headers:
        key = environ_key(name)
        if key is None:
            continue
        text = value.decode("latin-1")
        if key in environ:   # RFC 9110 §5.3: repeated fields join with commas
            environ[key] += ", " + text
        else:
            environ[key] = text


# The same few field names come in every request: a small cache makes 7 of them
# 3.8 -> 1.4 us. Bounded, so that made-up names only push others out.
@functools.lru_cache(maxsize=256)
def environ_key(name: bytes) -> str | None:
    """b"user-agent" -> "HTTP_USER_AGENT" (PEP 3333, after CGI); None: leave it out."""
    if b"_" in name:
        # Policy: "X_Forwarded_For" would become the same HTTP_ key as
        # "X-Forwarded-For", so a client could spoof what a proxy set.
        return None
    key = name.decode("latin-1").upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


class WSGIInput:
    """wsgi.input for a body still arriving (PEP 3333, "Input and Error Streams").

    The loop thread feed()s bytes in; the app's worker thread reads them out,
    waiting when none are there yet. read() returns b"" at the end of the
    body and never reads into the next request. Everything here is shared by
    the two threads and guarded by `ready`, except send_continue (the
    worker's alone).
    """

    def __init__(self, conn: WSGIConnection, parts: list[bytes], expect_continue: bool,
                 unread: int | None) -> None:
        """Holds the body bytes in `parts`; `unread` more are due (None: unknown)."""
        self.conn = conn
        self.ready = threading.Condition()
        self.buffer = bytearray(b"".join(parts))
        self.complete = False
        self.error: Exception | None = None
        self.refusal: HTTPError | None = None   # the client broke HTTP mid-body
        self.unread = unread       # bytes the loop has not received yet
        self.paused = False        # the loop stopped reading: we are full
        self.waiting = False       # the app waits in read() for more than we hold
        # RFC 9110 §10.1.1: the client waits for "100 Continue" before it sends
        # the body. We send it when the app first reads, so an app that answers
        # without reading (say, 401) spares the client the upload.
        self.send_continue = expect_continue and not parts

    # Runs on: the loop thread.
    def feed(self, data: bytes, unread: int | None) -> None:
        """Add body bytes, wake read(); past HIGH_WATER (no read() waiting) the loop pauses."""
        with self.ready:
            self.buffer += data
            self.unread = unread
            self.paused = len(self.buffer) > HIGH_WATER and not self.waiting
            self.ready.notify()

    def finish(self, error: Exception | None = None,
               refusal: HTTPError | None = None) -> None:
        """The body has ended: whole, or cut short by `error` (e.g. a disconnect)
        or by `refusal` (the client's framing error)."""
        with self.ready:
            self.complete = True
            self.error = error
            self.refusal = refusal
            self.ready.notify()

    # Runs on: a worker thread.
    def drainable(self) -> bool:
        """Could the loop skip what the app leaves unread? (§4 can_drain)"""
        with self.ready:
            return self.complete or can_drain(self.unread)

    def refused(self) -> HTTPError | None:
        """The client's framing error that ended this body early, if any."""
        with self.ready:
            return self.refusal

    # Runs on: a worker thread.
    def _wait(self, enough) -> None:
        """Wait until enough(buffer) is true or no more bytes will come."""
        if self.send_continue:
            self.send_continue = False
            self.conn.put(CONTINUE)
        with self.ready:
            while not (enough(self.buffer) or self.complete):
                if self.paused:
                    # The app asks for more than we hold back for it (say,
                    # read(CONTENT_LENGTH) of a large body): let the loop read on.
                    self.paused = False
                    self.conn.server.wake(self.conn)
                self.waiting = True
                self.ready.wait()
            self.waiting = False
            if self.error is not None and not enough(self.buffer):
                raise self.error

    def _take(self, size: int) -> bytes:
        """Cut `size` bytes off the buffer; below LOW_WATER, let a paused loop read on."""
        with self.ready:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            resume = self.paused and len(self.buffer) < LOW_WATER
            if resume:
                self.paused = False
        if resume:
            self.conn.server.wake(self.conn)    # ask the loop to read again
        return data

    def read(self, size: int | None = -1) -> bytes:
        """PEP 3333 "Input and Error Streams": `size` bytes (fewer only at the end
        of the body), or all the rest; b"" once the body is over."""
        if size is None or size < 0:
            self._wait(lambda buffer: False)          # the whole rest
            return self._take(len(self.buffer))
        self._wait(lambda buffer: len(buffer) >= size)
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        """PEP 3333 "Input and Error Streams": one line, up to and including its
        LF, or less if the body ends first or `size` is reached."""
        limit = size if size is not None and size >= 0 else sys.maxsize
        self._wait(lambda buffer: b"\n" in buffer or len(buffer) >= limit)
        newline = self.buffer.find(b"\n")
        end = len(self.buffer) if newline < 0 else newline + 1
        return self._take(min(end, limit))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """The rest of the lines; with a `hint`, stop once they total that many bytes."""
        lines, total = [], 0
        for line in self:
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        """Line by line, as PEP 3333 "Input and Error Streams" asks of wsgi.input."""
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class WSGIResponse:
    """start_response() and write() for one request. Runs on: a worker thread."""

    def __init__(self, conn: WSGIConnection, request: Request,
                 body: WSGIInput | None) -> None:
        """Nothing sent yet; the response keeps the connection alive if the
        request allows it and the server is not stopping."""
        self.conn = conn
        self.body = body         # None: the body was whole before the app ran
        # While the server shuts down, each response says "Connection: close".
        keep_alive = request.keep_alive and not conn.server.stopping
        self.response = Response(request.method, request.version, keep_alive,
                                 conn.server.config)
        self.status: str | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_sent = False
        self.called = False      # start_response() was called, even if it raised

    def start_response(self, status: str, headers: list, exc_info=None):
        """PEP 3333, "The start_response() Callable"."""
        if exc_info:
            try:
                if self.head_sent:   # too late to change: re-raise the app's error
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None      # PEP 3333: avoid a reference cycle
        elif self.called:
            # PEP 3333: only an error handler (with exc_info) may call again,
            # and a first call that raised counts as a call.
            raise AssertionError("start_response() called twice without exc_info")
        self.called = True
        self.headers = check_wsgi_headers(status, headers)
        self.status = status
        if self.conn.trace:
            self.conn.trace("app", f"start_response({status!r}, {headers!r})")
        return self.app_write

    def _head(self) -> bytes:
        """The response head, the first time body bytes are ready for it.

        PEP 3333, "The start_response() Callable": start_response() only
        stores the status and headers; they go out with the first non-empty
        body bytes (or when the app is done), so an app can still replace
        them with an error page until then.
        """
        if self.status is None:
            raise AssertionError("the app sent a body before calling start_response()")
        body = self.body
        if body is not None and body.send_continue:
            # RFC 9110 §10.1.1: we answer before asking for the body, so the
            # client will not send it; say that we close instead of reading.
            body.send_continue = False
            self.response.keep_alive = False
        if body is not None and not body.drainable():
            self.response.keep_alive = False
        # A flag the loop sets once, read without a lock: if this read is
        # stale, the head says keep-alive and the loop closes all the same.
        if self.conn.server.stopping:
            self.response.keep_alive = False    # draining: this is the last one
        code, _, reason = self.status.partition(" ")
        head = self.response.head(int(code), self.headers, time.time(),
                                  reason.encode("latin-1"))
        self.head_sent = True
        if self.conn.trace:
            self.conn.trace.head("<", head)
        return head

    def write(self, data: bytes, wait: bool = True) -> None:
        """PEP 3333, "The write() Callable": queued in order before we return.

        For the app's write() (app_write) and for the items of its iterable.
        """
        if type(data) is not bytes:
            raise TypeError(f"WSGI body must be bytes, not {type(data).__name__}")
        head = b"" if self.head_sent else self._head()
        if self.conn.trace:
            self.conn.trace("app", "body " + brief(data))
        self.conn.put(head + self.response.body(data), wait)

    def app_write(self, data: bytes) -> None:
        """The write() callable that start_response() returns to the app.

        PEP 3333, "Handling the Content-Length Header": writing past the
        declared Content-Length is an error raised to the app. Policy: the
        bytes that still fit go out first, so the client gets the whole body
        it was promised; the connection then closes (Response.body).
        """
        dropped = self.response.dropped
        self.write(data)
        if self.response.dropped > dropped:
            raise ValueError(f"write() past Content-Length: "
                             f"{self.response.dropped - dropped} bytes not sent")

    def length_sent(self) -> bool:
        """Is all of the declared Content-Length sent? Then the body is done."""
        return self.response.framing == "length" and not self.response.length

    def final_bytes(self, last: bytes = b"") -> bytes:
        """The rest of the response once the app is done: head, `last`, end."""
        if type(last) is not bytes:
            raise TypeError(f"WSGI body must be bytes, not {type(last).__name__}")
        head = b"" if self.head_sent else self._head()
        return head + self.response.body(last) + self.response.end()


# PEP 3333 "The start_response() Callable": a code, one space, a reason, and no
# control characters. RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
# Policy: HTAB passes (the RFC allows it and it cannot end a line); other C0
# controls and DEL do not. A str pattern: obs-text is U+0080-U+00FF.
# RFC 9110 §15: a status code is 100-599, and a 1xx is an interim response,
# never the final one an app's status starts: so 200-599, as for ASGI.
WSGI_STATUS = re.compile(r"[2-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")


def check_wsgi_headers(status: str, headers: list) -> list[tuple[bytes, bytes]]:
    """PEP 3333: the status is "NNN reason", headers a list of (str, str)."""
    if type(status) is not str or WSGI_STATUS.fullmatch(status) is None:
        raise ValueError(f"WSGI status must look like '200 OK', not {status!r}")
    if type(headers) is not list:
        raise TypeError("WSGI response headers must be a list of (name, value) tuples")
    encoded = []
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError(f"WSGI header must be a (name, value) tuple: {item!r}")
        name, value = item
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"WSGI header name and value must be str: {item!r}")
        # PEP 3333: "servers should check for errors in the headers at the time
        # start_response is called", so field_line() (§4, RFC 9112 §11.1) runs
        # here, while the app can still catch the error, as well as in head().
        pair = name.encode("latin-1"), value.encode("latin-1")
        field_line(*pair)
        if name.lower() in ("connection", "keep-alive", "transfer-encoding", "upgrade",
                            "te", "trailer", "proxy-authenticate", "proxy-authorization"):
            # PEP 3333, "Other HTTP Features": hop-by-hop headers are the server's.
            raise ValueError(f"hop-by-hop header not allowed in a WSGI app: {name!r}")
        encoded.append(pair)
    return encoded


class WSGICall:
    """One PEP 3333 application call, from start_response() to close().

    Runs on: a worker thread. PEP 3333, "Buffering and Streaming": each item
    is handed on before the next is asked for. While the client is slow to
    read, iteration pauses: run() parks the call with the connection and
    returns, so a slow client holds no thread; the loop hands the call back
    to a worker once the client has caught up.
    """

    def __init__(self, conn: WSGIConnection, request: Request, environ: dict,
                 started: float, client: tuple | None = None,
                 body: WSGIInput | None = None) -> None:
        """A call not made yet: no result and no iterator."""
        self.conn = conn
        self.client = client             # as the app sees it (proxies considered)
        self.request = request
        self.environ = environ
        self.started = started
        self.response = WSGIResponse(conn, request, body)
        self.result = None
        self.iterator = None

    def run(self) -> None:
        """Call the app, or resume its parked iteration, and send each item.

        Returns early, with the call parked, while the client is slow to read.
        PEP 3333 "Error Handling": any exception ends the request in wsgi_failure()."""
        conn, response = self.conn, self.response
        try:
            if self.iterator is None:
                # The client reset while this call was queued: skip the app.
                # (An unlocked read: if it is stale, put() raises instead.) A
                # FIN alone is no reason: a half-closed client still reads.
                if conn.closed:
                    raise ClientDisconnected("client went away")
                self.result = conn.server.app(self.environ, response.start_response)
                final = self.first_result()
                if final is not None:
                    self.end(final, response.response.keep_alive)
                    return
            for data in self.iterator:
                if data:      # PEP 3333: empty items send nothing, not even headers
                    response.write(data, wait=False)
                    if response.length_sent():
                        break     # PEP 3333 "Handling the Content-Length Header"
                if conn.park_if_full(self):
                    return            # resumed by the loop when the client catches up
            self.end(response.final_bytes(), response.response.keep_alive)
        except BaseException as error:
            # PEP 3333, "Error Handling". BaseException too: sys.exit() or a
            # KeyboardInterrupt raised by an app ends that request, not a
            # worker thread (the pool would shrink, and the client would wait).
            self.end(wsgi_failure(conn, response, self.environ, error), False)

    def first_result(self) -> bytes | None:
        """Send a one-item or file result whole; else prepare to iterate."""
        result, response = self.result, self.response
        if (type(result) is FileWrapper and result.sendable() and not self.conn.tls
                and not response.head_sent):
            return send_file(result, response)
        try:
            single = len(result) == 1
        except TypeError:      # PEP 3333: only len(), iter() and close() are used
            single = False
        if single and not response.head_sent:
            # PEP 3333, "Handling the Content-Length Header": a one-item body
            # has a known length, so the client can keep the connection open.
            body = next(iter(result))
            # RFC 9110 §8.6, §9.3.2: for HEAD, Content-Length must be the GET
            # body's length. What the app returned for HEAD (often b"") does
            # not tell it, so the server adds none; the app's own is kept.
            if (response.status is not None and type(body) is bytes
                    and self.request.method != "HEAD" and not any(
                        name.lower() == b"content-length" for name, _ in response.headers)):
                response.headers.append((b"Content-Length", b"%d" % len(body)))
            return response.final_bytes(body)
        self.iterator = iter(result)
        return None

    def end(self, final: bytes, keep_alive: bool) -> None:
        """close() the result, hand over the last bytes, log the request."""
        try:
            if hasattr(self.result, "close"):  # PEP 3333: always, even after errors
                self.result.close()
        except BaseException:  # the response itself is whole: send it, then close
            log.exception("error in the close() of a WSGI result")
            keep_alive = False
        conn, response = self.conn, self.response
        # Policy: the access line shows what the client was sent: the app's
        # status, or our error answer's; "-" when it left before either.
        status = response.response.status if response.head_sent or final else "-"
        log_access(conn.server.config, self.client, self.request, status,
                   response.response.sent, self.started)
        conn.finish(final, keep_alive)     # last: the loop may then end the server


class FileWrapper:
    """wsgi.file_wrapper (PEP 3333, "Optional Platform-Specific File Handling")."""

    def __init__(self, filelike, block_size: int = 8192) -> None:
        """Wraps a file-like object, to be read in blocks of `block_size` bytes."""
        self.filelike = filelike
        self.block_size = block_size

    def __iter__(self):
        """The portable way: read blocks (used when sendfile() cannot be)."""
        while True:
            block = self.filelike.read(self.block_size)
            if not block:
                return
            yield block

    def sendable(self) -> bool:
        """Can the loop hand this file to os.sendfile()? (a real, regular file)"""
        try:
            return (hasattr(os, "sendfile")
                    and stat.S_ISREG(os.fstat(self.filelike.fileno()).st_mode))
        except (AttributeError, OSError, ValueError):
            return False

    def close(self) -> None:
        """Close the wrapped file, if it has a close()."""
        if hasattr(self.filelike, "close"):   # PEP 3333: close() is passed on
            self.filelike.close()


class FileRegion:
    """Part of a file that the loop sends with os.sendfile(), zero-copy."""

    def __init__(self, fd: int, offset: int, count: int) -> None:
        """`count` bytes of the open file `fd`, from `offset` on, still to send."""
        self.fd, self.offset, self.count = fd, offset, count

    def __len__(self) -> int:
        """The bytes still to send."""
        return self.count

    def send_to(self, sock: socket.socket) -> int:
        """Runs on: the loop thread. Send some of it; return the bytes sent."""
        sent = os.sendfile(sock.fileno(), self.fd, self.offset,
                           min(self.count, SENDFILE_BYTES))
        if sent == 0:     # the file is shorter than promised: we cannot go on
            raise OSError("file ended before its Content-Length")
        self.offset += sent
        self.count -= sent
        return sent


def send_file(wrapper: FileWrapper, response: WSGIResponse) -> bytes:
    """PEP 3333: send a wrapped file from its current position with sendfile()."""
    filelike = wrapper.filelike
    fd = filelike.fileno()
    offset = filelike.tell() if hasattr(filelike, "tell") else 0
    count = max(0, os.fstat(fd).st_size - offset)
    if not any(name.lower() == b"content-length" for name, _ in response.headers):
        response.headers.append((b"Content-Length", b"%d" % count))
    conn = response.conn
    conn.put(response._head())
    if response.response.framing == "length":      # not for HEAD, 204, 304
        # PEP 3333 "Handling the Content-Length Header": as for an iterable,
        # sending stops once the declared length is sent (a longer file is fine).
        count = min(count, response.response.length)
        if count:
            response.response.count(count)         # for end() and the access log
            conn.put(FileRegion(fd, offset, count))
    conn.wait_until_sent()     # close() may only close the file after this
    return response.response.end()


def wsgi_failure(conn: WSGIConnection, response: WSGIResponse, environ: dict,
                 error: BaseException) -> bytes:
    """PEP 3333, "Error Handling": a 500 if nothing was sent, else cut it short."""
    refusal = response.body.refused() if response.body is not None else None
    if refusal is None and isinstance(error, ClientDisconnected):
        return b""                 # nobody is left to answer: not an error
    if refusal is None:
        log.exception("error in WSGI app for %s %s", environ["REQUEST_METHOD"],
                      printable(environ["PATH_INFO"]))
    if response.head_sent:
        return b""    # the client sees an incomplete message, then EOF
    # The body was malformed (then that is the answer), or the app failed.
    status, reason = (refusal.status, refusal.reason) if refusal else (
        500, "the application failed")
    response.response.status = status          # for the access log
    return error_response(status, reason, time.time(), conn.server.config)


# =============================================================================
# §6  WSGI server - a selectors event loop and a thread pool
#
# The loop thread owns every socket: it accepts, reads, parses and writes.
# WSGI apps block, so each request runs on a worker thread (§5). Workers hand
# bytes back with put()/finish() and wake the loop through a socketpair (the
# self-pipe trick). Both directions are bounded: the loop stops reading a body
# the app has not consumed, and a worker waits while its output is unsent.
# Every hand-off between threads costs system calls and a pass of the GIL, so
# the pool wakes as few workers as it can (WorkerPool).
# =============================================================================


class WSGIConnection:
    """One client socket. Runs on: the loop thread, unless a method says so.

    One request's way through the two threads, in order:

        loop     on_readable -> process -> start_request -> submit (to the pool)
        worker   WSGICall.run: the app, then put() / finish() -> server.wake()
        loop     server.on_wake -> on_wake -> queue_output -> flush -> end_response

    Who owns what. The loop alone touches the socket, the parser, `state`,
    `body_complete`, `error`, `peer_eof` and `sending`, and only the loop
    closes the connection. Shared with the worker under the `room` lock:
    `outbox`, `unsent`, `parked`, `worker_done` and `keep_alive`. What the
    worker must know of the body (its bytes, how much is still unread, a
    framing error) goes through WSGIInput, under that object's own lock. The
    worker reads two loop flags without a lock, where a stale value is
    harmless: `closed` (put() raises on the next try) and `server.stopping`
    (the loop closes after the response anyway).
    """

    def __init__(self, server: WSGIServer, sock: socket.socket, client: tuple) -> None:
        """A new connection: idle, with an empty parser and nothing to send."""
        self.server = server
        self.sock = sock
        self.client = client if isinstance(client, tuple) else None   # None: unix
        self.tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
        self.scheme = "https" if self.tls else "http"
        self.wants = selectors.EVENT_READ    # what the TLS handshake waits for
        self.parser = RequestParser(server.config)
        self.sending: collections.deque = collections.deque()  # bytearray, FileRegion
        self.state = "idle"          # idle -> busy -> idle ... -> closing
        self.since = time.monotonic()    # start of this idle or closing phase
        self.last_read = self.since      # last time body bytes came in
        self.last_write = self.since     # last time sending made progress
        self.events = 0              # what the selector watches for us
        self.closed = False
        self.peer_eof = False        # the client sent FIN
        self._reset()
        # Shared with the worker thread, guarded by `room`:
        self.room = threading.Condition()
        self.outbox: list[bytes] = []
        self.unsent = 0              # bytes put() but not yet sent
        self.parked: WSGICall | None = None   # paused while the client reads
        self.trace = Trace() if server.config.trace else None
        self.worker_done = False

    def _reset(self) -> None:
        """Forget the last request: the connection is ready for the next one."""
        self.request: Request | None = None
        self.body_parts: list[bytes] = []
        self.body: WSGIInput | None = None
        self.spool: tempfile.SpooledTemporaryFile | None = None
        self.body_complete = False
        self.submitted = False
        self.error: HTTPError | None = None
        self.done = False            # the response is complete (loop side)
        self.keep_alive = False

    # -- reading ---------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        """The selector's callback: a TLS handshake step, or read, then write;
        then watch for what comes next and read what TLS has already decrypted."""
        if self.state == "handshake":
            self.handshake()
            return
        if mask & selectors.EVENT_READ:
            self.on_readable()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()
        if not self.closed:
            self.watch()
            self.read_pending()

    def handshake(self) -> None:
        """TLS: one non-blocking step of the handshake; the loop never waits."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.wants = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            self.wants = selectors.EVENT_WRITE
        except OSError:            # includes ssl.SSLError: a bad or plain client
            self.close()
            return
        else:
            self.state = "idle"
            self.since = time.monotonic()
        self.watch()
        self.read_pending()

    def read_pending(self) -> None:
        """TLS: bytes already decrypted wake no select(); read them now."""
        while (self.tls and not self.closed and self.events & selectors.EVENT_READ
               and self.sock.pending()):
            self.on_readable()
            if not self.closed:
                self.watch()

    def on_readable(self) -> None:
        """Read what the client sent and parse it; an empty read is its FIN.

        While closing (RFC 9112 §9.6), bytes are discarded until that FIN."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except WOULD_BLOCK:
            return
        except OSError:              # e.g. a reset: nothing can be sent either
            self.close()
            return
        if self.state == "closing":
            if not data:
                self.close()          # lingering close is over (RFC 9112 §9.6)
            return
        if not data:
            self.on_eof()
            return
        self.last_read = time.monotonic()
        self.parser.feed(data)
        self.process()

    def on_eof(self) -> None:
        """The client sent FIN: close if there is nothing to answer, fail a body still
        arriving (RFC 9112 §8), or else let the response go out."""
        self.peer_eof = True
        if self.state == "idle" or not (self.submitted or self.done):
            self.close()    # idle, mid-head or mid-spool: nothing to answer
        elif not self.body_complete and self.body is not None:
            # RFC 9112 §8: an incomplete body is never reported as complete.
            self.fail_body(ClientDisconnected("client closed mid-body"))
        # else: a half-close after a full request; the response still goes out.

    def process(self) -> None:
        """Start the next request, or hand body bytes to the one in progress."""
        try:
            while self.state in ("idle", "draining") or (
                    self.state == "busy" and not self.body_complete):
                if self.body is not None and self.body.paused:
                    break                         # the app has enough unread
                event = self.parser.next_event()
                if event is None:
                    break
                if self.state == "draining":      # a body the app did not read
                    if event is END:
                        self.state, self.since = "idle", time.monotonic()
                elif self.state == "idle":
                    self.start_request(event)
                elif event is END:
                    self.body_complete = True
                    if self.body is not None:
                        self.body.finish()
                elif self.body is not None:
                    self.body.feed(event, self.parser.unread_body())
                elif self.spool is not None:
                    self.write_spool(event)
                else:
                    self.body_parts.append(event)
        except HTTPError as error:
            self.on_bad_request(error)
        if (self.state == "busy" and not self.submitted and not self.done
                and (self.body_complete or self.spool is None)):
            self.submit()

    def start_request(self, request: Request) -> None:
        """Begin serving a request head: the connection is now busy.

        A chunked body is spooled first, so that the app gets its length; with
        "Expect: 100-continue", the 100 goes out at once (RFC 9110 §10.1.1)."""
        self.state, self.request = "busy", request
        self.started = time.monotonic()
        if self.trace:
            self.trace.head(">", self.parser.last_head)
        if request.chunked:
            # Many frameworks (Django among them) read exactly CONTENT_LENGTH
            # bytes and see no body without it. So, as waitress does, a chunked
            # body is collected first (in memory, then on disk) and the app gets
            # its length. Its size is bounded by --limit-spool (write_spool).
            self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
            if request.expect_continue:     # RFC 9110 §10.1.1: we will read it
                self.queue_own(CONTINUE)

    def write_spool(self, data: bytes) -> None:
        """Add de-chunked body bytes to the spool; what cannot be kept is refused."""
        if self.spool.tell() + len(data) > self.server.config.limit_spool:
            # Limit: one client must not fill the temporary directory.
            raise HTTPError(413, "chunked request body too large")  # RFC 9110 §15.5.14
        try:
            self.spool.write(data)
        except OSError as error:
            # The disk is full, or the file too large for it, or we are out of
            # file descriptors: that request fails, the server goes on.
            log.warning("cannot store a chunked request body: %s", error)
            if error.errno == errno.EFBIG:
                raise HTTPError(413, "request body too large to store") from None
            if error.errno in STORAGE_FULL:
                # RFC 9110 §15.6.4: 503, a condition that is likely temporary.
                raise HTTPError(503, "no room to store the request body") from None
            raise HTTPError(500, "cannot store the request body") from None

    def close_spool(self) -> None:
        """Close the spool file. A disk that refused its bytes may refuse the
        last flush too: the file is closed all the same, and that is enough."""
        try:
            self.spool.close()
        except OSError:
            pass

    def on_bad_request(self, error: HTTPError) -> None:
        """Answer a request the parser refused, then close (RFC 9112 §9.6)."""
        if not self.submitted:     # the app never saw it: we answer for it
            self.state = "busy"
            self.send_now(error_response(error.status, error.reason, time.time(),
                                         self.server.config))
        else:                      # the app is reading the body: stop it there
            self.error = error
            self.fail_body(ClientDisconnected("malformed request body"), error)

    def fail_body(self, error: Exception, refusal: HTTPError | None = None) -> None:
        """The body will never be complete: wake the app's read() with `error`."""
        self.body_complete = True
        if self.body is not None:
            self.body.finish(error, refusal)

    def submit(self) -> None:
        """Hand the request to a worker thread, with what we have of its body."""
        request = self.request
        self.submitted = True
        self.last_read = time.monotonic()
        if self.spool is not None:
            body = self.spool                 # de-chunked, complete, rewound
            length = body.tell()
            body.seek(0)
        elif self.body_complete:
            body = io.BytesIO(b"".join(self.body_parts))   # no waiting needed
        else:
            self.body = body = WSGIInput(self, self.body_parts, request.expect_continue,
                                         self.parser.unread_body())
        self.body_parts = []
        config = self.server.config
        client, scheme, host = behind_proxy(request, self.client, self.scheme, config)
        environ = build_environ(request, body, self.server.address, client, config, scheme)
        if host:
            environ["HTTP_HOST"] = host
        if self.spool is not None:
            environ["CONTENT_LENGTH"] = str(length)
        if self.trace:
            self.trace.mapping("environ", environ)
        call = WSGICall(self, request, environ, self.started, client, self.body)
        self.server.pool.submit(call.run)

    # -- writing ---------------------------------------------------------------

    def put(self, data: bytes | FileRegion, wait: bool = True) -> None:
        """Runs on: a worker. Queue bytes to send; wait while too many are unsent."""
        with self.room:
            while wait and self.unsent > HIGH_WATER and not self.closed:
                self.room.wait()
            if self.closed:
                raise ClientDisconnected("client went away")
            self.outbox.append(data)
            self.unsent += len(data)
        self.server.wake(self)

    def park_if_full(self, call: WSGICall) -> bool:
        """Runs on: a worker. Too much unsent? Then leave `call` with us (the
        loop resubmits it once the client has read enough) and say so."""
        with self.room:
            if self.unsent <= HIGH_WATER or self.closed:
                return False          # closed: the next put() raises instead
            self.parked = call
        self.server.wake(self)     # the loop may have drained it meanwhile
        return True

    def resume_parked(self) -> None:
        """Runs on: the loop. Give a parked call back to a worker thread."""
        with self.room:
            call, self.parked = self.parked, None
        if call is not None:
            self.server.pool.submit(call.run)

    def wait_until_sent(self) -> None:
        """Runs on: a worker. Wait until everything put() so far is sent."""
        with self.room:
            while self.unsent > 0 and not self.closed:
                self.room.wait()
        if self.closed:
            raise ClientDisconnected("client went away")

    def finish(self, data: bytes, keep_alive: bool) -> None:
        """Runs on: a worker. The last bytes of the response; the worker is done."""
        with self.room:
            self.outbox.append(data)
            self.unsent += len(data)
            self.worker_done = True
            self.keep_alive = keep_alive
        self.server.wake(self)

    def on_wake(self) -> None:
        """A worker put bytes, finished, or read enough of the body to go on."""
        with self.room:
            outbox, self.outbox = self.outbox, []
            if self.worker_done:
                self.worker_done = False
                self.done = True
            # It parked after the loop had caught up: resume it.
            resume = self.parked is not None and self.unsent <= LOW_WATER
        for item in outbox:
            self.queue_output(item)
        if resume:
            self.resume_parked()
        if self.state == "busy" and not self.body_complete:
            self.process()           # the app made room for more body
        self.flush()
        if not self.closed:
            self.watch()
            self.read_pending()

    def queue_output(self, item) -> None:
        """Add bytes (or a FileRegion) to what the loop will send, in order."""
        if not self.sending:
            self.last_write = time.monotonic()
        if type(item) is FileRegion:
            self.sending.append(item)
        elif item:
            if self.sending and type(self.sending[-1]) is bytearray:
                self.sending[-1] += item      # one send() for adjacent pieces
            else:
                self.sending.append(bytearray(item))

    def queue_own(self, data: bytes) -> None:
        """Queue bytes the loop itself produced (not put() by a worker)."""
        with self.room:
            self.unsent += len(data)
        self.queue_output(data)

    def send_now(self, data: bytes) -> None:
        """Send bytes the loop itself produced, as the end of this response."""
        if self.trace:
            self.trace.head("!", data)
        self.queue_own(data)
        self.done = True
        self.keep_alive = False
        self.flush()

    def flush(self) -> None:
        """Send what we can without blocking; end the response once all is out."""
        while self.sending:
            item = self.sending[0]
            try:
                if type(item) is FileRegion:
                    sent = item.send_to(self.sock)
                else:
                    sent = self.sock.send(item)
                    del item[:sent]
            except WOULD_BLOCK:
                return
            except OSError:
                self.close()
                return
            self.last_write = time.monotonic()
            with self.room:
                self.unsent -= sent
                resume = self.unsent <= LOW_WATER
                if resume:
                    self.room.notify()    # a worker may be waiting in put()
                resume = resume and self.parked is not None
            if resume:
                self.resume_parked()
            if len(item):
                return                    # the socket is full: wait for EVENT_WRITE
            self.sending.popleft()
        if self.done:
            self.end_response()

    def end_response(self) -> None:
        """RFC 9112 §9.3: keep the connection for the next request, or close."""
        # After the client's FIN, only requests it sent before it remain.
        more = not self.peer_eof or bool(self.parser.buffer)
        keep = self.keep_alive and self.error is None and more and not self.server.stopping
        draining = not self.body_complete
        if self.spool is not None:
            self.close_spool()       # the app is done with it: free the disk now
        self._reset()
        self.since = self.last_read = time.monotonic()
        if not keep:
            self.close_gracefully()
            return
        self.state = "draining" if draining else "idle"
        self.process()     # a pipelined request may be waiting (RFC 9112 §9.3.2)
        if self.peer_eof and self.state in ("idle", "draining"):
            self.close()   # what is left can never become a request

    # -- the selector and closing ---------------------------------------------

    def watch(self) -> None:
        """Tell the selector what this connection is waiting for now."""
        if self.closed:
            return          # e.g. a 408 that could not be written closed it
        if self.state == "handshake":
            self._set_events(self.wants)
            return
        if self.state == "closing":
            reading = True                  # discard until the client's FIN
        elif self.peer_eof:
            reading = False
        elif self.state in ("idle", "draining"):
            reading = True
        elif not self.body_complete:
            reading = self.body is None or not self.body.paused
        else:                               # pipelined bytes, up to a bound
            reading = len(self.parser.buffer) < MAX_HEAD_BYTES
        self._set_events((selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if self.sending else 0))

    def _set_events(self, events: int) -> None:
        """Register, modify or unregister the socket so the selector watches `events`."""
        if events == self.events:
            return
        if self.events == 0:
            self.server.selector.register(self.sock, events, self)
        elif events == 0:
            self.server.selector.unregister(self.sock)
        else:
            self.server.selector.modify(self.sock, events, self)
        self.events = events

    def close_gracefully(self) -> None:
        """RFC 9112 §9.6: send FIN, then read and discard until the client's FIN.

        Closing with unread bytes in the socket would send a TCP reset, which
        can destroy the last response before the client reads it.
        """
        if self.peer_eof:
            self.close()
            return
        self.state = "closing"
        self.since = time.monotonic()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def close(self) -> None:
        """Close the socket now; a worker still busy with it learns from put()."""
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.events = 0
            try:
                self.server.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass         # never registered, or the selector lost it
        self.sock.close()
        if self.spool is not None and not self.submitted:
            self.close_spool()       # an upload cut short: the app never got it
        self.server.connections.discard(self)
        with self.room:
            self.room.notify_all()   # a worker waiting in put() must see this
        self.resume_parked()         # a parked call ends (and close()s) on a worker
        if self.body is not None:
            self.body.finish(ClientDisconnected("connection closed"))

    def check_timeouts(self, now: float) -> None:
        """Close (or answer 408) a connection that has waited too long, §1."""
        config = self.server.config
        if self.state == "closing":
            if now - self.since > LINGER_SECONDS:
                self.close()
        elif self.state == "handshake":
            if now - self.since > config.timeout_request_head:
                self.close()      # a TLS handshake that never finishes
        elif self.sending and now - self.last_write > config.timeout_write:
            self.close()          # the client does not read what we send
        elif self.state == "idle":
            if not self.parser.has_partial_request:
                if now - self.since > config.timeout_keep_alive:
                    self.close()      # RFC 9112 §9.5: idle connections may close
            elif now - self.since > config.timeout_request_head:
                # RFC 9110 §15.5.9: 408 for a head that takes too long (slowloris).
                self.on_bad_request(HTTPError(408, "request head not received in time"))
                self.watch()
        elif self.state == "draining":
            if now - self.last_read > config.timeout_read:
                self.close()
        elif (not self.body_complete and self.events & selectors.EVENT_READ
              and now - self.last_read > config.timeout_read):
            self.on_bad_request(HTTPError(408, "request body not received in time"))
            self.watch()


def tune_malloc() -> None:
    """glibc malloc settings that keep RSS flat while bodies stream through
    the WSGI threads (called before they start). Elsewhere this does nothing.

    One arena: glibc gives each thread an arena of its own, and body bytes
    made on the loop thread and freed on a worker (and back) then leave RSS
    tens of MiB high (256 MiB streaming echo: +45 MiB by default, +10 to 12
    MiB with one arena; the GIL already serialises the threads, so one arena
    costs no speed: hello ~50 us of CPU per request either way).

    Fixed mmap and trim thresholds: by default glibc raises its mmap threshold
    each time a large block is freed, so later large buffers come from the
    heap and fragment it (512 MiB to 1 GiB streaming echo, peak RSS growth: 8
    to 23 MiB over 15 runs; with these settings 6 to 8 over 7, same MB/s). The trim
    threshold is raised with it, else the heap shrinks and regrows for every
    piece (-25% MB/s with the fixed mmap threshold alone).
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(-8, 1)                  # M_ARENA_MAX, glibc's malloc.h
        libc.mallopt(-3, 1024 * 1024)        # M_MMAP_THRESHOLD
        libc.mallopt(-1, 4 * 1024 * 1024)    # M_TRIM_THRESHOLD


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim).

    Under a mixed load the heap fragments: freed blocks lie between live
    ones, so the heap cannot shrink from its top, and RSS creeps up while
    the live data stays the same. malloc_trim(0) also returns the whole free
    pages inside the heap. Both servers call it every MEMORY_TRIM_SECONDS;
    it takes well under a millisecond. Elsewhere this does nothing.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=None)
def glibc():
    """The C library, if it is glibc (Linux, not musl); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim       # musl has neither
        return libc
    except (OSError, AttributeError):
        return None


class WorkerPool:
    """A few threads that run WSGI app calls, oldest first.

    Runs on: the loop (submit, wake_workers, stop) and its workers (_work).
    An awake worker runs queued calls one after another and sleeps only when
    none is left, on a lock of its own (waking it is one futex call). The
    loop wakes a sleeper just before it waits in select(): one when calls are
    queued and every worker sleeps, and one more each WORKER_WAIT_SECONDS
    while the oldest call has waited that long (the awake ones are blocked in
    apps). Waking a thread per request only made them fight over the GIL
    (hello, one connection: 15.5 -> 10-11.6 system calls per request; 50
    connections: 55-64 -> 45-51 us of CPU per request).

    With one thread (--threads 1) that comes down to: wake it when it sleeps
    and a call is queued; calls run one after another, oldest first. A call
    parked for a slow reader (§6 park_if_full) has given the thread back, so
    the next request runs meanwhile and the parked one resumes after it.
    """

    def __init__(self, count: int) -> None:
        """Start `count` worker threads, with nothing queued."""
        tune_malloc()
        self.jobs: collections.deque = collections.deque()    # (queued at, function)
        self.lock = threading.Lock()         # guards jobs, sleeping and stopping
        self.sleeping: list[threading.Lock] = []   # the held lock of each sleeper
        self.last_wake = 0.0
        self.stopping = False
        self.threads = [threading.Thread(target=self._work, daemon=True,
                                         name=f"gateway-worker-{n}")
                        for n in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, function) -> None:
        """Queue a call, stamped with the time; wake_workers() wakes a worker for it."""
        with self.lock:
            self.jobs.append((time.monotonic(), function))

    def wake_workers(self, now: float, longest: float) -> float:
        """Wake a sleeper if the queue needs one; return how long select() may wait."""
        with self.lock:
            if not (self.jobs and self.sleeping):
                return longest
            overdue = (now - self.jobs[0][0] >= WORKER_WAIT_SECONDS
                       and now - self.last_wake >= WORKER_WAIT_SECONDS)
            if len(self.sleeping) == len(self.threads) or overdue:
                self.sleeping.pop().release()
                self.last_wake = now
            return min(longest, WORKER_WAIT_SECONDS)

    def _work(self) -> None:
        """A worker thread: run queued calls, oldest first; when none is left,
        sleep on a lock of its own until woken; end once stopping and the queue is empty."""
        bell = threading.Lock()
        bell.acquire()               # held: acquire() again sleeps until a release()
        while True:
            with self.lock:
                job = self.jobs.popleft()[1] if self.jobs else None
                if job is None:
                    if self.stopping:
                        return
                    self.sleeping.append(bell)
            if job is None:
                bell.acquire()
                continue
            try:
                job()
            except BaseException:   # WSGICall.run catches the app's; this is ours
                log.exception("internal error in a worker thread")

    def stop(self) -> None:
        """Let the workers finish what is queued, then end."""
        with self.lock:
            self.stopping = True
            for bell in self.sleeping:
                bell.release()
            self.sleeping.clear()


class WSGIServer:
    """Serves one WSGI app on a listening socket until shutdown() is called."""

    def __init__(self, app, listener: socket.socket, config: Config | None = None):
        """The selector, the worker pool and the wake-up socketpair, ready for
        serve_forever(); no connection yet."""
        self.app = app
        self.listener = listener
        self.config = config or Config()
        self.address = listen_address(listener)
        self.selector = selectors.DefaultSelector()
        self.connections: set[WSGIConnection] = set()
        self.pool = WorkerPool(self.config.threads)
        self.ssl_context = make_ssl_context(self.config) if self.config.ssl_certfile else None
        self.running = True          # shutdown() may come before serve_forever()
        # The self-pipe: a worker writes a byte to wake the loop's select().
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.woken: collections.deque[WSGIConnection] = collections.deque()
        self.wake_sent = False
        self.stopping = False        # draining: answer no new request
        self.forced = False
        # Look for timeouts every second, or more often when one is shorter.
        self.tick = min(1.0, self.config.timeout_keep_alive / 2,
                        self.config.timeout_request_head / 2,
                        self.config.timeout_read / 2, self.config.timeout_write / 2)
        self.last_check = self.last_trim = time.monotonic()
        # Limit: connections the selector can watch at once. select() (all that
        # Windows has) takes SELECT_SOCKETS sockets there, the listener and the
        # waker among them; on POSIX only descriptors below SELECT_SOCKETS, and
        # the kernel hands out the lowest free one, so count those open now.
        # epoll, kqueue and poll: None, only RLIMIT_NOFILE bounds them.
        self.capacity: int | None = None
        if isinstance(self.selector, selectors.SelectSelector):
            in_use = 2 if os.name == "nt" else self.wake_writer.fileno() + 1
            self.capacity = SELECT_SOCKETS - in_use
        self.accepting = False       # the listener is in the selector
        self.resume_at = 0.0         # not accepting: try again at this time ...
        self.resume_below = 0        # ... or once fewer connections are open
        self.refusing: set[str] = set()   # why we stopped, since the backlog was empty

    def serve_forever(self) -> None:
        """Runs on: the loop thread. Accept, read, write until shutdown()."""
        self.listener.setblocking(False)
        self.watch_listener(True)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, "wake")
        on_signals(self.shutdown)
        try:
            while self.running:
                self.run_once()
            self.drain()
        finally:
            self.close_all()

    def run_once(self) -> None:
        """One turn of the loop: wait for sockets, handle them, check the clocks."""
        timeout = self.pool.wake_workers(time.monotonic(), self.tick)
        if not self.accepting and not self.stopping:
            timeout = max(0.0, min(timeout, self.resume_at - time.monotonic()))
        for key, mask in self.selector.select(timeout):
            if key.data == "accept":
                self.accept()
            elif key.data == "wake":
                self.on_wake()
            else:
                self.guarded(key.data, key.data.on_event, mask)
        now = time.monotonic()
        if not self.accepting and not self.stopping and (
                now >= self.resume_at or len(self.connections) < self.resume_below):
            self.watch_listener(True)      # a descriptor may be free again
        if now - self.last_check >= self.tick:
            self.check_timeouts(now)
            self.last_check = now
        if now - self.last_trim >= MEMORY_TRIM_SECONDS:
            release_memory()
            self.last_trim = now

    def drain(self) -> None:
        """Graceful shutdown: stop accepting, close idle connections, and let
        requests in progress finish (each response says "Connection: close")."""
        self.stopping = True
        self.watch_listener(False)
        self.listener.close()
        for conn in list(self.connections):
            if conn.state == "idle":
                conn.close()
        deadline = time.monotonic() + self.config.timeout_graceful_shutdown
        while self.connections and time.monotonic() < deadline and not self.forced:
            self.run_once()

    def accept(self) -> None:
        """Take waiting clients off the listener, several per turn of the loop;
        stop watching it while no more can be taken."""
        for _ in range(64):     # several per wake-up, but let others run too
            if self.capacity is not None and len(self.connections) >= self.capacity:
                # Policy: a full selector stops accepting until a connection
                # closes; clients wait in the backlog. A 503 (RFC 9110 §15.6.4:
                # overloaded, try later), as --limit-concurrency sends, would
                # need a socket the selector watches while the answer goes out
                # and we linger for the client's FIN: there is no room for one.
                self.stop_accepting("the selector is full (%d connections)"
                                    % self.capacity, until=float("inf"))
                return
            try:
                sock, client = self.listener.accept()
            except BlockingIOError:
                if self.refusing:          # caught up with the clients who waited
                    self.refusing.clear()
                    log.info("accepting connections again")
                return
            except (InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                if error.errno in OUT_OF_DESCRIPTORS:
                    # Policy: back off. The listener stays readable, so trying
                    # again at once would spin; the clients wait in the backlog.
                    self.stop_accepting(out_of(error),
                                        until=time.monotonic() + ACCEPT_PAUSE_SECONDS)
                    return
                log.warning("accept() failed: %s", error)
                return
            self.add_connection(sock, client)
            if not self.accepting:
                return

    def add_connection(self, sock: socket.socket, client) -> None:
        """Start serving an accepted socket. One that is dead already, or that
        the selector will not take, is closed: it must not end the loop."""
        if self.capacity is not None and os.name != "nt" and (
                sock.fileno() >= SELECT_SOCKETS):
            # Limit: POSIX select() cannot take it: all lower descriptors are
            # in use (the app holds some). Try again later, or once one closes.
            sock.close()
            self.stop_accepting("no descriptor below %d free for select()" % SELECT_SOCKETS,
                                until=time.monotonic() + ACCEPT_PAUSE_SECONDS)
            return
        conn = None
        try:
            sock.setblocking(False)
            if not set_nodelay(sock):
                raise ConnectionResetError("reset before it was served")
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            conn = WSGIConnection(self, sock, client)
            if conn.tls:
                conn.state = "handshake"
            self.connections.add(conn)
            limit = self.config.limit_concurrency
            if limit is not None and len(self.connections) > limit:
                # Limit: RFC 9110 §15.6.4, 503 while we have too many clients.
                conn.state = "busy"
                conn.send_now(error_response(503, "too many connections", time.time(),
                                             self.config))
            if not conn.closed:
                conn.watch()
        except (OSError, ValueError) as error:
            log.debug("closed a new connection at once: %s", error)
            if conn is not None:
                conn.close()
            else:
                sock.close()

    def watch_listener(self, on: bool) -> None:
        """Watch the listener for new clients, or leave them in the backlog."""
        if on != self.accepting:
            if on:
                self.selector.register(self.listener, selectors.EVENT_READ, "accept")
            else:
                self.selector.unregister(self.listener)
            self.accepting = on

    def stop_accepting(self, reason: str, until: float) -> None:
        """Leave new clients in the backlog until `until`, or until one of
        ours closes. One warning per reason until the backlog is empty again."""
        self.watch_listener(False)
        self.resume_at = until
        self.resume_below = len(self.connections)
        if reason not in self.refusing:
            self.refusing.add(reason)
            log.warning("%s: not accepting for now", reason)

    def wake(self, conn: WSGIConnection) -> None:
        """Runs on: any thread. Have the loop call conn.on_wake() soon."""
        self.woken.append(conn)
        # One byte wakes the loop; while one is on its way, more are useless.
        # The loop clears wake_sent before it empties `woken`, so a connection
        # appended after that is either seen now or sends a new byte.
        if not self.wake_sent:
            self.wake_sent = True
            try:
                self.wake_writer.send(b"\0")
            except OSError:       # full: the loop is about to wake anyway
                pass

    def on_wake(self) -> None:
        """Empty the wake-up socket, then run on_wake() of each connection woken."""
        try:
            self.wake_reader.recv(4096)
        except BlockingIOError:
            pass
        self.wake_sent = False
        while self.woken:
            conn = self.woken.popleft()
            if not conn.closed:
                self.guarded(conn, conn.on_wake)

    def check_timeouts(self, now: float) -> None:
        """Have each open connection check its own timeouts."""
        for conn in list(self.connections):
            if not conn.closed:
                self.guarded(conn, conn.check_timeouts, now)

    def guarded(self, conn: WSGIConnection, handler, *args) -> None:
        """Run one connection's handler. Nothing that happens on one connection
        may end the loop: an error of ours is logged and closes only it."""
        try:
            handler(*args)
        except Exception:
            log.exception("internal error on a connection from %s; closing it",
                          conn.client[0] if conn.client else "a unix socket")
            try:
                conn.close()
            except Exception:
                self.connections.discard(conn)    # at least forget it

    def shutdown(self) -> None:
        """Runs on: any thread. Stop gracefully; a second call stops at once."""
        self.forced = not self.running
        self.running = False
        try:
            self.wake_writer.send(b"\0")
        except OSError:
            pass

    def close_all(self) -> None:
        """Close every connection, stop the workers, then the selector and sockets."""
        for conn in list(self.connections):
            conn.close()
        self.pool.stop()
        self.selector.close()
        if self.listener.fileno() >= 0:
            self.listener.close()
        self.wake_reader.close()
        self.wake_writer.close()


def out_of(error: OSError) -> str:
    """What an accept() that failed with one of OUT_OF_DESCRIPTORS ran out of."""
    what = ("file descriptors" if error.errno in (errno.EMFILE, errno.ENFILE)
            else "memory")
    return "out of %s (%s)" % (what, errno.errorcode[error.errno])


def set_nodelay(sock: socket.socket) -> bool:
    """Send small responses at once instead of waiting for Nagle's algorithm.

    False if the socket is dead already: macOS refuses the option (EINVAL) on
    a connection the client reset before we got to it.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return False
    return True


# =============================================================================
# §7  ASGI HTTP adapter - ASGI "HTTP & WebSocket" spec, http scope
#
# One HTTPCycle per request: it builds the scope, and its receive() and send()
# are what the app awaits. receive() pulls body bytes through the parser only
# when the app asks (that is the flow control); send() frames the response
# with §4 and waits for the socket to drain.
# =============================================================================


def build_scope(request: Request, server: tuple, client: tuple | None, config: Config,
                state: dict, scheme: str = "http") -> dict:
    """The ASGI http scope for one request ("HTTP Connection Scope").

    A scope lives for one request, not for the connection: each request on a
    keep-alive connection gets a new one (and a new call of the app).
    """
    # "path" is percent-decoded and then UTF-8 decoded; "raw_path" and
    # "query_string" stay the bytes the client sent. Policy: invalid UTF-8 in
    # the path becomes U+FFFD rather than a 400: the app still decides, and
    # raw_path keeps the exact bytes.
    root_path, path_info = split_root_path(config.root_path,
                                           unquote(request.path.decode("ascii")))
    return {
        "type":         "http",
        "asgi":         {"version": "3.0", "spec_version": "2.5"},
        "http_version": request.version,              # "1.0" or "1.1"
        "method":       request.method,               # as sent (RFC 9110 §9.1)
        "scheme":       scheme,
        "path":         root_path + path_info,        # the whole path (§5 split_root_path)
        "raw_path":     request.path,
        "query_string": request.query,                # after "?", still encoded
        "root_path":    root_path,                    # WSGI's SCRIPT_NAME
        # Lower-case names, in the order received, repeated fields kept apart.
        "headers":      [[name, value] for name, value in request.headers],
        "client":       list(client) if client else None,
        "server":       list(server),
        "state":        dict(state),    # ASGI Lifespan spec: a shallow copy
        # ASGI "Extensions": what send() takes beyond the core messages.
        "extensions":   {"http.response.trailers": {}, "http.response.pathsend": {},
                         "http.response.early_hint": {}, "http.response.zerocopysend": {}},
    }


class HTTPCycle:
    """One request and its response on the ASGI path.

    The response moves through these states as the app calls send():

        start --http.response.start--> body --body, more_body=False--> done
                                       body --last body, trailers=True--> trailers
                                   trailers --more_trailers=False------> done

    and "failed" when the server answered with an error of its own instead.
    An http.response.zerocopysend is a body message whose bytes come from a
    file. An http.response.early_hint changes no state: it is sent (as a 103)
    only while the head is still held back.
    """

    def __init__(self, conn: ASGIConnection, request: Request) -> None:
        """A response not started yet ("start"); its head waits for the first body message."""
        self.conn = conn
        self.request = request
        # While the server shuts down, each response says "Connection: close".
        keep_alive = request.keep_alive and not conn.stopping.is_set()
        self.response = Response(request.method, request.version, keep_alive,
                                 conn.config)
        self.state = "start"          # see the class docstring
        # ASGI "Response Start": nothing may be sent before the first body
        # message, so the head waits here and goes out with it, in one write.
        self.head = b""
        self.head_written = False
        self.trailers: list | None = None   # http.response.trailers expected
        self.body_done = False        # the app has received the whole body
        self.disconnected = False
        self.response_done = asyncio.Event()
        self.send_continue = request.expect_continue

    @property
    def keep_alive(self) -> bool:
        """May the connection serve another request? Only after a complete response,
        with the whole body received, no framing error and no disconnect."""
        return (self.state == "done" and self.response.keep_alive and self.body_done
                and not self.disconnected and self.conn.error is None)

    async def run(self) -> None:
        """Call the app; answer 500 if it fails before its response starts."""
        scope = self.conn.scope_for(self.request)
        started = time.monotonic()
        failure = None
        try:
            receive, send = self.receive, self.send
            if self.conn.trace:
                receive, send = traced(self.conn.trace, receive, send)
            await self.conn.app(scope, receive, send)
        except ClientDisconnected:
            self.disconnected = True
        except BaseException as error:
            if self.conn.cancelled_by_server(error):
                raise                 # the server is shutting down: not the app's fault
            # ASGI spec, "Error Handling": an exception from the app is logged and
            # answered as an internal error; the connection ends below. Policy:
            # SystemExit, KeyboardInterrupt, GeneratorExit and a CancelledError
            # the app raises itself count as app errors too, so no app can stop
            # the server or leave its client without an answer.
            log.exception("error in ASGI app for %s %s", scope["method"],
                          printable(scope["path"]))
            failure = HTTPError(500, "the application failed")
        else:
            # A send() that found the connection closed raised ClientDisconnected
            # (ASGI HTTP "Disconnected Client - send exception"); the app may have
            # caught it and returned.
            self.disconnected = self.disconnected or self.conn.writer.transport.is_closing()
            if self.state in ("start", "body") and self.disconnected:
                # Policy: a client that leaves (or sends a malformed body) before
                # its response is complete is no server error: DEBUG only.
                log.debug("no complete response to %s %s: %s", scope["method"],
                          printable(scope["path"]),
                          self.conn.error.reason if self.conn.error else "the client left")
            elif self.state == "start":
                log.error("ASGI app returned without sending a response")
                failure = HTTPError(500, "the application sent no response")
            elif self.state == "body":
                log.error("ASGI app returned before its response was complete")
        failure = self.conn.error or failure   # a malformed body is the real cause
        if failure is not None:
            await self.fail(failure)
        elif self.state == "done" and not self.disconnected and not self.body_done:
            await self.skip_unread_body()
        # Policy: the access line shows what the client was sent: the app's status
        # once its head went out, or the server's own error answer; "-" (and 0
        # bytes) when it was sent nothing because it left first.
        answered = self.head_written or self.state == "failed"
        log_access(self.conn.config, scope["client"], self.request,
                   self.response.status if answered else "-", self.response.sent, started)

    async def skip_unread_body(self) -> None:
        """RFC 9112 §9.3: read and drop a body the app did not read, so that the
        next request can be found (only when can_drain(); else we close)."""
        parser = self.conn.parser
        dropped = 0
        while not self.body_done and self.response.keep_alive and dropped <= DRAIN_BYTES:
            try:
                event = parser.next_event()
            except HTTPError:
                return              # the connection closes; the answer is sent
            if type(event) is bytes:
                dropped += len(event)
            if event is None:
                try:
                    data = await asyncio.wait_for(self.conn.read(),
                                                  self.conn.config.timeout_read)
                except asyncio.TimeoutError:
                    return
                if not data:
                    return
                parser.feed(data)
            self.body_done = event is END

    async def fail(self, error: HTTPError) -> None:
        """Send an error response if no part of the response went out yet."""
        if self.head_written or (self.disconnected and self.conn.error is None):
            return
        data = error_response(error.status, error.reason, time.time(), self.conn.config)
        if self.conn.trace:
            self.conn.trace.head("!", data)
        try:
            await self.conn.write(data)
        except ClientDisconnected:
            self.disconnected = True      # no one is left to answer: not an error
            log.debug("client left before its %d answer", error.status)
            return
        self.state = "failed"
        self.response.status = error.status      # for the access log

    # -- receive ---------------------------------------------------------------

    async def receive(self) -> dict:
        """ASGI HTTP spec: "Request - receive event", then "Disconnect"."""
        if self.body_done or self.disconnected:
            # After the body: wait until the response is done or the client
            # leaves, then say http.disconnect (now, and on every later call).
            await self.wait_for_disconnect()
            return {"type": "http.disconnect"}
        if self.send_continue:
            self.send_continue = False
            if not self.conn.parser.buffer:    # RFC 9110 §10.1.1
                await self.conn.write(CONTINUE)
        return await self.read_body()

    async def read_body(self) -> dict:
        """All the body bytes the parser has now, reading the socket if it has none."""
        parts = []
        parser = self.conn.parser
        while True:
            try:
                event = parser.next_event()
            except HTTPError as error:
                self.conn.error = error      # answered after the app returns
                self.disconnected = True
                return {"type": "http.disconnect"}
            if event is END:
                self.body_done = True
                return {"type": "http.request", "body": b"".join(parts),
                        "more_body": False}
            if event is not None:
                parts.append(event)
                continue
            if parts:
                return {"type": "http.request", "body": b"".join(parts),
                        "more_body": True}
            try:
                data = await asyncio.wait_for(self.conn.read(), self.conn.config.timeout_read)
            except asyncio.TimeoutError:
                self.conn.error = HTTPError(408, "request body not received in time")
                data = b""
            if not data:
                self.disconnected = True     # RFC 9112 §8: incomplete body
                return {"type": "http.disconnect"}
            parser.feed(data)

    async def wait_for_disconnect(self) -> None:
        """Wait for the response to finish, noticing if the client goes away."""
        conn = self.conn
        while not self.disconnected and self.state not in ("done", "failed"):
            if conn.eof or len(conn.parser.buffer) > MAX_HEAD_BYTES:
                await self.response_done.wait()    # nothing more to learn
                return
            reading = conn.start_read()
            finished = asyncio.ensure_future(self.response_done.wait())
            await asyncio.wait([reading, finished], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if reading.done():
                data = await conn.read()         # takes the finished read
                if data:
                    conn.parser.feed(data)       # the next pipelined request
                else:
                    self.disconnected = True

    # -- send ------------------------------------------------------------------

    async def send(self, message: dict) -> None:
        """ASGI HTTP spec: one "http.response.start", then "http.response.body"s."""
        kind = message["type"]
        if self.disconnected:
            raise ClientDisconnected("the client has disconnected")  # spec 2.4
        if kind == "http.response.start":
            if self.state != "start":
                raise RuntimeError(f"ASGI: 'http.response.start' sent twice ({self.state})")
            self.start = (check_asgi_status(message["status"]),
                          check_asgi_headers(message.get("headers", [])))
            self.head = self.response.head(*self.start, time.time())
            self.state = "body"
            self.trailers = [] if message.get("trailers", False) else None
        elif kind == "http.response.body":
            if self.state == "start":
                raise RuntimeError("ASGI: 'http.response.body' before 'http.response.start'")
            if self.state != "body":
                return          # ASGI HTTP spec: ignored once the response is done
            await self.send_body(message.get("body", b""), message.get("more_body", False))
        elif kind == "http.response.trailers" and self.state == "trailers":
            await self.send_trailers(check_asgi_headers(message.get("headers", [])),
                                     message.get("more_trailers", False))
        elif kind == "http.response.pathsend" and self.state == "body":
            await self.send_path(message["path"])
        elif kind == "http.response.zerocopysend" and self.state != "start":
            # ASGI extensions "Zero Copy Send": it acts as a body message, so
            # once the response is complete it is ignored like one.
            if self.state == "body":
                await self.send_zerocopy(message)
        elif kind == "http.response.early_hint" and self.state != "start":
            await self.send_early_hint(message["links"])
        else:
            raise RuntimeError(f"ASGI: unexpected message type {kind!r} for http "
                               f"(response {self.state})")

    async def send_body(self, body: bytes, more_body: bool) -> None:
        """ASGI "Response Body": the first one takes the held-back head along."""
        if type(body) is not bytes:
            raise TypeError(f"ASGI: body must be bytes, not {type(body).__name__}")
        await self.write_body(self.take_head() + self.response.body(body), more_body)

    def take_head(self) -> bytes:
        """The held-back head, for the first body bytes to go out with; then b""."""
        if not self.head_written and (self.conn.stopping.is_set() or not self.body_done and (
                self.send_continue or not can_drain(self.conn.parser.unread_body()))):
            # RFC 9110 §10.1.1: answering before asking for the body means the
            # client will not send it; a large unread body is not worth
            # skipping; and a draining server answers no more. So: we close.
            self.send_continue = False
            self.response.keep_alive = False
            self.head = self.response.head(*self.start, time.time())
        if self.conn.trace and self.head:
            self.conn.trace.head("<", self.head)
        data, self.head = self.head, b""
        self.head_written = True
        return data

    async def write_body(self, data: bytes, more_body: bool) -> None:
        """Write body bytes; with the last ones, what ends the response."""
        if not more_body and self.trailers is not None:
            self.state = "trailers"          # the end waits for the trailers
        elif not more_body:
            data += self.response.end()
            self.state = "done"
        if data:
            await self.conn.write(data)
        if self.state == "done":
            self.response_done.set()

    async def send_trailers(self, headers: list, more_trailers: bool) -> None:
        """ASGI "HTTP Trailers" extension: fields after the last body bytes.

        RFC 9110 §6.5.1 and §10.1.4: they go on the wire only in a chunked
        response to a client that said "TE: trailers"; otherwise, dropped.
        """
        self.trailers += headers
        if more_trailers:
            return
        wanted = b"trailers" in comma_list(field_values(self.request.headers, b"te"))
        self.state = "done"
        await self.conn.write(self.response.end(self.trailers if wanted else []))
        self.response_done.set()

    async def send_early_hint(self, links) -> None:
        """ASGI "Early Hints" extension: a 103 response ahead of the final one.

        RFC 8297: each link becomes one Link field of an interim response. The
        links are checked like the app's headers (§4 field_line) even when the
        hint is then dropped, so a bad one raises here whoever the client is.
        """
        lines = [STATUS_LINES[103]]
        for link in links:
            if type(link) is not bytes:
                raise TypeError(f"ASGI: early hint links must be bytes: {link!r}")
            lines.append(field_line(b"Link", link))
        # RFC 9110 §15.2: an HTTP/1.0 client gets no 1xx response. Interim
        # responses come before the final one, so once its head is on the wire
        # a hint is too late. Policy: both are dropped without an error, and so
        # is a hint without links, which would tell the client nothing.
        if self.request.version == "1.0" or self.head_written or len(lines) == 1:
            return
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        if self.conn.trace:
            self.conn.trace.head("<", data)
        await self.conn.write(data)

    async def send_zerocopy(self, message: dict) -> None:
        """ASGI "Zero Copy Send" extension: a body message whose bytes are in a file.

        It may come any number of times, between body messages. The file is
        the app's: the server never closes it.
        """
        offset, count = message.get("offset"), message.get("count")
        for value in (offset, count):
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"ASGI: zerocopysend offset and count must be "
                                 f"integers >= 0: {value!r}")
        data = await self.send_file(message["file"], offset, count)
        await self.write_body(data, message.get("more_body", False))

    async def send_path(self, path: str) -> None:
        """ASGI "Path Send" extension: the server sends a file by its path."""
        with open(path, "rb") as file:
            data = await self.send_file(file, 0, None)
        await self.write_body(data, more_body=False)

    async def send_file(self, file, offset: int | None, count: int | None) -> bytes:
        """Send `count` bytes of `file` from `offset` as body bytes, head first.

        ASGI extensions "Zero Copy Send": `offset` None is the file's current
        position, `count` None its end (as is a `count` past it). The file stays
        open, positioned after the last byte sent. Returns what is still to be
        written: the head, if no body bytes went out.
        """
        fd = file.fileno()          # a file of the OS, not a BytesIO: before the head
        if offset is None:
            offset = file.tell()
        left = max(0, os.fstat(fd).st_size - offset)
        count = left if count is None else min(count, left)   # no more than it has
        data = self.take_head()
        response = self.response
        count = response.allow(count)      # §4: none for HEAD; Content-Length overrun
        if not count:
            return data
        if (response.framing == "length" and self.conn.scheme == "http"
                and hasattr(os, "sendfile")):
            # Zero copy (sendfile(2), like §6's FileRegion): only where the file's
            # bytes go out as they are, so not through TLS or chunk framing. A
            # file that ends early sends less; Response.end() then closes.
            if data:
                await self.conn.write(data)
            response.count(await self.conn.sendfile(file, offset, count))
            return b""
        file.seek(offset)
        while count:
            block = file.read(min(count, RECV_BYTES))      # never past `count`
            if not block:
                break               # the file ended early: Response.end() judges
            count -= len(block)
            await self.conn.write(data + response.body(block))
            data = b""
        return data


def check_asgi_status(status) -> int:
    """ASGI HTTP "Response Start": `status` is an int, here a final status.

    Policy: bool is refused although it is an int (True would go out as
    status 1); an int subclass such as HTTPStatus.OK is taken as its value.
    RFC 9110 §15: codes are 100-599, and a 1xx is an interim response, never
    the final one that http.response.start begins (Response.head writes no
    1xx properly: no body, no upgrade), so only 200-599 pass.
    """
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"ASGI: status must be an int, not {type(status).__name__}")
    if not 200 <= status <= 599:
        raise ValueError(f"ASGI: status must be a final status (200-599), not {status}")
    return int(status)


def check_asgi_headers(headers) -> list[tuple[bytes, bytes]]:
    """ASGI HTTP spec: headers are an iterable of [name, value] byte strings."""
    checked = []
    for name, value in headers:
        if type(name) is not bytes or type(value) is not bytes:
            raise TypeError(f"ASGI: header names and values must be bytes: {name!r}")
        checked.append((name, value))
    return checked


# =============================================================================
# §8  ASGI server - asyncio.start_server
#
# One task per connection runs ASGIConnection.run(): wait for a request head,
# run its HTTPCycle, and loop while the connection is kept alive. All reads go
# through read() so that only one is ever waiting on the socket.
# =============================================================================


class ASGIConnection:
    """One client connection on the asyncio path."""

    def __init__(self, server: ASGIServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        """A new connection, idle: waiting for its first request head."""
        self.app = server.app
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.server_address = server.address
        self.stopping = server.stopping
        self.loop = server.loop
        self.state = server.lifespan.state
        self.idle = True             # waiting for a request, not serving one
        self.websocket: WebSocketCycle | None = None
        self.trace = Trace() if self.config.trace else None
        self.idle_since: float | None = None   # waiting for a request since
        peer = writer.get_extra_info("peername")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None  # None: unix
        ssl_object = writer.get_extra_info("ssl_object")
        self.scheme = "https" if ssl_object is not None else "http"
        # ASGI TLS extension: only on a TLS connection; the same for all its requests.
        self.tls = None if ssl_object is None else tls_extension(ssl_object,
                                                                 server.server_cert)
        self.parser = RequestParser(self.config)
        self.pending_read: asyncio.Future | None = None
        self.eof = False
        self.error: HTTPError | None = None
        self.cancelled = False       # the server has cancelled this connection's task

    def cancelled_by_server(self, error: BaseException) -> bool:
        """Whether `error`, raised out of the app, is a cancellation of this
        connection's task (shutdown) rather than a CancelledError of the app's own.

        The server marks the connections it cancels; on Python 3.11+ the task's
        cancelling() count also catches a cancel from outside the server (e.g.
        asyncio.run() on Ctrl+C, where no signal handler could be installed).
        """
        if not isinstance(error, asyncio.CancelledError):
            return False
        cancelling = getattr(asyncio.current_task(), "cancelling", None)   # 3.11+
        return self.cancelled or (cancelling is not None and cancelling() > 0)

    async def run(self, refusal: HTTPError | None = None) -> None:
        """Serve requests until the connection closes; or answer `refusal`."""
        try:
            if refusal is not None:
                raise refusal
            while not self.stopping.is_set():
                self.idle = True
                request = await self.next_request()
                if request is None:
                    break
                self.idle = False
                if is_websocket_request(request):
                    # RFC 6455 §4.2.1; after it, the connection speaks frames.
                    self.websocket = WebSocketCycle(self, request, check_handshake(request))
                    await self.websocket.run()
                    break
                cycle = HTTPCycle(self, request)
                await cycle.run()
                if not cycle.keep_alive:
                    break       # RFC 9112 §9.3, or the body was not all read
        except HTTPError as error:
            data = error_response(error.status, error.reason, time.time(), self.config,
                                  error.headers)
            if self.trace:
                self.trace.head("!", data)
            try:
                await self.write(data)
            except OSError:     # ClientDisconnected, too
                # Policy: a client that is gone before its error answer (e.g. one
                # that reset as its 408 fired) is no server error: DEBUG only.
                log.debug("client left before its %d answer", error.status)
        except (ClientDisconnected, OSError):
            pass
        finally:
            await self.close()

    async def next_request(self) -> Request | None:
        """The next request head, or None if the client leaves or stays idle."""
        loop = self.loop   # not get_running_loop(): that costs a getpid() call
        deadline = loop.time() + self.config.timeout_request_head
        while True:
            event = self.parser.next_event()
            if event is not None:
                return event
            if not self.parser.buffer:
                # RFC 9112 §9.5: an idle connection may be closed; the server's
                # close_idle() does it. (A timer per request cost ~8% in cProfile.)
                self.idle_since = loop.time()
                try:
                    data = await self.read()
                finally:
                    self.idle_since = None
            else:
                try:   # part of a head: it must be complete by the deadline
                    data = await asyncio.wait_for(self.read(), deadline - loop.time())
                except asyncio.TimeoutError:
                    # RFC 9110 §15.5.9: 408 for a head that is too slow (slowloris).
                    raise HTTPError(408, "request head not received in time") from None
            if not data:
                return None       # RFC 9112 §9.5: close quietly, even mid-head
            self.parser.feed(data)

    def scope_for(self, request: Request) -> dict:
        """The scope for a request on this connection, proxies considered (§11)."""
        client, scheme, host = behind_proxy(request, self.client, self.scheme, self.config)
        scope = build_scope(request, self.server_address, client, self.config, self.state,
                            scheme)
        if host:
            scope["headers"] = [[n, host.encode("latin-1") if n == b"host" else v]
                                for n, v in scope["headers"]]
        if self.tls is not None:      # a copy: one request's app may change its own
            scope["extensions"]["tls"] = dict(
                self.tls, client_cert_chain=list(self.tls["client_cert_chain"]))
        if self.trace:
            self.trace.head(">", self.parser.last_head)
            self.trace.mapping("scope", scope)
        return scope

    def start_read(self) -> asyncio.Future:
        """Start (or return) the one read that may wait on the socket."""
        if self.pending_read is None:
            self.pending_read = asyncio.ensure_future(self.reader.read(RECV_BYTES))
        return self.pending_read

    async def read(self) -> bytes:
        """The next bytes from the client; b"" at EOF or on a broken connection."""
        pending, self.pending_read = self.pending_read, None
        try:
            data = await (pending if pending is not None else self.reader.read(RECV_BYTES))
        except OSError:
            data = b""
        self.eof = not data
        return data

    async def write(self, data: bytes) -> None:
        """Write and wait for the socket to drain (backpressure).

        ASGI "Response Body": the server hands the data to the send buffer
        before send() returns; waiting while the buffer is full is what keeps
        a fast app from piling up a slow client's response in memory.
        """
        transport = self.writer.transport
        if transport.is_closing():
            raise ClientDisconnected("the client has disconnected")
        transport.write(data)      # what StreamWriter.write() does, one call less
        try:
            buffered = transport.get_write_buffer_size()
            if buffered == 0:
                return          # all went to the socket (the usual case): no drain()
            if buffered <= transport.get_write_buffer_limits()[1]:
                await self.writer.drain()        # not paused: returns at once
                return
            await asyncio.wait_for(self.writer.drain(), self.config.timeout_write)
        except OSError as error:
            raise ClientDisconnected(str(error)) from error
        except asyncio.TimeoutError:
            transport.abort()     # Limit: the client does not read its response
            raise ClientDisconnected("response not read in time") from None

    async def sendfile(self, file, offset: int, count: int) -> int:
        """Send part of a file with the kernel's sendfile(); the bytes sent.

        Fewer than `count` only if the file ends first. loop.sendfile() waits
        for what write() left in the buffer to go out before it starts.
        """
        transport = self.writer.transport
        if transport.is_closing():
            raise ClientDisconnected("the client has disconnected")
        try:
            return await self.loop.sendfile(transport, file, offset, count)
        except ConnectionError as error:
            raise ClientDisconnected(str(error)) from error

    async def close(self) -> None:
        """RFC 9112 §9.6: send FIN, discard until the client's FIN, then close."""
        if self.pending_read is not None:
            self.pending_read.cancel()
        transport = self.writer.transport
        try:
            if (not self.stopping.is_set()     # shutting down: no lingering
                    and not self.eof and not transport.is_closing()
                    and transport.can_write_eof()):
                transport.write_eof()
                deadline = time.monotonic() + LINGER_SECONDS
                while await asyncio.wait_for(self.reader.read(RECV_BYTES),
                                             max(0.0, deadline - time.monotonic())):
                    pass
        except (OSError, asyncio.TimeoutError):
            pass
        # close() sends what the response left in the buffer first; wait for
        # it, so that a server shutting down does not end the loop before.
        self.writer.close()
        closed = asyncio.ensure_future(self.writer.wait_closed())
        try:
            await asyncio.wait_for(asyncio.shield(closed), self.config.timeout_write)
        except (OSError, asyncio.TimeoutError):
            if not closed.done():     # (it may have closed as the time ran out)
                transport.abort()     # Limit: the client does not read the rest


class ASGIServer:
    """Serves one ASGI app on a listening socket until shutdown() is called."""

    def __init__(self, app, listener: socket.socket, config: Config | None = None,
                 ready=None):
        """`listener` is bound, and listening or not: serve() listens once the
        lifespan startup is complete, then calls `ready()` (if given)."""
        self.config = config or Config()
        self.app = asgi3_app(app, self.config.interface)
        self.listener = listener
        self.ready = ready
        self.address = listen_address(listener)
        self.lifespan = Lifespan(self.app, self.config.lifespan,
                                 self.config.timeout_graceful_shutdown)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.connections: dict[asyncio.Task, ASGIConnection] = {}
        self.forced = False
        self.stop_early = False
        self.starting = threading.Lock()
        self.out_of_fds: float | None = None   # loop time accept() last failed
        self.next_handler = None     # the loop's exception handler before ours
        self.server_cert: str | None = None    # PEM, for the ASGI TLS extension

    async def serve(self) -> None:
        """Start up, accept and serve connections until shutdown(), shut down."""
        with self.starting:          # shutdown() from another thread may race us
            self.stopping = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            if self.stop_early:
                self.stopping.set()  # shutdown() came before serve()
        # Policy: the signal handlers come before the lifespan startup, which
        # may take long or never end: SIGTERM or Ctrl+C during it stops us
        # (start_up()) instead of killing the process.
        self.next_handler = self.loop.get_exception_handler()
        self.loop.set_exception_handler(self.on_loop_error)
        restore_signals = on_signals(self.shutdown, self.loop)
        try:
            # ASGI Lifespan "Startup Complete": no connection is accepted before
            # it. asyncio.start_server() is what calls listen(): a listener that
            # make_listener() only bound refuses clients until then.
            if not await self.start_up():
                return
            tls = {}
            if self.config.ssl_certfile:
                tls = {"ssl": make_ssl_context(self.config),
                       "ssl_handshake_timeout": self.config.timeout_request_head}
                self.server_cert = read_server_cert(self.config.ssl_certfile)
            # Limit: asyncio's `backlog` is also how many accept() calls it makes
            # per wake-up, and it goes on calling after one fails for want of
            # descriptors, each failure scheduling one more retry: their number
            # grows every second. With 1 there is one retry at a time, and one
            # accept() per turn of the loop. asyncio also calls listen() with it,
            # so we listen() again with --backlog, which the kernel then uses.
            server = await asyncio.start_server(self.handle, sock=self.listener,
                                                limit=RECV_BYTES, backlog=1, **tls)
            self.listener.listen(self.config.backlog)
            if self.ready is not None:
                self.ready()
            sweeper = asyncio.ensure_future(self.close_idle())
            async with server:
                await self.stopping.wait()
                server.close()          # stop accepting now ...
                await self.drain()      # ... and drain before __aexit__: since Python
                #                         3.12 it waits for every connection to close
            sweeper.cancel()
            if not self.forced:
                await self.lifespan.shutdown()
        finally:
            restore_signals()           # a handler must not outlive the loop
            self.loop.set_exception_handler(self.next_handler)

    async def start_up(self) -> bool:
        """Run the lifespan startup until it completes (True) or shutdown() comes
        first (False). Raises LifespanFailure if the app could not start."""
        started = False
        if not self.stopping.is_set():        # else shutdown() came before serve()
            startup = asyncio.ensure_future(self.lifespan.startup())
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                started = startup.done()
                if not started:
                    startup.cancel()
                    self.lifespan.abandon()
        if started:
            startup.result()          # raises LifespanFailure if it failed
            return True
        # Policy: a shutdown during the startup is obeyed at once: the server
        # stops without serving, and the command line exits 0 as after any
        # requested stop. ASGI Lifespan "Shutdown" follows a completed startup
        # only, so lifespan.shutdown is not sent.
        log.warning("shutdown requested during the application startup: "
                    "stopping without serving")
        return False

    async def close_idle(self) -> None:
        """Close connections idle for longer than --timeout-keep-alive, every tick;
        every MEMORY_TRIM_SECONDS, give free heap pages back (release_memory)."""
        timeout = self.config.timeout_keep_alive
        last_trim = self.loop.time()
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            now = self.loop.time()
            for conn in list(self.connections.values()):
                if conn.idle_since is not None and now - conn.idle_since > timeout:
                    conn.writer.transport.abort()    # its read() returns b""
            if now - last_trim >= MEMORY_TRIM_SECONDS:
                release_memory()      # §6: the heap's free pages, back to the system
                last_trim = now

    async def drain(self) -> None:
        """Graceful shutdown: close idle connections, let busy ones finish."""
        for task, conn in list(self.connections.items()):
            if conn.idle:
                self.cancel(task)
            elif conn.websocket is not None:   # RFC 6455 §7.4.1: 1001 "going away"
                asyncio.ensure_future(conn.websocket.close(1001, "server shutting down"))
        busy = list(self.connections)
        if busy:
            await asyncio.wait(busy, timeout=self.config.timeout_graceful_shutdown)
        for task in list(self.connections):
            self.cancel(task)   # out of time: cut them off
        await asyncio.gather(*self.connections, return_exceptions=True)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's exception handler while we serve.

        asyncio reports an accept() that ran out of descriptors with a
        traceback, and again at each retry (constants.ACCEPT_RETRY_DELAY, a
        second, during which new clients wait in the backlog). Say it once
        until a connection is accepted again; pass everything else on.
        """
        error = context.get("exception")
        if (context.get("message") == "socket.accept() out of system resource"
                and isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS):
            if self.out_of_fds is None:
                log.warning("%s: not accepting for now", out_of(error))
            self.out_of_fds = loop.time()
        elif self.next_handler is not None:
            self.next_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Serve one accepted connection, unless it is dead already."""
        if (self.out_of_fds is not None and self.loop.time() - self.out_of_fds
                >= asyncio.constants.ACCEPT_RETRY_DELAY):
            # Accepted by a retry, not before the failure (those come here
            # within a few turns of the loop).
            self.out_of_fds = None
            log.info("accepting connections again")
        if not set_nodelay(writer.get_extra_info("socket")):
            log.debug("closed a new connection at once: reset before it was served")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        conn = ASGIConnection(self, reader, writer)
        self.connections[task] = conn
        refusal = None
        limit = self.config.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            # Limit: RFC 9110 §15.6.4, 503 while we have too many clients.
            refusal = HTTPError(503, "too many connections")
        try:
            await conn.run(refusal)
        except asyncio.CancelledError:
            pass           # shutdown() cancelled us; the connection is closed
        except Exception:  # a bug of ours: log it, keep serving the others
            log.exception("internal error on a connection")
        finally:
            del self.connections[task]
            if not writer.transport.is_closing():
                writer.transport.abort()   # cancelled mid-close: never leave it open

    def shutdown(self) -> None:
        """Runs on: any thread. Stop gracefully; a second call stops at once."""
        with self.starting:
            if self.loop is None:
                self.stop_early = True
                return
        try:
            self.loop.call_soon_threadsafe(self._stop)
        except RuntimeError:
            pass            # the loop has already ended: nothing is left to stop

    def _stop(self) -> None:
        """Runs on: the loop. Start the drain; if it has begun, cut off every connection."""
        if self.stopping.is_set():
            self.forced = True
            for task in self.connections:
                self.cancel(task)
        self.stopping.set()

    def cancel(self, task: asyncio.Task) -> None:
        """Cancel a connection's task, marked so that the CancelledError it gets is
        not taken for one the app raised (ASGIConnection.cancelled_by_server)."""
        self.connections[task].cancelled = True
        task.cancel()


# =============================================================================
# §9  WebSocket - RFC 6455, RFC 7692, ASGI "HTTP & WebSocket" spec
#
# A pure codec (bytes in, values out), then WebSocketCycle: ASGI over asyncio.
# =============================================================================

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 §4.2.2 item 5.4
# RFC 6455 §5.2's frame: FIN RSV1-3 opcode(4) | MASK length(7) | length | key
FIN, RSV1, RSV23, OPCODE, MASKED, LENGTH7 = 0x80, 0x40, 0x30, 0x0F, 0x80, 0x7F
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
UTF8_DECODER = codecs.getincrementaldecoder("utf-8")   # RFC 6455 §5.6: text is UTF-8
# RFC 6455 §7.4.1 and IANA's 1012-1014; not 1004, nor 1005, 1006, 1015 (app-only)
SENDABLE_CLOSE_CODES = {*range(1000, 1004), *range(1007, 1015)}
# RFC 7692 §7.1's parameters, but no server_max_window_bits=8: zlib cannot make it
DEFLATE_PARAMETER = re.compile(
    rb"(server|client)_no_context_takeover|server_max_window_bits=0*(9|1[0-5])"
    rb"|client_max_window_bits(=0*(8|9|1[0-5]))?")


def sendable_close_code(code: int) -> bool:
    """RFC 6455 §7.4: checked both ways: a client's Close, the app's close."""
    return code in SENDABLE_CLOSE_CODES or 3000 <= code < 5000   # RFC 6455 §7.4.2


class WebSocketError(Exception):
    """The client broke RFC 6455; `code` is the close code to fail it with."""

    def __init__(self, code: int, reason: str) -> None:
        """`code` is the close code to send (RFC 6455 §7.4.1); `reason` says why."""
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def websocket_accept(key: bytes) -> bytes:
    """RFC 6455 §4.2.2 item 5.4: the Sec-WebSocket-Accept value for this key.
    >>> websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==")     # RFC 6455 §1.3's example
    b's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
    """
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


def is_websocket_request(request: Request) -> bool:
    """RFC 6455 §4.2.1 item 3; RFC 9110 §7.8: a 1.0 request's Upgrade is ignored."""
    upgrade = comma_list(field_values(request.headers, b"upgrade"))
    return request.version != "1.0" and b"websocket" in upgrade


def check_handshake(request: Request) -> bytes:
    """RFC 6455 §4.2.1: the key, or an HTTPError; Origin: the app's (RFC 6455 §10.2)."""
    if request.method != "GET" or request.version != "1.1":   # RFC 6455 §4.2.1 item 1
        raise HTTPError(400, "a WebSocket handshake is a GET over HTTP/1.1")
    if b"upgrade" not in comma_list(field_values(request.headers, b"connection")):
        raise HTTPError(400, "a WebSocket handshake needs 'Connection: Upgrade'")
    versions = field_values(request.headers, b"sec-websocket-version")   # item 6
    if len(versions) != 1:
        raise HTTPError(400, "exactly one Sec-WebSocket-Version is required")
    if versions != [b"13"]:   # RFC 6455 §4.2.2 /version/; RFC 9110 §15.5.22: a 426
        raise HTTPError(426, "Sec-WebSocket-Version must be 13", (
            (b"Sec-WebSocket-Version", b"13"), (b"Upgrade", b"websocket")))
    keys = field_values(request.headers, b"sec-websocket-key")   # item 5: 16 bytes
    if len(keys) != 1 or not re.fullmatch(rb"[A-Za-z0-9+/]{22}==", keys[0]):
        raise HTTPError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return keys[0]


def encode_length(size: int) -> bytes:
    """RFC 6455 §5.2 "Payload length" in its shortest form, without MASK."""
    if size <= 125:                 # 7-bit form: the length itself
        return bytes([size])
    if size <= 0xFFFF:              # 16-bit form: 126, then the length in 2 bytes
        return bytes([126]) + size.to_bytes(2, "big")
    return bytes([127]) + size.to_bytes(8, "big")   # 64-bit form: 127, then 8 bytes


def encode_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    r"""RFC 6455 §5.2: one final frame, unmasked (RFC 6455 §5.1). RFC 6455 §5.7:
    >>> encode_frame(OP_TEXT, b"Hello")
    b'\x81\x05Hello'
    >>> [encode_length(size).hex(" ") for size in (5, 256, 65536)]   # three forms
    ['05', '7e 01 00', '7f 00 00 00 00 00 01 00 00']
    """
    first = FIN | (RSV1 if rsv1 else 0) | opcode    # RFC 7692 §6: RSV1, compressed
    return bytes([first]) + encode_length(len(payload)) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """RFC 6455 §5.5.1: a Close frame; 1005 (RFC 6455 §7.1.5) is an empty one."""
    body = b"" if code == 1005 else code.to_bytes(2, "big") + reason.encode("utf-8")
    return encode_frame(OP_CLOSE, body)


def unmask(payload: bytes, key: bytes) -> bytes:
    r"""RFC 6455 §5.3: "j = i MOD 4; transformed-octet-i = original-octet-i XOR
    masking-key-octet-j", as written on the left (and unmasking is the same XOR):
    >>> key, masked = b"\x37\xfa\x21\x3d", b"\x7f\x9f\x4d\x51\x58"  # RFC 6455 §5.7
    >>> bytes(octet ^ key[i % 4] for i, octet in enumerate(masked)), unmask(masked, key)
    (b'Hello', b'Hello')
    """
    mask = (key * (len(payload) // 4 + 1))[:len(payload)]   # octet i is key[i MOD 4]
    return xor_bytes(payload, mask)


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """a XOR b, octet by octet (equal lengths)."""
    # As two big integers: one loop in C instead of a Python step per octet.
    number = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return number.to_bytes(len(a), "little")


class PerMessageDeflate:
    """RFC 7692: permessage-deflate, each message compressed with raw DEFLATE."""

    def __init__(self, reset_each_message: bool, window_bits: int = 15) -> None:
        """server_no_context_takeover, server_max_window_bits (RFC 7692 §7.1)."""
        self.reset, self.window_bits = reset_each_message, window_bits
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
        self.decompressor = zlib.decompressobj(-15)   # takes any smaller window

    @staticmethod
    def negotiate(offers: list[bytes]) -> tuple[PerMessageDeflate | None, bytes]:
        """RFC 7692 §5 and RFC 7692 §5.1: (codec, answer) for the first good offer."""
        for offer in comma_list(offers):
            name, *params = [p.strip(b" \t") for p in offer.split(b";")]
            pairs = [[part.strip(b' \t"') for part in p.split(b"=", 1)] for p in params]
            values = {pair[0]: pair[1] if len(pair) > 1 else None for pair in pairs}
            if (name != b"permessage-deflate" or len(values) != len(pairs) or not
                    all(DEFLATE_PARAMETER.fullmatch(b"=".join(p)) for p in pairs)):
                continue
            window = int(values.get(b"server_max_window_bits") or 15)
            answer = [b"permessage-deflate"]   # RFC 7692 §7.1.2.2: no client bits
            if b"server_max_window_bits" in values:     # RFC 7692 §7.1.2.1
                answer.append(b"server_max_window_bits=%d" % window)
            flags = (b"server_no_context_takeover", b"client_no_context_takeover")
            answer += [flag for flag in flags if flag in values]   # RFC 7692 §7.1.1
            codec = PerMessageDeflate(b"server_no_context_takeover" in values, window)
            return codec, b"; ".join(answer)
        return None, b""

    def compress(self, data: bytes) -> bytes:
        """RFC 7692 §7.2.1: one message, deflated (afresh, if reset)."""
        if self.reset:
            self.compressor = zlib.compressobj(6, zlib.DEFLATED, -self.window_bits)
        data = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]       # RFC 7692 §7.2.1: drop the final 00 00 FF FF

    def decompress(self, data: bytes, limit: int, final: bool) -> bytes:
        """RFC 7692 §7.2.2: one frame's payload, inflated: at most `limit` bytes."""
        data += b"\x00\x00\xff\xff" if final else b""   # RFC 7692 §7.2.2: put it back
        try:
            out = self.decompressor.decompress(data, limit + 1)
        except zlib.error:         # RFC 6455 §7.4.1: 1007, data "not consistent"
            raise WebSocketError(1007, "invalid compressed data") from None
        if len(out) > limit or self.decompressor.unconsumed_tail:   # a bomb, too
            raise WebSocketError(1009, "message too big")
        if self.decompressor.eof:   # RFC 7692 §7.2.3.4: a BFINAL block; a new stream
            if self.decompressor.unused_data not in (b"", b"\x00\x00\xff\xff"):
                raise WebSocketError(1007, "data after the final DEFLATE block")
            self.decompressor = zlib.decompressobj(-15)
        return out


class FrameParser:
    r"""RFC 6455 frames from a client in, whole messages out: ("text", str),
    ("bytes", bytes), ("ping", b), ("pong", b), ("close", code, reason).
        between messages --text/binary, FIN=0--> inside a message
          |  ^   ^                                  |   |   ^
          |  |   +------- continuation, FIN=1 ------+   +---+ continuation, FIN=0
          +--+ text/binary, FIN=1                      (RFC 6455 §5.4)
    Control frames come out at once. `kind` is None between messages (and
    `parts` empty), else "text" or "bytes"; a first frame sets `compressed`
    (RSV1, RFC 7692 §6.1), `size` and a UTF-8 `decoder`. Errors: 1002 (against
    RFC 6455 §5), 1007 (not UTF-8, not DEFLATE), 1009 (over `max_size`).
    >>> parser = FrameParser(max_size=1000)
    >>> parser.feed(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")  # RFC 6455 §5.7
    >>> parser.feed(b"\x8a\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")  # masked Pong
    >>> parser.next_message(), parser.next_message(), parser.next_message()
    (('text', 'Hello'), ('pong', b'Hello'), None)
    """

    def __init__(self, max_size: int, deflate: PerMessageDeflate | None = None) -> None:
        """An empty buffer, between messages."""
        self.buffer, self.max_size, self.deflate = bytearray(), max_size, deflate
        self.kind, self.parts = None, []

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client."""
        self.buffer += data

    def next_message(self) -> tuple | None:
        """RFC 6455 §5.2: take whole frames off the buffer until one ends a message."""
        buffer = self.buffer
        while len(buffer) >= 2:
            if not buffer[1] & MASKED:   # RFC 6455 §5.1: a client MUST mask frames
                raise WebSocketError(1002, "frames from a client must be masked")
            size = buffer[1] & LENGTH7   # RFC 6455 §5.2 "Payload length", three forms:
            if size == 126:              # 16-bit: 2 more bytes, then the masking key
                key_at, size = 4, int.from_bytes(buffer[2:4], "big")
            elif size == 127:            # 64-bit: 8 more bytes, then the masking key
                key_at, size = 10, int.from_bytes(buffer[2:10], "big")
            else:                        # 7-bit: the length itself
                key_at = 2
            if len(buffer) < key_at:
                return None
            if size >> 63:               # RFC 6455 §5.2: "the most significant bit
                raise WebSocketError(1002, "invalid frame length")   # MUST be 0"
            if encode_length(size)[0] != buffer[1] & LENGTH7:   # Policy: RFC 6455 §5.2
                raise WebSocketError(1002, "frame length not minimally encoded")
            if size > self.max_size:     # Limit: --ws-max-size (RFC 6455 §10.4)
                raise WebSocketError(1009, "message too big")
            end = key_at + 4 + size
            if len(buffer) < end:
                return None
            first, key = buffer[0], bytes(buffer[key_at:key_at + 4])
            payload = unmask(bytes(buffer[key_at + 4:end]), key)
            del buffer[:end]
            message = self._on_frame(first, first & OPCODE, payload)
            if message is not None:
                return message
        return None

    def _on_frame(self, first: int, opcode: int, payload: bytes) -> tuple | None:
        """RFC 6455 §5.4: a control message, a finished data message, or None."""
        rsv1 = bool(first & RSV1)
        if first & RSV23 or (rsv1 and (self.deflate is None or opcode not in
                                       (OP_TEXT, OP_BINARY))):
            raise WebSocketError(1002, "reserved bits set")   # RFC 6455 §5.2
        if opcode >= OP_CLOSE:
            return self._on_control(first, opcode, payload)
        if opcode == OP_CONTINUATION:
            if self.kind is None:        # RFC 6455 §5.4: nothing to continue
                raise WebSocketError(1002, "continuation of nothing")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self.kind is not None:    # RFC 6455 §5.4: no interleaved messages
                raise WebSocketError(1002, "new message inside a fragmented one")
            self.kind = "text" if opcode == OP_TEXT else "bytes"
            self.compressed, self.size = rsv1, 0
            self.decoder = UTF8_DECODER() if opcode == OP_TEXT else None
        else:               # RFC 6455 §5.2: 0x3-0x7 are reserved non-control opcodes
            raise WebSocketError(1002, f"unknown opcode {opcode}")
        final = bool(first & FIN)
        if self.compressed:
            payload = self.deflate.decompress(payload, self.max_size - self.size, final)
        self.size += len(payload)
        if self.size > self.max_size:    # Limit: --ws-max-size (RFC 6455 §10.4)
            raise WebSocketError(1009, "message too big")
        if self.kind == "text":
            try:      # RFC 6455 §8.1: text is UTF-8; fail fast, even mid-message
                payload = self.decoder.decode(payload, final)
            except UnicodeDecodeError:
                raise WebSocketError(1007, "invalid UTF-8 in a text message") from None
        self.parts.append(payload)
        if not final:
            return None
        message = (self.kind, ("" if self.kind == "text" else b"").join(self.parts))
        self.kind, self.parts = None, []
        return message

    def _on_control(self, first: int, opcode: int, payload: bytes) -> tuple:
        """RFC 6455 §5.5: a Ping, Pong or Close frame, as a message."""
        if len(payload) > 125 or not first & FIN:   # RFC 6455 §5.5: short, one frame
            raise WebSocketError(1002, "control frames are short and not fragmented")
        if opcode in (OP_PING, OP_PONG):
            return ("ping" if opcode == OP_PING else "pong", payload)
        if opcode != OP_CLOSE:           # RFC 6455 §5.2: 0xB-0xF are reserved too
            raise WebSocketError(1002, f"unknown opcode {opcode}")
        if not payload:
            return ("close", 1005, "")   # RFC 6455 §7.1.5: "no status code"
        code = int.from_bytes(payload[:2], "big")   # RFC 6455 §5.5.1: a code, a reason
        if len(payload) == 1 or not sendable_close_code(code):
            raise WebSocketError(1002, "invalid close code")    # RFC 6455 §7.4.1
        try:
            return ("close", code, payload[2:].decode("utf-8"))   # RFC 6455 §8.1
        except UnicodeDecodeError:
            raise WebSocketError(1007, "invalid UTF-8 in a close reason") from None


class WebSocketCycle:
    """One WebSocket connection on the ASGI path (ASGI "HTTP & WebSocket" spec,
    "WebSocket"). Its `state`:
        connecting -> open      websocket.accept: the 101 (accept())
        connecting -> denying   websocket.http.response.start (deny()), and
                   -> closed    at its last body
        connecting -> closed    websocket.close, or the app ends: HTTP 403 (500
                                if it raised) instead of the 101 (end())
        open -> closing         close(): we send Close, and wait
        open, closing -> closed the client's Close, TCP lost, a failure, time out
    The client closes first: we answer with its code (RFC 6455 §5.5.1) and close
    TCP; the app gets that code (1005: none). We close first, in close(): the
    app's code (default 1000), 1000 or 1011 as the app returns or raises, 1001
    at shutdown (section 8, ASGI server), 1011 for a Ping without Pong; we wait
    WS_CLOSE_SECONDS for the client's Close, then close TCP (RFC 6455 §7.1.1).
    To fail (RFC 6455 §7.1.7), close(wait=False) sends FrameParser's code (1011
    for our bugs) and closes at once. No Close at all: 1006. close() waits for
    `closed`, keep_alive() for `pong`; receive() repeats `last_event` at the end;
    `tasks` are the reader and the pinger, `denial` a denial's Response.
    """

    def __init__(self, conn: ASGIConnection, request: Request, key: bytes) -> None:
        """A handshake not answered yet; ASGI "Connect - receive event" is queued."""
        self.conn, self.request, self.key = conn, request, key
        self.state = "connecting"
        offers = field_values(request.headers, b"sec-websocket-extensions")
        self.deflate, self.deflate_answer = PerMessageDeflate.negotiate(
            offers if conn.config.ws_per_message_deflate else [])
        self.parser = FrameParser(conn.config.ws_max_size, self.deflate)
        self.inbox = asyncio.Queue(maxsize=WS_QUEUE)   # Limit: full, we stop reading
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.closed, self.pong = asyncio.Event(), asyncio.Event()
        self.tasks, self.denial = [], None
        protocols = b",".join(field_values(request.headers, b"sec-websocket-protocol"))
        self.offered = [p.strip(" \t") for p in protocols.decode("latin-1").split(",")
                        if p.strip(" \t")]    # RFC 6455 §4.2.1 item 8: case-sensitive
        self.last_event = {"type": "websocket.disconnect", "code": 1006, "reason": ""}

    def scope(self) -> dict:
        """ASGI "Websocket Connection Scope", with "WebSocket Denial Response"."""
        scope = self.conn.scope_for(self.request)
        tls = {k: v for k, v in scope["extensions"].items() if k == "tls"}  # on wss too
        scheme = "wss" if scope["scheme"] == "https" else "ws"
        scope.update(type="websocket", scheme=scheme, subprotocols=self.offered,
                     asgi={"version": "3.0", "spec_version": "2.5"},
                     extensions={"websocket.http.response": {}, **tls})
        return scope

    async def run(self) -> None:
        """Call the app; then refuse or close, by how it ended (see end())."""
        try:
            receive, send = self.receive, self.send
            if self.conn.trace:
                receive, send = traced(self.conn.trace, receive, send)
            await self.conn.app(self.scope(), receive, send)
        except ClientDisconnected:
            pass
        except BaseException as error:
            if self.conn.cancelled_by_server(error):
                raise
            log.exception("error in ASGI websocket app")    # ASGI "Error Handling"
            await self.end(500, 1011)
        else:
            await self.end(403, 1000)
        finally:
            for task in self.tasks:
                task.cancel()

    async def end(self, status: int, code: int) -> None:
        """ASGI "Close - send event": refuse the handshake, end a denial, or close."""
        if self.state == "connecting":
            await self.conn.write(error_response(status, "WebSocket refused",
                                                 time.time(), self.conn.config))
            self.state = "closed"
        elif self.state == "denying":
            await self.conn.write(self.denial.end())
        elif self.state == "open":
            await self.close(code, "")

    async def receive(self) -> dict:
        """ASGI "Receive - receive event"s, then "Disconnect", repeated (last_event)."""
        if self.state == "closed" and self.inbox.empty():
            return self.last_event
        self.last_event = await self.inbox.get()
        return self.last_event

    async def send(self, message: dict) -> None:
        """ASGI websocket send(): each event in its states (see the class docstring)."""
        kind = message["type"]
        if self.state in ("closing", "closed"):   # ASGI "Disconnected Client - send
            raise ClientDisconnected("the WebSocket is closed")   # exception"
        if kind == "websocket.accept" and self.state == "connecting":
            await self.accept(message)
        elif kind == "websocket.send" and self.state == "open":     # ASGI "Send - send
            data, text = message.get("bytes"), message.get("text")  # event"
            if (data is None) == (text is None):
                raise RuntimeError("ASGI: websocket.send needs exactly one of bytes "
                                   "and text")
            opcode = OP_BINARY if text is None else OP_TEXT
            payload = data if text is None else text.encode()
            if self.deflate is not None:                            # RFC 7692 §6.1
                payload = self.deflate.compress(payload)
            await self.conn.write(encode_frame(opcode, payload, bool(self.deflate)))
        elif kind == "websocket.close" and self.state == "connecting":
            await self.end(403, 1000)           # ASGI "Close - send event", too
        elif kind == "websocket.close" and self.state == "open":
            code, reason = message.get("code", 1000), message.get("reason") or ""
            if not sendable_close_code(code) or len(reason.encode("utf-8")) > 123:
                raise ValueError(f"invalid WebSocket close: {code} {reason!r}")
            await self.close(code, reason)      # RFC 6455 §5.5: 2 + 123 <= 125 bytes
        elif kind.startswith("websocket.http.response.") and self.state in (
                "connecting", "denying"):
            await self.deny(message)
        else:        # ASGI "Connect - receive event": nothing is sent before accept
            raise RuntimeError(f"ASGI: unexpected {kind!r} while the WebSocket is "
                               f"{self.state}")

    async def accept(self, message: dict) -> None:
        """ASGI "Accept - send event": the 101 (RFC 6455 §4.2.2 item 5); then read
        frames, the first perhaps sent before the client had the 101."""
        headers = check_asgi_headers(message.get("headers", []))
        if any(name.lower() == b"sec-websocket-protocol" for name, _ in headers):
            raise RuntimeError("ASGI: use 'subprotocol', not a sec-websocket-protocol "
                               "header")
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                 b"Connection: Upgrade",
                 b"Sec-WebSocket-Accept: " + websocket_accept(self.key)]
        subprotocol = message.get("subprotocol")
        if subprotocol is not None and subprotocol not in self.offered:
            # Policy: RFC 6455 §4.2.2 has the server pick one the client offered.
            raise RuntimeError(f"ASGI: subprotocol {subprotocol!r} was not offered")
        if subprotocol is not None:
            lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1"))
        if self.deflate is not None:                  # RFC 7692 §5
            lines.append(b"Sec-WebSocket-Extensions: " + self.deflate_answer)
        lines += [field_line(name, value) for name, value in headers]
        await self.conn.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.state = "open"
        self.parser.feed(bytes(self.conn.parser.buffer))   # Leniency: RFC 6455 §4.1
        self.conn.parser.buffer.clear()
        self.tasks.append(asyncio.ensure_future(self.read_frames()))
        if self.conn.config.ws_ping_interval:
            self.tasks.append(asyncio.ensure_future(self.keep_alive()))

    async def deny(self, message: dict) -> None:
        """ASGI "WebSocket Denial Response" extension: answer with plain HTTP."""
        if message["type"] == "websocket.http.response.start" and self.denial is None:
            status = check_asgi_status(message["status"])   # checked as for http,
            headers = check_asgi_headers(message.get("headers", []))   # before changes
            self.denial = Response("GET", "1.1", False, self.conn.config)  # then close
            self.state = "denying"
            await self.conn.write(self.denial.head(status, headers, time.time()))
        elif message["type"] == "websocket.http.response.body" and self.denial:
            await self.conn.write(self.denial.body(message.get("body", b"")))
            if not message.get("more_body", False):
                await self.conn.write(self.denial.end())
                self.state = "closed"
        else:
            raise RuntimeError(f"ASGI: unexpected {message['type']!r}")

    async def close(self, code: int, reason: str, wait: bool = True) -> None:
        """RFC 6455 §7.1.2: send Close, then wait for the client's (class docstring)."""
        if wait:
            if self.state != "open":
                return
            self.state = "closing"
        try:
            await self.conn.write(encode_close(code, reason))
            if wait:
                await asyncio.wait_for(self.closed.wait(), WS_CLOSE_SECONDS)
        except (ClientDisconnected, asyncio.TimeoutError):
            pass
        await self.disconnected(code, reason)

    async def disconnected(self, code: int, reason: str) -> None:
        """Close TCP, and tell the app, once (ASGI "Disconnect - receive event")."""
        if self.state != "closed":
            self.state = "closed"
            self.closed.set()
            self.conn.writer.transport.close()
            await self.inbox.put({"type": "websocket.disconnect", "code": code,
                                  "reason": reason})

    async def read_frames(self) -> None:
        """ASGI "WebSocket": whole messages for the app; Pongs; the client's Close."""
        try:
            while self.state in ("open", "closing"):
                message = self.parser.next_message()
                if message is None:
                    self.parser.feed(await self.conn.read())
                    if self.conn.eof:         # b"": TCP closed (RFC 6455 §7.1.5: 1006)
                        raise ClientDisconnected("the client has disconnected")
                elif message[0] == "ping":    # RFC 6455 §5.5.2: a Pong with its data
                    await self.conn.write(encode_frame(OP_PONG, message[1]))
                elif message[0] == "pong":    # RFC 6455 §5.5.3: maybe unsolicited;
                    self.pong.set()           # either way, the client is alive
                elif message[0] == "close":
                    if self.state == "open":  # RFC 6455 §5.5.1: answer with its code
                        await self.conn.write(encode_close(message[1]))
                    await self.disconnected(message[1], message[2])
                elif self.state == "open":    # ASGI "Receive - receive event"
                    await self.inbox.put({"type": "websocket.receive",
                                          message[0]: message[1]})
        except WebSocketError as error:
            await self.close(error.code, error.reason, wait=False)
        except ClientDisconnected:            # RFC 6455 §7.1.5: no Close frame
            await self.disconnected(1006, "")
        except Exception:    # a bug of ours: end this connection, not the app's wait
            log.exception("internal error while reading WebSocket frames")
            await self.close(1011, "internal error", wait=False)

    async def keep_alive(self) -> None:
        """ASGI "WebSocket": the server pings. Policy: no Pong in time: 1011."""
        config = self.conn.config
        while self.state == "open":
            await asyncio.sleep(config.ws_ping_interval)
            self.pong.clear()
            await self.conn.write(encode_frame(OP_PING, b""))
            try:
                await asyncio.wait_for(self.pong.wait(), config.ws_ping_timeout)
            except asyncio.TimeoutError:
                await self.close(1011, "keepalive ping timeout")


# =============================================================================
# §10  Lifespan - ASGI Lifespan spec
#
# One app call with a "lifespan" scope brackets the server's whole life: the
# app gets "lifespan.startup" before the first connection is accepted and
# "lifespan.shutdown" after the last one is done.
# =============================================================================


# Policy: the exit status of a lifespan that goes wrong, which run_workers()
# passes on. 3: the app could not start (lifespan.startup.failed, or it raised
# with --lifespan on). 4: it could not stop (shutdown.failed, or no answer).
EXIT_STARTUP_FAILED = 3
EXIT_SHUTDOWN_FAILED = 4


class LifespanFailure(Exception):
    """The app could not start or stop; `status` is the exit status to end with."""

    def __init__(self, message: str, status: int = EXIT_STARTUP_FAILED) -> None:
        """`message` is logged as it is; `status` is an EXIT_* above."""
        super().__init__(message)
        self.status = status


class Lifespan:
    """ASGI Lifespan spec: startup() before serving, shutdown() after, around one
    app call, run(). startup() sends lifespan.startup; then, from "starting":
        starting -> running      lifespan.startup.complete: serve
        starting -> exit 3       lifespan.startup.failed
        starting -> unsupported  the app raised: serve without lifespan (exit 3
                                 with --lifespan on, for an app that needs it)
        running -> stopping      shutdown() sends lifespan.shutdown
        stopping -> done         lifespan.shutdown.complete, or the app returned
        stopping -> exit 4       lifespan.shutdown.failed, or no answer in time
    --lifespan "auto" carries on when the app raises: an app written without
    lifespan may well raise on a scope type it does not know. "off" skips it.
    `started` and `stopped` are set at the end of starting and of stopping (or
    of the app's call); `state` is the app's (ASGI Lifespan "Lifespan State"):
    section 7 (ASGI HTTP adapter) gives each scope a shallow copy.
    """

    def __init__(self, app, mode: str = "auto",
                 timeout: float = GRACEFUL_SECONDS) -> None:
        """`mode` is --lifespan; `timeout` bounds the wait for the shutdown's answer."""
        self.app, self.mode, self.timeout = app, mode, timeout
        self.state: dict = {}
        self.task = self.inbox = self.started = self.stopped = None   # see startup()
        self.failure: str | None = None    # the message of a *.failed event
        self.stopping = False              # lifespan.shutdown was sent
        self.supported = mode != "off"

    async def startup(self) -> None:
        """ASGI Lifespan "Startup - receive event"; raises LifespanFailure."""
        if not self.supported:
            return
        # Made here, on the serving loop: an asyncio object belongs to one loop.
        self.inbox = asyncio.Queue()
        self.started, self.stopped = asyncio.Event(), asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run())
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started.wait()
        if self.failure is not None:     # ASGI Lifespan "Startup Failed - send event"
            raise LifespanFailure(f"application startup failed: {self.failure}")
        if not self.supported and self.mode == "on":
            raise LifespanFailure("application startup failed: the app raised, "
                                  "and --lifespan on requires it")

    def abandon(self) -> None:
        """The server stops before the startup completed: cancel the app's call."""
        if self.task is not None:
            self.task.cancel()

    async def shutdown(self) -> None:
        """ASGI Lifespan "Shutdown - receive event"; raises LifespanFailure."""
        if not self.supported or self.stopped.is_set():
            return
        self.stopping = True
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:    # ASGI Lifespan "Shutdown Complete - send event", waited for
            await asyncio.wait_for(self.stopped.wait(), self.timeout)
        except asyncio.TimeoutError:
            # Policy: no answer in time is a failed shutdown: nothing says the
            # app's cleanup ran. Its lifespan call is cancelled.
            self.task.cancel()
            raise LifespanFailure(f"application shutdown did not complete within "
                                  f"{self.timeout:g} s (--timeout-graceful-shutdown)",
                                  EXIT_SHUTDOWN_FAILED) from None
        if self.failure is not None:     # ASGI Lifespan "Shutdown Failed - send event"
            raise LifespanFailure(f"application shutdown failed: {self.failure}",
                                  EXIT_SHUTDOWN_FAILED)

    async def run(self) -> None:
        """The app's call, with the scope of ASGI Lifespan "Scope"."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        try:
            await self.app(scope, self.inbox.get, self.send)
        except Exception as error:
            # ASGI Lifespan "Scope": if the app raises before its startup is over,
            # "the server must continue but not send any lifespan events".
            self.supported = self.started.is_set()
            if self.supported:
                log.exception("error in ASGI lifespan")
            elif self.mode == "on":
                log.error("ASGI lifespan startup raised: %r", error)
            else:
                log.info("ASGI 'lifespan' protocol appears unsupported")
        finally:
            self.started.set()
            self.stopped.set()

    async def send(self, message: dict) -> None:
        """The app's answers, each in its turn; others raise (ASGI "Error Handling")."""
        kind = message["type"]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            event = self.started
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            event = self.stopped if self.stopping else None
        else:
            event = None
        if event is None or event.is_set():
            raise RuntimeError(f"ASGI lifespan: unexpected message {kind!r}")
        if kind.endswith(".failed"):
            self.failure = message.get("message", "")
        event.set()


def asgi3_app(app, interface: str = "auto"):
    """ASGI spec, "Legacy Applications": wrap an ASGI 2 (double-callable) app."""
    call = getattr(app, "__call__", None)
    single = not inspect.isclass(app) and (inspect.iscoroutinefunction(app)
                                           or inspect.iscoroutinefunction(call))
    if interface == "asgi3" or (interface == "auto" and single):
        return app                          # already ASGI 3: app(scope, receive, send)

    async def asgi3(scope, receive, send):
        """The ASGI 3 call: make the ASGI 2 instance for this scope, then await it."""
        await app(scope)(receive, send)
    return asgi3


# =============================================================================
# §11  Operations - logging, proxies, TLS, sockets and worker processes
#
# What running gateway for real needs around the protocol: an access log,
# trusting a proxy in front, TLS, unix and inherited sockets, and a parent
# process that keeps N forked workers on one listening socket.
# =============================================================================

access_log = logging.getLogger("gateway.access")

# The fields an --access-log-format may use, with the default format.
ACCESS_LOG_FORMAT = '%(client)s - "%(request_line)s" %(status)s %(bytes)s %(duration_ms).1fms'


def log_access(config: Config, client, request: Request, status: int | str, size: int,
               started: float) -> None:
    """One access log line per request (client, request line, status, bytes, ms);
    status "-" for a request that got no response."""
    if not config.access_log or not access_log.isEnabledFor(logging.INFO):
        return     # checked first: building the line costs more than this test
    fields = {
        "client": "%s:%s" % tuple(client[:2]) if client else "-",
        "request_line": printable(f"{request.method} {request.target.decode('latin-1')}"
                                  f" HTTP/{request.version}"),
        "status": status, "bytes": size,
        "duration_ms": (time.monotonic() - started) * 1000.0,
    }
    access_log.info(config.access_log_format or ACCESS_LOG_FORMAT, fields)


trace_log = logging.getLogger("gateway.trace")
TRACE_IDS = itertools.count(1)
# Colour only for a person watching a terminal, and never against NO_COLOR.
TRACE_COLOURS = {">": "36", "<": "32", "app": "33", "!": "31"}


class Trace:
    """--trace: one connection's protocol, as it happens, on gateway.trace.

    Each line starts with the connection's number and the seconds since it
    opened. ">" is what the client sent, "<" what the server wrote, "app"
    what crossed the WSGI or ASGI interface, "!" an error.
    """

    def __init__(self) -> None:
        """The next connection number, its start time, and whether to colour."""
        self.id = next(TRACE_IDS)
        self.start = time.monotonic()
        self.colour = sys.stderr.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, kind: str, text: str) -> None:
        """Log `text`, one trace line per line of it, tagged with `kind`."""
        elapsed = time.monotonic() - self.start
        for line in text.split("\n"):    # not splitlines(): it also splits at \x85
            line = f"#{self.id} +{elapsed:.3f}s {kind} {printable(line)}"
            if self.colour:
                line = f"\x1b[{TRACE_COLOURS.get(kind, '0')}m{line}\x1b[0m"
            trace_log.info("%s", line)

    def head(self, kind: str, head: bytes) -> None:
        """A request or response head, line by line, as bytes on the wire."""
        self(kind, head.decode("latin-1").replace("\r\n", "\n").rstrip("\r\n"))

    def mapping(self, name: str, values: dict) -> None:
        """An environ or scope, one key per line, in a stable order."""
        self("app", name)
        for key in sorted(values, key=str):
            self("app", f"    {key}: {brief(values[key])}")


def brief(value, limit: int = 80) -> str:
    """repr() cut short: body bytes in a trace are shown, not dumped."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def traced(trace: Trace, receive, send):
    """Wrap ASGI receive() and send() so that every message is traced."""
    async def traced_receive():
        """receive(), then trace the message."""
        message = await receive()
        trace("app", "receive " + brief(message, 200))
        return message

    async def traced_send(message):
        """Trace the message, then send() it."""
        trace("app", "send " + brief(message, 200))
        await send(message)
    return traced_receive, traced_send


def trusted_proxy(address: str | None, config: Config) -> bool:
    """Is this peer one of --forwarded-allow-ips? (a unix socket peer always is)"""
    if address is None or "*" in config.forwarded_allow_ips:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(item.strip(), strict=False)
               for item in config.forwarded_allow_ips.split(",") if item.strip())


def node_address(node: str) -> str:
    """RFC 7239 §6: node = nodename [ ":" node-port ], an IPv6 name in brackets."""
    if node.startswith("["):
        return node[1:].split("]")[0]
    return node.rsplit(":", 1)[0] if node.count(":") == 1 else node


def forwarded_hops(headers: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    """The proxies' record of the request's path, client first: for/proto/host."""
    hops = []
    for value in field_values(headers, b"forwarded"):    # RFC 7239 wins
        for element in value.decode("latin-1").split(","):   # §4: 1#element
            hop = {}
            for pair in element.split(";"):                  # §4: pairs by ";"
                name, _, text = pair.strip().partition("=")
                hop[name.lower()] = text.strip().strip('"')
            if "for" in hop:
                hop["for"] = node_address(hop["for"])
            hops.append(hop)
    if hops:
        return hops
    extra = {}      # the de-facto X-Forwarded-* headers (last value wins)
    for name, key in ((b"x-forwarded-proto", "proto"), (b"x-forwarded-host", "host")):
        values = field_values(headers, name)
        if values:
            extra[key] = values[-1].decode("latin-1").strip()
    addresses = comma_list(field_values(headers, b"x-forwarded-for"))
    return [dict(extra, **{"for": a.decode("latin-1")}) for a in addresses] or (
        [extra] if extra else [])


def behind_proxy(request: Request, client, scheme: str, config: Config):
    """--proxy-headers: who the client really is, per a proxy we trust.

    Returns (client, scheme, host or None). Headers from an untrusted peer
    are ignored. The right-most address that is not itself a trusted proxy is
    the client: everything left of it could have been forged by that client.
    """
    if not config.proxy_headers or not trusted_proxy(client[0] if client else None,
                                                     config):
        return client, scheme, None
    hops = forwarded_hops(request.headers)
    if not hops:
        return client, scheme, None
    for hop in reversed(hops):
        if not trusted_proxy(hop.get("for"), config):
            break
    address = hop.get("for")
    return ((address, 0) if address else client), hop.get("proto", scheme).lower(), \
        hop.get("host")


def make_ssl_context(config: Config):
    """A server TLS context from --ssl-certfile/--ssl-keyfile (and client certs)."""
    if ssl is None:
        raise ValueError("TLS needs the ssl module, which this Python lacks")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile,
                            config.ssl_keyfile_password)
    if config.ssl_ca_certs:
        # Policy: ask for a client certificate and check it, but let clients
        # without one in (uvicorn's --ssl-cert-reqs 1); the app sees which.
        context.load_verify_locations(config.ssl_ca_certs)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


# ASGI TLS extension, tls_version: the protocol's own number, as on the wire.
TLS_VERSIONS = {"SSLv3": 0x0300, "TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303,
                "TLSv1.3": 0x0304}
# RFC 4514 §3: the attribute types that a DN string names by a short name.
# ssl reports types by OpenSSL's long name; the others it knows (emailAddress,
# serialNumber, title ...) are LDAP names already, and an unknown one is an OID.
RFC4514_TYPES = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
                 "organizationName": "O", "organizationalUnitName": "OU",
                 "countryName": "C", "streetAddress": "STREET",
                 "domainComponent": "DC", "userId": "UID"}
CIPHER_SUITES: dict[str, int | None] = {}   # OpenSSL cipher name -> IANA number
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----")


def read_server_cert(certfile: str) -> str | None:
    """The first certificate of --ssl-certfile (the one the server sends), as PEM."""
    with open(certfile, encoding="latin-1") as file:   # may hold the key and a chain
        match = PEM_CERTIFICATE.search(file.read())
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(match.group())) if match \
        else None


def tls_extension(ssl_object, server_cert: str | None) -> dict:
    """scope["extensions"]["tls"] for one connection, after its handshake.

    ASGI TLS extension: the value describes the connection, so it is worked
    out once for all of its requests.
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    chain, name = [], None
    if leaf:
        # The client's certificate first, then what it sent to link it to a CA
        # (readable from Python 3.13 on; before, the client's certificate alone).
        sent = getattr(ssl_object, "get_unverified_chain", list)()
        chain = [leaf] + [der for der in sent if der != leaf]
        subject = (ssl_object.getpeercert() or {}).get("subject")
        name = rfc4514_name(subject) if subject is not None else None
    cipher = ssl_object.cipher()
    return {
        "server_cert": server_cert,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der) for der in chain],
        "client_cert_name": name,
        # With --ssl-ca-certs a certificate the client offers is checked, and a
        # bad one ends the handshake: no connection has a failed one to report.
        "client_cert_error": None,
        "tls_version": TLS_VERSIONS.get(ssl_object.version()),
        "cipher_suite": cipher_suite(ssl_object.context, cipher[0]) if cipher else None,
    }


def cipher_suite(context, name: str) -> int | None:
    """The IANA number of the cipher suite OpenSSL calls `name`.

    ASGI TLS extension, cipher_suite: the two bytes of the TLS registry as one
    16-bit number. ssl only gives the name; the context's get_ciphers() gives
    ids of OpenSSL's form 0x0300XXXX, whose low 16 bits are that number. The
    list is read when a name is first seen, and kept (a name not in it, as None).
    """
    if name not in CIPHER_SUITES:
        CIPHER_SUITES.update((c["name"], c["id"] & 0xFFFF) for c in context.get_ciphers())
        CIPHER_SUITES.setdefault(name, None)
    return CIPHER_SUITES[name]


def rfc4514_name(subject) -> str:
    """A DN from the "subject" of ssl's getpeercert() as an RFC 4514 string.

    RFC 4514 §2.1: the RDNs are written last first, joined by ","; §2.2: the
    attributes of one RDN are joined by "+", each as type=value.
    """
    return ",".join("+".join(RFC4514_TYPES.get(kind, kind) + "=" + rfc4514_value(value)
                             for kind, value in rdn)
                    for rdn in reversed(subject))


def rfc4514_value(value: str) -> str:
    """RFC 4514 §2.4: escape an attribute value with backslashes."""
    escaped = ["\\" + c if c in '"+,;<>\\' else "\\00" if c == "\0" else c
               for c in value]
    if value[:1] in (" ", "#"):      # a leading space or "#"
        escaped[0] = "\\" + value[0]
    if value[-1:] == " ":            # a trailing space
        escaped[-1] = "\\ "
    return "".join(escaped)


def make_listener(host: str, port: int, backlog: int = BACKLOG, uds: str | None = None,
                  fd: int | None = None, listen: bool = True) -> socket.socket:
    """A listening socket: TCP (port 0 picks a free one), unix, or inherited.

    listen=False only binds it: the server listen()s when it is ready (the ASGI
    server, after the lifespan startup). Until then a client is refused at
    once, where a listening socket would queue it unanswered. An inherited
    socket (`fd`) may be listening already.
    """
    if fd is not None:
        sock = socket.socket(fileno=fd)        # e.g. from systemd
        if listen:
            sock.listen(backlog)
        return sock
    if uds is not None:
        if not hasattr(socket, "AF_UNIX"):
            raise OSError(errno.EAFNOSUPPORT, "unix sockets are not available here")
        if os.path.exists(uds) and stat.S_ISSOCK(os.stat(uds).st_mode):
            os.unlink(uds)                     # a stale socket from a past run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(uds)
        if listen:
            sock.listen(backlog)
        return sock
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    if listen:
        return socket.create_server((host, port), family=family, backlog=backlog)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:                # the options socket.create_server() sets, without listen()
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_address(listener: socket.socket) -> tuple:
    """The ASGI `server` value: [host, port], or [path, None] for a unix socket."""
    name = listener.getsockname()
    return (name, None) if isinstance(name, str) else tuple(name[:2])


# The signals on_signals() (§12) turns into a shutdown, by name: a platform may
# lack one. run_workers() leaves a worker only SIGTERM.
SHUTDOWN_SIGNALS = ("SIGINT", "SIGTERM")


RELAYED_SIGNALS = ("SIGINT", "SIGTERM")    # what run_workers() passes on


def run_workers(count: int, serve_one) -> int:
    """Fork `count` workers that share the listening socket; keep them alive.

    The parent forwards SIGINT/SIGTERM (as SIGTERM) and waits for them to
    drain; a worker that dies unexpectedly is replaced.
    """
    children: set[int] = set()
    stopping = []

    def stop(signum, frame) -> None:
        """The parent's handler: relay the stop to every worker as SIGTERM."""
        stopping.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass               # it has just exited; os.wait() will say so

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for _ in range(count):
        children.add(fork_worker(serve_one))
    result = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code == EXIT_STARTUP_FAILED and not stopping:   # it cannot start: stop them all
            result = code
            stop(signal.SIGTERM, None)
        elif not stopping:
            log.warning("worker %d died (exit %d); starting another", pid, code)
            children.add(fork_worker(serve_one))
        elif code in (EXIT_STARTUP_FAILED, EXIT_SHUTDOWN_FAILED) and not result:
            # ASGI Lifespan "Shutdown Failed" (or a startup that failed as we
            # stopped) in one worker: the whole server exits non-zero.
            result = code
    return result


def fork_worker(serve_one) -> int:
    """Fork one worker that serves until stopped, then exits; return its pid.

    The relayed signals are blocked across fork(): a child must never run the
    parent's handler (it would relay the signal to its brothers a second
    time), and it may not get to run at all before a signal arrives.
    """
    relayed = {getattr(signal, name) for name in RELAYED_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, relayed)
    pid = os.fork()
    if pid == 0:
        be_a_worker(serve_one, relayed)       # never returns
    signal.pthread_sigmask(signal.SIG_UNBLOCK, relayed)
    return pid


def be_a_worker(serve_one, relayed: set) -> None:
    """In a forked child: take a worker's signals, serve, and leave the process."""
    global SHUTDOWN_SIGNALS
    # Ctrl+C in a terminal goes to the whole process group: a worker ignores
    # it and waits for the SIGTERM its parent relays, so that one Ctrl+C
    # never counts twice (which would stop it at once).
    SHUTDOWN_SIGNALS = ("SIGTERM",)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # until the server's own
    signal.pthread_sigmask(signal.SIG_UNBLOCK, relayed)
    code = 1
    try:
        serve_one()
        code = 0
    except LifespanFailure as error:
        log.error("%s", error)
        code = error.status
    finally:
        os._exit(code)


# =============================================================================
# §12  Command line
# =============================================================================


class AppImportError(Exception):
    """The "module:attr" given on the command line does not name an app."""


def import_app(spec: str, factory: bool = False):
    """Import "module:attr" (attr may be dotted; default: app, then application)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise AppImportError(f"cannot import module {module_name!r}: "
                                 "no such module") from None
        raise AppImportError(f"error while importing {module_name!r}: {error}") from None
    except Exception as error:
        raise AppImportError(f"error while importing {module_name!r}: "
                             f"{type(error).__name__}: {error}") from None
    for name in [attr] if attr else ["app", "application"]:
        found = module
        for part in name.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found() if factory else found    # --factory: call it for the app
    if attr:
        raise AppImportError(f"module {module_name!r} has no attribute {attr!r}")
    raise AppImportError(f"module {module_name!r} has neither 'app' nor 'application'; "
                         f"name it: {module_name}:ATTR")


def on_signals(stop, loop: asyncio.AbstractEventLoop | None = None):
    """Call stop() on SIGINT and SIGTERM (main thread only); return a function
    that puts back the handlers this replaced with signal.signal().

    The first signal starts a graceful shutdown, a second one ends it at once.
    Policy: both mean that even when they came in ignored, as a shell starts a
    background job (`gateway.py ... &` in a script) with SIGINT ignored; only a
    worker of run_workers() leaves SIGINT to its parent (SHUTDOWN_SIGNALS).
    With a `loop`, stop() runs in it: through loop.add_signal_handler(), or,
    where a loop has none (Windows), through a plain handler that hands the
    call to the loop. That handler also replaces the one asyncio.run() puts on
    SIGINT (3.11+), which would cancel the server instead of draining it.
    A server in another thread gets no handlers: Ctrl+C is its caller's.
    """
    replaced = {}

    def restore() -> None:
        """Put back the handlers that signal.signal() replaced."""
        for signum, previous in replaced.items():
            if previous is not None:     # None: not set from Python; leave ours
                signal.signal(signum, previous)

    if threading.current_thread() is not threading.main_thread():
        return restore
    for name in SHUTDOWN_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue                    # e.g. a platform without SIGTERM
        try:
            if loop is not None:
                try:
                    loop.add_signal_handler(signum, stop)
                    continue        # the loop takes it back when it closes
                except (NotImplementedError, AttributeError):
                    handler = lambda number, frame: loop.call_soon_threadsafe(stop)
            else:
                handler = lambda number, frame: stop()
            replaced[signum] = signal.signal(signum, handler)
        except (RuntimeError, ValueError, OSError) as error:
            log.warning("cannot handle %s (%s): it will not stop the server gracefully",
                        name, error)
    return restore


def serve(app, interface: str = "asgi", host: str = "127.0.0.1", port: int = 8000,
          config: Config | None = None, listener: socket.socket | None = None,
          ready=None) -> None:
    """Serve `app` ("wsgi" or "asgi") until interrupted. Blocks. `ready()`, if
    given, is called once connections are accepted (after the ASGI lifespan
    startup)."""
    config = config or Config(host=host, port=port)
    listener = listener or make_listener(host, port, config.backlog, config.uds, config.fd)
    if interface == "wsgi":
        if ready is not None:
            ready()
        WSGIServer(app, listener, config).serve_forever()
    elif interface == "asgi":
        asyncio.run(ASGIServer(app, listener, config, ready).serve())
    else:
        raise ValueError(f"interface must be 'wsgi' or 'asgi', not {interface!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    """The options; each `dest` is the name of a Config field (§1)."""
    parser = argparse.ArgumentParser(
        prog="gateway.py",
        description="Serve a WSGI or ASGI app over HTTP/1.1 (standard library only).",
        epilog="example: python gateway.py --asgi echo_asgi:app --port 8000")
    add = parser.add_argument
    app = parser.add_mutually_exclusive_group(required=True)
    app.add_argument("--asgi", metavar="MODULE:ATTR", help="serve this ASGI 3 app")
    app.add_argument("--wsgi", metavar="MODULE:ATTR", help="serve this WSGI app")
    add("--factory", action="store_true", help="ATTR is a callable that returns the app")
    add("--app-dir", default=".", metavar="DIR",
        help="directory to import the app from (default: current)")
    add("--env-file", metavar="PATH", help="read KEY=VALUE lines into the environment")
    add("--reload", action="store_true",
        help="restart when a .py file under the current directory changes")
    sock = parser.add_argument_group("sockets")
    sock.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: %(default)s)")
    sock.add_argument("--port", type=int, default=8000,
                      help="port to listen on, 0 for any free one (default: %(default)s)")
    sock.add_argument("--uds", metavar="PATH", help="listen on this unix socket instead")
    sock.add_argument("--fd", type=int, metavar="N",
                      help="serve an inherited listening socket (e.g. from systemd)")
    sock.add_argument("--backlog", type=int, default=BACKLOG,
                      help="pending connections the kernel may queue (default: %(default)s)")
    sock.add_argument("--workers", type=int,
                      default=int(os.environ.get("WEB_CONCURRENCY", 1)),
                      help="worker processes (default: $WEB_CONCURRENCY or 1)")
    sock.add_argument("--threads", type=int, default=WSGI_THREADS,
                      help="WSGI worker threads per process; 1: one app call at a time "
                      "(default: %(default)s)")
    sock.add_argument("--root-path", default="", metavar="PATH",
                      help="mount point of the app (SCRIPT_NAME / root_path)")
    add_tls_and_proxy_options(parser)
    add_logging_options(parser.add_argument_group("logging and headers"))
    add_asgi_options(parser.add_argument_group("ASGI"))
    add_defaulted(parser.add_argument_group("limits (going over one gets the status shown)"),
                  int, LIMIT_OPTIONS)
    add_defaulted(parser.add_argument_group("timeouts, in seconds"), float, TIMEOUT_OPTIONS)
    return parser


def add_tls_and_proxy_options(parser: argparse.ArgumentParser) -> None:
    """The TLS options, and whom to trust behind a proxy."""
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--ssl-certfile", metavar="PATH", help="certificate (PEM)")
    tls.add_argument("--ssl-keyfile", metavar="PATH", help="private key (PEM)")
    tls.add_argument("--ssl-keyfile-password", metavar="TEXT")
    tls.add_argument("--ssl-ca-certs", metavar="PATH",
                     help="CA certificates to check client certificates with")
    proxy = parser.add_argument_group("behind a proxy")
    proxy.add_argument("--proxy-headers", action="store_true",
                       help="trust Forwarded / X-Forwarded-* from --forwarded-allow-ips")
    proxy.add_argument("--forwarded-allow-ips", default="127.0.0.1", metavar="LIST",
                       help="comma list of addresses and CIDR ranges, or * "
                       "(default: %(default)s)")


def add_logging_options(logs) -> None:
    """The options of the log, --trace and the extra response headers."""
    logs.add_argument("--trace", action="store_true",
                      help="show the protocol: heads, environ/scope, ASGI messages")
    logs.add_argument("--log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"],
                      help="trace: debug, and --trace too (default: %(default)s)")
    logs.add_argument("--no-access-log", dest="access_log", action="store_false",
                      help="no line per request on the gateway.access logger")
    logs.add_argument("--access-log-format", default=ACCESS_LOG_FORMAT, metavar="FMT",
                      help="%%-format over client, request_line, status, bytes, "
                      "duration_ms (default: %(default)s)")
    logs.add_argument("--header", dest="headers", action="append", default=[],
                      metavar="NAME:VALUE", help="add this header to every response")
    logs.add_argument("--no-server-header", dest="server_header", action="store_false")
    logs.add_argument("--no-date-header", dest="date_header", action="store_false")


def add_asgi_options(asgi) -> None:
    """The options of the ASGI path: lifespan, interface and WebSocket."""
    asgi.add_argument("--lifespan", choices=["auto", "on", "off"], default="auto",
                      help="run the app's lifespan startup and shutdown; auto: only if "
                      "the app supports it (default: %(default)s)")
    asgi.add_argument("--interface", choices=["auto", "asgi3", "asgi2"], default="auto",
                      help="ASGI 3 (single callable) or ASGI 2 (double); auto detects "
                      "(default: %(default)s)")
    asgi.add_argument("--ws-max-size", type=int, default=WS_MAX_SIZE, metavar="BYTES",
                      help="largest WebSocket message, else close 1009 (default: %(default)s)")
    asgi.add_argument("--ws-ping-interval", type=float, default=WS_PING_SECONDS,
                      metavar="S", help="send a WebSocket ping this often; 0: never "
                      "(default: %(default)s)")
    asgi.add_argument("--ws-ping-timeout", type=float, default=WS_PING_SECONDS,
                      metavar="S", help="close (1011) if no pong comes this soon "
                      "(default: %(default)s)")
    asgi.add_argument("--ws-per-message-deflate", choices=["true", "false"],
                      default="true", help="offer permessage-deflate compression "
                      "(RFC 7692) to clients that ask (default: %(default)s)")


# Options whose default is the Config field of the same name: (option, metavar,
# what the value bounds and what going over it gets). Config's defaults are §1's.
LIMIT_OPTIONS = [
    ("--limit-request-line", "BYTES", "request-line, 414"),
    ("--limit-request-head", "BYTES", "request head, 431"),
    ("--limit-request-fields", "N", "header fields, 431"),
    ("--limit-request-body", "BYTES", "request body, 413"),
    ("--limit-spool", "BYTES", "a chunked body the WSGI path stores for the app, 413"),
    ("--limit-concurrency", "N", "open connections, 503"),
]
TIMEOUT_OPTIONS = [
    ("--timeout-keep-alive", "S", "idle between requests"),
    ("--timeout-request-head", "S", "to receive a whole head, 408"),
    ("--timeout-read", "S", "without body bytes while reading a body, 408"),
    ("--timeout-write", "S", "a response may stay unread"),
    ("--timeout-graceful-shutdown", "S", "requests in progress may finish during shutdown"),
]


def add_defaulted(group, kind, rows: list) -> None:
    """Add options of one type whose defaults are Config's (None: no limit)."""
    for option, metavar, text in rows:
        default = getattr(DEFAULTS, option[2:].replace("-", "_"))
        shown = "no limit" if default is None else "%(default)s"
        group.add_argument(option, type=kind, default=default, metavar=metavar,
                           help=f"{text} (default: {shown})")


def config_from(args: argparse.Namespace) -> Config:
    """Turn parsed options into a Config: same names, a few conversions."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
               if hasattr(args, f.name)}
    options["ws_ping_interval"] = args.ws_ping_interval or None
    options["ws_per_message_deflate"] = args.ws_per_message_deflate == "true"
    headers = []
    for item in args.headers:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--header needs NAME:VALUE, not {item!r}")
        headers.append((name.strip().encode("latin-1"), value.strip().encode("latin-1")))
    options["headers"] = headers
    return Config(**options)


def load_env_file(path: str) -> None:
    """--env-file: KEY=VALUE lines; blank lines and # comments are skipped."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                os.environ[key.strip()] = value


def run_reloader(argv: list[str]) -> int:
    """--reload: run the server in a child process; restart it when a .py file
    under the current directory changes (by polling modification times)."""
    command = [sys.executable, os.path.abspath(__file__)] + [a for a in argv
                                                             if a != "--reload"]

    def snapshot() -> dict:
        """Modification times of the .py files under ".", but not in hidden folders
        or __pycache__."""
        times = {}
        for folder, dirs, files in os.walk("."):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    try:
                        times[path] = os.stat(path).st_mtime
                    except OSError:
                        pass
        return times

    seen = snapshot()
    child = subprocess.Popen(command)
    try:
        while True:
            time.sleep(1.0)       # polling: the standard library has no file watcher
            now = snapshot()
            if now != seen:
                log.info("a .py file changed; restarting")
                seen = now
                child.terminate()
                child.wait()
                child = subprocess.Popen(command)
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_args(argv)
    if args.log_level == "trace":     # the most detailed level: debug and --trace
        args.log_level, args.trace = "debug", True
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    if args.env_file:
        load_env_file(args.env_file)
    if args.reload:
        return run_reloader(argv)
    if args.workers > 1 and not hasattr(os, "fork"):
        log.error("--workers needs os.fork(), which this platform does not have")
        return 1
    sys.path.insert(0, os.path.abspath(args.app_dir))
    interface, spec = ("asgi", args.asgi) if args.asgi else ("wsgi", args.wsgi)
    try:
        config = config_from(args)
        app = import_app(spec, args.factory)
        # Limit: --workers share one socket and the parent cannot tell when a
        # worker has started, so it listens from the outset: clients that come
        # before the first worker is ready wait in the backlog.
        listener = make_listener(args.host, args.port, args.backlog, args.uds, args.fd,
                                 listen=interface == "wsgi" or config.workers > 1)
    except (AppImportError, ValueError) as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        reason = "address already in use" if error.errno == errno.EADDRINUSE else error
        log.error("cannot listen on %s: %s", args.uds or f"{args.host}:{args.port}", reason)
        return 1
    where = listen_url(listener, config)

    def announce() -> None:
        """The start-up line, once connections are accepted."""
        log.info("serving %s app %s on %s (Ctrl+C to quit)", interface.upper(), spec, where)

    config.port = listen_address(listener)[1] or 0
    return serve_until_stopped(app, interface, config, listener, announce)


def listen_url(listener: socket.socket, config: Config) -> str:
    """Where the server listens, for the start-up line: a URL, or unix:PATH."""
    host, port = listen_address(listener)
    scheme = "https" if config.ssl_certfile else "http"
    return f"unix:{host}" if port is None else "%s://%s:%d" % (
        scheme, f"[{host}]" if ":" in host else host, port)


def serve_until_stopped(app, interface: str, config: Config, listener: socket.socket,
                        announce) -> int:
    """Serve in this process or in --workers; return the exit status."""
    try:
        if config.workers > 1:
            announce()
            return run_workers(config.workers,
                               lambda: serve(app, interface, config=config, listener=listener))
        serve(app, interface, config=config, listener=listener, ready=announce)
    except KeyboardInterrupt:
        pass             # where no signal handler could be installed
    except LifespanFailure as error:
        log.error("%s", error)
        return error.status   # EXIT_STARTUP_FAILED or EXIT_SHUTDOWN_FAILED
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
