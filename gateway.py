"""gateway.py - a small HTTP/1.1 server for WSGI and ASGI apps, written to be read.

One file, standard library only. It serves WSGI apps (PEP 3333) from a
`selectors` event loop with a small thread pool, and ASGI 3 apps from
`asyncio.start_server`. Both share one hand-written, I/O-free HTTP/1.1 parser,
one response writer and one set of per-connection decisions (keep-alive or
close, skipping an unread body, the error answer, the mount point).

Read it beside:  RFC 9112 (HTTP/1.1 message syntax)   RFC 9110 (HTTP semantics)
                 RFC 6455 (WebSocket)   RFC 7692 (WebSocket compression)
                 RFC 7239 (Forwarded)
                 PEP 3333 (WSGI)    ASGI "HTTP & WebSocket" and "Lifespan" specs

The sections, in order (a banner "# §N  Title" opens each):

    §1  Imports, limits and constants   §8  ASGI HTTP adapter (scope, receive, send)
    §2  Errors                          §9  ASGI server       (asyncio streams)
    §3  Reading requests     (pure)     §10 WebSocket         (pure codec, then ASGI)
    §4  Writing responses    (pure)     §11 Lifespan          (ASGI)
    §5  WSGI adapter   (worker threads) §12 Operations        (logs, --trace, TLS)
    §6  WSGI connections (the loop)     §13 Command line      (options, workers)
    §7  WSGI server  (loop and pool)

Sections 3 and 4 and the codec at the start of section 10 never touch a
socket, a thread or an event loop: bytes go in, values come out, and their
docstrings carry examples that `python -m doctest gateway.py` runs. The rest
does the I/O and calls down into them. The file's own sections are named
"section N"; a "§" number always follows the name of its spec (RFC 9112 §6.3).

Run:   python gateway.py --wsgi echo_wsgi:application
       python gateway.py --asgi echo_asgi:app --trace
Grep:  "Policy:" marks a choice where the spec allows several, "Leniency:"
       something accepted that a strict reading would refuse, and "Limit:" a
       refusal that comes from a constant in section 1.
Not here, on purpose: HTTP/2 and HTTP/3 (put a proxy such as nginx in front).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def run_from_bytecode() -> None:
    """`python gateway.py`: become a process that imports gateway, from its
    cached bytecode, and runs main() there with the same arguments.

    Why: Python compiles a script each time it starts, and keeps the script's
    syntax tree until the script ends: a large part of the server's peak memory.
    A module that is imported loads from __pycache__ instead: written here
    first if missing or stale, as the new process would, since exec forgets
    this process's peak (where it cannot be written, the import compiles and
    lets the tree go). os.execv() starts a program afresh in this process:
    a signal sent to its process id (by systemd, docker, kill) still reaches the
    server. This runs before the imports below, which it would pay for twice.

    The new process has the same sys.argv, sys.path, working directory and
    interpreter options (sys.orig_argv: -X, -W, -O ...), and imports this file
    as "gateway", never as "__main__": it does not come back here. Only an
    optimisation, so this returns, and the script runs as it is, wherever that
    would not pay or cannot be done: on Windows (no exec that keeps the process),
    under -B or PYTHONDONTWRITEBYTECODE with no up-to-date bytecode, with -m
    (bytecode already), or where `import gateway` would load another file or
    none (-I and -P leave this folder off sys.path; a copy under another name).
    """
    options = [o for o in sys.orig_argv[1:-len(sys.argv)] if o != "--"]   # -X dev, -O
    spec = importlib.util.find_spec("gateway")      # what `import gateway` would load
    if os.name != "posix" or sys.orig_argv[-len(sys.argv):] != sys.argv \
            or spec is None or spec.origin != os.path.realpath(sys.argv[0]):
        return
    with contextlib.suppress(OSError):      # no bytecode, or no exec: run as it is
        stale = not os.path.exists(spec.cached) \
            or os.path.getmtime(spec.cached) < os.path.getmtime(spec.origin)
        if stale and not sys.dont_write_bytecode:
            with contextlib.suppress(Exception):   # read-only: the import compiles
                import py_compile
                py_compile.compile(spec.origin, spec.cached, doraise=True)
        if not stale or not sys.dont_write_bytecode:
            code = ("import sys; del sys.argv[0]; sys.path[0] = %r; import gateway; "
                    "sys.exit(gateway.main())" % sys.path[0])
            os.execv(sys.executable, [sys.executable, *options, "-c", code, *sys.argv])


if __name__ == "__main__":
    run_from_bytecode()         # returns only where it could not

import argparse
import asyncio
import base64
import codecs
import collections
import dataclasses
import errno
import functools
import hashlib
import inspect
import io
import ipaddress
import itertools
import logging
import re
import selectors
import signal
import socket
import stat
import subprocess
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
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote, unquote_to_bytes
import zlib

__all__ = ["Config", "Limits", "HTTPError", "Request", "RequestParser", "Response",
           "END", "parse_head", "error_response", "WSGIServer", "ASGIServer", "serve",
           "make_listener", "main"]

log = logging.getLogger("gateway")   # configured by the command line (section 13)

# =============================================================================
# §1  Imports, limits and constants
#
# Every number the server uses lives here, with its unit and the status code
# that going over it produces. Limits holds the ones the parser and the writer
# read; Config extends it, and the command line (section 13) can change both.
# =============================================================================

SERVER_NAME = b"gateway"

# Precedents for the head limits: h11 allows 16 KiB, waitress 256 KiB.
MAX_REQUEST_LINE = 8 * 1024      # bytes, request-line          -> 414 (RFC 9112 §3)
MAX_HEAD_BYTES = 64 * 1024       # bytes, request-line + fields -> 431 (RFC 6585 §5)
MAX_FIELD_LINES = 100            # field lines in one head      -> 431
MAX_METHOD_BYTES = 32            # longer than any method we know -> 501 (RFC 9112 §3)
MAX_EMPTY_LINES = 8              # before a request-line -> 400 (RFC 9112 §2.2)
MAX_CHUNK_LINE = 4 * 1024        # bytes, chunk-size + ext -> 400 (RFC 9112 §7.1.1)
MAX_SIZE_DIGITS = 16             # hex digits in a chunk-size, so it cannot overflow
MAX_LENGTH_DIGITS = 18           # decimal digits in a Content-Length -> 413

RECV_BYTES = 64 * 1024           # size asked of each recv()
HIGH_WATER = 256 * 1024          # bytes buffered for one side before we pause it
LOW_WATER = 64 * 1024            # ... and the level at which we resume it
BACKLOG = 2048                   # pending connections the kernel may queue
# When it cannot take one more connection (the selector is full, or accept()
# ran out of descriptors) the server stops watching its listener for a while;
# new clients wait in that backlog meanwhile (sections 7 and 9, the servers).
SELECT_SOCKETS = 512 if os.name == "nt" else 1024   # FD_SETSIZE: select() watches
#                                  this many sockets (Windows), or descriptors below
#                                  it (POSIX) -> the WSGI loop stops accepting
ACCEPT_PAUSE_SECONDS = 0.5       # after accept() ran out of descriptors (`ulimit -n`)
#                                  -> no accept() for this long (ASGI: then asyncio's
#                                  retry, constants.ACCEPT_RETRY_DELAY, 1 s)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#                                  accept() errors that mean "pause", as above
SPOOL_BYTES = 1024 * 1024        # a chunked WSGI body past this goes to a temp file
MAX_SPOOL_BYTES = 1024 ** 3      # bytes, a chunked WSGI body on disk -> 413
# The errors of a full disk or file table: a spool that fails so -> 503.
STORAGE_FULL = {errno.ENOSPC, errno.EMFILE, errno.ENFILE, getattr(errno, "EDQUOT", 0)}
# Eight threads: enough that a few slow app calls (a database, an upstream API)
# do not hold up the rest, few enough that GIL hand-offs stay cheap.
WSGI_THREADS = 8                 # worker threads that call WSGI applications
# Policy: a queued app call waits this long for a busy worker before one more
# sleeping worker is woken (WorkerPool, section 7): a request may start 2 ms
# late, but waking a thread for every request makes the threads fight over the GIL.
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
class Limits:
    """What the parser (section 3) and writer (section 4) read; Config adds the rest."""

    limit_request_line: int = MAX_REQUEST_LINE
    limit_request_head: int = MAX_HEAD_BYTES
    limit_request_fields: int = MAX_FIELD_LINES
    limit_request_body: int | None = None     # bytes -> 413; None: no limit
    server_header: bool = True                # send "Server: gateway"
    date_header: bool = True                  # send "Date: ..."
    headers: list = field(default_factory=list)   # (name, value) bytes: --header

    def __post_init__(self) -> None:
        """Refuse extra headers (--header) that would break every response head.

        RFC 9112 §11.1: they get field_line()'s check once, here. Policy: the
        fields that frame the body or describe the connection are the
        server's (RFC 9112 §6, RFC 9110 §7.6.1), so they are refused too."""
        for name, value in self.headers:
            if type(name) is not bytes or type(value) is not bytes:
                raise TypeError(f"extra header (--header): name and value must be "
                                f"bytes: {name!r}: {value!r}")
            try:
                field_line(name, value)
                if name.lower() in (*CONNECTION_FIELDS, b"content-length"):
                    raise ValueError(f"{name.decode()} is the server's to send")
            except ValueError as error:
                raise ValueError(f"extra header (--header): {error}") from None


@dataclass
class Config(Limits):
    """The knobs of one server; the defaults are the constants above."""

    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = WSGI_THREADS
    root_path: str = ""
    backlog: int = BACKLOG
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
    access_log_format: str = ""      # "" means ACCESS_LOG_FORMAT (section 12)
    trace: bool = False              # log the protocol as it happens (section 12)

    def __post_init__(self) -> None:
        """Refuse what no server could run with: no threads, or bad extra headers."""
        if self.threads < 1:
            # A pool of no threads would queue every WSGI request for ever.
            raise ValueError("--threads must be 1 or more (1: one app call at a time), "
                             f"not {self.threads}")
        super().__post_init__()


LIMITS = Limits()


# =============================================================================
# §2  Errors
#
# HTTPError: "answer this status, then close". The parser (section 3) raises
# it for a request that breaks HTTP; sections 6 to 10 raise it for what only a
# server sees (a slow client, a full disk, a failed app, a refused WebSocket
# handshake). The catcher answers with error_response() (section 4).
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
    """The client went away: the OSError subclass that ASGI send() raises then.

    ASGI "HTTP & WebSocket" spec, "Disconnected Client - send exception". The
    WSGI path raises it too, in write() and in a read() of wsgi.input."""


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
# input, down to one byte at a time, gives the same events. The parser moves
# on to a pipelined request only when asked for the next event, so the server
# decides when to read it. Nothing here touches a socket, a thread or a clock.
# =============================================================================

# Limit: patterns run on client bytes, so each must take linear time. Two neighbours
# that can both take a run of bytes make a failing match try every split (quadratic),
# so each byte has one part to go to (a chunk-ext's BWS, two); alternatives start apart.

# RFC 9110 §5.6.2   token = 1*tchar
#   tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#           "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"

# RFC 9112 §3   request-line = method SP request-target SP HTTP-version
# RFC 9112 §3.2 the target has no whitespace, no CTL and no "#" (a fragment is
#               never sent), so: visible ASCII except "#".
# RFC 9112 §2.3 HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
REQUEST_LINE = re.compile(rb"(?P<method>" + TOKEN + rb") (?P<target>[!-\"$-~]+) "
                          rb"(?P<version>HTTP/[0-9]\.[0-9])")

# RFC 9112 §3.2.2 absolute-form = absolute-URI; we take http and https only,
#   and split it where the authority ends (at the first "/" or "?").
ABSOLUTE_FORM = re.compile(rb"(?i:https?)://(?P<authority>[^/?]*)(?P<rest>.*)", re.S)

# RFC 9112 §5   field-line = field-name ":" OWS field-value OWS
# RFC 9110 §5.5 field-value: visible characters, SP, HTAB and obs-text
#   (%x80-FF); never NUL, CR, LF or another CTL. The OWS is matched as part
#   of the value and stripped afterwards: a separate OWS pattern would compete
#   with the value for the same blanks.
FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
FIELD_LINE = re.compile(rb"(?P<name>" + TOKEN + rb"):(?P<value>" + FIELD_VALUE + rb")")

# RFC 9112 §3.2 + RFC 3986 §3.2.2: Host = uri-host [ ":" port ]
HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")

# RFC 9112 §7.1    chunk      = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#                  chunk-size = 1*HEXDIG
# RFC 9112 §7.1.1  chunk-ext  = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
#                  ext-val    = token / quoted-string
# Blanks after an ext-name are tried for "=", then for the next ";": twice at
# most. In a quoted-string, "\" always starts a quoted-pair, never qdtext.
QUOTED_STRING = (rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]'
                 rb'|\\[\t\x20-\x7e\x80-\xff])*"')
CHUNK_EXT = (rb"(?:[ \t]*;[ \t]*" + TOKEN
             + rb"(?:[ \t]*=[ \t]*(?:" + TOKEN + rb"|" + QUOTED_STRING + rb"))?)*")
CHUNK_LINE = re.compile(rb"(?P<size>[0-9A-Fa-f]+)" + CHUNK_EXT)

# RFC 9112 §2.2: the head ends at its first empty line: the LF that ends the
# last field line, then CRLF or (Leniency, as the RFC allows) a bare LF.
END_OF_HEAD = re.compile(rb"\n\r?\n")


@dataclass
class Request:
    """A parsed request head: the RFC 9112 §3 request-line and §5 field lines."""
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
    if not values:
        return []       # the usual case: the field is absent
    items = [item.strip(b" \t") for value in values for item in value.split(b",")]
    return [item.lower() for item in items if item]


def parse_request_line(line: bytes) -> tuple[str, bytes, str]:
    """RFC 9112 §3: split the request-line into method, target and version.

    >>> parse_request_line(b"GET /search?q=1 HTTP/1.2")
    ('GET', b'/search?q=1', '1.1')
    """
    match = REQUEST_LINE.fullmatch(line)
    if match is None:     # RFC 9112 §3: exactly one SP between the parts, nothing else
        raise HTTPError(400, "malformed request line")
    method, target, version = match.group("method", "target", "version")
    if version[:7] != b"HTTP/1.":
        # RFC 9110 §15.6.6: 505, also to an HTTP/2 preface ("PRI * HTTP/2.0").
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if len(method) > MAX_METHOD_BYTES:
        raise HTTPError(501, "method too long")    # Limit: RFC 9112 §3
    # RFC 9110 §2.5: a higher minor version "SHOULD" be handled as ours: 1.1.
    return method.decode("ascii"), target, "1.0" if version == b"HTTP/1.0" else "1.1"


def split_target(method: str, target: bytes) -> tuple[bytes, bytes, bytes | None]:
    """RFC 9112 §3.2: the four forms of request-target -> (path, query, authority)."""
    if method == "CONNECT":
        # Policy: authority-form (RFC 9112 §3.2.3) is for proxies; this is not one.
        raise HTTPError(501, "CONNECT is not supported")
    if target == b"*":
        if method != "OPTIONS":      # RFC 9112 §3.2.4: asterisk-form, for OPTIONS only
            raise HTTPError(400, "'*' is only allowed with OPTIONS")
        return b"*", b"", None
    authority = None
    if target[:1] != b"/":
        # RFC 9112 §3.2.2: a server MUST accept absolute-form (a proxy's form).
        match = ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            raise HTTPError(400, "malformed request target")
        authority, target = match.group("authority", "rest")
        # RFC 9110 §4.2.1: an empty host MUST be rejected; RFC 9110 §4.2.4: userinfo
        # SHOULD be treated as an error; and the port must be digits (RFC 9112 §3.2).
        if not authority or b"@" in authority or HOST.fullmatch(authority) is None \
                or authority.startswith(b":"):
            raise HTTPError(400, "malformed authority in the request target")
        target = target if target[:1] == b"/" else b"/" + target   # RFC 9112 §3.2.2
    path, _, query = target.partition(b"?")   # RFC 9112 §3.2.1: split at the first "?"
    return path, query, authority


def parse_field_line(line: bytes) -> tuple[bytes, bytes]:
    """RFC 9112 §5: one "Name: value" line -> (lower-case name, value)."""
    match = FIELD_LINE.fullmatch(line)
    if match is None:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: obs-fold may get 400; RFC 9112 §2.2: so may line one.
            raise HTTPError(400, "obsolete line folding is not accepted")
        # Covers "Name : v" (RFC 9112 §5.1 MUST reject), a missing colon, and
        # CR, LF, NUL or other control characters in a value (RFC 9110 §5.5).
        raise HTTPError(400, "malformed header field")
    # RFC 9110 §5.1: names are case-insensitive, so lower-cased. RFC 9112 §5.1,
    # RFC 9110 §5.6.3: OWS is SP and HTAB only, so not strip().
    return match["name"].lower(), match["value"].strip(b" \t")


def body_framing(version: str, fields: dict[bytes, list[bytes]]) -> tuple[bool, int]:
    """Where does this request's body end? RFC 9112 §6.3, items (3) to (7).

    Takes framing_fields(); returns (chunked, content_length).

    >>> body_framing("1.1", {b"content-length": [b"5, 5"]})
    (False, 5)
    """
    te_fields = fields.get(b"transfer-encoding")
    cl = fields.get(b"content-length")
    if te_fields and cl:
        # RFC 9112 §6.3 (3). Policy: the RFC lets Transfer-Encoding win, saying it
        # "ought to be handled as an error". A proxy in front may have used the
        # other one (request smuggling, RFC 9112 §11.2), so we refuse and close.
        raise HTTPError(400, "both Transfer-Encoding and Content-Length")
    if te_fields:
        te = comma_list(te_fields)   # RFC 9112 §6.1: the codings, in the order applied
        if not te:
            raise HTTPError(400, "empty Transfer-Encoding")
        if version == "1.0":     # RFC 9112 §6.1: then TE means faulty framing
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te[-1] != b"chunked":  # RFC 9112 §6.3 (4): MUST answer 400, no length
            raise HTTPError(400, "chunked is not the final transfer coding")
        if te.count(b"chunked") > 1:   # RFC 9112 §6.1, §7.1: chunked is applied once
            raise HTTPError(400, "chunked applied twice")
        if len(te) > 1:   # RFC 9112 §6.1: a coding we do not implement -> 501
            raise HTTPError(501, "only the chunked transfer coding is supported")
        return True, 0
    if cl:
        # RFC 9112 §6.3 (5), RFC 9110 §8.6: Content-Length = 1*DIGIT. Equal values
        # ("5, 5", or two lines) may be taken as one; different ones are an error.
        values = {item.strip(b" \t") for value in cl for item in value.split(b",")}
        if len(values) != 1:
            raise HTTPError(400, "conflicting Content-Length values")
        value = values.pop()
        if not (value.isdigit() and value.isascii()):   # int() takes "+5" and "1_0"
            raise HTTPError(400, "malformed Content-Length")
        if len(value.lstrip(b"0")) > MAX_LENGTH_DIGITS:
            raise HTTPError(413, "Content-Length too large")   # Limit: RFC 9110 §8.6
        return False, int(value)       # (6) that many bytes
    return False, 0      # RFC 9112 §6.3 (7): neither, so a request has no body


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


# The fields that frame a request (RFC 9112 §3.2, §6, §9.3; RFC 9110 §10.1.1).
FRAMING_FIELDS = {b"host", b"content-length", b"transfer-encoding", b"connection",
                  b"expect"}


def framing_fields(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """The values of each of FRAMING_FIELDS sent, in order; an absent one has no key."""
    fields = {}
    for name, value in headers:     # one pass over the headers, not one per field
        if name in FRAMING_FIELDS:
            fields.setdefault(name, []).append(value)
    return fields


def parse_head(head: bytes, limits: Limits = LIMITS) -> Request:
    """Parse one request head, up to the LF that ends its last line, into a Request."""
    # RFC 9112 §2.2: lines end in CRLF; Leniency: or in a bare LF. One CR is taken
    # off each line; any other CR fails the patterns (400), never splits a line.
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    if len(lines[0]) > limits.limit_request_line:
        raise HTTPError(414, "request line too long")   # Limit: RFC 9112 §3
    method, target, version = parse_request_line(lines[0])
    path, query, authority = split_target(method, target)
    if len(lines) - 1 > limits.limit_request_fields:
        raise HTTPError(431, "too many header fields")    # Limit: RFC 6585 §5
    # RFC 9110 §5.3: every field line is kept, in wire order, never merged.
    headers = [parse_field_line(line) for line in lines[1:]]
    fields = framing_fields(headers)
    check_host(version, fields.get(b"host", []))
    if authority is not None:
        # RFC 9112 §3.2.2: the server "MUST ignore the received Host header
        # field (if any) and instead use the host information of the target".
        headers = [(name, value) for name, value in headers if name != b"host"]
        headers.append((b"host", authority))
    chunked, content_length = body_framing(version, fields)
    # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; 1.0 only with "keep-alive".
    connection = comma_list(fields.get(b"connection", []))
    keep_alive = b"close" not in connection and (version == "1.1"
                                                 or b"keep-alive" in connection)
    # RFC 9110 §10.1.1: 100-continue only means something for HTTP/1.1; any
    # other expectation gets 417 (RFC 9110 §15.5.18).
    expect_continue = False
    if b"expect" in fields and version == "1.1":
        if any(item != b"100-continue" for item in comma_list(fields[b"expect"])):
            raise HTTPError(417, "only 'Expect: 100-continue' is supported")
        expect_continue = chunked or content_length > 0   # no 100 for an empty body
    return Request(method, target, path, query, version, headers,
                   chunked, content_length, keep_alive, expect_continue)


class RequestParser:
    r"""Incremental HTTP/1.1 request parser: feed() bytes, take next_event()s.

    A state machine: `state` says what the next bytes must be, and READERS
    (at the end of the class) which method reads them:

      head --(Content-Length; none is 0)--> body --(all of it, then END)--> head
       |
    (chunked)
       v
      chunk-size --(size 0)--> trailers --(empty line, then END)--> head
       |      ^
    (size > 0) +-----------------(CRLF)-----------------+
       v                                                |
      chunk-data --(size bytes)--> chunk-end -----------+

    An HTTPError leads to "error" for good: no later byte can be trusted.
    The chunked body, RFC 9112 §7.1:

        chunked-body = *chunk last-chunk trailer-section CRLF
        chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        last-chunk   = 1*("0") [ chunk-ext ] CRLF

    >>> parser = RequestParser()
    >>> parser.feed(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Le")
    >>> parser.next_event() is None          # the head is not whole yet
    True
    >>> parser.feed(b"ngth: 5\r\n\r\nhello")
    >>> parser.next_event().target, parser.next_event(), parser.next_event()
    (b'/echo', b'hello', END)
    """
    def __init__(self, limits: Limits = LIMITS) -> None:
        """An empty buffer, waiting for the head of the first request."""
        self.buffer = bytearray()
        self.state = "head"       # one of the states drawn above
        self.limits = limits
        self.scanned_up_to = 0    # no end of head (or of a chunk line) before this
        self.empty_lines = 0      # empty lines skipped before this request-line
        self.last_head = b""      # the head last parsed, as sent (for --trace)
        self.remaining = 0        # body or chunk-data bytes still to come
        self.body_size = self.trailer_bytes = self.trailer_lines = 0   # for 413, 431

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client."""
        self.buffer += data

    def next_event(self) -> Request | bytes | EndOfMessage | None:
        """The next event, or None if more bytes are needed. Raises HTTPError."""
        if self.state == "error":
            raise HTTPError(400, "the connection is in an error state")
        try:
            return self.READERS[self.state](self)
        except HTTPError:
            self.state = "error"
            raise

    def unread_body(self) -> int | None:
        """Bytes of this request's body not even received yet (None: unknown)."""
        if self.state == "body":
            return max(0, self.remaining - len(self.buffer))
        return 0 if self.state == "head" else None

    def drop_body(self) -> int | None:
        """Drop the body bytes buffered: how many, or None once the body has ended.

        RFC 9112 §9.3: the next request starts after this body, so both servers
        skip a body the app left unread this way (while can_drain() allows)."""
        dropped = 0
        while type(event := self.next_event()) is bytes:
            dropped += len(event)
        return dropped if event is None else None

    @property
    def has_partial_request(self) -> bool:
        """True if some bytes of an unfinished request have arrived."""
        return self.state != "head" or bool(self.buffer)

    def _take(self, size: int) -> bytes:
        """Cut up to `size` bytes off the front of the buffer."""
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _read_head(self) -> Request | None:
        """State "head": the next request's head, parsed, or None until it is whole.

        RFC 9110 §5.3: a Request is an event only once its whole head is here."""
        buffer = self.buffer
        if not buffer:
            return None            # nothing of the next request yet
        # RFC 9112 §2.2: "a server SHOULD ignore at least one empty line (CRLF)
        # received prior to the request-line". Policy: at most MAX_EMPTY_LINES.
        while buffer.startswith((b"\r\n", b"\n")):
            del buffer[: 2 if buffer[:1] == b"\r" else 1]
            self.empty_lines += 1
            if self.empty_lines > MAX_EMPTY_LINES:
                raise HTTPError(400, "too many empty lines before the request")
        head = self._take_head()
        if head is None:
            return None
        self.last_head = head
        self.empty_lines = 0
        request = parse_head(head, self.limits)
        self.body_size = self.trailer_bytes = self.trailer_lines = 0
        self.remaining = request.content_length     # 0 if chunked
        self.state = "chunk-size" if request.chunked else "body"
        if not request.chunked:
            self._count_body(request.content_length)   # known at once
        return request

    def _take_head(self) -> bytes | None:
        r"""Cut the head off the buffer, up to its last line's LF; None until whole.

        The search resumes at `scanned_up_to`, so a head that comes one byte
        at a time is still searched in linear time. An example:

            G E T   /   H T T P / 1 . 1 \r \n H o s t :   a \r \n \r \n
            0                           14 15 16            23 24 25 26

        END_OF_HEAD finds "\n\r\n" at 24: the head is bytes 0 to 23 (parse_head
        takes off the CR of its last line) and all 27 bytes leave the buffer.
        Had only bytes 0 to 25 come, the head could be no shorter than 24 =
        26 - 2 bytes, and its end could start at 24 at the earliest: hence
        the 2 bytes of slack in the 431 check and in `scanned_up_to`.
        """
        match = END_OF_HEAD.search(self.buffer, self.scanned_up_to)
        end = match.start() if match else len(self.buffer) - 2
        self._check_head_limits(end)
        if match is None:
            self.scanned_up_to = max(0, end)
            return None
        self.scanned_up_to = 0
        return self._take(match.end())[:end]

    def _check_head_limits(self, end: int) -> None:
        """Limit: refuse a head that is, or can only become, too long.

        `end` is where the head ends, or the least it can end at (_take_head).
        The request-line is measured without its CRLF, which may be on its way
        (so its LF is looked for up to index limit + 1): any split, one answer."""
        buffer = self.buffer
        newline = buffer.find(b"\n", 0, self.limits.limit_request_line + 2)
        line_end = newline if newline >= 0 else len(buffer)   # or more
        if buffer[line_end - 1:line_end] == b"\r":
            line_end -= 1          # the CR of its CRLF (or, last, perhaps so)
        # A method longer than any we know: no SP in its first MAX_METHOD_BYTES + 1.
        if line_end > MAX_METHOD_BYTES and b" " not in buffer[:MAX_METHOD_BYTES + 1]:
            raise HTTPError(501, "method too long")   # Limit: RFC 9112 §3, before 414
        if line_end > self.limits.limit_request_line:
            raise HTTPError(414, "request line too long")     # Limit: RFC 9112 §3
        if end > self.limits.limit_request_head:
            raise HTTPError(431, "request header fields too large")   # RFC 6585 §5

    def _count_body(self, size: int) -> None:
        """Limit: the configured maximum body size -> 413 (RFC 9110 §15.5.14)."""
        self.body_size += size
        limit = self.limits.limit_request_body
        if limit is not None and self.body_size > limit:
            raise HTTPError(413, "request body too large")

    def _read_data(self) -> bytes | EndOfMessage | None:
        """States "body" (RFC 9112 §6.2, then END) and "chunk-data": body bytes."""
        if self.remaining == 0:     # in state "body" only
            self.state = "head"
            return END
        if not self.buffer:
            return None
        data = self._take(self.remaining)
        self.remaining -= len(data)
        if self.remaining == 0 and self.state == "chunk-data":
            self.state = "chunk-end"
        return data

    def _read_chunk_size(self) -> bytes | EndOfMessage | None:
        """State "chunk-size" (RFC 9112 §7.1.1: any chunk-ext is checked, ignored)."""
        line = self._take_line(MAX_CHUNK_LINE, "chunk size line too long", 400)
        if line is None:
            return None
        match = CHUNK_LINE.fullmatch(line)
        if match is None:
            raise HTTPError(400, "malformed chunk size line")
        if len(match["size"]) > MAX_SIZE_DIGITS:
            raise HTTPError(400, "chunk size too large")   # Limit: no overflow
        self.remaining = int(match["size"], 16)   # RFC 9112 §7.1: 1*HEXDIG, checked
        self._count_body(self.remaining)
        self.state = "chunk-data" if self.remaining else "trailers"
        return self.next_event()

    def _read_chunk_end(self) -> bytes | EndOfMessage | None:
        """State "chunk-end": the CRLF after chunk-data (RFC 9112 §7.1), exactly."""
        if self._take_line(0, "chunk data not followed by CRLF", 400) is None:
            return None
        self.state = "chunk-size"
        return self.next_event()

    def _read_trailers(self) -> EndOfMessage | None:
        """State "trailers": field lines up to the empty line, then END."""
        # RFC 9112 §7.1.2: trailer fields are read, checked like header fields,
        # and dropped: RFC 9110 §6.5.1 forbids merging them into the headers.
        limits = self.limits
        while True:
            line = self._take_line(limits.limit_request_head, "trailer field too large")
            if line is None:
                return None
            if not line:
                self.state = "head"
                return END
            self.trailer_bytes += len(line) + 2
            self.trailer_lines += 1
            if self.trailer_lines > limits.limit_request_fields:
                raise HTTPError(431, "too many trailer fields")   # Limit, as for heads
            if self.trailer_bytes > limits.limit_request_head:
                raise HTTPError(431, "trailer section too large")   # Limit
            parse_field_line(line)

    def _take_line(self, limit: int, too_long: str, status: int = 431) -> bytes | None:
        """Cut a CRLF-ended line of at most `limit` bytes off the buffer, or None."""
        end = self.buffer.find(b"\r\n", self.scanned_up_to, limit + 2)
        if end < 0:
            if len(self.buffer) > limit + 1:    # room for a line and its CR
                raise HTTPError(status, too_long)     # Limit (section 1)
            # Searched bytes are not searched again; the last may be a CRLF's CR.
            self.scanned_up_to = max(0, len(self.buffer) - 1)
            return None
        self.scanned_up_to = 0
        line = self._take(end + 2)[:-2]
        if b"\n" in line:
            # Policy: a bare LF is accepted in the head, not in chunked framing
            # (RFC 9112 §7.1): leniency there enables smuggling (RFC 9112 §11.2).
            raise HTTPError(400, "bare LF in chunked framing")
        return line

    # The reader of each state; "error" has none (next_event raises).
    READERS = {"head": _read_head, "body": _read_data, "chunk-size": _read_chunk_size,
               "chunk-data": _read_data, "chunk-end": _read_chunk_end,
               "trailers": _read_trailers}


# =============================================================================
# §4  Writing responses - RFC 9112 §4, §6, §7.1, §9
#
# Response is the one response serializer: it picks the framing, adds the
# headers the server owns, and turns app bytes into wire bytes. It does no
# I/O: it returns bytes and takes the clock as an argument. Two things it
# does besides: it logs an app that breaks its own Content-Length (log.error,
# where that is found), and http_date() remembers the last date it formatted.
# =============================================================================

REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].

    RFC 9112 §2.3, RFC 9110 §15.2: always "HTTP/1.1", the version we speak,
    even to an HTTP/1.0 client; the SP stays even when the reason is empty."""
    return b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"") if reason is None
                                else reason)


# RFC 9110 §7.6.1: these describe one connection, not the message. The server
# writes its own; the app's are dropped (ASGI) or refused (section 5, WSGI).
CONNECTION_FIELDS = {b"connection", b"keep-alive", b"transfer-encoding"}

# RFC 9112 §11.1 (response splitting): nothing from the app may end a line, so
# a field line the app gives us is a token, ": ", and a value without NUL, CR, LF.
SAFE_FIELD_LINE = re.compile(rb"(?P<name>" + TOKEN + rb"): [^\x00\r\n]*")


def field_line(name: bytes, value: bytes) -> bytes:
    """b"Name: value" for a field from the app; ValueError if it is unsafe."""
    line = name + b": " + value
    match = SAFE_FIELD_LINE.fullmatch(line)
    # The token must be the whole name: the pattern alone would take the
    # name b"X: Y" as the token X and a value "Y: ...".
    if match is None or match.end("name") != len(name):
        raise ValueError(f"invalid header field: {name!r}: {value!r}")
    return line


def http_date(now: float) -> bytes:
    """RFC 9110 §5.6.7: the IMF-fixdate of the second `now` falls in (its floor)."""
    return http_date_of_second(int(now // 1))


@functools.lru_cache(maxsize=1)    # formats the date once a second, not per response
def http_date_of_second(second: int) -> bytes:
    """b"Sun, 06 Nov 1994 08:49:37 GMT": English names whatever the locale."""
    return formatdate(second, usegmt=True).encode("ascii")


def can_drain(unread: int | None) -> bool:
    """Policy: after a response, is the rest of an unread body cheap to skip?

    RFC 9112 §9.3: the next request starts after this body. We skip up to
    DRAIN_BYTES (RequestParser.drop_body), else close. A chunked body's size
    is unknown (None): we try, and close if more than DRAIN_BYTES come."""
    return unread is None or unread <= DRAIN_BYTES


def must_close(stopping: bool, body_done: bool, continue_pending: bool,
               unread: int | None) -> bool:
    """Must a response that starts now say "Connection: close"? Both servers ask.

    Yes if the server is stopping; or if the body is not all read and either
    the client still waits for "100 Continue" (RFC 9110 §10.1.1: it will not
    send the body we never asked for, so the next request cannot be found)
    or the rest is too large to skip (RFC 9112 §9.3, can_drain)."""
    return stopping or not body_done and (continue_pending or not can_drain(unread))


def encode_chunk(data: bytes) -> bytes:
    r"""RFC 9112 §7.1: chunk = chunk-size CRLF chunk-data CRLF, the size in hex.

    >>> encode_chunk(b"hello, world")
    b'c\r\nhello, world\r\n'
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


class Response:
    r"""Frames one response: status line, fields, then body bytes (RFC 9112 §4-§7).

    >>> response = Response("GET", "1.1", keep_alive=True)
    >>> print(*response.head(200, [], now=0.0).split(b"\r\n"), sep="\n")
    b'HTTP/1.1 200 OK'
    b'Date: Thu, 01 Jan 1970 00:00:00 GMT'
    b'Server: gateway'
    b'Transfer-Encoding: chunked'
    b''
    b''
    >>> response.body(b"hi"), response.end()
    (b'2\r\nhi\r\n', b'0\r\n\r\n')
    """

    def __init__(self, method: str, version: str, keep_alive: bool,
                 config: Limits | None = None) -> None:
        """A response not yet started, for a request with this method and version."""
        self.method = method
        self.version = version          # the request's: "1.0" or "1.1"
        self.keep_alive = keep_alive    # may turn False in head() and end()
        self.config = config or LIMITS  # date_header, server_header, headers
        self.framing = ""               # "none", "length", "chunked" or "close"
        self.length = 0                 # Content-Length still owed (if "length")
        self.status = 0                 # for the access log ...
        self.sent = 0                   # ... and the body bytes sent
        self.dropped = 0                # body bytes past Content-Length, not sent

    def head(self, status: int, headers: list[tuple[bytes, bytes]],
             now: float, reason: bytes | None = None) -> bytes:
        """The status line and header section for a final (>= 200) response."""
        lines = [status_line(status, reason)]
        self.status = status
        length = None
        own = set()     # names of the app's fields that the server also adds
        for name, value in headers:
            line = field_line(name, value)
            lname = name.lower()     # RFC 9110 §5.1: names are case-insensitive
            if lname in CONNECTION_FIELDS:
                if lname == b"connection" and b"close" in comma_list([value]):
                    self.keep_alive = False      # the app asked us to close
                continue
            if lname == b"content-length":
                if status < 200 or status == 204:
                    continue     # RFC 9110 §8.6: never on 1xx and 204
                # RFC 9110 §8.6, §9.3.2: kept on HEAD and 304 (the size a GET
                # would get), and never added by us when the app gave none.
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
            return "none"       # RFC 9112 §6.3 (1): no body, whatever the app sends
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
        lines += [name + b": " + value for name, value in self.config.headers   # --header
                  if name.lower() not in own]
        if self.framing == "chunked":    # RFC 9112 §6.1: never to HTTP/1.0
            lines.append(b"Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append(b"Connection: close")          # RFC 9112 §9.6
        elif self.version == "1.0":
            lines.append(b"Connection: keep-alive")     # RFC 9112 App. C.2.2
        return lines

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the body; b"" for nothing to send."""
        data = data[:self.allow(len(data))]   # none past Content-Length, or if "none"
        self.count(len(data))
        if not data:
            return b""           # RFC 9112 §7.1: an empty chunk would end the body
        return encode_chunk(data) if self.framing == "chunked" else data

    def allow(self, size: int) -> int:
        """How many of `size` more body bytes may go out."""
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
                   config: Limits | None = None, headers: tuple = ()) -> bytes:
    r"""A short text/plain response that the server writes itself, then closes.

    RFC 9110 §15.5, §15.6: a 4xx or 5xx, with a short text. RFC 9112 §9.6:
    "Connection: close", as the request's framing may be out of sync.

    >>> error_response(400, "no Host", now=0.0).split(b"\r\n")[-3:]
    [b'Connection: close', b'', b'400 Bad Request: no Host\n']
    """
    body = f"{status} {REASONS.get(status, b'').decode()}: {message}\n".encode()
    fields = [(b"Content-Type", b"text/plain; charset=utf-8"),
              (b"Content-Length", b"%d" % len(body)), *headers]
    response = Response("GET", "1.1", keep_alive=False, config=config)
    return response.head(status, fields, now) + body


# RFC 9110 §15.2.1; never sent to an HTTP/1.0 client (RFC 9110 §15.2), which
# is why parse_head sets expect_continue for HTTP/1.1 requests only.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# =============================================================================
# §5  WSGI adapter - PEP 3333
#
# What a worker thread does for one request, in the PEP's order: build the
# environ, call the app, hand each piece of the response on, and always
# close() the result. Nothing here touches a socket: bytes go to the loop
# thread through the connection's put() and finish() in section 6 (WSGI
# connections), which is also where a call waits while the client reads.
# =============================================================================


def split_root_path(root_path: str, path: str) -> tuple[str, str]:
    """Split a decoded request path at the mount point: (script_name, path_info).

    One rule for both adapters. PEP 3333 "environ Variables": SCRIPT_NAME +
    PATH_INFO is the whole path, SCRIPT_NAME never ends in "/", and PATH_INFO
    is empty or starts with "/". ASGI HTTP "Connection Scope": root_path is
    SCRIPT_NAME and path the whole path, so build_scope in section 8 (ASGI
    HTTP adapter) takes script_name and script_name + path_info.

    >>> split_root_path("/api/", "/api/users"), split_root_path("/api", "/apix")
    (('/api', '/users'), ('/api', '/apix'))
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
    r"""The environ of one request: a new dict (PEP 3333 "Specification Details")
    with the keys of PEP 3333 "environ Variables". Each CGI-style value is a
    str of latin-1 code points ("Unicode Issues", "A Note On String Types").

    >>> parser = RequestParser()
    >>> parser.feed(b"GET /api/caf%C3%A9?q=a+b HTTP/1.1\r\nHost: example\r\n"
    ...             b"X-Id: 7\r\nX-Id: 8\r\n\r\n")
    >>> environ = build_environ(parser.next_event(), io.BytesIO(), ("example", 80),
    ...                         ("10.0.0.1", 5000), Config(root_path="/api"))
    >>> environ["SCRIPT_NAME"], environ["PATH_INFO"], environ["QUERY_STRING"]
    ('/api', '/cafÃ©', 'q=a+b')
    >>> environ["HTTP_X_ID"], environ["SERVER_PORT"], environ["REMOTE_PORT"]
    ('7, 8', '80', '5000')
    """
    # PEP 3333 "Unicode Issues": native strings hold the bytes as latin-1.
    script_name, path_info = split_root_path(
        config.root_path, unquote_to_bytes(request.path).decode("latin-1"))
    environ = {
        "REQUEST_METHOD":        request.method,
        "SCRIPT_NAME":           script_name,
        "PATH_INFO":             path_info,
        "QUERY_STRING":          request.query.decode("latin-1"),   # not decoded
        "SERVER_NAME":           str(server[0]),
        "SERVER_PORT":           str(server[1] or 0),   # 0: a unix socket
        "SERVER_PROTOCOL":       "HTTP/" + request.version,
        "SERVER_SOFTWARE":       SERVER_NAME.decode(),
        "wsgi.version":          (1, 0),
        "wsgi.url_scheme":       scheme,
        "wsgi.input":            body,
        "wsgi.errors":           sys.stderr,   # PEP 3333 "Input and Error Streams"
        # PEP 3333 "Thread Support": true if another thread may call the app
        # while this call runs; --threads 1 calls it on one thread only.
        "wsgi.multithread":      config.threads > 1,
        "wsgi.multiprocess":     config.workers > 1,
        "wsgi.run_once":         False,
        # Not in PEP 3333: a de-facto convention (Werkzeug reads it) for
        # "wsgi.input ends where the body ends, so read to EOF", as ours does.
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper":     FileWrapper,
    }
    if client is not None:   # PEP 3333 "environ Variables": omit what does not apply
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(client[0]), str(client[1])
    if scheme == "https":
        environ["HTTPS"] = "on"
    add_header_variables(environ, request.headers)
    return environ


def add_header_variables(environ: dict, headers: list[tuple[bytes, bytes]]) -> None:
    """PEP 3333 "environ Variables": CONTENT_TYPE, CONTENT_LENGTH, HTTP_* (CGI)."""
    for name, value in headers:
        key = environ_key(name)
        if key in environ:   # RFC 9110 §5.3: repeated fields join with commas
            environ[key] += ", " + value.decode("latin-1")
        elif key is not None:     # None: environ_key() leaves the field out
            environ[key] = value.decode("latin-1")


@functools.lru_cache(maxsize=256)   # cached: the same few names come in every request
def environ_key(name: bytes) -> str | None:
    """b"user-agent" -> "HTTP_USER_AGENT" (RFC 3875 §4.1.18); None: leave it out."""
    if b"_" in name:
        # Policy: RFC 3875 §4.1.18 turns "-" into "_": "X_Forwarded_For" would
        # pass for the "X-Forwarded-For" a proxy set. Such a field is left out.
        return None
    key = name.decode("latin-1").upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def call_wsgi_app(app, environ: dict, response: WSGIResponse):
    """One application call, in the order of PEP 3333 "Specification Details".

    Read this first; wsgiref's BaseHandler.run() has the same shape. It is a
    generator only to pause: it yields after each piece of body, and there
    WSGICall.resume may set the call aside while a slow client reads. Errors
    propagate, after close().
    """
    # PEP 3333 "Specification Details": called once, positionally;
    # start_response() may run now or in the first next() of the result.
    result = app(environ, response.start_response)
    try:
        if response.send_whole(result):    # a one-item list
            return
        for data in result:   # PEP 3333 "Specification Details": iter, len, close
            if data:          # PEP 3333 "Buffering and Streaming": b"" sends nothing
                response.send(data)
                if response.length_sent():
                    return    # PEP 3333 "Handling the Content-Length Header": all sent
                yield
    finally:
        if hasattr(result, "close"):   # always: PEP 3333 "Specification Details"
            response.close_result(result)


class WSGIInput:
    """wsgi.input for a body still arriving (PEP 3333 "Input and Error Streams").

    The loop thread feed()s bytes in; the app's worker thread reads them out,
    waiting when none are there yet. read() returns b"" at the end of the body
    and never reads into the next request. Both threads share all of it under
    `ready`, except send_continue (the worker's alone).
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
        # RFC 9110 §10.1.1, PEP 3333 "HTTP 1.1 Expect/Continue": the client
        # waits for "100 Continue" before it sends the body. We send it on the
        # app's first read: an app that answers at once (a 401) spares the upload.
        self.send_continue = expect_continue and not parts

    # Runs on: the loop thread.
    def feed(self, data: bytes, unread: int | None) -> None:
        """Add body bytes, wake read(); past HIGH_WATER (no read() waiting) pause."""
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

    def full(self) -> bool:
        """Should the loop stop reading this body until the app has read some?"""
        with self.ready:
            return self.paused

    # Runs on: a worker thread.
    def response_starts(self) -> tuple[bool, bool, int | None]:
        """(body complete, 100 Continue still owed, bytes not received) for
        must_close(); RFC 9110 §10.1.1: no 100 after the final response starts."""
        pending, self.send_continue = self.send_continue, False
        with self.ready:
            return self.complete, pending, self.unread

    def refused(self) -> HTTPError | None:
        """The client's framing error that ended this body early, if any."""
        with self.ready:
            return self.refusal

    def _wait(self, enough) -> None:
        """Wait until enough(buffer) is true or no more bytes will come."""
        if self.send_continue:    # PEP 3333 "HTTP 1.1 Expect/Continue": first read
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
                raise self.error      # RFC 9112 §8: never a short body as a whole one

    def _take(self, size: int) -> bytes:
        """Cut `size` bytes off the buffer; below LOW_WATER, a paused loop reads on."""
        with self.ready:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            if self.paused and len(self.buffer) < LOW_WATER:
                self.paused = False
                self.conn.server.wake(self.conn)    # ask the loop to read again
        return data

    def read(self, size: int | None = -1) -> bytes:
        """PEP 3333 "Input and Error Streams": `size` bytes (fewer only at the end
        of the body), or all the rest; b"" once the body is over."""
        if size is None or size < 0:
            size = sys.maxsize                        # the whole rest
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
        """PEP 3333 "Input and Error Streams": the lines left, or about `hint` bytes."""
        lines = []
        for line in self:
            lines.append(line)
            if hint is not None and 0 < hint <= sum(map(len, lines)):
                break
        return lines

    def __iter__(self):
        """Line by line, as PEP 3333 "Input and Error Streams" asks of wsgi.input."""
        return iter(self.readline, b"")


class WSGIResponse:
    """start_response() and write() for one request (PEP 3333), framed by the
    Response of section 4 (Writing responses). Runs on: a worker thread."""

    def __init__(self, conn: WSGIConnection, request: Request,
                 body: WSGIInput | None) -> None:
        """Nothing sent yet, and no status: start_response() gives it."""
        self.conn = conn
        self.body = body         # None: the body was whole before the app ran
        self.response = Response(request.method, request.version, request.keep_alive,
                                 conn.server.config)
        self.status: str | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_sent = False
        self.called = False      # start_response() was called, even if it raised
        self.last = b""          # a one-item body, sent with the end (send_whole)

    def start_response(self, status: str, headers: list, exc_info=None):
        """PEP 3333 "The start_response() Callable" (and "Error Handling")."""
        if exc_info:
            try:
                if self.head_sent:   # too late to change: re-raise the app's error
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None      # PEP 3333: avoid a reference cycle
        elif self.called:
            # PEP 3333 "The start_response() Callable": only an error handler
            # (with exc_info) may call again; a first call that raised counts.
            raise AssertionError("start_response() called twice without exc_info")
        self.called = True
        self.headers = check_wsgi_headers(status, headers)
        self.status = status
        if self.conn.trace:
            self.conn.trace("app", f"start_response({status!r}, {headers!r})")
        return self.write

    def _head(self) -> bytes:
        """The response head, the first time body bytes are ready for it.

        PEP 3333 "The start_response() Callable": start_response() only
        stores the status and headers; they go out with the first non-empty
        body bytes (or when the app is done), so an app can still replace
        them with an error page until then. Response.head adds Date and Server.
        RFC 9112 §9.3: must_close() in section 4 (Writing responses) says if
        it is the connection's last response, for WSGI and ASGI alike.
        """
        if self.status is None:
            # PEP 3333 "Specification Details": a body with no start_response()
            # is the app's error (a 500, in wsgi_failure).
            raise AssertionError("the app sent a body before calling start_response()")
        done, pending, unread = (self.body.response_starts() if self.body
                                 else (True, False, 0))   # body read before the call
        if must_close(self.conn.server.stopping.is_set(), done, pending, unread):
            self.response.keep_alive = False
        code, _, reason = self.status.partition(" ")
        head = self.response.head(int(code), self.headers, time.time(),
                                  reason.encode("latin-1"))
        self.head_sent = True
        if self.conn.trace:
            self.conn.trace.head("<", head)
        return head

    def send(self, data: bytes, wait: bool = False) -> None:
        """Queue a piece of body, the head first; with `wait`, as write() must,
        wait for room. RFC 9110 §9.3.2: for HEAD, Response drops the body."""
        if type(data) is not bytes:    # PEP 3333 "Unicode Issues": bytes only
            raise TypeError(f"WSGI body must be bytes, not {type(data).__name__}")
        head = b"" if self.head_sent else self._head()
        if self.conn.trace:
            self.conn.trace("app", "body " + brief(data))
        self.conn.put(head + self.response.body(data), wait)

    def write(self, data: bytes) -> None:
        """PEP 3333 "The write() Callable": queued in order before it returns.

        PEP 3333 "Handling the Content-Length Header": writing past the declared
        Content-Length raises. Policy: the bytes that still fit go out first, so
        the client gets the whole body promised; then it closes (Response.allow).
        """
        dropped = self.response.dropped
        self.send(data, wait=True)
        if self.response.dropped > dropped:
            raise ValueError(f"write() past Content-Length: "
                             f"{self.response.dropped - dropped} bytes not sent")

    def send_whole(self, result) -> bool:
        """Take a result that need not be iterated: False if it must be."""
        if self.head_sent:
            return False
        if type(result) is FileWrapper:
            size_file(result, self.headers)
            return False        # iterated, a block at a time
        try:
            if len(result) != 1:
                return False
        except TypeError:      # no len(): iterate it (PEP 3333 "Specification Details")
            return False
        # PEP 3333 "Handling the Content-Length Header": a one-item body has
        # a known length, so the client can keep the connection open.
        self.last = next(iter(result))
        # RFC 9110 §8.6, §9.3.2: a HEAD's Content-Length is the GET body's; what
        # the app returned (often b"") does not tell it: we add none, keep its own.
        if (self.status is not None and type(self.last) is bytes
                and self.response.method != "HEAD" and not has_length(self.headers)):
            self.headers.append((b"Content-Length", b"%d" % len(self.last)))
        return True

    def length_sent(self) -> bool:
        """Is all of the declared Content-Length sent? Then the body is done."""
        return self.response.framing == "length" and not self.response.length

    def close_result(self, result) -> None:
        """Call the result's close(). Policy: if it fails, the response (whole
        by then) still goes out, and the connection closes after it."""
        try:
            result.close()
        except BaseException:
            log.exception("error in the close() of a WSGI result")
            self.response.keep_alive = False

    def final_bytes(self) -> bytes:
        """The rest of the response once the app is done: head, last item, end."""
        if type(self.last) is not bytes:   # PEP 3333 "Unicode Issues"
            raise TypeError(f"WSGI body must be bytes, not {type(self.last).__name__}")
        head = b"" if self.head_sent else self._head()
        return head + self.response.body(self.last) + self.response.end()


# PEP 3333 "The start_response() Callable": a code, one space, a reason, and no
# control characters. RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
# Policy: HTAB passes (the RFC allows it and it cannot end a line); other C0
# controls and DEL do not. A str pattern: obs-text is U+0080-U+00FF.
# RFC 9110 §15: codes are 100-599, and a 1xx is interim, never an app's final
# status: so 200-599, as for ASGI.
WSGI_STATUS = re.compile(r"[2-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")


def check_wsgi_headers(status: str, headers: list) -> list[tuple[bytes, bytes]]:
    """PEP 3333 "The start_response() Callable": the status is "NNN reason",
    the headers a list of (str, str) tuples; anything else raises here."""
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
        # start_response is called", so field_line() (RFC 9112 §11.1) runs
        # here, while the app can still catch the error, as well as in head().
        # PEP 3333 "Unicode Issues": values are latin-1 (else encode() raises).
        pair = name.encode("latin-1"), value.encode("latin-1")
        field_line(*pair)
        if name.lower() in ("connection", "keep-alive", "transfer-encoding",
                            "upgrade", "te", "trailer", "proxy-authenticate",
                            "proxy-authorization"):
            # PEP 3333 "Other HTTP Features": hop-by-hop headers are the server's.
            raise ValueError(f"hop-by-hop header not allowed in a WSGI app: {name!r}")
        encoded.append(pair)
    return encoded


class WSGICall:
    """call_wsgi_app() on the worker threads, parked while the client reads.

    Runs on: one worker thread at a time (none while parked).
    PEP 3333 "Buffering and Streaming": each piece of body is handed on
    before the next is asked for. When more than HIGH_WATER bytes wait for a
    slow client, resume() leaves the call with the connection at one of
    call_wsgi_app's pauses and returns, so a slow client holds no thread;
    the loop submits resume() again once the client has caught up.
    """

    def __init__(self, conn: WSGIConnection, request: Request, environ: dict,
                 started: float, client: tuple | None = None,
                 body: WSGIInput | None = None) -> None:
        """A call not made yet."""
        self.conn = conn
        self.client = client             # as the app sees it (proxies considered)
        self.request = request
        self.environ = environ
        self.started = started
        self.response = WSGIResponse(conn, request, body)
        self.steps = call_wsgi_app(conn.server.app, environ, self.response)

    def run(self) -> None:
        """Make the call, unless the client reset while it was queued (a FIN
        alone is no reason: a half-closed client still reads)."""
        if self.conn.is_closed():
            self.end(b"")
        else:
            self.resume()

    def resume(self) -> None:
        """Run the call on to its end, or until it parks.

        PEP 3333 "Error Handling": any exception ends it in wsgi_failure(), even
        an app's sys.exit() or KeyboardInterrupt: that ends the request, not a worker.
        """
        try:
            for _ in self.steps:
                if self.conn.park_if_full(self):
                    return        # resumed by the loop when the client catches up
            final = self.response.final_bytes()
        except BaseException as error:
            final = wsgi_failure(self.response, self.environ, error)
        self.end(final)

    def end(self, final: bytes) -> None:
        """Log the request and hand the last bytes to the loop."""
        response = self.response
        # Policy: the access line shows what the client was sent: the app's
        # status, or our error answer's; "-" when it left before either.
        status = response.response.status if response.head_sent or final else "-"
        log_access(self.conn.server.config, self.client, self.request, status,
                   response.response.sent, self.started)
        self.conn.finish(final, response.response.keep_alive)   # last: see finish()


def wsgi_failure(response: WSGIResponse, environ: dict, error: BaseException) -> bytes:
    """PEP 3333 "Error Handling": a 500 if nothing was sent, else cut it short."""
    response.response.keep_alive = False
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
    return error_response(status, reason, time.time(), response.conn.server.config)


# =============================================================================
# §6  WSGI connections - one client socket on the selectors loop
#
# The loop thread owns every socket: it reads, parses and writes. WSGI apps
# block, so each app call runs on a worker thread in section 5 (WSGI adapter).
# The two threads share only what this table names, each under its lock:
#
#   state                                   owner           guarded by
#   --------------------------------------  --------------  --------------------
#   the socket, parser, `sending`, `state`  the loop        nothing: one thread
#   and the other flags of WSGIConnection
#   outbox unsent parked finished closed    loop + worker   WSGIConnection.room
#   WSGIInput's buffer and flags            loop + worker   WSGIInput.ready
#   WSGIInput.send_continue, WSGIResponse,  the worker      nothing: one thread
#   WSGICall (a parked call: nobody's)      running it      at a time
#   WSGIServer.woken and wake_sent          any thread      WSGIServer.wake_lock
#   WSGIServer.stopping (the loop sets it)  loop + worker   a threading.Event
#   WorkerPool.jobs, sleeping, stopping     loop + worker   WorkerPool.lock
#
# A worker never reads the loop's state, and only the loop closes a
# connection: a worker's response may say "Connection: close", and the
# loop acts on it. Both directions are bounded: the loop stops reading a
# body the app has not consumed, and a worker waits (or parks its call)
# while too much of its output is unsent.
# =============================================================================


class WSGIConnection:
    """One client socket. Runs on: the loop thread, unless a method says so.

    Its states, and what moves it from one to the next:

      handshake --TLS done--> idle --head--> reading --> app --finished--> sending
                               ^                                              |
                               +--- draining <--- body left unread ----------+
                               +------------------- keep-alive -------------+
                                                    closing <--- close -----+

    idle      waiting for a request head (some of it may have arrived).
    reading   a head is parsed; a chunked body is spooled whole first (the app
              then gets its length); any other request goes to a worker at once.
    app       a worker runs the call; body bytes go on into its WSGIInput.
    sending   the worker has finished (or the loop answers for itself, e.g.
              a 400): the last bytes go out, then end_response() decides.
    draining  skipping a body the app left unread (RFC 9112 §9.3).
    closing   our FIN is sent; we read and discard until the client's.
    And `closed`, from any state: the socket is gone.
    """

    def __init__(self, server: WSGIServer, sock: socket.socket, client: tuple) -> None:
        """A new connection, with an empty parser and nothing to send."""
        self.server = server
        self.sock = sock
        self.client = client if isinstance(client, tuple) else None   # None: unix
        self.tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
        self.scheme = "https" if self.tls else "http"
        self.state = "handshake" if self.tls else "idle"
        self.wants = selectors.EVENT_READ    # what the TLS handshake waits for
        self.events = 0                      # what the selector watches for us
        self.parser = RequestParser(server.config)
        self.sending = bytearray()           # bytes queued, in order, not yet sent
        # The clocks of expire(): `since` this idle (or closing) phase began, or
        # the head under way its first byte; when bytes last came in, and when
        # sending last made progress.
        self.since = self.last_read = self.last_write = time.monotonic()
        self.peer_eof = False            # client FIN: only requests buffered remain
        self.trace = Trace() if server.config.trace else None
        self.room = threading.Condition()   # guards the five below
        self.outbox: list = []              # bytes put() and not yet taken
        self.unsent = 0                     # bytes queued and not yet sent
        self.parked: WSGICall | None = None   # a call waiting for the client
        self.finished: bool | None = None   # the worker's keep-alive answer, once done
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        """Forget the last request: the connection is ready for the next one."""
        self.request: Request | None = None
        self.body_parts: list[bytes] = []    # body bytes that came with the head
        self.body: WSGIInput | None = None   # a body still arriving, for the app
        self.spool: tempfile.SpooledTemporaryFile | None = None   # a chunked body
        self.body_complete = False    # no more body for the app: all came, or failed
        self.keep_alive = True        # off: a refused request, or "Connection: close"

    def waiting_for_body(self) -> bool:
        """Is a request's body still arriving (for the spool or the app)?"""
        return self.state in ("reading", "app", "sending") and not self.body_complete

    def ready_to_submit(self) -> bool:
        """Can the request go to a worker? (a chunked body only once spooled)"""
        return self.state == "reading" and (self.body_complete or self.spool is None)

    # -- reading ---------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        """The selector's callback: a TLS handshake step, or read, then write;
        then watch for what comes next."""
        if self.state == "handshake":
            self.handshake()
        else:
            if mask & selectors.EVENT_READ:
                self.on_readable()
            if mask & selectors.EVENT_WRITE and not self.closed:
                self.flush()
        self.watch()

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
        else:
            self.state, self.since = "idle", time.monotonic()

    def on_readable(self) -> None:
        """Read what the client sent and parse it; an empty read is its FIN."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except WOULD_BLOCK:
            return
        except OSError:              # e.g. a reset: nothing can be sent either
            self.close()
            return
        if not data:
            self.on_eof()
        elif self.state != "closing":    # closing: what comes is read and dropped
            self.last_read = time.monotonic()
            if self.state == "idle" and not self.parser.has_partial_request:
                self.since = self.last_read     # a head: its timeout starts now
            self.parser.feed(data)
            self.process()

    def on_eof(self) -> None:
        """The client sent FIN (read now, or before end_response()): close if there
        is nothing to answer, fail a body still arriving, or let the response go out."""
        self.peer_eof = True
        # Closing: the lingering close is over (RFC 9112 §9.6). Idle, mid-head
        # or mid-spool: there is no request to answer (RFC 9112 §8).
        if self.state in ("closing", "idle", "reading", "draining"):
            self.close()
        elif self.waiting_for_body():
            # RFC 9112 §8: an incomplete body is never reported as complete.
            self.end_body(ClientDisconnected("client closed mid-body"))

    def process(self) -> None:
        """Parse what has arrived, then hand a request that is ready to a worker."""
        try:
            while self.parse_one():
                pass
        except HTTPError as error:
            self.on_bad_request(error)
        if self.ready_to_submit():
            self.submit()

    def parse_one(self) -> bool:
        """One step: skip unread body, start a request, or pass body bytes on.
        False when more bytes are needed, or none are wanted now."""
        if self.state == "draining":
            if self.parser.drop_body() is not None:
                return False                  # RFC 9112 §9.3: more body to skip
            self.state, self.since = "idle", time.monotonic()
        if self.state != "idle" and (not self.waiting_for_body() or (
                self.body is not None and self.body.full())):
            return False       # no body to pass on: none left, or the app has enough
        event = self.parser.next_event()
        if event is None:
            return False
        if self.state == "idle":
            self.start_request(event)     # the parser's first event is the head
        elif event is END:
            self.end_body()
        elif self.body is not None:
            self.body.feed(event, self.parser.unread_body())
        elif self.spool is not None:
            self.write_spool(event)
        else:
            self.body_parts.append(event)
        return True

    def start_request(self, request: Request) -> None:
        """Begin serving a request head: read its body, for the spool or the app."""
        self.state, self.request = "reading", request
        self.started = time.monotonic()
        if self.trace:
            self.trace.head(">", self.parser.last_head)
        if request.chunked:
            # Policy: many frameworks read exactly CONTENT_LENGTH bytes and see
            # no body without it, so a chunked body is collected first (in
            # memory, then on disk) and the app gets its length, against the
            # letter of PEP 3333 "environ Variables". --limit-spool bounds it.
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
            # Disk full, file too large, out of descriptors: the request fails.
            log.warning("cannot store a chunked request body: %s", error)
            if error.errno == errno.EFBIG:
                raise HTTPError(413, "request body too large to store") from None
            if error.errno in STORAGE_FULL:
                # RFC 9110 §15.6.4: 503, a condition that is likely temporary.
                raise HTTPError(503, "no room to store the request body") from None
            raise HTTPError(500, "cannot store the request body") from None

    def close_spool(self) -> None:
        """Close the spool file, even if a full disk refuses its last flush."""
        with contextlib.suppress(OSError):
            self.spool.close()

    def on_bad_request(self, error: HTTPError) -> None:
        """Answer a request the parser refused, then close (RFC 9112 §9.6)."""
        self.keep_alive = False
        if self.state in ("idle", "reading", "draining"):   # the app never saw it
            self.send_now(error_response(error.status, error.reason, time.time(),
                                         self.server.config))
        else:                      # the app is reading the body: stop it there
            self.end_body(ClientDisconnected("malformed request body"), error)

    def end_body(self, error: Exception | None = None,
                 refusal: HTTPError | None = None) -> None:
        """No more body for the app: it all came, or `error` cut it short (that
        is what the app's read() raises). Wakes a read() that waits."""
        self.body_complete = True
        if self.body is not None:
            self.body.finish(error, refusal)

    def submit(self) -> None:
        """Hand the request to a worker thread, with what we have of its body."""
        request, config = self.request, self.server.config
        self.state, self.last_read = "app", time.monotonic()
        if self.spool is not None:
            body, length = self.spool, self.spool.tell()   # de-chunked, whole
            body.seek(0)
        elif self.body_complete:
            body = io.BytesIO(b"".join(self.body_parts))   # no waiting needed
        else:
            body = self.body = WSGIInput(self, self.body_parts, request.expect_continue,
                                         self.parser.unread_body())
        client, scheme, host = behind_proxy(request, self.client, self.scheme, config)
        environ = build_environ(request, body, self.server.address, client, config,
                                scheme)
        if host:
            environ["HTTP_HOST"] = host
        if self.spool is not None:
            environ["CONTENT_LENGTH"] = str(length)
        if self.trace:
            self.trace.mapping("environ", environ)
        call = WSGICall(self, request, environ, self.started, client, self.body)
        self.server.pool.submit(call.run)

    # -- the worker's side: runs on a worker thread ----------------------------

    def put(self, data: bytes, wait: bool = True) -> None:
        """Runs on: a worker. Queue bytes to send; with `wait`, first wait
        while more than HIGH_WATER bytes are unsent. The client has gone if
        the connection closed meanwhile."""
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
        self.server.wake(self)     # the loop may have sent it all meanwhile
        return True

    def finish(self, data: bytes, keep_alive: bool) -> None:
        """Runs on: a worker. The last bytes of the response; the worker is done
        with this connection (so nothing may follow: the loop may now close it)."""
        with self.room:
            self.outbox.append(data)
            self.unsent += len(data)
            self.finished = keep_alive
        self.server.wake(self)

    def is_closed(self) -> bool:
        """Runs on: a worker. Has the loop closed this connection?"""
        with self.room:
            return self.closed

    # -- writing ---------------------------------------------------------------

    def on_wake(self) -> None:
        """A worker put bytes, finished, or read enough of the body to go on."""
        with self.room:
            outbox, self.outbox = self.outbox, []
            finished, self.finished = self.finished, None
        for item in outbox:
            self.queue_output(item)
        if finished is not None:
            self.state, self.keep_alive = "sending", self.keep_alive and finished
        self.resume_parked()         # it parked after the loop had caught up
        if self.waiting_for_body():
            self.process()           # the app made room for more body
        self.flush()
        self.watch()

    def resume_parked(self) -> None:
        """Give a parked call back to a worker thread once at most LOW_WATER
        bytes are unsent, or the client has gone (the call then ends there)."""
        with self.room:
            call = self.parked
            if call is None or (self.unsent > LOW_WATER and not self.closed):
                return
            self.parked = None
        self.server.pool.submit(call.resume)

    def queue_output(self, item: bytes) -> None:
        """Add bytes to what the loop will send, in order."""
        if not self.sending:
            self.last_write = time.monotonic()
        self.sending += item          # one send() for adjacent pieces

    def queue_own(self, data: bytes) -> None:
        """Queue bytes the loop itself produced (not put() by a worker)."""
        with self.room:
            self.unsent += len(data)
        self.queue_output(data)

    def send_now(self, data: bytes) -> None:
        """Send the loop's own answer (an error, a 503) as this connection's last."""
        if self.trace:
            self.trace.head("!", data)
        self.queue_own(data)
        self.state, self.keep_alive = "sending", False
        self.body_complete = True        # nothing more of this request is read
        self.flush()

    def flush(self) -> None:
        """Send what we can without blocking; end the response once all is out."""
        while self.sending:
            try:
                sent = self.sock.send(self.sending)
                del self.sending[:sent]
            except WOULD_BLOCK:
                return
            except OSError:
                self.close()
                return
            self.last_write = time.monotonic()
            with self.room:
                self.unsent -= sent
                if self.unsent <= LOW_WATER:
                    self.room.notify()    # a worker may be waiting in put()
            self.resume_parked()
            if self.sending:
                return                    # the socket is full: wait for EVENT_WRITE
        if self.state == "sending":
            self.end_response()

    def end_response(self) -> None:
        """RFC 9112 §9.3: keep the connection for the next request, or close
        (RFC 9112 §9.6: no request after a "Connection: close" is served)."""
        keep = self.keep_alive and not self.server.stopping.is_set()
        unread = not self.body_complete
        if self.spool is not None:
            self.close_spool()       # the app is done with it: free the disk now
        self._reset()
        self.since = self.last_read = time.monotonic()
        if not keep:
            self.close_gracefully()
            return
        self.state = "draining" if unread else "idle"
        self.process()     # RFC 9112 §9.3.2: a pipelined request may be waiting
        # After the client's FIN, only requests it sent before it remain.
        if self.peer_eof:   # and no read reports it again: what is unfinished now
            self.on_eof()   # (a head, a body) never will be (RFC 9112 §8)

    # -- the selector, timeouts and closing ------------------------------------

    def watch(self) -> None:
        """Tell the selector what this connection is waiting for now.

        TLS: bytes the ssl module has already decrypted make no socket
        readable, so select() would never report them: read them here."""
        while not self.closed:     # e.g. a 408 that could not be written closed it
            if self.state == "handshake":
                events = self.wants
            else:
                events = ((selectors.EVENT_READ if self.wants_to_read() else 0)
                          | (selectors.EVENT_WRITE if self.sending else 0))
            if events != self.events:
                if self.events == 0:
                    self.server.selector.register(self.sock, events, self)
                elif events == 0:
                    self.server.selector.unregister(self.sock)
                else:
                    self.server.selector.modify(self.sock, events, self)
                self.events = events
            if not (self.tls and events & selectors.EVENT_READ and self.sock.pending()):
                return
            self.on_readable()

    def wants_to_read(self) -> bool:
        """Should the selector wake us for bytes from the client?"""
        if self.peer_eof:    # never while closing: a FIN then closes at once
            return False
        if self.state in ("idle", "draining", "closing"):
            return True                     # closing: discard until the client's FIN
        if self.waiting_for_body():         # unless the app has enough unread
            return self.body is None or not self.body.full()
        return len(self.parser.buffer) < MAX_HEAD_BYTES   # pipelined, bounded

    def close_gracefully(self) -> None:
        """RFC 9112 §9.6: send FIN, then read and discard until the client's FIN:
        closing with unread bytes in the socket would send a TCP reset, which
        can destroy the last response before the client reads it."""
        if self.peer_eof:
            self.close()
            return
        self.state, self.since = "closing", time.monotonic()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def close(self) -> None:
        """Close the socket now; a worker still busy with it learns from put()."""
        if self.closed:
            return
        with self.room:
            self.closed = True
            self.room.notify_all()   # a worker waiting in put() must see this
        if self.events:
            self.events = 0
            # KeyError, ValueError: never registered, or the selector lost it.
            with contextlib.suppress(KeyError, ValueError):
                self.server.selector.unregister(self.sock)
        self.sock.close()
        if self.spool is not None and self.state != "app":
            self.close_spool()       # no worker reads it (any more)
        self.server.connections.discard(self)
        self.resume_parked()         # a parked call ends (and close()s) on a worker
        self.end_body(ClientDisconnected("connection closed"))


# =============================================================================
# §7  WSGI server - the selectors loop, wake-ups and the worker pool
#
# WSGIServer runs the loop: it accepts clients, calls each connection back
# when its socket is ready, wakes up when a worker has something for a
# connection (the self-pipe trick: a byte on a socketpair), and checks the
# clocks. WorkerPool is the worker threads. Graceful shutdown lets the
# requests in progress finish, each answer saying "Connection: close".
# Also here: wsgi.file_wrapper (FileWrapper, an iterable of the file's
# blocks, and size_file(), its Content-Length), has_length(), and
# release_memory(), which both servers call.
# =============================================================================


class WorkerPool:
    """A few threads that run WSGI app calls, oldest first.

    Runs on: the loop (submit, wake_workers, stop) and its workers (_work).
    The plain pool (a queue, N threads, a None each to stop) would wake a
    thread for every request; here an awake worker runs queued calls one
    after another and sleeps only when none is left, on a lock of its own,
    and the loop wakes a sleeper just before it waits in select(): one when
    calls are queued and every worker sleeps, and one more each
    WORKER_WAIT_SECONDS while the oldest call has waited that long (the awake
    ones are busy in apps). What it buys: fewer thread switches and fights
    over the GIL per request (bench/README.md has the figures).

    With one thread (--threads 1, PEP 3333 "Thread Support") the calls run
    one after another, oldest first. A call parked for a slow reader
    (WSGIConnection.park_if_full) has given its thread back, so the next
    request runs meanwhile and the parked one resumes after it.
    """

    def __init__(self, count: int) -> None:
        """Start `count` worker threads, with nothing queued."""
        self.jobs: collections.deque = collections.deque()    # (queued at, function)
        self.lock = threading.Lock()         # guards jobs, sleeping and stopping
        self.sleeping: list[threading.Lock] = []   # the held lock of each sleeper
        self.last_wake = 0.0                 # when the loop last woke a worker
        self.stopping = False                # stop(): end once the queue is empty
        self.threads = [threading.Thread(target=self._work, daemon=True,
                                         name=f"gateway-worker-{n}")
                        for n in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, function) -> None:
        """Queue a call, stamped with the time; wake_workers() wakes a worker for it."""
        with self.lock:
            self.jobs.append((time.monotonic(), function))   # no wake-up: see below

    def wake_workers(self, now: float, longest: float) -> float:
        """Wake a sleeper if the queue needs one; return how long select() may wait.

        Called by the loop just before select(), not by submit(): the calls
        queued in one turn of the loop then cost one wake-up at most, and a
        worker that is awake anyway takes them without any.
        """
        with self.lock:
            if not (self.jobs and self.sleeping):
                return longest           # nothing queued, or nobody to wake
            # Overdue: the awake workers are all inside slow app calls. Add
            # one more, and no more than one each WORKER_WAIT_SECONDS.
            overdue = (now - self.jobs[0][0] >= WORKER_WAIT_SECONDS
                       and now - self.last_wake >= WORKER_WAIT_SECONDS)
            if len(self.sleeping) == len(self.threads) or overdue:   # all asleep
                self.sleeping.pop().release()    # ring one sleeper's own bell
                self.last_wake = now
            return min(longest, WORKER_WAIT_SECONDS)   # look at the queue again soon

    def _work(self) -> None:
        """A worker thread: run queued calls, oldest first; when none is left,
        sleep on a lock of its own until woken; end once stopping and idle."""
        # Why a lock of its own, not a Condition on self.lock: wait() would
        # have to take self.lock back on waking, so a woken worker could find
        # the loop holding it and sleep again. This bell is released by the
        # loop and acquired here with self.lock free; a release() that comes
        # before the acquire() is not lost: acquire() then returns at once.
        bell = threading.Lock()
        bell.acquire()               # held: acquire() again sleeps until a release()
        while True:
            with self.lock:
                job = self.jobs.popleft()[1] if self.jobs else None   # oldest first
                if job is None:
                    if self.stopping:
                        return
                    self.sleeping.append(bell)   # under the lock: the loop sees it
            if job is None:
                bell.acquire()       # asleep here until wake_workers() or stop()
                continue
            try:
                job()
            except BaseException:   # WSGICall catches the app's; this is ours
                log.exception("internal error in a worker thread")

    def stop(self) -> None:
        """Let the workers finish what is queued, then end."""
        with self.lock:
            self.stopping = True
            for bell in self.sleeping:
                bell.release()        # each sleeper wakes, empties the queue, ends
            self.sleeping.clear()


class FileWrapper:
    """wsgi.file_wrapper (PEP 3333 "Optional Platform-Specific File Handling").

    The PEP lets a server send a wrapped file by a platform mechanism (such
    as sendfile()) but never requires it: iterating the wrapper is always
    correct. So here it is an iterable like any other: call_wsgi_app reads
    it on the worker, a block at a time; each block is framed like any body
    (section 4, Response), and the call parks while a slow client catches up.
    """

    def __init__(self, filelike, block_size: int = 8192) -> None:
        """Wraps a file-like object, to be read in blocks of `block_size` bytes."""
        self.filelike = filelike
        self.block_size = block_size
        self.limit: int | None = None    # most bytes to read; None: to the end

    def __iter__(self):
        """Read the file from where it is now, a block at a time, to its end
        (or until `limit` bytes are read)."""
        left = sys.maxsize if self.limit is None else self.limit
        while left > 0:
            block = self.filelike.read(min(self.block_size, left))
            if not block:
                return
            left -= len(block)
            yield block

    def size(self) -> int | None:
        """The bytes from the position to the end, for a regular file; else None."""
        try:
            info = os.fstat(self.filelike.fileno())
            if stat.S_ISREG(info.st_mode):
                return max(0, info.st_size - self.filelike.tell())
        except (AttributeError, OSError, ValueError):
            pass        # no fileno() (BytesIO), or a pipe: read it to its end
        return None

    def close(self) -> None:
        """Close the wrapped file, if it has a close(): PEP 3333 "Optional
        Platform-Specific File Handling" passes the result's close() on."""
        if hasattr(self.filelike, "close"):
            self.filelike.close()


def size_file(wrapper: FileWrapper, headers: list[tuple[bytes, bytes]]) -> None:
    """PEP 3333 "Handling the Content-Length Header": a regular file's length
    is known, so the response gets it (RFC 9110 §9.3.2: a HEAD's too), and no
    more of the file is read than the app's own Content-Length."""
    size = wrapper.size()
    if size is None:
        return
    declared = [int(value) for name, value in headers
                if name.lower() == b"content-length" and value.isdigit()]
    if not declared:
        headers.append((b"Content-Length", b"%d" % size))
    wrapper.limit = min([size] + declared)


def has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    """Did the app give a Content-Length? (RFC 9110 §5.1: any case of the name)"""
    return any(name.lower() == b"content-length" for name, _ in headers)


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
        libc.malloc_trim       # musl has none
        return libc
    except (OSError, AttributeError):
        return None


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
        self.ssl_context = (make_ssl_context(self.config) if self.config.ssl_certfile
                            else None)
        self.running = True          # shutdown() may come before serve_forever()
        self.stopping = threading.Event()   # set: answer no new request
        self.forced = False          # a second shutdown(): do not wait for requests
        # The self-pipe: select() sleeps until a socket is ready, so a worker
        # wakes it by making one ready: it adds its connection to `woken` and
        # writes a byte. A socketpair, not os.pipe(): Windows' select() takes
        # sockets only. Both ends never block: if the socket is full, a byte
        # is already waiting and the loop will wake anyway.
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.wake_lock = threading.Lock()   # guards the two below
        self.woken: list[WSGIConnection] = []
        self.wake_sent = False
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
        restore_signals = on_signals(self.shutdown)
        try:
            while self.running:
                self.run_once()
            self.drain()           # graceful: the requests in progress finish
        finally:
            restore_signals()      # a handler must not outlive its server
            self.close_all()

    def run_once(self) -> None:
        """One turn of the loop: wait for sockets, handle them, check the clocks."""
        timeout = self.pool.wake_workers(time.monotonic(), self.tick)   # then sleep
        if not self.accepting and not self.stopping.is_set():
            timeout = max(0.0, min(timeout, self.resume_at - time.monotonic()))  # retry
        for handler in logging.root.handlers:
            if isinstance(handler, BatchedStreamHandler):
                handler.flush()     # the access lines of this turn (section 12)
        for key, mask in self.selector.select(timeout):
            if key.data == "accept":
                self.accept()
            elif key.data == "wake":
                self.on_wake()
            else:
                self.guarded(key.data, key.data.on_event, mask)   # a client socket
        now = time.monotonic()
        if not self.accepting and not self.stopping.is_set() and (
                now >= self.resume_at or len(self.connections) < self.resume_below):
            self.watch_listener(True)      # a descriptor may be free again
        if now - self.last_check >= self.tick:
            for conn in list(self.connections):   # list: expire() may close one
                self.guarded(conn, self.expire, conn, now)
            self.last_check = now
        if now - self.last_trim >= MEMORY_TRIM_SECONDS:
            release_memory()
            self.last_trim = now

    def drain(self) -> None:
        """Graceful shutdown: stop accepting, close idle connections, and let
        requests in progress finish (each response says "Connection: close")."""
        self.stopping.set()     # from now on, every response says "Connection: close"
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
                                    % self.capacity, pause=float("inf"))
                return
            try:
                sock, client = self.listener.accept()
            except BlockingIOError:
                if self.refusing:          # caught up with the clients who waited
                    self.refusing.clear()
                    log.info("accepting connections again")
                return
            except OSError as error:
                if error.errno in OUT_OF_DESCRIPTORS:
                    # Policy: back off. The listener stays readable, so trying
                    # again at once would spin; the clients wait in the backlog.
                    self.stop_accepting(out_of(error))
                # EINTR, or a client that gave up in the backlog: no warning.
                elif not isinstance(error, (InterruptedError, ConnectionAbortedError)):
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
            self.stop_accepting("no descriptor below %d free for select()"
                                % SELECT_SOCKETS)
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
            self.connections.add(conn)
            limit = self.config.limit_concurrency
            if limit is not None and len(self.connections) > limit:
                # Limit: RFC 9110 §15.6.4, 503 while we have too many clients.
                conn.send_now(error_response(503, "too many connections", time.time(),
                                             self.config))
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

    def stop_accepting(self, reason: str, pause: float = ACCEPT_PAUSE_SECONDS) -> None:
        """Leave new clients in the backlog for `pause` seconds, or until one of
        ours closes. One warning per reason until the backlog is empty again."""
        self.watch_listener(False)
        self.resume_at = time.monotonic() + pause
        self.resume_below = len(self.connections)
        if reason not in self.refusing:
            self.refusing.add(reason)
            log.warning("%s: not accepting for now", reason)

    def wake(self, conn: WSGIConnection) -> None:
        """Runs on: any thread. Have the loop call conn.on_wake() soon."""
        with self.wake_lock:
            self.woken.append(conn)
            # One byte wakes the loop: while one is on its way, no more are sent.
            send, self.wake_sent = not self.wake_sent, True
        if send:
            with contextlib.suppress(OSError):   # full: the loop is about to wake anyway
                self.wake_writer.send(b"\0")

    def on_wake(self) -> None:
        """Empty the wake-up socket, then run on_wake() of each connection woken."""
        with contextlib.suppress(BlockingIOError):
            self.wake_reader.recv(4096)    # the bytes mean nothing: waking was all
        with self.wake_lock:
            woken, self.woken, self.wake_sent = self.woken, [], False   # byte read
        for conn in woken:
            if not conn.closed:
                self.guarded(conn, conn.on_wake)

    def expire(self, conn: WSGIConnection, now: float) -> None:
        """Runs on: the loop. Close (or answer 408) a connection that has waited
        too long; the timeouts are in section 1 (Imports, limits and constants).
        RFC 9112 §9.5: an idle connection may close; RFC 9112 §9.6: the
        lingering close ends."""
        config = self.config
        if conn.state == "closing":
            if now - conn.since > LINGER_SECONDS:
                conn.close()
        elif conn.state == "handshake":
            if now - conn.since > config.timeout_request_head:
                conn.close()      # a TLS handshake that never finishes
        elif conn.sending and now - conn.last_write > config.timeout_write:
            conn.close()          # the client does not read what we send
        elif conn.state == "idle":
            if not conn.parser.has_partial_request:
                if now - conn.since > config.timeout_keep_alive:
                    conn.close()
            elif now - conn.since > config.timeout_request_head:
                # RFC 9110 §15.5.9: 408 for a head that takes too long (slowloris).
                conn.on_bad_request(HTTPError(408, "request head not received in time"))
                conn.watch()
        elif conn.state == "draining":
            if now - conn.last_read > config.timeout_read:
                conn.close()
        elif (conn.waiting_for_body() and conn.events & selectors.EVENT_READ
              and now - conn.last_read > config.timeout_read):
            conn.on_bad_request(HTTPError(408, "request body not received in time"))
            conn.watch()

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
        with contextlib.suppress(OSError):
            self.wake_writer.send(b"\0")

    def close_all(self) -> None:
        """Close every connection, stop the workers, then the selector and sockets."""
        for conn in list(self.connections):
            conn.close()
        self.pool.stop()        # after close(): a worker's put() now raises, ends
        self.selector.close()
        self.listener.close()       # drain() may have closed it: that is fine
        self.wake_reader.close()
        self.wake_writer.close()


def out_of(error: OSError) -> str:
    """What an accept() that failed with one of OUT_OF_DESCRIPTORS ran out of."""
    what = ("file descriptors" if error.errno in (errno.EMFILE, errno.ENFILE)
            else "memory")
    return "out of %s (%s)" % (what, errno.errorcode[error.errno])


# =============================================================================
# §8  ASGI HTTP adapter - ASGI "HTTP & WebSocket" spec, http scope
#
# One HTTPCycle per request: it builds the scope, and its receive() and send()
# are what the app awaits. receive() pulls body bytes through the parser only
# when the app asks (that is the flow control); send() frames the response
# with section 4 (Writing responses) and waits for the socket to drain. The
# HTTP/1.1 decisions are not made here but in sections 3 and 4: must_close()
# and RequestParser.drop_body().
# =============================================================================


def build_scope(request: Request, server: tuple, client: tuple | None, config: Config,
                lifespan_state: dict, scheme: str = "http") -> dict:
    """The ASGI http scope for one request (ASGI HTTP "HTTP Connection Scope").

    ASGI "Applications": a new dict for each call of the app, and each request
    on a keep-alive connection is one call. "path" is percent-decoded, then
    UTF-8 decoded; "raw_path" and "query_string" are the bytes the client sent.

    >>> request = parse_head(b"GET /api/caf%C3%A9?q=1 HTTP/1.1\\r\\nHost: example.org")
    >>> scope = build_scope(request, ("127.0.0.1", 8000), ("10.0.0.7", 51000),
    ...                     Config(root_path="/api/"), {})
    >>> scope["path"], scope["root_path"], scope["raw_path"], scope["query_string"]
    ('/api/café', '/api', b'/api/caf%C3%A9', b'q=1')
    >>> scope["headers"], scope["client"], scope["server"]
    ([[b'host', b'example.org']], ['10.0.0.7', 51000], ['127.0.0.1', 8000])
    """
    # Policy: invalid UTF-8 in the path becomes U+FFFD rather than a 400: the
    # app still decides, and raw_path keeps the exact bytes. ASGI HTTP "WSGI
    # Compatibility": root_path is SCRIPT_NAME, split as in section 5 (WSGI).
    root_path, path_info = split_root_path(config.root_path,
                                           unquote(request.path.decode("ascii")))
    return {
        "type":         "http",
        # ASGI HTTP "Spec Versions": 2.5 is the one with every 2.x feature.
        "asgi":         {"version": "3.0", "spec_version": "2.5"},
        "http_version": request.version,              # "1.0" or "1.1"
        "method":       request.method,               # as sent (RFC 9110 §9.1)
        "scheme":       scheme,
        "path":         root_path + path_info,        # the whole path
        "raw_path":     request.path,
        "query_string": request.query,                # after "?", still encoded
        "root_path":    root_path,                    # WSGI's SCRIPT_NAME
        # Lower-case names, in the order received, repeated fields kept apart.
        "headers":      [[name, value] for name, value in request.headers],
        "client":       list(client) if client else None,
        "server":       list(server),
        "state":        dict(lifespan_state),  # ASGI Lifespan "Lifespan State": a copy
        # ASGI "Extensions": exactly those send() implements. HTTP/2's push and
        # the test-only debug are never advertised (ASGI extensions "HTTP/2
        # Server Push", "Debug"); "tls" is added by the connection (section 9).
        "extensions":   {"http.response.trailers": {}, "http.response.early_hint": {},
                         "http.response.pathsend": {},
                         "http.response.zerocopysend": {}},
    }


class HTTPCycle:
    """One request and its response on the ASGI path.

    The response moves through these states as the app calls send() (ASGI
    HTTP "Response Start" and "Response Body", ASGI extensions "HTTP Trailers"):

        start --http.response.start--> body --body, more_body=False--> done
                                        body --last body, trailers=True--> trailers
                                    trailers --more_trailers=False-------> done
        start or body --the app fails before any byte went out----------> failed

    "failed" means the server answered with an error of its own (fail()).
    Beside the state, what the cycle knows about the request and the client:

        start, head    the app's (status, headers), and the head made of them
        head_written   the head went out, with the first body bytes (take_head)
        trailers       None, or the trailer fields collected so far
        body_done      the app has received the whole request body
        send_continue  "100 Continue" is still owed (RFC 9110 §10.1.1)
        disconnected   the client has gone, or its body was malformed or late
        response_done  set at "done" to wake a receive() waiting for disconnect;
                       None until one waits (most requests have none)
    """

    def __init__(self, conn: ASGIConnection, request: Request) -> None:
        """A response not started yet ("start"); its head waits for the first body."""
        self.conn = conn
        self.request = request
        self.response = Response(request.method, request.version, request.keep_alive,
                                 conn.config)
        self.state = "start"
        self.start: tuple = ()
        self.head = b""
        self.head_written = False
        self.trailers: list | None = None
        self.body_done = False
        self.send_continue = request.expect_continue
        self.disconnected = False
        self.response_done: asyncio.Event | None = None

    @property
    def keep_alive(self) -> bool:
        """May the connection serve another request? Only after a complete response,
        with the whole body received, no framing error and no disconnect."""
        return (self.state == "done" and self.response.keep_alive and self.body_done
                and not self.disconnected and self.conn.error is None)

    async def run(self) -> None:
        """Call the app for this request, answer or skip what it left, log it."""
        scope = self.conn.scope_for(self.request)
        started = time.monotonic()
        failure = await self.call_app(scope)
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
                   self.response.status if answered else "-", self.response.sent,
                   started)

    async def call_app(self, scope: dict) -> HTTPError | None:
        """ASGI "Applications": await app(scope, receive, send), once per request.

        ASGI "Error Handling": an app that raises, or returns before its
        response started, is logged and answered with a 500 (the error
        returned); one that returns mid-response leaves a connection to close.
        """
        receive, send = self.receive, self.send
        if self.conn.trace:
            receive, send = traced(self.conn.trace, receive, send)
        try:
            await self.conn.app(scope, receive, send)
        except ClientDisconnected:
            # ASGI HTTP "Disconnected Client - send exception": it is ours, the
            # app let it out: no error.
            self.disconnected = True
            return None
        except BaseException as error:
            if self.conn.cancelled_by_server(error):
                raise                 # the server is shutting down: not the app's fault
            # Policy: SystemExit, KeyboardInterrupt, GeneratorExit and a
            # CancelledError the app raises itself count as app errors too, so
            # no app can stop the server or leave its client without an answer.
            log.exception("error in ASGI app for %s %s", scope["method"],
                          printable(scope["path"]))
            return HTTPError(500, "the application failed")
        # The app may have caught a send()'s ClientDisconnected and returned.
        self.disconnected = self.disconnected or self.conn.writer.transport.is_closing()
        if self.state in ("start", "body") and self.disconnected:
            # Policy: a client that leaves (or sends a malformed body) before
            # its response is complete is no server error: DEBUG only.
            log.debug("no complete response to %s %s: %s", scope["method"],
                      printable(scope["path"]),
                      self.conn.error.reason if self.conn.error else "the client left")
        elif self.state == "start":
            log.error("ASGI app returned without sending a response")
            return HTTPError(500, "the application sent no response")
        elif self.state == "body":
            log.error("ASGI app returned before its response was complete")
        return None

    async def skip_unread_body(self) -> None:
        """RFC 9112 §9.3: drop the body the app left unread (up to DRAIN_BYTES),
        so that the next request can be found; if it cannot be, we close."""
        dropped = 0
        while self.response.keep_alive and dropped <= DRAIN_BYTES:
            try:
                more = self.conn.parser.drop_body()      # section 3
                if more is None:
                    self.body_done = True                # the next request is next
                    return
                dropped += more
                if not await self.conn.read_more(self.conn.config.timeout_read):
                    return
            except (HTTPError, asyncio.TimeoutError):
                return      # a malformed or stalled body: the connection closes

    async def fail(self, error: HTTPError) -> None:
        """Answer `error` instead, if no byte of the app's response went out yet."""
        if self.head_written or (self.disconnected and self.conn.error is None):
            return
        if await self.conn.answer(error):            # False: the client has gone
            self.state = "failed"
            self.response.status = error.status      # for the access log

    # -- receive ---------------------------------------------------------------

    async def receive(self) -> dict:
        """ASGI HTTP "Request - receive event", then "Disconnect - receive event".

        The body is streamed: each event has all the body bytes the parser has
        now, de-chunked (RFC 9112 §7.1), and the socket is read only when it
        has none. So it is read only when the app asks for more, and a slow
        app slows its client down (backpressure).
        """
        if self.body_done or self.disconnected:
            await self.wait_for_disconnect()
            return {"type": "http.disconnect"}
        # RFC 9110 §10.1.1: the client waits for "100 Continue" before it sends
        # the body; ask for it now that the app wants it, unless some has come.
        continue_owed, self.send_continue = self.send_continue, False
        if continue_owed and not self.conn.parser.buffer:
            await self.conn.write(CONTINUE)
        parts = []
        try:
            while True:
                event = self.conn.parser.next_event()
                if event is END or (event is None and parts):
                    self.body_done = event is END
                    return {"type": "http.request", "body": b"".join(parts),
                            "more_body": not self.body_done}
                if event is not None:
                    parts.append(event)      # body bytes, de-chunked
                elif not await self.conn.read_more(self.conn.config.timeout_read):
                    break                    # RFC 9112 §8: an incomplete body
        except HTTPError as error:
            self.conn.error = error          # answered after the app returns
        except asyncio.TimeoutError:
            self.conn.error = HTTPError(408, "request body not received in time")
        self.disconnected = True
        return {"type": "http.disconnect"}

    async def wait_for_disconnect(self) -> None:
        """ASGI HTTP "Disconnect - receive event": wait until the response is
        complete or the client has gone, whichever comes first.

        Only a read notices that the client has gone, so one races the
        response (ASGIConnection.start_read); what it brings is the next
        pipelined request, kept in the parser.
        """
        self.response_done = self.response_done or asyncio.Event()
        while not self.disconnected and self.state not in ("done", "failed"):
            if self.conn.eof or len(self.conn.parser.buffer) > MAX_HEAD_BYTES:
                await self.response_done.wait()    # nothing more to learn
                return
            reading = self.conn.start_read()
            finished = asyncio.ensure_future(self.response_done.wait())
            await asyncio.wait([reading, finished], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if reading.done():                     # read_more() takes it over
                self.disconnected = not await self.conn.read_more(None)

    # -- send ------------------------------------------------------------------

    async def send(self, message: dict) -> None:
        """ASGI HTTP "Response Start" once, then "Response Body" and extensions.

        ASGI "Error Handling": a message out of order, or of a type we did not
        advertise, raises here, in the app; extra keys are ignored (.get).
        """
        kind = message["type"]
        if self.disconnected:   # ASGI HTTP "Disconnected Client - send exception"
            raise ClientDisconnected("the client has disconnected")
        if kind == "http.response.start" and self.state == "start":
            # ASGI HTTP "Response Start": the head is made now, so that a bad
            # field raises in the app (RFC 9112 §11.1), but waits for the first
            # body message, so that an app failing before it still gets a 500.
            self.start = (check_asgi_status(message["status"]),
                          check_asgi_headers(message.get("headers", [])))
            self.head = self.response.head(*self.start, time.time())
            self.trailers = [] if message.get("trailers", False) else None
            self.state = "body"
        elif kind == "http.response.body" and self.state != "start":
            if self.state == "body":    # ASGI HTTP "Response Body": later ones, ignored
                body = message.get("body", b"")
                if type(body) is not bytes:     # ASGI "Strings and Unicode": bytes only
                    raise TypeError(f"ASGI: body must be bytes, not {type(body).__name__}")
                # The first takes the held-back head along. RFC 9110 §9.3.2: a
                # HEAD response's body is taken, not sent (Response.body).
                await self.write_body(self.take_head() + self.response.body(body),
                                      message.get("more_body", False))
        elif kind == "http.response.zerocopysend" and self.state != "start":
            if self.state == "body":    # ASGI extensions "Zero Copy Send": as a body
                await self.send_file(message["file"], message)
        elif kind == "http.response.pathsend" and self.state == "body":
            with open(message["path"], "rb") as file:   # ASGI extensions "Path Send"
                await self.send_file(file, {})   # all of it, and the last body bytes
        elif kind == "http.response.early_hint" and self.state != "start":
            await self.send_early_hint(message["links"])
        elif kind == "http.response.trailers" and self.state == "trailers":
            await self.send_trailers(check_asgi_headers(message.get("headers", [])),
                                     message.get("more_trailers", False))
        else:
            raise RuntimeError(f"ASGI: unexpected {kind!r} (response {self.state})")

    def take_head(self) -> bytes:
        """The response head, now that the first body bytes go out; then b"".

        ASGI HTTP "Response Start": the head was held back until now, so the
        close decision (section 4 must_close) sees what the app has read; a
        head that must now say "Connection: close" is made again.
        Response.head drops the app's Transfer-Encoding: the server frames.
        """
        if self.head_written:
            return b""
        if self.response.keep_alive and must_close(
                self.conn.stopping.is_set(), self.body_done, self.send_continue,
                self.conn.parser.unread_body()):
            self.response.keep_alive = False
            self.head = self.response.head(*self.start, time.time())
        self.send_continue = False           # no 1xx after the final response
        self.head_written = True
        if self.conn.trace:
            self.conn.trace.head("<", self.head)
        return self.head

    async def write_body(self, data: bytes, more_body: bool) -> None:
        """Write body bytes; with the last ones, what ends the response."""
        if not more_body and self.trailers is not None:
            self.state = "trailers"          # the end waits for the trailers
        elif not more_body:
            data += self.response.end()
            self.state = "done"
        if data:
            await self.conn.write(data)
        if self.state == "done" and self.response_done is not None:
            self.response_done.set()

    async def send_trailers(self, headers: list, more_trailers: bool) -> None:
        """ASGI extensions "HTTP Trailers": fields after the last body bytes.

        RFC 9110 §6.5.1 and §10.1.4, RFC 9112 §7.1.2: they go on the wire only
        in a chunked response to a client that said "TE: trailers"; otherwise
        they are dropped and the response ends as usual.
        """
        self.trailers += headers
        if more_trailers:
            return
        wanted = b"trailers" in comma_list(field_values(self.request.headers, b"te"))
        self.state = "done"
        await self.conn.write(self.response.end(self.trailers if wanted else []))
        if self.response_done is not None:
            self.response_done.set()

    async def send_early_hint(self, links) -> None:
        """ASGI extensions "Early Hints": a 103 response ahead of the final one.

        RFC 8297: each link becomes one Link field of an interim response. The
        links are checked like the app's headers (section 4 field_line) even
        when the hint is then dropped, so a bad one raises whoever the client is.
        """
        lines = [b"HTTP/1.1 103 Early Hints"]
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

    async def send_file(self, file, message: dict) -> None:
        """Send part of `file` as body bytes, head first.

        ASGI extensions "Zero Copy Send": a body message whose bytes are in a
        file, any number of times between body messages. "offset" None is the
        file's current position, "count" None its end (as is a count past it).
        The file is the app's: it stays open, after the last byte sent.
        The extensions let a server use sendfile(); this one reads the file
        and writes the blocks like any body bytes: framed by the response
        (Content-Length or chunked), counted for the access log, and each
        waiting in write() for the client to drain the one before.
        """
        offset, count = message.get("offset"), message.get("count")
        for value in (offset, count):
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"ASGI: zerocopysend offset and count must be "
                                 f"integers >= 0: {value!r}")
        size = os.fstat(file.fileno()).st_size   # not a file of the OS: before the head
        offset = file.tell() if offset is None else offset
        left = max(0, size - offset)
        data = self.take_head()
        # Section 4 allow(): nothing for HEAD, and no more than Content-Length.
        count = self.response.allow(left if count is None else min(count, left))
        if count:
            file.seek(offset)
            # Never past `count`; a file that ends early sends less, and
            # Response.end() then closes (a Content-Length not met).
            while count and (block := file.read(min(count, RECV_BYTES))):
                count -= len(block)
                await self.conn.write(data + self.response.body(block))
                data = b""
        await self.write_body(data, message.get("more_body", False))


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
    """ASGI HTTP "Response Start": headers are an iterable of [name, value] pairs.

    ASGI "Strings and Unicode": both are byte strings, never str. Their case
    does not matter: section 4 compares names case-insensitively.
    """
    checked = []
    for name, value in headers:
        if type(name) is not bytes or type(value) is not bytes:
            raise TypeError(f"ASGI: header names and values must be bytes: {name!r}")
        checked.append((name, value))
    return checked


# =============================================================================
# §9  ASGI server - asyncio.start_server
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
        self.server = server         # its address and the app's lifespan state
        self.stopping = server.stopping
        self.loop = server.loop
        self.idle = True             # waiting for a request, not serving one
        self.idle_since: float | None = None   # waiting, with no byte of it yet, since
        self.websocket: WebSocketCycle | None = None
        self.trace = Trace() if self.config.trace else None
        peer = writer.get_extra_info("peername")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None  # None: unix
        ssl_object = writer.get_extra_info("ssl_object")
        self.scheme = "http" if ssl_object is None else "https"
        # ASGI "TLS" extension: on TLS connections only, the same for each request.
        self.tls = tls_extension(ssl_object, server.server_cert) if ssl_object else None
        self.parser = RequestParser(self.config)
        self.pending_read: asyncio.Future | None = None   # see start_read()
        self.eof = False             # the client has closed its side
        self.error: HTTPError | None = None     # a malformed or late request body
        self.cancelled = False       # the server has cancelled this connection's task

    def cancelled_by_server(self, error: BaseException) -> bool:
        """Whether `error`, raised out of the app, is a cancellation of this
        connection's task (shutdown) rather than a CancelledError of the app's own.

        The server marks the connections it cancels; on Python 3.11+ the task's
        cancelling() count also catches a cancel from outside the server (e.g.
        asyncio.run() on Ctrl+C, where no signal handler could be installed).
        """
        cancelling = getattr(asyncio.current_task(), "cancelling", None)   # 3.11+
        return isinstance(error, asyncio.CancelledError) and (
            self.cancelled or (cancelling is not None and cancelling() > 0))

    async def run(self, refusal: HTTPError | None = None) -> None:
        """Serve requests until the connection closes; or answer `refusal`.

        RFC 9112 §9.3, persistence: one request at a time, the next one read
        only once the last response is complete (ASGI HTTP "HTTP Connection
        Scope": a new scope and app call for each):

            idle --head--> HTTPCycle --complete, keep_alive--> idle
            idle --EOF, idle timeout, stopping--> close()
            HTTPCycle --must close (section 4 must_close) or incomplete--> close()
            idle --"Upgrade: websocket" head--> WebSocketCycle (section 10) --> close()
            idle --bad or slow head (HTTPError)--> answer(error) --> close()

        Any other Upgrade is served as plain http (RFC 9110 §7.8). A `refusal`
        (a 503 for one client too many) is answered before any request is read.
        """
        try:
            if refusal is not None:
                raise refusal
            while not self.stopping.is_set():
                self.idle = True
                request = await self.next_request()
                if request is None:
                    break
                self.idle = False
                if is_websocket_request(request):    # RFC 6455 §4.2.1
                    key = check_handshake(request)
                    self.websocket = WebSocketCycle(self, request, key)
                    await self.websocket.run()
                    break
                cycle = HTTPCycle(self, request)
                await cycle.run()
                if not cycle.keep_alive:
                    break
        except HTTPError as error:
            await self.answer(error)
        except OSError:
            pass                 # ClientDisconnected too: no one left to answer
        finally:
            await self.close()

    async def answer(self, error: HTTPError) -> bool:
        """Write the server's own error response; False if the client has gone."""
        data = error_response(error.status, error.reason, time.time(), self.config,
                              error.headers)
        if self.trace:
            self.trace.head("!", data)
        try:
            await self.write(data)
        except OSError:          # ClientDisconnected too
            # Policy: a client that is gone before its error answer (e.g. one
            # that reset as its 408 fired) is no server error: DEBUG only.
            log.debug("client left before its %d answer", error.status)
            return False
        return True

    async def next_request(self) -> Request | None:
        """The next request head, or None if the client leaves or stays idle."""
        deadline = None
        while (request := self.parser.next_event()) is None:
            # RFC 9112 §9.5: an idle connection may be closed. close_idle() does
            # it for every connection, one timer for all. A head under way gets
            # a deadline instead: RFC 9110 §15.5.9, 408 for a slow head (slowloris).
            between = not self.parser.buffer
            if deadline is None and not between:     # from the head's first bytes
                deadline = self.loop.time() + self.config.timeout_request_head
            self.idle_since = self.loop.time() if between else None
            try:
                if not await self.read_more(None if between
                                            else deadline - self.loop.time()):
                    return None   # RFC 9112 §9.5: close quietly, even mid-head
            except asyncio.TimeoutError:
                raise HTTPError(408, "request head not received in time") from None
            finally:
                self.idle_since = None
        return request

    def scope_for(self, request: Request) -> dict:
        """The scope for a request on this connection, proxies considered
        (section 12: behind_proxy)."""
        client, scheme, host = behind_proxy(request, self.client, self.scheme,
                                            self.config)
        scope = build_scope(request, self.server.address, client, self.config,
                            self.server.lifespan.state, scheme)
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
        """Start the one read that may wait on the socket, or return it if started.

        asyncio's StreamReader allows one waiting read at a time. The read that
        races the response in HTTPCycle.wait_for_disconnect may still be waiting
        when the response completes (or when the app cancels its receive()). It
        is kept here, not cancelled, and the next read() takes it over:

            receive() waits for http.disconnect    start_read(): pending_read
            the app's response completes           pending_read still waits
            next_request() calls read()            read() awaits pending_read
            the next request's bytes arrive        pending_read -> those bytes
        """
        if self.pending_read is None:
            self.pending_read = asyncio.ensure_future(self.reader.read(RECV_BYTES))
        return self.pending_read

    async def read(self) -> bytes:
        """The next bytes from the client; b"" at EOF or on a broken connection."""
        pending, self.pending_read = self.pending_read, None
        try:
            data = await (self.reader.read(RECV_BYTES) if pending is None else pending)
        except OSError:
            data = b""
        self.eof = not data
        return data

    async def read_more(self, timeout: float | None) -> bool:
        """read() into the parser; False at EOF. TimeoutError after `timeout`
        seconds (None: no limit)."""
        # No asyncio.wait_for() without a timeout: it would cost a coroutine per
        # read (and on Python 3.12+ a Timeout) to change nothing.
        data = await (self.read() if timeout is None
                      else asyncio.wait_for(self.read(), timeout))
        self.parser.feed(data)
        return bool(data)

    async def write(self, data: bytes) -> None:
        """Write and wait for the socket to drain (backpressure).

        ASGI HTTP "Response Body": the server hands the data to the send buffer
        before send() returns; waiting while the buffer is full is what keeps
        a fast app from piling up a slow client's response in memory.
        Limit: --timeout-write gives up on a client that does not read. Only a
        drain that will wait needs a timeout, and asyncio.wait_for() costs a
        task: so it is used only then.
        """
        transport = self.writer.transport
        if transport.is_closing():
            raise ClientDisconnected("the client has disconnected")
        self.writer.write(data)
        buffered = transport.get_write_buffer_size()
        if buffered == 0 and not transport.is_closing():
            return      # the usual case: all went to the socket, nothing to wait for
        try:
            if buffered <= transport.get_write_buffer_limits()[1]:
                await self.writer.drain()        # below the high-water mark: no wait
            else:
                await asyncio.wait_for(self.writer.drain(), self.config.timeout_write)
        except asyncio.TimeoutError:
            transport.abort()
            raise ClientDisconnected("response not read in time") from None
        except OSError as error:
            raise ClientDisconnected(str(error)) from error

    async def close(self) -> None:
        """RFC 9112 §9.6: send FIN, discard until the client's FIN, then close.

        The discarding goes through read(), which takes over a read left
        waiting by start_read(): asyncio allows no second one.
        """
        transport = self.writer.transport
        try:
            if (not self.stopping.is_set()     # shutting down: no lingering
                    and not self.eof and not transport.is_closing()
                    and transport.can_write_eof()):
                transport.write_eof()
                deadline = time.monotonic() + LINGER_SECONDS
                while await asyncio.wait_for(self.read(),
                                             max(0.0, deadline - time.monotonic())):
                    pass
        except (OSError, asyncio.TimeoutError):
            pass
        if self.pending_read is not None:     # not lingering: no one will read
            self.pending_read.cancel()
        # close() sends what the response left in the buffer first; wait for
        # it, so that a server shutting down does not end the loop before.
        self.writer.close()
        closed = asyncio.ensure_future(self.writer.wait_closed())
        try:
            await asyncio.wait_for(asyncio.shield(closed), self.config.timeout_write)
        except (OSError, asyncio.TimeoutError):
            if not closed.done():     # (it may have closed as the time ran out)
                transport.abort()     # Limit: the client does not read the rest


class ASGIListener(socket.socket):
    """The listening socket that asyncio.start_server() is given: a copy (dup).

    Limit: asyncio makes up to `backlog` accept() calls per wake-up, and when
    one fails for want of descriptors it goes on calling, each failure adding
    one more retry a second later (constants.ACCEPT_RETRY_DELAY): their number
    would grow every second. Here the first failure pauses accept() for
    ACCEPT_PAUSE_SECONDS, less than that second: until then it raises
    BlockingIOError, "no client waits", which ends asyncio's calls at once.
    The first failure is logged, and so is the first accept() after them.
    """
    paused_until = 0.0      # time.monotonic()
    failing = False         # accept() failed for want of descriptors, last time

    def accept(self):
        """socket.accept(), unless paused by a failure just before."""
        if time.monotonic() < self.paused_until:
            raise BlockingIOError(errno.EAGAIN, "paused: out of descriptors")
        try:
            accepted = super().accept()
        except OSError as error:
            if error.errno in OUT_OF_DESCRIPTORS:
                if not self.failing:
                    log.warning("%s: not accepting for now", out_of(error))
                self.failing = True
                self.paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
            raise
        if self.failing:
            self.failing = False
            log.info("accepting connections again")
        return accepted


class ASGIServer:
    """Serves one ASGI app on a listening socket until shutdown() is called.

    ASGI Lifespan spec (its introduction): the lifespan call and every
    connection run on one event loop, the one serve() runs on.
    """

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
        self.forced = False          # a second shutdown(): no lifespan shutdown
        self.stop_early = False      # shutdown() came before serve()
        self.starting = threading.Lock()
        self.next_handler = None     # the loop's exception handler before ours
        self.server_cert: str | None = None    # PEM, for the ASGI TLS extension

    async def serve(self) -> None:
        """Start up, accept and serve connections until shutdown(), shut down."""
        with self.starting:          # shutdown() from another thread may race us
            self.stopping = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            if self.stop_early:
                self.stopping.set()
        # Policy: the signal handlers come before the lifespan startup, which
        # may take long or never end: SIGTERM or Ctrl+C during it stops us
        # (start_up()) instead of killing the process.
        self.next_handler = self.loop.get_exception_handler()
        self.loop.set_exception_handler(self.on_loop_error)
        restore_signals = on_signals(self.shutdown, self.loop)
        try:
            # ASGI Lifespan "Startup - receive event": no connection is accepted
            # before the startup is complete. asyncio.start_server() is what
            # calls listen(): a listener make_listener() only bound refuses
            # clients until then.
            if not await self.start_up():
                return
            tls = {}
            if self.config.ssl_certfile:
                tls = {"ssl": make_ssl_context(self.config),
                       "ssl_handshake_timeout": self.config.timeout_request_head}
                self.server_cert = read_server_cert(self.config.ssl_certfile)
            # asyncio's `backlog` is how many accept() calls it makes per wake-up
            # (ASGIListener); it also calls listen() with it, so we listen() again
            # with --backlog, which the kernel then uses.
            listener = ASGIListener(self.listener.family, self.listener.type,
                                    fileno=socket.dup(self.listener.fileno()))
            server = await asyncio.start_server(self.handle, sock=listener,
                                                limit=RECV_BYTES, backlog=100, **tls)
            listener.listen(self.config.backlog)
            if self.ready is not None:
                self.ready()
            sweeper = asyncio.ensure_future(self.close_idle())
            async with server:
                await self.stopping.wait()
                server.close()          # stop accepting now ...
                self.listener.close()   # (server.close() closed the copy, `listener`)
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
        if not self.stopping.is_set():        # else shutdown() came before serve()
            startup = asyncio.ensure_future(self.lifespan.startup())
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
                if startup.done():
                    startup.result()          # raises LifespanFailure if it failed
                    return True
            finally:
                stop.cancel()
                if not startup.done():
                    startup.cancel()
                    self.lifespan.abandon()
        # Policy: a shutdown during the startup is obeyed at once: the server
        # stops without serving, and the command line exits 0 as after any
        # requested stop. ASGI Lifespan "Shutdown - receive event" follows a
        # completed startup only, so lifespan.shutdown is not sent.
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
                release_memory()      # section 7: free heap pages, back to the system
                last_trim = now

    async def drain(self) -> None:
        """Graceful shutdown: close idle connections, let busy ones finish."""
        for task, conn in list(self.connections.items()):
            if conn.idle:
                self.cancel(task)
            elif conn.websocket is not None:   # RFC 6455 §7.4.1: 1001 "going away"
                asyncio.ensure_future(conn.websocket.close(1001, "server shutting down"))
        if self.connections:
            await asyncio.wait(list(self.connections),
                               timeout=self.config.timeout_graceful_shutdown)
        for task in list(self.connections):
            self.cancel(task)   # out of time: cut them off
        await asyncio.gather(*self.connections, return_exceptions=True)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's exception handler while we serve.

        asyncio reports an accept() that ran out of descriptors with a
        traceback, and again at each retry (constants.ACCEPT_RETRY_DELAY, a
        second, during which new clients wait in the backlog). ASGIListener
        has said it once, without one; pass everything else on.
        """
        error = context.get("exception")
        if (context.get("message") == "socket.accept() out of system resource"
                and isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS):
            return            # ASGIListener said it once, without the traceback
        if self.next_handler is not None:
            self.next_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Serve one accepted connection, unless it is dead already."""
        if not set_nodelay(writer.get_extra_info("socket")):
            log.debug("closed a new connection at once: reset before it was served")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        conn = self.connections[task] = ASGIConnection(self, reader, writer)
        limit = self.config.limit_concurrency
        crowded = limit is not None and len(self.connections) > limit
        try:
            # Limit: RFC 9110 §15.6.4, 503 while we have too many clients.
            await conn.run(HTTPError(503, "too many connections") if crowded else None)
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
        """Runs on: the loop. Start the drain; once begun, cut off every connection."""
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
# §10  WebSocket - RFC 6455, RFC 7692, ASGI "HTTP & WebSocket" spec
#
# A pure codec (bytes in, values out), then WebSocketCycle: ASGI over asyncio.
# =============================================================================

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 §4.2.2 item 5.4
# RFC 6455 §5.2's frame: FIN RSV1-3 opcode(4) | MASK length(7) | length | key
FIN, RSV1, RSV23, OPCODE, MASKED, LENGTH7 = 0x80, 0x40, 0x30, 0x0F, 0x80, 0x7F
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
UTF8_DECODER = codecs.getincrementaldecoder("utf-8")   # RFC 6455 §5.6: text is UTF-8
# RFC 6455 §7.4: the close codes a Close may carry, checked both ways (a client's
# Close, the app's close). RFC 6455 §7.4.1 and IANA's 1012-1014, not 1004, nor
# 1005, 1006, 1015 (app-only); RFC 6455 §7.4.2's 3000-4999, for libraries and apps.
SENDABLE_CLOSE_CODES = {*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)}
# RFC 7692 §7.1's parameters, but no server_max_window_bits=8: zlib cannot make it
DEFLATE_PARAMETER = re.compile(
    rb"(server|client)_no_context_takeover|server_max_window_bits=0*(9|1[0-5])"
    rb"|client_max_window_bits(=0*(8|9|1[0-5]))?")


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
    """RFC 6455 §4.2.1: the key, or HTTPError; Origin: the app's (RFC 6455 §10.2)."""
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
    # XOR as two big integers: one loop in C instead of a Python step per octet.
    number = int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")
    return number.to_bytes(len(payload), "little")


class PerMessageDeflate:
    """RFC 7692: permessage-deflate, each message compressed with raw DEFLATE."""

    def __init__(self, reset_each_message: bool, window_bits: int = 15) -> None:
        """server_no_context_takeover, server_max_window_bits (RFC 7692 §7.1)."""
        # Z_FULL_FLUSH ends a message as Z_SYNC_FLUSH does, and also forgets
        # it: the next one refers to nothing before (no context takeover).
        self.flush = zlib.Z_FULL_FLUSH if reset_each_message else zlib.Z_SYNC_FLUSH
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
        self.decompressor = zlib.decompressobj(-15)   # takes any smaller window

    @staticmethod
    def negotiate(offers: list[bytes]) -> tuple[PerMessageDeflate | None, bytes]:
        """RFC 7692 §5 and RFC 7692 §5.1: (codec, answer) for the first good offer."""
        for offer in comma_list(offers):
            name, *params = [p.strip(b" \t") for p in offer.split(b";")]
            pairs = [[part.strip(b' \t"') for part in p.split(b"=", 1)] for p in params]
            values = {pair[0]: pair[1] if len(pair) > 1 else None for pair in pairs}
            # Limit: a value (the last part) of more digits than int() reads, 4,300,
            # is as invalid as one out of range.
            valid = all(DEFLATE_PARAMETER.fullmatch(b"=".join(p)) and len(p[-1]) <= 4300
                        for p in pairs)
            if name != b"permessage-deflate" or len(values) != len(pairs) or not valid:
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
        """RFC 7692 §7.2.1: one message, deflated (with no context, if reset)."""
        data = self.compressor.compress(data) + self.compressor.flush(self.flush)
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
    (RSV1, RFC 7692 §6.1), `size` and a UTF-8 `decoder` (used for text).
    Errors: 1002 (against RFC 6455 §5), 1007 (not UTF-8, not DEFLATE), 1009
    (over `max_size`).
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
            # RFC 6455 §5.2 "Payload length", three forms: 7 bits, the length
            # itself; 126, then 16 bits; 127, then 64 bits. Then the masking key.
            length = buffer[1] & LENGTH7
            key_at = {126: 4, 127: 10}.get(length, 2)
            if len(buffer) < key_at:
                return None
            size = int.from_bytes(buffer[2:key_at], "big") if key_at > 2 else length
            if size >> 63:               # RFC 6455 §5.2: "the most significant bit
                raise WebSocketError(1002, "invalid frame length")   # MUST be 0"
            if encode_length(size)[0] != length:   # Policy: RFC 6455 §5.2
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
        if OP_BINARY < opcode < OP_CLOSE or opcode > OP_PONG:   # RFC 6455 §5.2:
            raise WebSocketError(1002, f"unknown opcode {opcode}")   # reserved ones
        if opcode >= OP_CLOSE:
            return self._on_control(first, opcode, payload)
        # RFC 6455 §5.4: a continuation inside a message and only there, so
        # neither one of nothing nor a new message interleaved with another.
        if (opcode == OP_CONTINUATION) == (self.kind is None):
            raise WebSocketError(1002, "fragments out of order")
        if opcode != OP_CONTINUATION:    # a first frame: a new message
            self.kind = "text" if opcode == OP_TEXT else "bytes"
            self.compressed, self.size, self.decoder = rsv1, 0, UTF8_DECODER()
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
        if not payload:
            return ("close", 1005, "")   # RFC 6455 §7.1.5: "no status code"
        code = int.from_bytes(payload[:2], "big")   # RFC 6455 §5.5.1: a code, a reason
        if len(payload) == 1 or code not in SENDABLE_CLOSE_CODES:
            raise WebSocketError(1002, "invalid close code")    # RFC 6455 §7.4.1
        try:
            return ("close", code, payload[2:].decode("utf-8"))   # RFC 6455 §8.1
        except UnicodeDecodeError:
            raise WebSocketError(1007, "invalid UTF-8 in a close reason") from None


class WebSocketCycle:
    """One WebSocket connection on the ASGI path (ASGI "HTTP & WebSocket" spec,
    "WebSocket"). Its `state`:
        connecting -> open      websocket.accept: the 101 (accept())
        connecting -> denying   websocket.http.response.start (send()), and
                   -> closed    at its last body
        connecting -> closed    websocket.close, or the app ends: HTTP 403 (500
                                if it raised) instead of the 101 (end())
        open -> closing         close(): we send Close, and wait
        open, closing -> closed the client's Close, TCP lost, a failure, time out
    The client closes first: we answer with its code (RFC 6455 §5.5.1) and close
    TCP; the app gets that code (1005: none). We close first, in close(): the
    app's code (default 1000), 1000 or 1011 as the app returns or raises, 1001
    at shutdown (section 9, ASGI server), 1011 for a Ping without Pong; we wait
    WS_CLOSE_SECONDS for the client's Close, then close TCP (RFC 6455 §7.1.1).
    To fail (RFC 6455 §7.1.7), close(wait=False) sends FrameParser's code (1011
    for our bugs) and closes at once. No Close at all: 1006. close() waits for
    `closed`, keep_alive() for `pong`; receive() repeats `disconnect` at the end;
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
        self.disconnect = {"type": "websocket.disconnect", "code": 1006, "reason": ""}

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
        """ASGI "Receive - receive event"s, then "Disconnect", repeated: the one
        received, or 1006 (no Close) after a refused handshake."""
        if self.state == "closed" and self.inbox.empty():
            return self.disconnect
        event = await self.inbox.get()
        if event["type"] == "websocket.disconnect":
            self.disconnect = event
        return event

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
            if code not in SENDABLE_CLOSE_CODES or len(reason.encode("utf-8")) > 123:
                raise ValueError(f"invalid WebSocket close: {code} {reason!r}")
            await self.close(code, reason)      # RFC 6455 §5.5: 2 + 123 <= 125 bytes
        elif kind == "websocket.http.response.start" and self.state == "connecting":
            # ASGI "WebSocket Denial Response" extension: answer with plain HTTP,
            # status and headers checked as for http, before any change.
            status = check_asgi_status(message["status"])
            headers = check_asgi_headers(message.get("headers", []))
            self.denial = Response("GET", "1.1", False, self.conn.config)  # then close
            self.state = "denying"
            await self.conn.write(self.denial.head(status, headers, time.time()))
        elif kind == "websocket.http.response.body" and self.state == "denying":
            await self.conn.write(self.denial.body(message.get("body", b"")))
            if not message.get("more_body", False):
                await self.conn.write(self.denial.end())
                self.state = "closed"
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

    async def close(self, code: int, reason: str, wait: bool = True) -> None:
        """RFC 6455 §7.1.2: send Close, then wait for the client's (see the class)."""
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
        while self.state == "open":
            await asyncio.sleep(self.conn.config.ws_ping_interval)
            self.pong.clear()
            await self.conn.write(encode_frame(OP_PING, b""))
            try:
                await asyncio.wait_for(self.pong.wait(), self.conn.config.ws_ping_timeout)
            except asyncio.TimeoutError:
                await self.close(1011, "keepalive ping timeout")


# =============================================================================
# §11  Lifespan - ASGI Lifespan spec
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
        running -> done          the app's call ended early: no lifespan.shutdown
        stopping -> done         lifespan.shutdown.complete, or the app returned
        stopping -> exit 4       lifespan.shutdown.failed, or no answer in time
    --lifespan "auto" carries on when the app raises: an app written without
    lifespan may well raise on a scope type it does not know. "off" skips it.
    `started` and `stopped` are set at the end of starting and of stopping (or
    of the app's call); `stopping` once lifespan.shutdown is sent; `supported`
    turns False when the app raises while starting; `failure` keeps the
    message of a *.failed. `state` is the app's (ASGI Lifespan "Lifespan
    State"): section 8 (ASGI HTTP adapter) gives each scope a shallow copy.
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
        # The event each answer sets; a shutdown's only once lifespan.shutdown is sent.
        event = {"lifespan.startup.complete": self.started,
                 "lifespan.startup.failed": self.started,
                 "lifespan.shutdown.complete": self.stopping and self.stopped,
                 "lifespan.shutdown.failed": self.stopping and self.stopped}.get(kind)
        if not event or event.is_set():
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
# §12  Operations - logging, proxies, TLS and sockets
#
# What running gateway for real needs around the protocol: an access log and
# --trace, trusting a proxy in front, TLS, and listening sockets. The servers
# of sections 5 to 11 call in here; nothing here calls back into them.
# =============================================================================

# -- The access log and --trace -----------------------------------------------

access_log = logging.getLogger("gateway.access")
# The fields an --access-log-format may use, and the default format.
ACCESS_LOG_FORMAT = ('%(client)s - "%(request_line)s" %(status)s %(bytes)s '
                     '%(duration_ms).1fms')


def log_access(config: Config, client, request: Request, status: int | str, size: int,
               started: float) -> None:
    """One access log line per request (client, request line, status, bytes, ms);
    status "-" for a request that got no response. Both servers call it."""
    if not config.access_log or not access_log.isEnabledFor(logging.INFO):
        return     # checked first: building the line costs more than this test
    line = (config.access_log_format or ACCESS_LOG_FORMAT, client, request, status, size,
            time.monotonic() - started)
    handler = untouched_handler()
    if handler is not None:     # nobody could see a LogRecord: the line waits as values
        handler.add(line, batched=True)
    else:
        access_log.handle(access_record(line))


def access_fields(client, request: Request, status: int | str, size: int,
                  seconds: float) -> dict:
    """The fields an --access-log-format may use, for one request."""
    return {
        "client": "%s:%s" % tuple(client[:2]) if client else "-",
        "request_line": printable(f"{request.method} {request.target.decode('latin-1')}"
                                  f" HTTP/{request.version}"),
        "status": status, "bytes": size, "duration_ms": seconds * 1000.0,
    }


def access_record(line: tuple) -> logging.LogRecord:
    """The LogRecord of an access line (its format, then access_fields()'s
    arguments): what access_log.info() would make, less its search of the
    stack for the caller."""
    return access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line[0],
                                 (access_fields(*line[1:]),), None, "log_access")


def untouched_handler() -> BatchedStreamHandler | None:
    """main()'s handler if an access record would reach it alone, to be
    written as main() set it up; None once a filter, a handler or a format
    of one's own is configured. Checked per line, as logging checks levels."""
    logger = access_log
    while logger.parent and logger.propagate and not (logger.handlers or logger.filters):
        logger = logger.parent                    # up to the root logger
    handlers = logger.handlers if logger.parent is None else []     # the root's
    handler = handlers[0] if len(handlers) == 1 else None
    untouched = isinstance(handler, BatchedStreamHandler) and not handler.filters \
        and handler.formatter is handler.own_formatter and handler.level <= logging.INFO
    return handler if untouched else None


class BatchedStreamHandler(logging.StreamHandler):
    """The handler main() gives the root logger: stderr, as basicConfig()
    writes it, but access lines go out in batches, one write() per turn of
    the loop rather than one per request.

    An access line waits in `waiting` until the loop that logged it ends its
    turn: an asyncio loop runs flush() as its next callback (call_soon), and
    the WSGI loop flushes before it waits in select(). Any other line is
    written at once, behind those waiting, so the order is kept.
    logging.shutdown() writes what is left: at exit, and before a worker
    process's os._exit(). An access line that log_access() hands over as
    values is formatted by flush(), with its batch: formatting many lines in
    one go costs less than one at a time, between requests.
    """

    FORMAT = "%(name)s: %(message)s"

    def __init__(self) -> None:
        """Write to sys.stderr in FORMAT, with nothing waiting."""
        super().__init__()
        self.setFormatter(logging.Formatter(self.FORMAT))
        self.own_formatter = self.formatter
        # FORMAT ends with the message: an access line is this, then the line.
        self.access_prefix = self.FORMAT % {"name": access_log.name, "message": ""}
        self.waiting = collections.deque()      # lines (or an access line's values)

    def emit(self, record: logging.LogRecord) -> None:
        """Runs on: any thread, holding self.lock (Handler.handle takes it)."""
        try:
            self.add(self.format(record) + self.terminator,
                     batched=record.name == access_log.name)
        except Exception:
            self.handleError(record)              # as StreamHandler.emit() does

    def add(self, line: str | tuple, batched: bool) -> None:
        """Queue a line; write at once unless it may wait for the loop's turn.

        Without the lock: a deque's append() and popleft() are atomic, and
        flush() takes lines until none is left, so a line added while it
        runs is either taken or finds the deque empty and schedules a flush.
        """
        self.waiting.append(line)
        if not batched:
            self.flush()
        elif len(self.waiting) == 1:          # the first of a batch
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                pass          # a WSGI thread: its loop will flush

    def flush(self) -> None:
        """Write the waiting lines with one write(), then flush the stream."""
        with self.lock:                       # one flush at a time
            lines = []
            while self.waiting:
                line = self.waiting.popleft()
                lines.append(line if type(line) is str else self.access_text(line))
            try:
                self.stream.write("".join(lines))
                super().flush()
            except (OSError, ValueError):
                pass       # stderr is gone: lose the lines, not the server

    def access_text(self, line: tuple) -> str:
        """An access line from its values, as emit() would write its record."""
        try:
            text = line[0] % access_fields(*line[1:])
        except Exception:
            self.handleError(access_record(line))   # a bad --access-log-format
            return ""
        return self.access_prefix + text + self.terminator


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


# -- Behind a proxy: Forwarded (RFC 7239) and X-Forwarded-* -------------------


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
    """The proxies' record of the request's path, client first: for/proto/host.

    RFC 7239 §4: Forwarded = 1#forwarded-element, and
    forwarded-element = forwarded-pair *( ";" forwarded-pair ), each pair
    token "=" value. Only without a Forwarded field are the older, unwritten
    X-Forwarded-For (a list), -Proto and -Host (last value wins) read.
    """
    hops = []
    for value in field_values(headers, b"forwarded"):
        for element in value.decode("latin-1").split(","):      # RFC 7239 §4: 1#
            pairs = (pair.strip().partition("=") for pair in element.split(";"))
            # Leniency: a quoted-string value loses its quotes, not its escapes.
            hop = {name.lower(): text.strip().strip('"') for name, _, text in pairs}
            if "for" in hop:                                     # RFC 7239 §5.2
                hop["for"] = node_address(hop["for"])
            hops.append(hop)
    if hops:
        return hops
    extra = {key: field_values(headers, b"x-forwarded-" + key.encode())
             for key in ("proto", "host")}
    extra = {key: values[-1].decode("latin-1").strip()        # the last one wins
             for key, values in extra.items() if values}
    addresses = comma_list(field_values(headers, b"x-forwarded-for"))
    return [dict(extra, **{"for": a.decode("latin-1")}) for a in addresses] or (
        [extra] if extra else [])


def behind_proxy(request: Request, client, scheme: str, config: Config):
    """--proxy-headers: who the client really is, per a proxy we trust.

    Returns (client, scheme, host or None); both servers call it for every
    request. Headers from an untrusted peer are ignored. RFC 7239 §8.1: any
    node on the way may have written them, so the right-most address that is
    not itself a trusted proxy is the client; all left of it may be forged.
    """
    peer = client[0] if client else None
    trusted = config.proxy_headers and trusted_proxy(peer, config)
    hops = forwarded_hops(request.headers) if trusted else []
    if not hops:
        return client, scheme, None
    # The right-most hop that a trusted proxy did not add; if all did, the first.
    hop = next((hop for hop in reversed(hops)
                if not trusted_proxy(hop.get("for"), config)), hops[0])
    address = hop.get("for")
    return ((address, 0) if address else client), hop.get("proto", scheme).lower(), \
        hop.get("host")


# -- TLS, and the ASGI extensions "TLS" scope value ---------------------------


def make_ssl_context(config: Config):
    """A server TLS context from --ssl-certfile/--ssl-keyfile (and client certs)."""
    if ssl is None:
        raise ValueError("TLS needs the ssl module, which this Python lacks")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile,
                            config.ssl_keyfile_password)
    if config.ssl_ca_certs:
        # Policy: ask for a client certificate and check it, but let clients
        # without one in (CERT_OPTIONAL, not CERT_REQUIRED): the app sees in
        # the TLS scope value who sent one, and decides what that is worth.
        context.load_verify_locations(config.ssl_ca_certs)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


# ASGI extensions "TLS", tls_version: the protocol's own number, as on the wire.
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

    ASGI extensions "TLS": present only on TLS connections, with these six
    keys. The value describes the connection, so it is worked out once for
    all of its requests.
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    chain, name = [], None
    if leaf:
        # The client's certificate first, then what it sent to link it to a CA
        # (readable from Python 3.13 on; before, the client's certificate alone).
        sent = getattr(ssl_object, "get_unverified_chain", list)()
        chain = [leaf] + [der for der in sent if der != leaf]
        # It was checked (only --ssl-ca-certs asks for one), so getpeercert()
        # has its fields: the subject is always among them.
        name = rfc4514_name(ssl_object.getpeercert()["subject"])
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

    ASGI extensions "TLS", cipher_suite: the two bytes of the TLS registry as
    one 16-bit number. ssl only gives the name; the context's get_ciphers()
    gives ids of OpenSSL's form 0x0300XXXX, whose low 16 bits are that number.
    The list is read once, when a name is first seen (one not in it: None).
    """
    if name not in CIPHER_SUITES:
        CIPHER_SUITES.update((c["name"], c["id"] & 0xFFFF)
                             for c in context.get_ciphers())
        CIPHER_SUITES.setdefault(name, None)
    return CIPHER_SUITES[name]


def rfc4514_name(subject) -> str:
    """A DN from the "subject" of ssl's getpeercert() as an RFC 4514 string.

    RFC 4514 §2.1: the RDNs are written last first, joined by ",".
    RFC 4514 §2.2: the attributes of one RDN are joined by "+", as type=value.
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


# -- Listening sockets --------------------------------------------------------


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
    elif uds is not None:
        if not hasattr(socket, "AF_UNIX"):
            raise OSError(errno.EAFNOSUPPORT, "unix sockets are not available here")
        if os.path.exists(uds) and stat.S_ISSOCK(os.stat(uds).st_mode):
            os.unlink(uds)                     # a stale socket from a past run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(uds)
    else:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:            # the options socket.create_server() sets, but not listen()
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
    if listen:
        sock.listen(backlog)
    return sock


def listen_address(listener: socket.socket) -> tuple:
    """The ASGI `server` value: [host, port], or [path, None] for a unix socket."""
    name = listener.getsockname()
    return (name, None) if isinstance(name, str) else tuple(name[:2])


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
# §13  Command line - options in, an exit status out
#
# main(argv) turns the options into a Config and a listening socket, serves
# until a signal stops it, and returns the exit status; the sections above
# never read sys.argv. How a run goes:
#
#   1. parse the options (build_arg_parser): every Config field is one;
#      --env-file fills os.environ, --reload hands over to run_reloader()
#   2. config_from(): the Config, whose checks refuse a bad value   -> exit 1
#   3. import_app(): the app named "module:attr"                     -> exit 1
#   4. make_listener() (section 12): bind the socket                 -> exit 1
#   5. serve_until_stopped(): serve() in this process, or, with
#      --workers N, run_workers() (at the end) forks N processes that each serve()
#   6. the server installs on_signals() and serves until SIGTERM or Ctrl+C,
#      then drains: exit 0, or 3 / 4 if the ASGI lifespan failed
# =============================================================================


class AppImportError(Exception):
    """The "module:attr" given on the command line does not name an app."""


def import_app(spec: str, factory: bool = False):
    """Import "module:attr" (attr may be dotted; default: app, then application).

    Each way this can fail gets a message that says which: no such module, an
    error while the module runs (its own failing import included), or no such
    attribute. main() logs it and exits with status 1.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        # Missing: the module itself (or a package on its path), not something
        # that it imports.
        if isinstance(error, ModuleNotFoundError) and error.name \
                and f"{module_name}.".startswith(f"{error.name}."):
            raise AppImportError(f"cannot import module {module_name!r}: "
                                 "no such module") from None
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
    """Call stop() on SIGINT and SIGTERM; return restore(), which puts back
    what this replaced. This is how signals stop the server, in one place:

    - The first SIGTERM or Ctrl+C (SIGINT) calls stop(), the server's
      shutdown(): it stops accepting and lets requests in progress finish for
      --timeout-graceful-shutdown. A second one calls it again, which cuts off
      every connection at once.
    - With --workers, the parent relays SIGINT/SIGTERM to each worker as
      SIGTERM (run_workers()); a worker ignores SIGINT, because a Ctrl+C in a
      terminal reaches the whole process group and must count once.
    - Policy: both signals mean "stop" even when they came in ignored, as a
      shell starts a background job (`gateway.py ... &`) with SIGINT ignored.
    - With a `loop`, stop() runs in it: by loop.add_signal_handler(), or where
      a loop has none (Windows) by a handler that hands the call to the loop,
      replacing asyncio.run()'s SIGINT one (3.11+), which would cancel the
      server instead of draining it. restore() takes them back while the loop
      runs: asyncio closes its wakeup pipe first, then removes its handlers.
    - A server in another thread gets no handlers: Ctrl+C is its caller's.
    """
    replaced, on_loop = {}, []     # handlers to put back, and the loop's

    def restore() -> None:
        """Put back the handlers this replaced (the loop's too)."""
        for signum in on_loop:
            loop.remove_signal_handler(signum)
        for signum, previous in replaced.items():
            if previous is not None:     # None: not set from Python; leave ours
                signal.signal(signum, previous)

    if threading.current_thread() is not threading.main_thread():
        return restore
    # (a platform may lack one of them, e.g. SIGTERM)
    for signum in [getattr(signal, name) for name in SHUTDOWN_SIGNALS
                   if hasattr(signal, name)]:
        try:
            if loop is not None:
                try:
                    loop.add_signal_handler(signum, stop)
                    on_loop.append(signum)      # restore() takes it back
                    continue
                except (NotImplementedError, AttributeError):
                    handler = lambda number, frame: loop.call_soon_threadsafe(stop)
            else:
                handler = lambda number, frame: stop()
            replaced[signum] = signal.signal(signum, handler)    # returns the old one
        except (RuntimeError, ValueError, OSError) as error:
            log.warning("cannot handle %s (%s): it will not stop the server gracefully",
                        signum.name, error)
    return restore


def serve(app, interface: str = "asgi", host: str = "127.0.0.1", port: int = 8000,
          config: Config | None = None, listener: socket.socket | None = None,
          ready=None) -> None:
    """Serve `app` ("wsgi" or "asgi") until stopped: steps 5-6 for one process.

    Blocks. `ready()`, if given, is called once connections are accepted
    (after the ASGI lifespan startup). Without a listener, one is made.
    """
    config = config or Config(host=host, port=port)
    listener = listener or make_listener(host, port, config.backlog, config.uds,
                                         config.fd)
    if interface == "wsgi":
        if ready is not None:
            ready()             # the WSGI server accepts as soon as it runs
        WSGIServer(app, listener, config).serve_forever()
    elif interface == "asgi":
        asyncio.run(ASGIServer(app, listener, config, ready).serve())
    else:
        raise ValueError(f"interface must be 'wsgi' or 'asgi', not {interface!r}")


# The help of every option that sets a Config field (section 1): (metavar, help).
# add_config_options() makes the options from Config's fields; this table only
# says what each one means. A metavar "a|b" lists the only values allowed; ""
# marks a switch, which takes no value.
OPTION_HELP = {
    "--host": ("HOST", "address to listen on"),
    "--port": ("PORT", "port to listen on, 0 for any free one"),
    "--uds": ("PATH", "listen on this unix socket instead"),
    "--fd": ("N", "serve an inherited listening socket (e.g. from systemd)"),
    "--backlog": ("N", "pending connections the kernel may queue"),
    "--workers": ("N", "worker processes; $WEB_CONCURRENCY sets the default"),
    "--threads": ("N", "WSGI worker threads per process; 1: one app call at a time"),
    "--root-path": ("PATH", "mount point of the app (SCRIPT_NAME / root_path)"),
    "--ssl-certfile": ("PATH", "TLS certificate (PEM)"),
    "--ssl-keyfile": ("PATH", "TLS private key (PEM)"),
    "--ssl-keyfile-password": ("TEXT", "password of the TLS private key"),
    "--ssl-ca-certs": ("PATH", "CA certificates to check client certificates with"),
    "--proxy-headers": ("", "trust Forwarded, X-Forwarded-* of --forwarded-allow-ips"),
    "--forwarded-allow-ips": ("LIST", "comma list of addresses and CIDR ranges, or *"),
    "--trace": ("", "show the protocol: heads, environ/scope, ASGI messages"),
    "--no-access-log": ("", "no line per request on the gateway.access logger"),
    "--access-log-format": ("FMT", "%%-format over client, request_line, status, "
                            "bytes, duration_ms (default: "
                            + ACCESS_LOG_FORMAT.replace("%", "%%") + ")"),
    "--no-server-header": ("", "send no Server header"),
    "--no-date-header": ("", "send no Date header"),
    "--lifespan": ("auto|on|off", "ASGI lifespan; auto: only if the app supports it"),
    "--interface": ("auto|asgi3|asgi2", "ASGI 3 or 2 (double callable); auto detects"),
    "--ws-max-size": ("BYTES", "largest WebSocket message, else close 1009"),
    "--ws-ping-interval": ("S", "send a WebSocket ping this often; 0: never"),
    "--ws-ping-timeout": ("S", "close (1011) if no pong comes this soon"),
    # Going over a limit gets the status shown (section 1 has the reasons).
    "--limit-request-line": ("BYTES", "longest request-line, else 414"),
    "--limit-request-head": ("BYTES", "largest request head, else 431"),
    "--limit-request-fields": ("N", "most header fields, else 431"),
    "--limit-request-body": ("BYTES", "largest request body, else 413 (default: none)"),
    "--limit-spool": ("BYTES", "largest chunked body the WSGI path stores, else 413"),
    "--limit-concurrency": ("N", "most open connections, else 503 (default: none)"),
    "--timeout-keep-alive": ("S", "seconds idle between requests"),
    "--timeout-request-head": ("S", "seconds to receive a whole head, else 408"),
    "--timeout-read": ("S", "seconds without body bytes while reading one, else 408"),
    "--timeout-write": ("S", "seconds a response may stay unread"),
    "--timeout-graceful-shutdown": ("S", "seconds requests may go on during shutdown"),
}


def build_arg_parser() -> argparse.ArgumentParser:
    """The options: first those of the command line itself (which app, how to
    load it, logging), then one per Config field.

    argparse checks types and choices, and ends a run with a usage error
    (exit status 2) before anything else happens.
    """
    parser = argparse.ArgumentParser(
        prog="gateway.py",
        description="Serve a WSGI or ASGI app over HTTP/1.1 (standard library only).",
        epilog="example: python gateway.py --asgi echo_asgi:app --port 8000")
    add = parser.add_argument
    # Not Config fields: which app to serve, how to load it, and the log set-up.
    app = parser.add_mutually_exclusive_group(required=True)
    app.add_argument("--asgi", metavar="MODULE:ATTR", help="serve this ASGI 3 app")
    app.add_argument("--wsgi", metavar="MODULE:ATTR", help="serve this WSGI app")
    add("--factory", action="store_true",
        help="ATTR is a callable that returns the app")
    add("--app-dir", default=".", metavar="DIR",
        help="directory to import the app from (default: current)")
    add("--env-file", metavar="PATH", help="read KEY=VALUE lines into the environment")
    add("--reload", action="store_true",
        help="restart when a .py file under the current directory changes")
    add("--log-level", default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="trace: debug, and --trace too (default: %(default)s)")
    # Two Config fields whose options take another form than the field's value:
    # config_from() converts them.
    add("--header", dest="headers", action="append", default=[], metavar="NAME:VALUE",
        help="add this header to every response (repeatable)")
    add("--ws-per-message-deflate", choices=["true", "false"], default="true",
        help="offer permessage-deflate compression (RFC 7692) to clients that ask "
        "(default: %(default)s)")
    add_config_options(parser)
    # Policy: $WEB_CONCURRENCY, which hosting platforms set to the number of
    # processes to run, is the default of --workers.
    parser.set_defaults(workers=int(os.environ.get("WEB_CONCURRENCY", 1)))
    return parser


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per Config field, with its help from OPTION_HELP.

    The field limit_request_line becomes --limit-request-line, which sets it;
    the option's default is the field's default, and its type the field's
    annotation. A bool field is a switch: off by default, --trace turns it
    on; on by default, --no-date-header turns it off.
    """
    for field_ in dataclasses.fields(Config):
        default = field_.default    # MISSING for headers (a default_factory)
        option = ("--no-" if default is True else "--") + field_.name.replace("_", "-")
        if option not in OPTION_HELP:
            continue            # headers, ws_per_message_deflate: written above
        metavar, text = OPTION_HELP[option]
        if isinstance(default, bool):     # a switch: --trace on, --no-date-header off
            action = "store_false" if default else "store_true"
            parser.add_argument(option, dest=field_.name, action=action, help=text)
            continue
        # The value's type is the annotation's (a string: see the __future__
        # import): "int | None" is int, "str" is str.
        kind = float if "float" in field_.type else int if "int" in field_.type else str
        choices = metavar.split("|") if "|" in metavar else None
        # None ("no limit", "not set") and "" have no value worth showing.
        shown = "" if default in (None, "") else " (default: %(default)s)"
        parser.add_argument(option, type=kind, default=default, choices=choices,
                            metavar=None if choices else metavar, help=text + shown)


def config_from(args: argparse.Namespace) -> Config:
    """Turn parsed options into a Config: same names, three values converted.

    --ws-ping-interval 0 means no pings (None), --ws-per-message-deflate is a
    word, and each --header NAME:VALUE becomes a (name, value) pair of bytes.
    Config itself refuses what no server could run with: its ValueError ends
    the run with exit status 1.
    """
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    options["ws_ping_interval"] = args.ws_ping_interval or None       # 0: no pings
    options["ws_per_message_deflate"] = args.ws_per_message_deflate == "true"
    options["headers"] = []
    for item in args.headers:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--header needs NAME:VALUE, not {item!r}")
        options["headers"].append((name.strip().encode("latin-1"),
                                   value.strip().encode("latin-1")))
    return Config(**options)


def load_env_file(path: str) -> None:
    """--env-file: KEY=VALUE lines into os.environ, for the app to read.

    Blank lines and # comments are skipped; a value in matching quotes loses
    them. The file is read after the options are parsed, so it sets nothing
    of gateway's own (not even the default of --workers).
    """
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                os.environ[key.strip()] = value


def source_times() -> dict:
    """--reload: the modification times of the .py files under ".", but not in
    hidden folders or __pycache__."""
    times = {}
    for folder, dirs, files in os.walk("."):
        # Pruning `dirs` in place is how os.walk() is told to skip a folder.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for path in [os.path.join(folder, name) for name in files
                     if name.endswith(".py")]:
            try:
                times[path] = os.stat(path).st_mtime
            except OSError:
                pass            # deleted since os.walk() listed it
    return times


def run_reloader(argv: list[str]) -> int:
    """--reload: run the server in a child process; restart it when a .py file
    under the current directory changes.

    A new process is the one sure way to load changed code: a module imported
    again does not change the objects made from the old one. The files are
    polled once a second, because the standard library has no file watcher.
    """
    command = [sys.executable, os.path.abspath(__file__)] + [a for a in argv
                                                             if a != "--reload"]
    while True:
        seen = source_times()
        child = subprocess.Popen(command)
        try:
            while source_times() == seen:
                time.sleep(1.0)
        except KeyboardInterrupt:
            # From a terminal, Ctrl+C reached the child too (one process group);
            # terminate()'s SIGTERM is then its second signal: it stops at once.
            return 0
        finally:
            child.terminate()
            child.wait()
        log.info("a .py file changed; restarting")


def main(argv: list[str] | None = None) -> int:
    """Run the command line (steps 1-4 above, then 5-6); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_args(argv)                     # step 1
    if args.log_level == "trace":     # the most detailed level: debug and --trace
        args.log_level, args.trace = "debug", True
    # The one place that sets up logging: the sections above only log.
    logging.basicConfig(level=args.log_level.upper(), handlers=[BatchedStreamHandler()])
    if args.env_file:
        load_env_file(args.env_file)
    if args.reload:
        return run_reloader(argv)       # a child runs main() again, without --reload
    if args.workers > 1 and not hasattr(os, "fork"):     # Windows has no fork()
        log.error("--workers needs os.fork(), which this platform does not have")
        return 1
    sys.path.insert(0, os.path.abspath(args.app_dir))    # --app-dir's modules first
    interface, spec = ("asgi", args.asgi) if args.asgi else ("wsgi", args.wsgi)
    try:
        config = config_from(args)                                   # step 2
        app = import_app(spec, args.factory)                         # step 3
        # Step 4. Limit: --workers share one socket and the parent cannot tell when a
        # worker has started, so it listens from the outset: clients that come
        # before the first worker is ready wait in the backlog.
        listener = make_listener(args.host, args.port, args.backlog, args.uds, args.fd,
                                 listen=interface == "wsgi" or config.workers > 1)
    except (AppImportError, ValueError) as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        reason = "address already in use" if error.errno == errno.EADDRINUSE else error
        where = args.uds or f"{args.host}:{args.port}"
        log.error("cannot listen on %s: %s", where, reason)
        return 1
    return serve_until_stopped(app, interface, spec, config, listener)


def serve_until_stopped(app, interface: str, spec: str, config: Config,
                        listener: socket.socket) -> int:
    """Steps 5-6: serve in this process or in --workers; return the exit status.

    0 after a graceful stop; EXIT_STARTUP_FAILED (3) or EXIT_SHUTDOWN_FAILED (4)
    when the ASGI lifespan failed (section 11), in this process or a worker.
    """
    host, port = listen_address(listener)
    scheme = "https" if config.ssl_certfile else "http"
    where = f"unix:{host}" if port is None else "%s://%s:%d" % (
        scheme, f"[{host}]" if ":" in host else host, port)
    config.port = port or 0             # the port that --port 0 picked; 0: unix socket

    def announce() -> None:
        """The start-up line, once connections are accepted."""
        log.info("serving %s app %s on %s (Ctrl+C to quit)", interface.upper(), spec,
                 where)

    serve_one = functools.partial(serve, app, interface, config=config,
                                  listener=listener)
    try:
        if config.workers > 1:
            announce()          # once for all of them, before any is ready
            return run_workers(config.workers, serve_one)
        serve_one(ready=announce)
    except KeyboardInterrupt:
        pass             # where no signal handler could be installed
    except LifespanFailure as error:
        log.error("%s", error)
        return error.status   # EXIT_STARTUP_FAILED or EXIT_SHUTDOWN_FAILED
    log.info("stopped")
    return 0



# -- --workers: a parent process and N forked workers -------------------------
#
# The parent binds the socket, forks the workers (each one runs serve() on the
# inherited socket; the kernel hands each new connection to one of them) and
# then only waits: it relays SIGINT/SIGTERM to them as SIGTERM, replaces one
# that dies, and exits with the status of a lifespan that failed in one.

# The signals on_signals() (above) turns into a graceful shutdown, by
# name: a platform may lack one. A worker keeps only SIGTERM (fork_worker()).
SHUTDOWN_SIGNALS = ("SIGINT", "SIGTERM")


def run_workers(count: int, serve_one) -> int:
    """Fork `count` workers that share the listening socket; keep them alive.

    The parent forwards SIGINT/SIGTERM (as SIGTERM) and waits for them to
    drain; a worker that dies unexpectedly is replaced."""
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
        if stopping:
            # ASGI Lifespan "Shutdown Failed" (or a startup that failed as we
            # stopped) in one worker: the whole server exits non-zero.
            if code in (EXIT_STARTUP_FAILED, EXIT_SHUTDOWN_FAILED) and not result:
                result = code
        elif code == EXIT_STARTUP_FAILED:     # it cannot start: stop them all
            result = code
            stop(signal.SIGTERM, None)
        else:
            log.warning("worker %d died (exit %d); starting another", pid, code)
            children.add(fork_worker(serve_one))
    return result


def fork_worker(serve_one) -> int:
    """Fork one worker that serves until stopped, then exits; return its pid.

    The relayed signals are blocked across fork(): a child must never run the
    parent's handler (it would relay the signal to its brothers a second
    time), and it may not get to run at all before a signal arrives.
    """
    global SHUTDOWN_SIGNALS
    relayed = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, relayed)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, relayed)
        return pid      # the parent
    # The child. Ctrl+C in a terminal goes to the whole process group: a
    # worker ignores it and waits for the SIGTERM its parent relays, so that
    # one Ctrl+C never counts twice (which would stop it at once).
    SHUTDOWN_SIGNALS = ("SIGTERM",)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # until the server's own
    signal.pthread_sigmask(signal.SIG_UNBLOCK, relayed)
    code = 1            # serve, then leave the process: fork_worker never returns
    try:
        serve_one()
        code = 0
    except LifespanFailure as error:
        log.error("%s", error)
        code = error.status
    finally:
        logging.shutdown()     # write the access lines that wait, as exit would
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
