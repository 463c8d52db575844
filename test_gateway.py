"""Tests for gateway.py, in the order of its sections.

Every server test starts a real server on a free loopback port (port 0) in a
thread, talks raw bytes to it, and waits on conditions with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import errno
import hashlib
import importlib.util
import io
import json
import logging
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from http import HTTPStatus
from wsgiref.validate import WSGIWarning, validator

import pytest

import echo_asgi
import echo_wsgi
import gateway
from gateway import (END, Config, HTTPError, Request, RequestParser, Response,
                     encode_chunk, error_response, http_date)

TIMEOUT = 10.0     # seconds any single socket operation may take in a test


# -- helpers: servers, clients and feeders ------------------------------------


@contextlib.contextmanager
def running_server(interface: str, app, **options):
    """Serve `app` on 127.0.0.1, port 0, in a thread; yield the port."""
    config = gateway.Config(**options)
    listener = gateway.make_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    if interface == "wsgi":
        server = gateway.WSGIServer(app, listener, config)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
    else:
        server = gateway.ASGIServer(app, listener, config)
        thread = threading.Thread(target=asyncio.run, args=(server.serve(),),
                                  daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()        # also fine before the server has started
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "server did not stop"


ECHO_APPS = {"wsgi": echo_wsgi.application, "asgi": echo_asgi.app}


@pytest.fixture(params=["wsgi", "asgi"])
def interface(request):
    return request.param


@pytest.fixture
def echo_server(interface):
    """The echo app of the interface under test; yields the port."""
    with running_server(interface, ECHO_APPS[interface]) as port:
        yield port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    with connect(port) as sock:
        sock.sendall(raw)
        return read_until_closed(sock)


class ResponseReader:
    """Reads HTTP/1.1 responses off a socket one at a time (a tiny client)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        piece = self.sock.recv(65536)
        self.buffer += piece
        return bool(piece)

    def read_head(self) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-head: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, lines[0]

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._fill(), "connection closed mid-body"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                assert self._fill(), "connection closed mid-chunk"
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in self.buffer:
                    assert self._fill()
                assert self.buffer.startswith(b"\r\n"), "trailers not expected"
                self.buffer = self.buffer[2:]
                return body
            body += self.read_exact(size)
            assert self.read_exact(2) == b"\r\n"

    def read_response(self, method: str = "GET") -> tuple[int, dict, bytes]:
        """One whole response: (status, headers, body)."""
        status, headers, _ = self.read_head()
        if method == "HEAD" or status in (204, 304) or status < 200:
            return status, headers, b""
        if headers.get(b"transfer-encoding") == b"chunked":
            return status, headers, self.read_chunked()
        if b"content-length" in headers:
            return status, headers, self.read_exact(int(headers[b"content-length"]))
        body = self.buffer + read_until_closed(self.sock)
        self.buffer = b""
        return status, headers, body


def request(port: int, raw: bytes, method: str = "GET") -> tuple[int, dict, bytes]:
    """Send one request on a new connection and read one response."""
    with connect(port) as sock:
        sock.sendall(raw)
        return ResponseReader(sock).read_response(method)


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    """Wait until condition() is true, polling briefly; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)




# =============================================================================
# §3  Reading requests - RFC 9112 §2-§7
#
# Every table row is fed three ways (STYLE rule 24): whole, one byte at a time,
# and whole with a second, pipelined request behind it. Body bytes may arrive
# in any number of pieces, so adjacent body pieces are joined before comparing.
# =============================================================================

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"

# The head most rows share: "GET / HTTP/1.1" with "Host: t" and no body.
BASE_REQUEST = Request(method="GET", target=b"/", path=b"/", query=b"", version="1.1",
                       headers=[(b"host", b"t")], chunked=False, content_length=0,
                       keep_alive=True, expect_continue=False)

NEXT_EVENTS = [dataclasses.replace(BASE_REQUEST, target=b"/next", path=b"/next"), END]


def head_of(**changes) -> Request:
    """BASE_REQUEST with some fields changed."""
    return dataclasses.replace(BASE_REQUEST, **changes)


def feed_whole(raw: bytes) -> list[bytes]:
    return [raw]


def feed_bytewise(raw: bytes) -> list[bytes]:
    return [raw[i:i + 1] for i in range(len(raw))]


def feed_pipelined(raw: bytes) -> list[bytes]:
    return [raw + NEXT_REQUEST]


FEED_WAYS = {"whole": feed_whole, "bytewise": feed_bytewise, "pipelined": feed_pipelined}


def parse_pieces(pieces: list[bytes], max_body: int | None = None) -> list:
    """Feed the pieces in order, taking every ready event after each one.

    Adjacent body pieces are joined, so any split of the input can be compared
    with any other. Raises the parser's HTTPError.
    """
    parser = RequestParser(Config(limit_request_body=max_body))
    events: list = []
    for piece in pieces:
        parser.feed(piece)
        while (event := parser.next_event()) is not None:
            assert event != b"", "a body event is never empty"
            if isinstance(event, bytes) and events and isinstance(events[-1], bytes):
                events[-1] += event
            else:
                events.append(event)
    return events


def rejection(pieces: list[bytes], max_body: int | None = None) -> HTTPError:
    """The HTTPError that parsing these pieces must raise."""
    with pytest.raises(HTTPError) as caught:
        parse_pieces(pieces, max_body)
    return caught.value


def leftover_after_end(raw: bytes) -> bytes:
    """Parse `raw` up to its first END; return what is still buffered."""
    parser = RequestParser()
    parser.feed(raw)
    while (event := parser.next_event()) is not END:
        assert event is not None, "the message did not end"
    return bytes(parser.buffer)


# -- accepted heads -------------------------------------------------------------

LONGEST_LINE = b"GET /" + b"a" * (gateway.MAX_REQUEST_LINE - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
MANY_FIELDS = b"".join(b"X-%d: v\r\n" % i for i in range(gateway.MAX_FIELD_LINES - 1))

ACCEPTED_HEADS = [
    # raw request,  expected Request,  expected body,  rule
    (b"GET /search?q=1&r=%20 HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(target=b"/search?q=1&r=%20", path=b"/search", query=b"q=1&r=%20"), b"",
     "RFC 9112 §3.2.1 origin-form with query"),
    (b"GET /a?b?c HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(target=b"/a?b?c", path=b"/a", query=b"b?c"), b"",
     "RFC 9112 §3.2.1 split at the first question mark"),
    (b"GET /a? HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(target=b"/a?", path=b"/a", query=b""), b"",
     "RFC 9112 §3.2.1 empty query"),
    (b"GET http://h:1/p?q HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(target=b"http://h:1/p?q", path=b"/p", query=b"q",
             headers=[(b"host", b"h:1")]), b"",
     "RFC 9112 §3.2.2 absolute-form: its authority replaces Host"),
    (b"GET http://h HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(target=b"http://h", path=b"/", headers=[(b"host", b"h")]), b"",
     "RFC 9112 §3.2.2 absolute-form empty path is slash"),
    (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(method="OPTIONS", target=b"*", path=b"*"), b"",
     "RFC 9112 §3.2.4 asterisk-form with OPTIONS"),
    (b"get / HTTP/1.1\r\nHost: t\r\n\r\n",
     head_of(method="get"), b"",
     "RFC 9110 §9.1 method case is kept"),
    (b"GET / HTTP/1.0\r\n\r\n",
     head_of(version="1.0", headers=[], keep_alive=False), b"",
     "RFC 9112 §3.2 HTTP-1.0 without Host"),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
     head_of(version="1.0", headers=[(b"connection", b"keep-alive")]), b"",
     "RFC 9112 §9.3 HTTP-1.0 keep-alive"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
     head_of(headers=[(b"host", b"t"), (b"connection", b"close")], keep_alive=False), b"",
     "RFC 9112 §9.3 HTTP-1.1 Connection close"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, CLOSE\r\n\r\n",
     head_of(headers=[(b"host", b"t"), (b"connection", b"Upgrade, CLOSE")], keep_alive=False),
     b"", "RFC 9110 §7.6.1 Connection is a case-insensitive list"),
    pytest.param(
        b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
        head_of(version="1.0", headers=[(b"connection", b"keep-alive, close")],
                keep_alive=False), b"",
        "RFC 9112 §9.3 HTTP-1.0 close wins over keep-alive"),
    (b"\r\n\r\n\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
     BASE_REQUEST, b"",
     "RFC 9112 §2.2 empty lines before the request-line are skipped"),
    (b"GET / HTTP/1.1\nHost: t\nX: y\n\n",
     head_of(headers=[(b"host", b"t"), (b"x", b"y")]), b"",
     "RFC 9112 §2.2 Leniency bare LF line endings"),
    (b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\n",
     head_of(headers=[(b"host", b"t"), (b"x", b"y")]), b"",
     "RFC 9112 §2.2 Leniency mixed CRLF and LF"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n\n", BASE_REQUEST, b"",
     "RFC 9112 §2.2 Leniency CRLF lines then a bare LF empty line"),
    (b"GET / HTTP/1.1\nHost: t\n\r\n", BASE_REQUEST, b"",
     "RFC 9112 §2.2 Leniency bare LF lines then a CRLF empty line"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: caf\xc3\xa9 \x80\xff\r\n\r\n",
     head_of(headers=[(b"host", b"t"), (b"x", b"caf\xc3\xa9 \x80\xff")]), b"",
     "RFC 9110 §5.5 obs-text in a value is kept as bytes"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: \t a \t b \t \r\nY:v\r\nZ:\r\nW: \xa0v\xa0\r\n\r\n",
     head_of(headers=[(b"host", b"t"), (b"x", b"a \t b"), (b"y", b"v"), (b"z", b""),
                      (b"w", b"\xa0v\xa0")]), b"",
     "RFC 9112 §5.1 only SP and HTAB are trimmed"),
    (b"GET / HTTP/1.1\r\nAccept: a\r\nHOST: t\r\naccept: b\r\nX-Y: 1\r\n\r\n",
     head_of(headers=[(b"accept", b"a"), (b"host", b"t"), (b"accept", b"b"), (b"x-y", b"1")]),
     b"", "RFC 9110 §5.3 names lower-cased, wire order, duplicates kept"),
    (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
     head_of(headers=[(b"host", b"[::1]:8080")]), b"",
     "RFC 9112 §3.2 Host with IPv6 literal and port"),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
     head_of(headers=[(b"host", b"")]), b"",
     "RFC 9112 §3.2 empty Host"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
     head_of(method="POST", headers=[(b"host", b"t"), (b"content-length", b"5, 5")],
             content_length=5), b"hello",
     "RFC 9112 §6.3 equal Content-Length list"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     head_of(method="POST", headers=[(b"host", b"t"), (b"content-length", b"5"),
                                     (b"content-length", b"5")], content_length=5), b"hello",
     "RFC 9112 §6.3 equal Content-Length lines"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: , Chunked\r\n\r\n0\r\n\r\n",
     head_of(method="POST", headers=[(b"host", b"t"), (b"transfer-encoding", b", Chunked")],
             chunked=True), b"",
     "RFC 9112 §6.1 Transfer-Encoding case-insensitive, empty members ignored"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
     head_of(method="POST", headers=[(b"host", b"t"), (b"expect", b"100-continue"),
                                     (b"content-length", b"2")],
             content_length=2, expect_continue=True), b"hi",
     "RFC 9110 §10.1.1 Expect 100-continue"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
     head_of(headers=[(b"host", b"t"), (b"expect", b"100-continue")]), b"",
     "RFC 9110 §10.1.1 no 100 Continue for a request without a body"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\nhi",
     head_of(method="POST", headers=[(b"host", b"t"), (b"expect", b"100-Continue"),
                                     (b"content-length", b"2")],
             content_length=2, expect_continue=True), b"hi",
     "RFC 9110 §10.1.1 Expect is case-insensitive"),
    (b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n",
     head_of(version="1.0", headers=[(b"expect", b"100-continue")], keep_alive=False), b"",
     "RFC 9110 §10.1.1 Expect ignored on HTTP-1.0"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + MANY_FIELDS + b"\r\n",
     head_of(headers=[(b"host", b"t")] + [(b"x-%d" % i, b"v")
                                          for i in range(gateway.MAX_FIELD_LINES - 1)]),
     b"", "RFC 9110 §5.4 exactly the field-line limit"),
    pytest.param(
        b"GET / HTTP/1.2\r\nHost: t\r\n\r\n", BASE_REQUEST, b"",
        "RFC 9110 §2.5 HTTP-1.2 is handled as 1.1"),
]


def row_id(row, index: int) -> str:
    """The rule name of a table row, plain tuple or pytest.param."""
    return getattr(row, "values", row)[index]


@pytest.mark.parametrize("how", FEED_WAYS)
@pytest.mark.parametrize("raw,expected,body,rule", ACCEPTED_HEADS,
                         ids=[row_id(row, 3) for row in ACCEPTED_HEADS])
def test_accepted_heads(raw, expected, body, rule, how):
    events = [expected] + ([body] if body else []) + [END]
    if how == "pipelined":
        events += NEXT_EVENTS
        assert leftover_after_end(raw + NEXT_REQUEST) == NEXT_REQUEST
    assert parse_pieces(FEED_WAYS[how](raw)) == events


# -- rejected heads -------------------------------------------------------------


def host_head(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    """A head with "Host: t" and the given extra field lines."""
    return line + b"\r\nHost: t\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


REJECTED_HEADS = [
    # raw head,  status,  rule
    (host_head(b"X : y"), 400, "RFC 9112 §5.1 space before colon"),
    (host_head(b"X\t: y"), 400, "RFC 9112 §5.1 tab before colon"),
    (host_head(b"X: a", b" b"), 400, "RFC 9112 §5.2 obs-fold"),
    (host_head(b"X: a", b"\tb"), 400, "RFC 9112 §5.2 obs-fold with HTAB"),
    (b"GET / HTTP/1.1\r\n Host: t\r\n\r\n", 400,
     "RFC 9112 §2.2 whitespace line after request-line"),
    (host_head(b"Host: u"), 400, "RFC 9112 §3.2 two Host lines"),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "RFC 9112 §3.2 two Host lines on 1.0"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "RFC 9112 §3.2 missing Host on 1.1"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "RFC 9112 §3.2 Host with space"),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "RFC 9112 §3.2 Host with slash"),
    (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, "RFC 9112 §3.2 Host with userinfo"),
    (b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400, "RFC 9112 §3.2 Host with non-numeric port"),
    (host_head(line=b"GET / http/1.1"), 400, "RFC 9112 §2.3 lowercase version"),
    (host_head(line=b"GET / HTTP/1.1x"), 400, "RFC 9112 §2.3 junk after version"),
    (host_head(line=b"GET / HTTP/2.0"), 505, "RFC 9110 §15.6.6 HTTP-2.0"),
    (host_head(line=b"GET / HTTP/3.0"), 505, "RFC 9110 §15.6.6 HTTP-3.0"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "RFC 9110 §15.6.6 HTTP-2 connection preface"),
    (host_head(line=b"GET /"), 400, "RFC 9112 §3 missing version"),
    (host_head(line=b"GET  / HTTP/1.1"), 400, "RFC 9112 §3 double space"),
    (host_head(line=b"GET / HTTP/1.1 "), 400, "RFC 9112 §3 trailing space"),
    (host_head(line=b" GET / HTTP/1.1"), 400, "RFC 9112 §3 leading space"),
    (host_head(line=b"GET\t/\tHTTP/1.1"), 400, "RFC 9112 §3 tab separators"),
    (host_head(line=b"G(T / HTTP/1.1"), 400, "RFC 9112 §3.1 method not a token"),
    (host_head(line=b"GET /a#f HTTP/1.1"), 400, "RFC 9112 §3.2 fragment in target"),
    (host_head(line=b"GET /a\x00b HTTP/1.1"), 400, "RFC 9112 §3.2 NUL in target"),
    (host_head(line=b"GET /a\x7fb HTTP/1.1"), 400, "RFC 9112 §3.2 DEL in target"),
    (host_head(line=b"GET /\xc3\xa9 HTTP/1.1"), 400, "RFC 9112 §3.2 non-ASCII in target"),
    (host_head(line=b"GET ftp://h/ HTTP/1.1"), 400, "RFC 9112 §3.2.2 non-http scheme"),
    (host_head(line=b"GET h/p HTTP/1.1"), 400, "RFC 9112 §3.2 target neither origin nor absolute"),
    (host_head(b"X: a\x00b"), 400, "RFC 9110 §5.5 NUL in value"),
    (host_head(b"X: a\x01b"), 400, "RFC 9110 §5.5 CTL in value"),
    (host_head(b"X: a\x7fb"), 400, "RFC 9110 §5.5 DEL in value"),
    (host_head(b"X: \x0bv"), 400, "RFC 9110 §5.5 VT is a CTL not OWS"),
    (host_head(b"X: v\x0c"), 400, "RFC 9110 §5.5 FF is a CTL not OWS"),
    (host_head(b"X: a\rb"), 400, "RFC 9112 §2.2 lone CR in a value"),
    (host_head(b"X: a\r"), 400, "RFC 9112 §2.2 CR CR LF"),
    (b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n", 400, "RFC 9112 §2.2 lone CR as line end"),
    (host_head(line=b"GET /\r HTTP/1.1"), 400, "RFC 9112 §2.2 lone CR in request-line"),
    # A stray CR before a line's end is refused wherever the line stands, and
    # whatever ends the lines: one CR is part of the CRLF, a second one is not.
    (b"GET / HTTP/1.1\r\r\nHost: t\r\n\r\n", 400,
     "RFC 9112 §2.2 stray CR ending the request-line"),
    (b"GET / HTTP/1.1\r\nHost: t\r\r\nX: y\r\n\r\n", 400,
     "RFC 9112 §2.2 stray CR ending a middle line"),
    (b"GET / HTTP/1.1\r\nHost: t\r\r\n\r\n", 400, "RFC 9112 §2.2 stray CR ending the last line"),
    (b"GET / HTTP/1.1\r\nHost: t\r\r\n\n", 400,
     "RFC 9112 §2.2 stray CR ending the last line before a bare LF"),
    (b"GET / HTTP/1.1\r\r\nHost: t\n\n", 400,
     "RFC 9112 §2.2 stray CR ending the request-line of a bare LF head"),
    (b"GET / HTTP/1.1\nHost: t\r\r\nX: y\n\n", 400,
     "RFC 9112 §2.2 stray CR ending a middle line of a bare LF head"),
    (b"GET / HTTP/1.1\nHost: t\r\r\n\n", 400,
     "RFC 9112 §2.2 stray CR ending the last line of a bare LF head"),
    (b"POST / HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\r\r\n\n", 400,
     "RFC 9112 §2.2 stray CR ending a bare LF head's framing field"),
    (host_head(line=b"GET * HTTP/1.1"), 400, "RFC 9112 §3.2.4 asterisk with GET"),
    (host_head(line=b"CONNECT h:443 HTTP/1.1"), 501, "RFC 9112 §3.2.3 CONNECT not supported"),
    (host_head(line=b"M" * (gateway.MAX_METHOD_BYTES + 1) + b" / HTTP/1.1"), 501,
     "RFC 9112 §3 method longer than 32 bytes"),
    (host_head(line=b"GET /" + b"a" * 9000 + b" HTTP/1.1"), 414,
     "RFC 9112 §3 request-line over 8 KiB"),
    (host_head(*[b"X-%d: " % i + b"v" * 1000 for i in range(70)]), 431,
     "RFC 6585 §5 head over 64 KiB"),
    (host_head(b"X: " + b"v" * 70000), 431, "RFC 6585 §5 one field line over 64 KiB"),
    (host_head(*[b"X-%d: v" % i for i in range(gateway.MAX_FIELD_LINES)]), 431,
     "RFC 6585 §5 more than 100 field lines"),
    (host_head(b"Content-Length: +5"), 400, "RFC 9110 §8.6 Content-Length plus sign"),
    (host_head(b"Content-Length: -1"), 400, "RFC 9110 §8.6 Content-Length negative"),
    (host_head(b"Content-Length: 0x10"), 400, "RFC 9110 §8.6 Content-Length hex"),
    (host_head(b"Content-Length: 1_0"), 400, "RFC 9110 §8.6 Content-Length underscore"),
    (host_head(b"Content-Length: 5 5"), 400, "RFC 9110 §8.6 Content-Length inner space"),
    (host_head(b"Content-Length: 5.0"), 400, "RFC 9110 §8.6 Content-Length decimal point"),
    (host_head(b"Content-Length: \xd9\xa1"), 400, "RFC 9110 §8.6 Content-Length non-ASCII digit"),
    (host_head(b"Content-Length:"), 400, "RFC 9110 §8.6 Content-Length empty"),
    (host_head(b"Content-Length: 5, 6"), 400, "RFC 9112 §6.3 differing Content-Length list"),
    (host_head(b"Content-Length: 5", b"Content-Length: 6"), 400,
     "RFC 9112 §6.3 differing Content-Length lines"),
    (host_head(b"Content-Length: 5", b"Content-Length: x"), 400,
     "RFC 9112 §6.3 one invalid Content-Length line"),
    (host_head(b"Content-Length: 9999999999999999999"), 413,
     "RFC 9110 §8.6 Content-Length with 19 digits"),
    (host_head(b"Content-Length: " + b"9" * 400), 413,
     "RFC 9110 §8.6 Content-Length with 400 digits"),
    (host_head(b"Transfer-Encoding: chunked", b"Content-Length: 5"), 400,
     "RFC 9112 §6.3 Transfer-Encoding and Content-Length"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "RFC 9112 §6.1 Transfer-Encoding on HTTP-1.0"),
    (host_head(b"Transfer-Encoding: gzip"), 400, "RFC 9112 §6.3 final coding gzip"),
    (host_head(b"Transfer-Encoding: xchunked"), 400, "RFC 9112 §6.3 final coding xchunked"),
    (host_head(b"Transfer-Encoding: chunked, identity"), 400,
     "RFC 9112 §6.3 chunked not the final coding"),
    (host_head(b"Transfer-Encoding: chunked;q=1"), 400, "RFC 9112 §7.1 chunked with parameters"),
    (host_head(b"Transfer-Encoding: gzip, chunked"), 501, "RFC 9112 §6.1 gzip before chunked"),
    (host_head(b"Transfer-Encoding: identity, chunked"), 501,
     "RFC 9112 §6.1 identity before chunked"),
    (host_head(b"Transfer-Encoding: chunked, chunked"), 400, "RFC 9112 §7.1 chunked twice"),
    (host_head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400,
     "RFC 9112 §7.1 chunked twice on two lines"),
    (host_head(b"X(y): 1"), 400, "RFC 9110 §5.1 field name not a token"),
    (host_head(b"X y: 1"), 400, "RFC 9110 §5.1 space inside field name"),
    (host_head(b"X\xe9: 1"), 400, "RFC 9110 §5.1 non-ASCII field name"),
    (host_head(b": 1"), 400, "RFC 9110 §5.1 empty field name"),
    (host_head(b"NoColon"), 400, "RFC 9112 §5 field line without colon"),
    pytest.param(host_head(b"Expect: something-else"), 417,
                 "RFC 9110 §10.1.1 unknown expectation"),
    pytest.param(b"\r\n" * 100 + host_head(), 400,
                 "RFC 9112 §2.2 too many empty lines before the request-line"),
    # All field lines are matched by one pattern first: a bad last line after
    # many blank-padded values must not make it backtrack (it used to hang here).
    pytest.param(host_head(*[b"X-%d:%s" % (i, b" \t" * 20) for i in range(60)], b"X y"),
                 400, "RFC 9112 §5 bad line after many padded ones"),
]


@pytest.mark.parametrize("how", FEED_WAYS)
@pytest.mark.parametrize("raw,status,rule", REJECTED_HEADS,
                         ids=[row_id(row, 2) for row in REJECTED_HEADS])
def test_rejected_heads(raw, status, rule, how):
    assert rejection(FEED_WAYS[how](raw)).status == status


# -- limits: the same answer for every split -------------------------------------

CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
LONGEST_HEAD = (b"GET / HTTP/1.1\r\nHost: t\r\nX: "
                + b"v" * (gateway.MAX_HEAD_BYTES - len(b"GET / HTTP/1.1\r\nHost: t\r\nX: ") - 1)
                + b"\r\n\r\n")
LONGEST_CHUNK_LINE = b"5;" + b"e" * (gateway.MAX_CHUNK_LINE - 2)

LIMIT_CASES = [
    # raw request,  events when accepted (None: the status of the HTTPError),  rule
    pytest.param(
        LONGEST_LINE + b"\r\nHost: t\r\n\r\n",
        [head_of(target=LONGEST_LINE[4:-9], path=LONGEST_LINE[4:-9]), END],
        id="RFC 9112 §3 request-line of exactly 8 KiB"),
    pytest.param(
        LONGEST_HEAD,
        [head_of(headers=[(b"host", b"t"), (b"x", LONGEST_HEAD[28:-4])]), END],
        id="RFC 6585 §5 head of exactly 64 KiB"),
    pytest.param(
        CHUNKED_HEAD + LONGEST_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n",
        [head_of(method="POST", headers=[(b"host", b"t"), (b"transfer-encoding", b"chunked")],
                 chunked=True), b"hello", END],
        id="RFC 9112 §7.1.1 chunk line of exactly 4 KiB"),
    pytest.param(
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414,
        id="RFC 9112 §3 request-line over 64 KiB is 414 too"),
]


@pytest.mark.parametrize("raw,expected", LIMIT_CASES)
def test_limits_give_the_same_answer_for_every_split(raw, expected):
    splits = [feed_whole(raw), feed_bytewise(raw), [raw[:-1], raw[-1:]], [raw[:-2], raw[-2:]]]
    for pieces in splits:
        if isinstance(expected, int):
            assert rejection(pieces).status == expected
        else:
            assert parse_pieces(pieces) == expected


# -- bodies ------------------------------------------------------------------------


def post_head(*fields: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: t\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


CHUNKED = post_head(b"Transfer-Encoding: chunked")

ACCEPTED_BODIES = [
    # raw request,  de-framed body,  rule
    (post_head(b"Content-Length: 5") + b"hello", b"hello", "RFC 9112 §6.2 Content-Length body"),
    (post_head(b"Content-Length: 10") + b"a\r\n\r\nb\n\r\x00\xff", b"a\r\n\r\nb\n\r\x00\xff",
     "RFC 9112 §6.2 Content-Length body is opaque bytes"),
    (post_head(b"Content-Length: 0"), b"", "RFC 9112 §6.2 zero Content-Length"),
    (post_head(b"Content-Length: 007") + b"1234567", b"1234567",
     "RFC 9110 §8.6 Content-Length with leading zeros"),
    (post_head(), b"", "RFC 9112 §6.3 no framing fields means no body"),
    (CHUNKED + b"5\r\nhello\r\n0\r\n\r\n", b"hello", "RFC 9112 §7.1 chunked"),
    (CHUNKED + b"5;name\r\nhello\r\n0\r\n\r\n", b"hello", "RFC 9112 §7.1.1 ext name only"),
    (CHUNKED + b"5;a=b;c=d\r\nhello\r\n0;z=1\r\n\r\n", b"hello",
     "RFC 9112 §7.1.1 ext token values"),
    (CHUNKED + b'5;a="x y\\"z;=";b=""\r\nhello\r\n0\r\n\r\n', b"hello",
     "RFC 9112 §7.1.1 ext quoted-string values"),
    (CHUNKED + b"5 ; a = b\t;\tc\r\nhello\r\n0\r\n\r\n", b"hello",
     "RFC 9112 §7.1.1 BWS around semicolon and equals"),
    (CHUNKED + b"A\r\n0123456789\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n",
     b"0123456789" + b"z" * 26, "RFC 9112 §7.1 upper- and lower-case hex"),
    (CHUNKED + b"005\r\nhello\r\n000\r\n\r\n", b"hello", "RFC 9112 §7.1 leading zeros in sizes"),
    (CHUNKED + b"1\r\na\r\n2\r\nbc\r\n3\r\ndef\r\n0\r\n\r\n", b"abcdef",
     "RFC 9112 §7.1 several chunks"),
    (CHUNKED + b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n",
     "RFC 9112 §7.1 chunk data holding CRLFs"),
    (CHUNKED + b"0\r\n\r\n", b"", "RFC 9112 §7.1 only the last chunk"),
    (CHUNKED + b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nHost: evil\r\n\r\n", b"hello",
     "RFC 9112 §7.1.2 trailers are read and dropped"),
    (CHUNKED + b"3;x=y\r\nabc\r\n0;z\r\nX-A: 1\r\nX-B:\r\nX-C: \t3 \r\n\r\n", b"abc",
     "RFC 9112 §7.1.2 several trailers after chunk-ext lines"),
]


def splits_of(raw: bytes):
    """Whole, byte by byte, pipelined, and every split into two pieces."""
    yield "whole", feed_whole(raw), []
    yield "bytewise", feed_bytewise(raw), []
    yield "pipelined", feed_pipelined(raw), NEXT_EVENTS
    for i in range(1, len(raw)):
        yield f"split at {i}", [raw[:i], raw[i:]], []


@pytest.mark.parametrize("raw,body,rule", ACCEPTED_BODIES, ids=[row[2] for row in ACCEPTED_BODIES])
def test_bodies_arrive_whole_for_every_split(raw, body, rule):
    head = parse_pieces([raw])[0]
    assert isinstance(head, Request)
    assert b"x-sum" not in dict(head.headers)                # trailers are dropped
    assert [name for name, _ in head.headers].count(b"host") == 1
    for how, pieces, after in splits_of(raw):
        assert parse_pieces(pieces) == [head] + ([body] if body else []) + [END] + after, how


def test_zero_length_body_ends_right_after_the_head():
    parser = RequestParser()
    parser.feed(post_head(b"Content-Length: 0"))
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() is END


def test_body_pieces_are_handed_out_as_they_arrive():
    parser = RequestParser()
    parser.feed(post_head(b"Content-Length: 5") + b"he")
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"he"
    assert parser.next_event() is None
    parser.feed(b"llo" + NEXT_REQUEST)
    assert parser.next_event() == b"llo"     # never more than Content-Length
    assert parser.next_event() is END
    assert parser.next_event() == NEXT_EVENTS[0]


def test_the_head_is_an_event_before_any_body_byte():
    parser = RequestParser()
    parser.feed(CHUNKED)
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() is None


def test_the_next_request_waits_until_asked():
    parser = RequestParser()
    parser.feed(post_head(b"Content-Length: 2") + b"hi" + NEXT_REQUEST)
    assert isinstance(parser.next_event(), Request)
    assert parser.next_event() == b"hi"
    assert parser.next_event() is END
    assert bytes(parser.buffer) == NEXT_REQUEST
    assert parser.has_partial_request


REJECTED_BODIES = [
    # raw request,  status,  max_body,  rule
    (CHUNKED + b"g\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 non-hex chunk size"),
    (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 0x prefix"),
    (CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 sign"),
    (CHUNKED + b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 underscore"),
    (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 space before size"),
    (CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 space after size"),
    (CHUNKED + b"\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 empty chunk size"),
    (CHUNKED + b"1" + b"0" * 16 + b"\r\n", 400, None, "RFC 9112 §7.1 chunk size of 17 hex digits"),
    (CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400, None, "RFC 9112 §7.1 no CRLF after chunk data"),
    (CHUNKED + b"5\r\nhello world\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 data longer than size"),
    (CHUNKED + b"5\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 bare LF after size"),
    (CHUNKED + b"5\r\nhello\n0\r\n\r\n", 400, None, "RFC 9112 §7.1 bare LF after data"),
    (CHUNKED + b"0\r\nX: y\n\r\n", 400, None, "RFC 9112 §7.1 bare LF in trailer"),
    (CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n", 400, None,
     "RFC 9112 §7.1.1 chunk-ext line over 4 KiB"),
    (CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1.1 ext without name"),
    (CHUNKED + b"5;a=\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1.1 ext without value"),
    (CHUNKED + b'5;a="x\r\nhello\r\n0\r\n\r\n', 400, None, "RFC 9112 §7.1.1 unterminated quote"),
    (CHUNKED + b"5;a b\r\nhello\r\n0\r\n\r\n", 400, None, "RFC 9112 §7.1.1 space inside ext"),
    (CHUNKED + b"0\r\nbad trailer\r\n\r\n", 400, None, "RFC 9112 §7.1.2 trailer without colon"),
    (CHUNKED + b"0\r\nX : y\r\n\r\n", 400, None, "RFC 9112 §7.1.2 space before colon in trailer"),
    (CHUNKED + b"0\r\nX: a\r\n b\r\n\r\n", 400, None, "RFC 9112 §7.1.2 obs-fold in trailer"),
    (CHUNKED + b"0\r\nX: a\x00\r\n\r\n", 400, None, "RFC 9112 §7.1.2 NUL in trailer"),
    (CHUNKED + b"0\r\nX: a\rb\r\n\r\n", 400, None, "RFC 9112 §7.1.2 lone CR in a trailer"),
    (CHUNKED + b"0\r\nX: a\r\r\n\r\n", 400, None, "RFC 9112 §7.1.2 CR CR LF in a trailer"),
    (post_head(b"Content-Length: 11") + b"hello world", 413, 10,
     "RFC 9110 §15.5.14 Content-Length over max_body"),
    (CHUNKED + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 413, 10,
     "RFC 9110 §15.5.14 chunked body over max_body"),
    (CHUNKED + b"ffffffff\r\n", 413, 10, "RFC 9110 §15.5.14 one huge chunk over max_body"),
]


@pytest.mark.parametrize("how", FEED_WAYS)
@pytest.mark.parametrize("raw,status,max_body,rule", REJECTED_BODIES,
                         ids=[row[3] for row in REJECTED_BODIES])
def test_rejected_bodies(raw, status, max_body, rule, how):
    assert rejection(FEED_WAYS[how](raw), max_body).status == status


@pytest.mark.parametrize("raw,body", [
    (post_head(b"Content-Length: 10") + b"0123456789", b"0123456789"),
    (CHUNKED + b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", b"helloworld"),
], ids=["Content-Length", "chunked"])
def test_a_body_of_exactly_max_body_is_accepted(raw, body):
    for pieces in (feed_whole(raw), feed_bytewise(raw)):
        assert parse_pieces(pieces, max_body=10)[1:] == [body, END]


@pytest.mark.parametrize("raw", [
    host_head(b"X : y"),
    CHUNKED + b"g\r\n",
    post_head(b"Content-Length: 11") + b"hello world",
], ids=["bad head", "bad chunk size", "body over max_body"])
def test_after_an_error_the_parser_keeps_raising(raw):
    parser = RequestParser(Config(limit_request_body=10))
    parser.feed(raw)
    with pytest.raises(HTTPError):
        while parser.next_event() is not None:
            pass
    parser.feed(NEXT_REQUEST)
    for _ in range(3):
        with pytest.raises(HTTPError):
            parser.next_event()


def test_max_body_counts_each_pipelined_request_alone():
    raw = (CHUNKED + b"8\r\n12345678\r\n0\r\n\r\n"
           + post_head(b"Content-Length: 5") + b"abcde")
    events = parse_pieces([raw], max_body=10)
    assert events[1:3] == [b"12345678", END]
    assert events[4:] == [b"abcde", END]


def test_trailers_never_reach_the_headers():
    parser = RequestParser()
    parser.feed(CHUNKED + b"0\r\nHost: evil\r\nX-Trailer: 1\r\n\r\n")
    head = parser.next_event()
    assert parser.next_event() is END
    assert head.headers == [(b"host", b"t"), (b"transfer-encoding", b"chunked")]


# -- no pattern backtracks: the worst case at each limit -------------------------
#
# Every pattern run on client bytes must take time linear in them. A pattern
# that can split the same bytes many ways (OWS next to a value that may hold
# blanks too) tries every split before it fails: seconds of CPU for one 64 KiB
# head, with every other client waiting. A linear parser answers each row in
# milliseconds, so the bound below is generous and cannot flake.


def filled(before: bytes, filler: bytes, after: bytes, size: int) -> bytes:
    """before + filler repeated + after: `size` bytes, or a few bytes fewer."""
    return before + filler * ((size - len(before) - len(after)) // len(filler)) + after


HEAD_ROOM = gateway.MAX_HEAD_BYTES - 1     # a head's bytes before its CRLF CRLF
LINE_ROOM = gateway.MAX_REQUEST_LINE
TRAILER_ROOM = gateway.MAX_HEAD_BYTES - 2   # one trailer line, without its CRLF
HOST_T = b"GET / HTTP/1.1\r\nHost: t\r\n"


def worst_head(field: bytes, filler: bytes, tail: bytes) -> bytes:
    """A head of 64 KiB whose last line is field + filler... + tail."""
    return filled(HOST_T + field, filler, tail, HEAD_ROOM) + b"\r\n\r\n"


def worst_line(line: bytes, filler: bytes, tail: bytes) -> bytes:
    """A head whose request-line is 8 KiB: line + filler... + tail."""
    return filled(line, filler, tail, LINE_ROOM) + b"\r\nHost: t\r\n\r\n"


def worst_chunk(line: bytes, filler: bytes, tail: bytes) -> bytes:
    """A chunked request whose chunk-size line is 4 KiB."""
    return CHUNKED + filled(line, filler, tail, gateway.MAX_CHUNK_LINE) + b"\r\nhello\r\n0\r\n\r\n"


def worst_trailer(field: bytes, filler: bytes, tail: bytes) -> bytes:
    """A chunked request with one trailer line of 64 KiB."""
    return CHUNKED + b"0\r\n" + filled(field, filler, tail, TRAILER_ROOM) + b"\r\n\r\n"


PADDED_LINES = [b"X-%d:" % i + b" \t" * 320 for i in range(gateway.MAX_FIELD_LINES - 2)]

WORST_CASES = [
    # raw request,  status,  rule
    (worst_head(b"X:", b" ", b"\x01"), 400, "RFC 9112 §5 OWS then a CTL"),
    (worst_head(b"X:", b" \t", b"\x01"), 400, "RFC 9112 §5 SP and HTAB then a CTL"),
    (worst_head(b"X: a", b" ", b"\x01"), 400, "RFC 9112 §5 blanks inside a value then a CTL"),
    (worst_head(b"X:", b" ", b"\r"), 400, "RFC 9112 §5 OWS then a stray CR"),
    (filled(b"GET / HTTP/1.1\nHost: t\nX:", b" ", b"\x01", HEAD_ROOM) + b"\n\n", 400,
     "RFC 9112 §5 OWS then a CTL in a bare LF head"),
    (HOST_T + b"".join(line + b"\r\n" for line in PADDED_LINES) + b"X y\r\n\r\n", 400,
     "RFC 9112 §5 a bad line after 98 padded ones"),
    (worst_head(b"", b"X", b""), 400, "RFC 9112 §5 a long name without colon"),
    (worst_head(b"", b"X", b" :"), 400, "RFC 9112 §5 a long name then space colon"),
    (worst_head(b"Host: ", b"a", b"/"), 400, "RFC 9112 §3.2 a long Host then a slash"),
    (worst_head(b"Host: a:", b"1", b"x"), 400, "RFC 9112 §3.2 a long port then a letter"),
    (worst_head(b"Host: [", b"0:", b"x"), 400, "RFC 9112 §3.2 an unclosed IPv6 literal"),
    (worst_head(b"Host: [", b"0:", b"]:1x"), 400, "RFC 9112 §3.2 a long IPv6 literal bad port"),
    (worst_line(b"GET /", b"a", b" HTTP/1.x"), 400, "RFC 9112 §3 a long target then a bad version"),
    (worst_line(b"GET /", b"a", b"\x01 HTTP/1.1"), 400, "RFC 9112 §3 a long target then a CTL"),
    (worst_line(b"GET ", b"/ ", b"HTTP/1.1"), 400, "RFC 9112 §3 many spaces in the request-line"),
    (worst_line(b"GET http://", b"a", b"^/ HTTP/1.1"), 400,
     "RFC 9112 §3.2.2 a long authority then a bad byte"),
    (worst_chunk(b"5", b";a ", b"x"), 400, "RFC 9112 §7.1.1 names with BWS then a bad byte"),
    (worst_chunk(b"5", b" ; a = b", b" x"), 400, "RFC 9112 §7.1.1 pairs with BWS then a bad byte"),
    (worst_chunk(b"5;a", b" ", b"x"), 400, "RFC 9112 §7.1.1 long BWS then a bad byte"),
    (worst_chunk(b'5;a="', b'\\"', b"\x01"), 400,
     "RFC 9112 §7.1.1 a quoted-string of escapes then a CTL"),
    (worst_chunk(b"5", b';a=""', b"="), 400, "RFC 9112 §7.1.1 empty quoted-strings then a bad byte"),
    (worst_trailer(b"X:", b" ", b"\x01"), 400, "RFC 9112 §7.1.2 OWS then a CTL in a trailer"),
    (worst_trailer(b"X: a", b" \t", b"\x01"), 400,
     "RFC 9112 §7.1.2 blanks inside a trailer value then a CTL"),
    (worst_trailer(b"", b"X", b""), 400, "RFC 9112 §7.1.2 a long trailer name without colon"),
    (CHUNKED + b"0\r\n" + b"".join(line + b"\r\n" for line in PADDED_LINES) + b"X:\x01\r\n\r\n",
     400, "RFC 9112 §7.1.2 a bad trailer after 98 padded ones"),
]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("raw,status,rule", WORST_CASES, ids=[row[2] for row in WORST_CASES])
def test_worst_case_input_is_refused_in_linear_time(raw, status, rule, how):
    started = time.thread_time()       # CPU time: other processes do not count
    assert rejection(FEED_WAYS[how](raw)).status == status
    assert time.thread_time() - started < 2.0


def test_a_trailer_line_arriving_byte_by_byte_is_searched_once():
    # The parser looks for the CRLF only in bytes it has not searched yet;
    # searching the line again from its start after every read is quadratic.
    # With the limit at 128 KiB, linear takes a fraction of a second of CPU
    # and quadratic about ten seconds.
    limit = 128 * 1024
    line = b"X-Sum: " + b"v" * (limit - 9)
    parser = RequestParser(Config(limit_request_head=limit))
    parser.feed(CHUNKED + b"0\r\n")
    assert isinstance(parser.next_event(), Request)
    started = time.thread_time()
    for i in range(len(line)):
        parser.feed(line[i:i + 1])
        assert parser.next_event() is None
    for byte in b"\r\n\r":
        parser.feed(bytes([byte]))
        assert parser.next_event() is None
    parser.feed(b"\n")
    assert parser.next_event() is END
    assert time.thread_time() - started < 2.0


# =============================================================================
# §4  Writing responses - RFC 9112 §4, §6, §7.1, §9
#
# Exact bytes with a fixed clock.
# =============================================================================

FIXED_NOW = 784111777.0
FIXED_DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"
SERVER_FIELDS = b"Date: " + FIXED_DATE + b"\r\nServer: gateway\r\n"


def test_http_date_is_imf_fixdate():
    assert http_date(FIXED_NOW) == FIXED_DATE
    assert http_date(FIXED_NOW + 0.999) == FIXED_DATE
    assert http_date(FIXED_NOW + 1) == b"Sun, 06 Nov 1994 08:49:38 GMT"


def test_http_date_agrees_with_email_utils():
    # gateway formats the date itself (English names whatever the locale).
    import email.utils
    for day in range(0, 366 * 4, 5):       # every weekday and month, and a leap year
        now = 946684800 + day * 86400 + day * 3571 % 86400   # from 2000-01-01
        assert http_date(now) == email.utils.formatdate(now, usegmt=True).encode(), now
    assert http_date(0.0) == b"Thu, 01 Jan 1970 00:00:00 GMT"


HTTP_DATE_ROWS = [0.0, 0.0, 0.5, -0.5, -1.0, -1.5, 1.0, FIXED_NOW]


def test_http_date_first_call_in_a_fresh_process_is_a_date():
    # RFC 9110 §5.6.7 (HF-11): the first call of a process has an empty cache,
    # which must not pass for the date of any second - 0.0 (1970) included.
    import email.utils
    code = ("import gateway; print(*(gateway.http_date(t).decode() or '(empty)' "
            f"for t in {HTTP_DATE_ROWS!r}), sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(gateway.__file__)),
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [email.utils.formatdate(t, usegmt=True)
                                        for t in HTTP_DATE_ROWS]


@pytest.mark.parametrize("now", HTTP_DATE_ROWS)
def test_http_date_of_each_second_whatever_came_before(now):
    # RFC 9110 §5.6.7: the date of the second that `now` falls in (floor, so
    # -1.5 is 23:59:58), whatever second the cache held before the call.
    import email.utils
    for before in HTTP_DATE_ROWS:
        http_date(before)
        assert http_date(now) == email.utils.formatdate(now, usegmt=True).encode(), before


def test_encode_chunk():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"z" * 26) == b"1a\r\n" + b"z" * 26 + b"\r\n"


def respond(method, version, keep_alive, status, headers, pieces, config=None):
    """Serialize one whole response; returns (wire bytes, keep_alive afterwards)."""
    response = Response(method, version, keep_alive, config)
    wire = response.head(status, headers, FIXED_NOW)
    for piece in pieces:
        wire += response.body(piece)
    return wire + response.end(), response.keep_alive


CL5 = [(b"Content-Length", b"5")]

RESPONSES = [
    # request (method, version, keep_alive), status, app headers, body pieces,
    # wire bytes, keep_alive afterwards, rule
    (("GET", "1.1", True), 200, CL5, [b"hel", b"lo"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + SERVER_FIELDS + b"\r\nhello", True,
     "RFC 9112 §6.3 length framing from the app"),
    (("GET", "1.1", True), 200, [(b"Content-Type", b"text/plain")], [b"hello", b"", b"world"],
     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + SERVER_FIELDS
     + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", True,
     "RFC 9112 §7.1 chunked for 1.1 without length"),
    (("GET", "1.1", True), 200, [], [],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     True, "RFC 9112 §7.1 empty chunked body"),
    (("GET", "1.0", False), 200, [], [b"hi"],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"Connection: close\r\n\r\nhi", False,
     "RFC 9112 §6.3 close-delimited for 1.0 without length"),
    (("GET", "1.0", True), 200, [], [b"hi"],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"Connection: close\r\n\r\nhi", False,
     "RFC 9112 §6.1 no chunked for a 1.0 keep-alive request without length"),
    (("GET", "1.0", True), 200, CL5, [b"hello"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + SERVER_FIELDS
     + b"Connection: keep-alive\r\n\r\nhello", True,
     "RFC 9112 App C.2.2 1.0 keep-alive response"),
    (("GET", "1.1", False), 200, CL5, [b"hello"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + SERVER_FIELDS
     + b"Connection: close\r\n\r\nhello", False,
     "RFC 9112 §9.6 client asked to close"),
    (("HEAD", "1.1", True), 200, [(b"Content-Length", b"42")], [b"x" * 42],
     b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n" + SERVER_FIELDS + b"\r\n", True,
     "RFC 9110 §9.3.2 HEAD keeps the app Content-Length and sends no body"),
    (("HEAD", "1.1", True), 200, [], [b"ignored"],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"\r\n", True,
     "RFC 9110 §8.6 HEAD gets no invented Content-Length"),
    (("HEAD", "1.0", True), 200, [], [],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"Connection: keep-alive\r\n\r\n", True,
     "RFC 9112 §6.3 HEAD 1.0 keep-alive needs no close"),
    (("GET", "1.1", True), 204, [(b"content-length", b"5"), (b"Transfer-Encoding", b"chunked")],
     [b"hello"],
     b"HTTP/1.1 204 No Content\r\n" + SERVER_FIELDS + b"\r\n", True,
     "RFC 9110 §8.6 204 strips Content-Length"),
    (("GET", "1.1", True), 103, [(b"Link", b"</s.css>"), (b"Content-Length", b"0")], [],
     b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n" + SERVER_FIELDS + b"\r\n", True,
     "RFC 9110 §8.6 1xx strips Content-Length"),
    (("GET", "1.1", True), 304, CL5, [b"hello"],
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n" + SERVER_FIELDS + b"\r\n", True,
     "RFC 9110 §8.6 304 keeps Content-Length and sends no body"),
    (("GET", "1.1", True), 200, CL5 + [(b"connection", b"Close")], [b"hello"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + SERVER_FIELDS
     + b"Connection: close\r\n\r\nhello", False,
     "RFC 9112 §9.6 app Connection close honoured once"),
    (("GET", "1.1", True), 200, CL5 + [(b"Transfer-Encoding", b"chunked"),
                                       (b"Keep-Alive", b"timeout=5")], [b"hello"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + SERVER_FIELDS + b"\r\nhello", True,
     "RFC 9112 §6.1 app Transfer-Encoding and Keep-Alive dropped"),
    (("GET", "1.1", True), 200, [(b"Transfer-Encoding", b"gzip")], [b"hi"],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS
     + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", True,
     "RFC 9112 §6.1 only the server's Transfer-Encoding"),
    (("GET", "1.0", False), 200, [(b"Transfer-Encoding", b"chunked")], [b"hi"],
     b"HTTP/1.1 200 OK\r\n" + SERVER_FIELDS + b"Connection: close\r\n\r\nhi", False,
     "RFC 9112 §6.1 never Transfer-Encoding to 1.0"),
    (("GET", "1.1", True), 200, CL5 + [(b"DATE", b"Mon, 07 Nov 1994 00:00:00 GMT"),
                                       (b"server", b"app/1")], [b"hello"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDATE: Mon, 07 Nov 1994 00:00:00 GMT\r\n"
     b"server: app/1\r\n\r\nhello", True,
     "RFC 9110 §6.6.1 app Date and Server not duplicated"),
    (("GET", "1.1", True), 599, CL5, [b"hello"],
     b"HTTP/1.1 599 \r\nContent-Length: 5\r\n" + SERVER_FIELDS + b"\r\nhello", True,
     "RFC 9112 §4 empty reason keeps its SP"),
]


@pytest.mark.parametrize("request_line,status,headers,pieces,wire,keep_alive,rule", RESPONSES,
                         ids=[row[-1] for row in RESPONSES])
def test_response_bytes(request_line, status, headers, pieces, wire, keep_alive, rule):
    assert respond(*request_line, status, headers, pieces) == (wire, keep_alive)


def test_config_can_leave_out_date_and_server():
    config = Config(server_header=False, date_header=False)
    wire, _ = respond("GET", "1.1", True, 200, CL5, [b"hello"], config)
    assert wire == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_an_empty_piece_is_never_a_last_chunk():
    response = Response("GET", "1.1", True)
    response.head(200, [], FIXED_NOW)
    assert response.body(b"") == b""
    assert response.body(b"ab") == b"2\r\nab\r\n"
    assert response.end() == b"0\r\n\r\n"


@pytest.mark.parametrize("pieces", [[b"hello!"], [b"abc", b"abc"]], ids=["one piece", "two pieces"])
def test_bytes_past_content_length_are_dropped_and_the_connection_closes(pieces):
    response = Response("GET", "1.1", True)
    response.head(200, CL5, FIXED_NOW)
    sent = b"".join(response.body(piece) for piece in pieces)
    assert sent == b"".join(pieces)[:5]       # RFC 9112 §6.3: never past the length
    assert response.end() == b""
    assert not response.keep_alive


def test_a_body_short_of_content_length_closes():
    response = Response("GET", "1.1", True)
    response.head(200, CL5, FIXED_NOW)
    assert response.body(b"hel") == b"hel"
    assert response.keep_alive
    assert response.end() == b""
    assert response.keep_alive is False


@pytest.mark.parametrize("name,value", [
    (b"X", b"a\r\nSet-Cookie: x=1"),
    (b"X", b"a\rb"),
    (b"X", b"a\nb"),
    (b"X", b"a\x00b"),
    (b"X Y", b"v"),
    (b"X:Y", b"v"),
    (b"X: Y", b"v"),
    (b"", b"v"),
    (b"X\r\nY", b"v"),
    (b"Content-Length", b"five"),
    (b"Content-Length", b"-1"),
], ids=["CRLF in value", "CR in value", "LF in value", "NUL in value", "space in name",
        "colon in name", "colon-space in name", "empty name", "CRLF in name", "non-numeric Content-Length",
        "negative Content-Length"])
def test_unsafe_response_headers_raise(name, value):
    with pytest.raises(ValueError):
        Response("GET", "1.1", True).head(200, [(name, value)], FIXED_NOW)


def test_error_response_bytes():
    body = b"400 Bad Request: malformed request line\n"
    assert error_response(400, "malformed request line", FIXED_NOW) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n" % len(body) + SERVER_FIELDS
        + b"Connection: close\r\n\r\n" + body)


@pytest.mark.parametrize("status,message", [
    (413, "request body too large"), (431, "caf\u00e9 \u2603"), (505, ""),
])
def test_error_response_length_matches_its_body(status, message):
    wire = error_response(status, message, FIXED_NOW, Config(server_header=False,
                                                             date_header=False))
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 %d %s" % (status, gateway.REASONS[status])
    assert b"Content-Length: %d" % len(body) in lines
    assert lines[-1] == b"Connection: close"
    assert b"Date" not in head and b"Server" not in head
    assert body == f"{status} {gateway.REASONS[status].decode()}: {message}\n".encode()


# -- server tests (§5-§9): both paths over real loopback sockets ---------------
#
# Names here start with srv_ / test_srv_ so that they cannot clash with the
# helpers and tests around them once this part is pasted into test_gateway.py.




SRV_HERE = os.path.dirname(os.path.abspath(gateway.__file__))


# -- helpers ------------------------------------------------------------------


def srv_post(body: bytes, path: bytes = b"/", extra: bytes = b"") -> bytes:
    """An HTTP/1.1 POST with a Content-Length body."""
    return (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))


def srv_split_response(data: bytes) -> tuple[bytes, dict, bytes]:
    """(status line, headers, rest) of the raw bytes of one response."""
    assert b"\r\n\r\n" in data, f"no complete head in {data!r}"
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


def srv_read_chunk(reader: ResponseReader) -> bytes:
    """One chunk of a chunked body (b"" for the last-chunk, trailers not read)."""
    while b"\r\n" not in reader.buffer:
        assert reader._fill(), "connection closed mid-chunk"
    line, reader.buffer = reader.buffer.split(b"\r\n", 1)
    size = int(line.split(b";")[0], 16)
    if size == 0:
        return b""
    data = reader.read_exact(size)
    assert reader.read_exact(2) == b"\r\n"
    return data


def srv_hash_chunked(reader: ResponseReader) -> tuple[str, int]:
    """sha256 and length of a chunked body, decoded without holding it whole."""
    digest, total = hashlib.sha256(), 0
    while True:
        while b"\r\n" not in reader.buffer:
            assert reader._fill(), "connection closed mid-chunk"
        line, reader.buffer = reader.buffer.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert reader.read_exact(2) == b"\r\n", "trailers not expected"
            return digest.hexdigest(), total
        while size:
            if not reader.buffer:
                assert reader._fill(), "connection closed mid-chunk"
            piece = reader.buffer[:size]
            reader.buffer = reader.buffer[len(piece):]
            digest.update(piece)
            size -= len(piece)
            total += len(piece)
        assert reader.read_exact(2) == b"\r\n"


def srv_assert_eof(sock: socket.socket) -> None:
    """The server closes the connection next, sending nothing more."""
    assert read_until_closed(sock) == b""


# -- small apps for both interfaces -------------------------------------------
#
# /boom  raises before the response starts
# /late  sends part of a body, then raises
# else   echoes the request body with a Content-Length (a known length)


def srv_boom_wsgi(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom-secret-detail")

    if path == "/late":
        def late():
            yield b"partial"
            raise RuntimeError("late-secret-detail")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return late()
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def srv_boom_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/boom":
        raise RuntimeError("boom-secret-detail")
    if scope["path"] == "/late":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("late-secret-detail")
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


SRV_BOOM_APPS = {"wsgi": srv_boom_wsgi, "asgi": srv_boom_asgi}


def srv_recording_app(interface: str, calls: list):
    """The echo app, recording (path, what it was given) for every call."""
    if interface == "wsgi":
        def app(environ, start_response):
            calls.append(environ["PATH_INFO"])
            return echo_wsgi.application(environ, start_response)
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        calls.append(scope["path"])

        async def recording_receive():
            message = await receive()
            calls.append(message["type"] + (" body" if message.get("body") else ""))
            return message
        await echo_asgi.app(scope, recording_receive, send)
    return app


# -- 1. echo, framing and persistence ------------------------------------------


def test_srv_echo_content_length(echo_server):
    body = b"hello, gateway" * 10
    status, headers, got = request(echo_server, srv_post(body, extra=b"Content-Type: x/y\r\n"))
    assert status == 200
    assert got == body
    assert headers[b"content-type"] == b"x/y"
    # echo gives no length: an HTTP/1.1 response is chunked, never both
    assert headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in headers


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: test\r\n\r\n",
], ids=["post-cl0", "get"])
def test_srv_echo_empty_body(echo_server, raw):
    with connect(echo_server) as sock:
        sock.sendall(raw)
        reader = ResponseReader(sock)
        status, headers, line = reader.read_head()
        assert line == b"HTTP/1.1 200 OK"
        assert headers[b"transfer-encoding"] == b"chunked"
        # the body is exactly the last-chunk: nothing before "0\r\n\r\n"
        assert reader.read_exact(5) == b"0\r\n\r\n"
        assert b"connection" not in headers     # 1.1: persistent by default


def test_srv_echo_chunked_upload(echo_server):
    raw = (b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    status, headers, body = request(echo_server, raw)
    assert (status, body) == (200, b"hello world")


def test_srv_keep_alive_sequential(echo_server):
    with connect(echo_server) as sock:
        reader = ResponseReader(sock)
        for body in (b"first", b"second request"):
            sock.sendall(srv_post(body))
            status, headers, got = reader.read_response()
            assert (status, got) == (200, body)
            assert b"connection" not in headers
        assert reader.buffer == b""


def test_srv_pipelined_in_order(echo_server):
    with connect(echo_server) as sock:
        sock.sendall(srv_post(b"one") + srv_post(b"two-two") + srv_post(b"3"))
        reader = ResponseReader(sock)
        assert [reader.read_response()[2] for _ in range(3)] == [b"one", b"two-two", b"3"]
        assert reader.buffer == b""


def test_srv_head_has_no_body(echo_server):
    with connect(echo_server) as sock:
        # the HEAD carries a body, so the echo app does produce body bytes
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nabcde"
                     + b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nxyz")
        reader = ResponseReader(sock)
        status, headers, line = reader.read_head()
        assert line == b"HTTP/1.1 200 OK"
        # no body bytes at all: the very next bytes are the GET's status line
        while len(reader.buffer) < 17:
            assert reader._fill()
        assert reader.buffer.startswith(b"HTTP/1.1 200 OK\r\n")
        status, headers, body = reader.read_response()
        assert (status, body) == (200, b"xyz")


def test_srv_http10_close_delimited(echo_server):
    with connect(echo_server) as sock:
        sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
        data = read_until_closed(sock)
    line, headers, rest = srv_split_response(data)
    assert line == b"HTTP/1.1 200 OK"
    assert headers[b"connection"] == b"close"
    assert b"transfer-encoding" not in headers     # a 1.0 client knows no chunked
    assert b"content-length" not in headers
    assert rest == b"hello"                        # ended by the close


def test_srv_http10_keep_alive_without_length_closes(echo_server):
    # RFC 9112 §6.3 (8) + §9.3: echo gives no length and a 1.0 client cannot
    # take chunked, so the body is close-delimited: "Connection: close", EOF.
    with connect(echo_server) as sock:
        sock.sendall(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n"
                     b"Content-Length: 5\r\n\r\nhello")
        data = read_until_closed(sock)
    line, headers, rest = srv_split_response(data)
    assert line == b"HTTP/1.1 200 OK"
    assert headers[b"connection"] == b"close"
    assert b"content-length" not in headers and b"transfer-encoding" not in headers
    assert rest == b"hello"


def test_srv_http10_keep_alive_with_length_stays_open(interface):
    with running_server(interface, SRV_BOOM_APPS[interface]) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for body in (b"hello", b"again!"):
                sock.sendall(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                status, headers, got = reader.read_response()
                assert (status, got) == (200, body)
                assert headers[b"connection"] == b"keep-alive"
                assert headers[b"content-length"] == b"%d" % len(body)
            # without keep-alive the third closes
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            status, headers, got = reader.read_response()
            assert (status, got, headers[b"connection"]) == (200, b"", b"close")
            assert reader.buffer == b""
            srv_assert_eof(sock)


def test_srv_client_connection_close_honoured(echo_server):
    with connect(echo_server) as sock:
        sock.sendall(srv_post(b"bye", extra=b"Connection: close\r\n")
                     + srv_post(b"never answered"))
        reader = ResponseReader(sock)
        status, headers, body = reader.read_response()
        assert (status, body) == (200, b"bye")
        assert headers[b"connection"] == b"close"
        assert reader.buffer == b""
        srv_assert_eof(sock)


# -- 2. streaming echo ----------------------------------------------------------


def test_srv_streaming_echo(echo_server):
    body = bytes(range(256)) * 782 + b"tail"      # 200196 bytes
    first, rest = body[:100000], body[100000:]
    with connect(echo_server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + first)
        reader = ResponseReader(sock)
        status, headers, _ = reader.read_head()
        assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
        echoed = srv_read_chunk(reader)      # arrives before the rest is sent
        assert echoed and first.startswith(echoed)
        sock.sendall(rest)
        while True:
            piece = srv_read_chunk(reader)
            if not piece:
                break
            echoed += piece
        assert reader.read_exact(2) == b"\r\n"
        assert echoed == body


# -- 3. a big body ----------------------------------------------------------------


def test_srv_32mib_echo_intact(echo_server):
    body = os.urandom(32 * 1024 * 1024)
    errors = []

    def send_all(sock):
        try:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n"
                         % len(body))
            sock.sendall(memoryview(body))
        except Exception as error:     # reported by the test thread
            errors.append(error)

    with connect(echo_server) as sock:
        sender = threading.Thread(target=send_all, args=(sock,), daemon=True)
        sender.start()
        reader = ResponseReader(sock)
        status, headers, _ = reader.read_head()
        assert status == 200
        digest, size = srv_hash_chunked(reader)
        sender.join(TIMEOUT)
        assert not sender.is_alive() and errors == []
    assert size == len(body)
    assert digest == hashlib.sha256(body).hexdigest()


# -- 4. many clients at once -------------------------------------------------


def test_srv_50_concurrent_clients(echo_server):
    count = 50
    barrier = threading.Barrier(count, timeout=TIMEOUT)
    results: dict[int, object] = {}

    def client(n):
        body = (b"client %d; " % n) * (n * 37 + 1)
        try:
            with connect(echo_server) as sock:
                barrier.wait()          # all 50 are connected at the same time
                sock.sendall(srv_post(body))
                results[n] = ResponseReader(sock).read_response()[::2] == (200, body)
        except Exception as error:
            results[n] = error

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == {n: True for n in range(count)}


# -- 5. app errors ------------------------------------------------------------


def test_srv_app_error_before_start_is_500(interface):
    with running_server(interface, SRV_BOOM_APPS[interface]) as port:
        data = exchange(port, b"GET /boom HTTP/1.1\r\nHost: test\r\n\r\n")
        line, headers, body = srv_split_response(data)
        assert line == b"HTTP/1.1 500 Internal Server Error"
        assert headers[b"content-type"].startswith(b"text/plain")
        assert headers[b"connection"] == b"close"
        assert int(headers[b"content-length"]) == len(body)   # and nothing after it
        assert body.startswith(b"500 ") and len(body) < 200
        assert b"Traceback" not in body and b"secret" not in body
        # the server lives on: a new connection is served
        assert request(port, srv_post(b"still here"))[::2] == (200, b"still here")


def test_srv_app_error_after_start_cuts_response(interface):
    with running_server(interface, SRV_BOOM_APPS[interface]) as port:
        data = exchange(port, b"GET /late HTTP/1.1\r\nHost: test\r\n\r\n")
        line, headers, rest = srv_split_response(data)
        assert line == b"HTTP/1.1 200 OK"
        assert headers[b"transfer-encoding"] == b"chunked"
        # the chunk that was sent, then EOF: no terminating 0-chunk
        assert rest == b"7\r\npartial\r\n"
        assert request(port, srv_post(b"ok"))[::2] == (200, b"ok")


# -- 6. malformed requests ----------------------------------------------------

SRV_MALFORMED = {
    "bad-host": (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
                 b"HTTP/1.1 400 Bad Request"),
    "te-and-cl": (b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 5\r\n\r\n0\r\n\r\n",
                  b"HTTP/1.1 400 Bad Request"),
    "bad-chunk-size": (b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n",
                       b"HTTP/1.1 400 Bad Request"),
    "http-2.0": (b"GET / HTTP/2.0\r\nHost: test\r\n\r\n",
                 b"HTTP/1.1 505 HTTP Version Not Supported"),
}


@pytest.mark.parametrize("case", list(SRV_MALFORMED))
def test_srv_malformed_request(interface, case):
    raw, expected_line = SRV_MALFORMED[case]
    calls: list = []
    with running_server(interface, srv_recording_app(interface, calls)) as port:
        with connect(port) as other:          # a bystander connection, open before
            data = exchange(port, raw)        # ... reads until EOF
            line, headers, body = srv_split_response(data)
            assert line == expected_line
            assert headers[b"connection"] == b"close"
            assert headers[b"content-type"].startswith(b"text/plain")
            assert int(headers[b"content-length"]) == len(body)   # then EOF
            if case == "bad-chunk-size" and interface == "asgi":
                # ASGI reads a body only when the app asks, so the app runs
                # for a good head; it must never see a byte of the bad body.
                assert calls == ["/", "http.disconnect"]
            else:
                assert calls == []
            other.sendall(srv_post(b"bystander"))
            assert ResponseReader(other).read_response()[::2] == (200, b"bystander")
        assert request(port, srv_post(b"new"))[::2] == (200, b"new")


def test_srv_worst_case_head_does_not_stall_other_clients(echo_server):
    # A 64 KiB head that a backtracking pattern would chew on for seconds,
    # holding up the event loop: both answers must come at once.
    started = time.monotonic()
    with connect(echo_server) as bad, connect(echo_server) as other:
        bad.sendall(worst_head(b"X:", b" ", b"\x01"))
        other.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert ResponseReader(other).read_response()[0] == 200
        answered = time.monotonic() - started
        line, _, _ = srv_split_response(read_until_closed(bad))
        refused = time.monotonic() - started
    assert line == b"HTTP/1.1 400 Bad Request"
    assert answered < 5.0 and refused < 5.0


# -- 7. WSGI: a blocked app does not block others -----------------------------


def test_srv_wsgi_slow_app_does_not_block_others():
    release, entered, left = threading.Event(), threading.Event(), threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            entered.set()
            release.wait(5)
            left.set()
            body = b"slow"
        else:
            body = b"fast"
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    try:
        with running_server("wsgi", app) as port:
            with connect(port) as slow:
                slow.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
                assert entered.wait(TIMEOUT)
                assert request(port, b"GET /fast HTTP/1.1\r\nHost: test\r\n\r\n")[::2] \
                    == (200, b"fast")
                assert not left.is_set()         # the first is still blocked
                release.set()
                assert ResponseReader(slow).read_response()[::2] == (200, b"slow")
    finally:
        release.set()


# -- 8. ASGI receive() after the body; keep-alive idle timeout -----------------


def test_srv_asgi_disconnect_waits_for_response_end():
    events: list = []
    release, returned = threading.Event(), threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        message = await receive()
        assert message == {"type": "http.request", "body": b"data", "more_body": False}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})

        async def probe():
            got = await receive()
            events.append(("receive", got["type"]))
            returned.set()
        task = asyncio.ensure_future(probe())   # runs while we wait below
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        events.append("final")
        await send({"type": "http.response.body", "body": b"part2"})
        await asyncio.wait_for(task, TIMEOUT)

    try:
        with running_server("asgi", app) as port:
            with connect(port) as sock:
                sock.sendall(srv_post(b"data"))
                reader = ResponseReader(sock)
                assert reader.read_head()[0] == 200
                assert srv_read_chunk(reader) == b"part1"
                assert not returned.is_set()
                release.set()
                assert srv_read_chunk(reader) == b"part2"
                assert srv_read_chunk(reader) == b""
                assert returned.wait(TIMEOUT)
                assert events == ["final", ("receive", "http.disconnect")]
    finally:
        release.set()


def test_srv_asgi_disconnect_when_client_leaves():
    got: list = []
    returned = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        got.append(await receive())       # the response is not complete
        returned.set()

    with running_server("asgi", app) as port:
        sock = connect(port)
        with sock:
            sock.sendall(srv_post(b"x"))
            reader = ResponseReader(sock)
            assert reader.read_head()[0] == 200
            assert srv_read_chunk(reader) == b"part1"
            assert not returned.is_set()
        assert returned.wait(TIMEOUT)
        assert got == [{"type": "http.disconnect"}]


def test_srv_keep_alive_idle_timeout(interface):
    with running_server(interface, ECHO_APPS[interface], timeout_keep_alive=0.5) as port:
        with connect(port) as used, connect(port) as silent:
            start = time.monotonic()         # the idle time starts after this
            used.sendall(srv_post(b"one"))
            reader = ResponseReader(used)
            assert reader.read_response()[::2] == (200, b"one")
            srv_assert_eof(used)                 # within TIMEOUT (socket timeout)
            assert time.monotonic() - start >= 0.45   # not before the timeout
            srv_assert_eof(silent)               # never sent a byte: closed too


# -- 9. Expect: 100-continue ---------------------------------------------------


def test_srv_expect_100_continue(echo_server):
    body = b"the body after 100"
    with connect(echo_server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        reader = ResponseReader(sock)
        while len(reader.buffer) < len(gateway.CONTINUE):
            assert reader._fill()
        assert reader.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        reader.buffer = reader.buffer[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        sock.sendall(body)
        status, headers, got = reader.read_response()
        assert (status, got) == (200, body)


# -- 10. command line -----------------------------------------------------------


def srv_run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "gateway.py", *args], cwd=SRV_HERE,
                          capture_output=True, text=True, timeout=TIMEOUT)


def children_get_sigint() -> None:
    """A test run started in the background ignores SIGINT, and a child inherits
    that (gateway then keeps ignoring it, on purpose, as its workers must).
    Let the children get the default, as from a terminal."""
    if os.name == "posix" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class SrvCLIProcess:
    """gateway.py in a subprocess; its stderr read line by line by a thread."""

    def __init__(self, *args: str, launch: tuple = ("gateway.py",)) -> None:
        children_get_sigint()
        self.proc = subprocess.Popen([sys.executable, *launch, *args], cwd=SRV_HERE,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self) -> str | None:
        line = self.lines.get(timeout=TIMEOUT)
        if line is not None:
            self.seen.append(line)
        return line

    def rest(self) -> str:
        """All remaining stderr, up to EOF."""
        while self.next_line() is not None:
            pass
        return "".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def test_srv_cli_help():
    done = srv_run_cli("--help")
    assert done.returncode == 0
    assert "--asgi" in done.stdout and "--wsgi" in done.stdout


@pytest.mark.parametrize("spec, names", [
    ("nosuchmodule:app", "'nosuchmodule'"),
    ("echo_asgi:nope", "'nope'"),
])
def test_srv_cli_bad_app(spec, names):
    done = srv_run_cli("--asgi", spec, "--port", "0")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child needs POSIX")
@pytest.mark.parametrize("interface, spec", [
    ("asgi", "echo_asgi:app"), ("wsgi", "echo_wsgi:application")])
def test_srv_cli_serves_and_stops_on_sigint(interface, spec):
    cli = SrvCLIProcess(f"--{interface}", spec, "--port", "0")
    try:
        line = cli.next_line()
        prefix = f"gateway: serving {interface.upper()} app {spec} on http://127.0.0.1:"
        suffix = " (Ctrl+C to quit)\n"
        assert line is not None and line.startswith(prefix) and line.endswith(suffix), line
        port = int(line[len(prefix):-len(suffix)])
        # Ctrl+C while a (keep-alive) client is still connected, as a browser is
        with connect(port) as held:
            held.sendall(srv_post(b"via the CLI"))
            assert ResponseReader(held).read_response()[::2] == (200, b"via the CLI")
            cli.proc.send_signal(signal.SIGINT)
            srv_assert_eof(held)          # the server closes it on its way out
        assert cli.proc.wait(TIMEOUT) == 0
        stderr = cli.rest()
        assert stderr.endswith("gateway: stopped\n")
        assert "Traceback" not in stderr, stderr
    finally:
        cli.kill()


def test_srv_cli_runs_as_module():
    # runpy loads "python -m gateway" from cached bytecode: it stays this process.
    cli = SrvCLIProcess("--wsgi", "echo_wsgi:application", "--port", "0",
                        launch=("-m", "gateway"))
    try:
        line = cli.next_line()
        prefix = "gateway: serving WSGI app echo_wsgi:application on http://127.0.0.1:"
        assert line is not None and line.startswith(prefix), line
        port = int(line[len(prefix):].split()[0])
        with connect(port) as sock:
            sock.sendall(srv_post(b"as a module"))
            assert ResponseReader(sock).read_response()[::2] == (200, b"as a module")
    finally:
        cli.kill()


def test_srv_cli_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = srv_run_cli("--asgi", "echo_asgi:app", "--port", str(port))
    assert done.returncode == 1
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr


# =============================================================================
# Limits, timeouts and what the app sends back - both paths, real sockets
#
# Names start with limits_ / test_limits_ so that they cannot clash with the
# rest of test_gateway.py once this part is pasted into it. Every server here
# runs with date_header=False, so every response has fixed, exact bytes.
# =============================================================================

LIMITS_GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
LIMITS_SHORT = 3.0      # socket timeout where the server must not make us wait


@contextlib.contextmanager
def limits_server(interface: str, app, **options):
    """running_server() without the Date header; yields the port."""
    if "timeout_graceful_shutdown" in {f.name for f in dataclasses.fields(gateway.Config)}:
        options.setdefault("timeout_graceful_shutdown", 1.0)   # a failed test ends fast
    with running_server(interface, app, date_header=False, **options) as port:
        yield port


def limits_connect(port: int, timeout: float = TIMEOUT, rcvbuf: int | None = None):
    """A client socket; `rcvbuf` shrinks its receive window before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def limits_exchange(port: int, raw: bytes, timeout: float = LIMITS_SHORT) -> bytes:
    """Send raw bytes, read until EOF; a server that waits fails the test."""
    with limits_connect(port, timeout) as sock:
        sock.sendall(raw)
        return read_until_closed(sock)


def limits_error(status: int, message: str) -> bytes:
    """The exact bytes of an error the server writes itself (no Date header)."""
    reason = gateway.REASONS[status]
    body = b"%d %s: %s\n" % (status, reason, message.encode())
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nServer: gateway\r\nConnection: close\r\n\r\n"
            % (status, reason, len(body)) + body)


LIMITS_APP_FAILED = limits_error(500, "the application failed")


def limits_ok(size: int) -> bytes:
    """What limits_reader_app answers for a body of `size` bytes (keep-alive)."""
    body = b"got %d" % size
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Server: gateway\r\n\r\n" % len(body) + body)


def limits_reader_app(interface: str, seen: list, entered: threading.Event | None = None):
    """Reads the whole body, then answers limits_ok(). Records the path it was
    called for, and how reading failed (an exception name, or http.disconnect)."""
    if interface == "wsgi":
        def app(environ, start_response):
            seen.append(environ["PATH_INFO"])
            if entered is not None:
                entered.set()
            try:
                body = environ["wsgi.input"].read()
            except Exception as error:
                seen.append(type(error).__name__)
                raise
            out = b"got %d" % len(body)
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(out)))])
            return [out]
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["path"])
        if entered is not None:
            entered.set()
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen.append("http.disconnect")
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = b"got %d" % len(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"Content-Type", b"text/plain"),
                                (b"Content-Length", b"%d" % len(out))]})
        await send({"type": "http.response.body", "body": out})
    return app


def limits_fixed_app(interface: str, status: int, headers: list, body: bytes, calls: list):
    """Answers with exactly these headers and one body piece, never reading.

    `headers` are (str, str) pairs; the ASGI app sends them as bytes."""
    if interface == "wsgi":
        def app(environ, start_response):
            calls.append(environ["PATH_INFO"])
            start_response("%d %s" % (status, gateway.REASONS[status].decode()), headers)
            return [body]
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(n.encode("latin-1"), v.encode("latin-1"))
                                for n, v in headers]})
        await send({"type": "http.response.body", "body": body})
    return app


# -- 1. configured limits -----------------------------------------------------


def limits_line(length: int) -> bytes:
    """A GET request-line of exactly `length` bytes (without its CRLF)."""
    prefix, suffix = b"GET /", b" HTTP/1.1"
    return prefix + b"a" * (length - len(prefix) - len(suffix)) + suffix


def test_limits_request_line(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       limit_request_line=100) as port:
        long_target = b"GET /" + b"a" * 199 + b" HTTP/1.1\r\nHost: test\r\n\r\n"
        assert limits_exchange(port, long_target) == limits_error(414, "request line too long")
        assert seen == []
        line = limits_line(100)
        assert len(line) == 100
        with limits_connect(port) as sock:
            sock.sendall(line + b"\r\nHost: test\r\n\r\n")
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
        assert seen == ["/" + "a" * 86]
        assert limits_exchange(port, limits_line(101) + b"\r\nHost: test\r\n\r\n") \
            == limits_error(414, "request line too long")


def test_limits_request_head(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       limit_request_head=200) as port:
        big = b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"b" * 300 + b"\r\n\r\n"
        assert limits_exchange(port, big) == limits_error(431, "request header fields too large")
        assert seen == []
        small = b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"b" * 100 + b"\r\n\r\n"
        with limits_connect(port) as sock:
            sock.sendall(small)
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
        assert seen == ["/"]


def test_limits_request_fields(interface):
    seen: list = []

    def head(fields: int) -> bytes:     # Host plus fields - 1 others
        return (b"GET / HTTP/1.1\r\nHost: test\r\n"
                + b"".join(b"X-%d: v\r\n" % n for n in range(fields - 1)) + b"\r\n")

    with limits_server(interface, limits_reader_app(interface, seen),
                       limit_request_fields=5) as port:
        assert limits_exchange(port, head(6)) == limits_error(431, "too many header fields")
        assert seen == []
        with limits_connect(port) as sock:
            sock.sendall(head(5))
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
        assert seen == ["/"]


def test_limits_body_content_length_refused_before_the_body(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       limit_request_body=100) as port:
        # Only the head is sent: the answer must not wait for the 1000 bytes.
        head = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n"
        with limits_connect(port, LIMITS_SHORT) as sock:
            sock.sendall(head)
            assert read_until_closed(sock) == limits_error(413, "request body too large")
        assert seen == []            # the app was never called
        with limits_connect(port) as sock:    # exactly the limit is fine
            sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n"
                         + b"z" * 100)
            assert ResponseReader(sock).read_exact(len(limits_ok(100))) == limits_ok(100)
        assert seen == ["/"]


def test_limits_body_chunked_growing_over_the_limit(interface):
    seen: list = []
    entered = threading.Event()
    with limits_server(interface, limits_reader_app(interface, seen, entered),
                       limit_request_body=10) as port:
        with limits_connect(port, LIMITS_SHORT) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n8\r\n12345678\r\n")            # 8 bytes: under the limit
            if interface == "asgi":
                assert entered.wait(TIMEOUT)      # the app is reading the body
            sock.sendall(b"8\r\n12345678\r\n0\r\n\r\n")      # 16 bytes: over it
            assert read_until_closed(sock) == limits_error(413, "request body too large")
        if interface == "wsgi":
            # WSGI collects a chunked body before the call (to give the app a
            # CONTENT_LENGTH): the app is never called for a body over the limit.
            assert seen == []
        else:
            assert seen == ["/up", "http.disconnect"]


def limits_status(port: int) -> int:
    """The status of one GET on a new connection."""
    with limits_connect(port, LIMITS_SHORT) as sock:
        sock.sendall(LIMITS_GET)
        return ResponseReader(sock).read_head()[0]


def test_limits_concurrency(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       limit_concurrency=2) as port:
        with limits_connect(port) as first, limits_connect(port) as second:
            readers = [ResponseReader(first), ResponseReader(second)]
            for sock, reader in zip((first, second), readers):   # both are served
                sock.sendall(LIMITS_GET)
                assert reader.read_exact(len(limits_ok(0))) == limits_ok(0)
            # Two are held open: a third is refused, and closed.
            assert limits_exchange(port, LIMITS_GET) == limits_error(503, "too many connections")
            assert seen == ["/", "/"]
            first.sendall(LIMITS_GET)            # the two held ones still work
            assert readers[0].read_exact(len(limits_ok(0))) == limits_ok(0)
        # Once the server has seen them close, a new connection is served.
        # (Retried: the server learns of the close asynchronously.)
        wait_for(lambda: limits_status(port) == 200)


def limits_bound_client(port: int, ports: set) -> socket.socket:
    """A connected client whose port is added to `ports` before it connects."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(LIMITS_SHORT)
    sock.bind(("127.0.0.1", 0))
    ports.add(sock.getsockname()[1])
    sock.connect(("127.0.0.1", port))
    return sock


def limits_closed_by_server(sock: socket.socket) -> bool:
    """True if the server closed (or reset) the connection without a byte."""
    try:
        return read_until_closed(sock) == b""
    except ConnectionResetError:
        return True


def limits_no_tracebacks(caplog) -> None:
    """Nothing was logged with a traceback, nor at ERROR or above."""
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        caplog.text


def test_limits_select_selector_full_stops_accepting(monkeypatch, caplog):
    # Windows has only select(), which takes 512 sockets (FD_SETSIZE). Here a
    # select() selector's capacity is lowered to 2 connections.
    caplog.set_level(logging.INFO, logger="gateway")
    monkeypatch.setattr(selectors, "DefaultSelector", selectors.SelectSelector)
    seen: list = []
    with ops_serving("wsgi", limits_reader_app("wsgi", seen), date_header=False,
                     timeout_graceful_shutdown=1.0) as (server, thread, port):
        assert isinstance(server.selector, selectors.SelectSelector)
        in_use = 2 if os.name == "nt" else server.wake_writer.fileno() + 1
        assert server.capacity == gateway.SELECT_SOCKETS - in_use
        server.capacity = 2
        with limits_connect(port) as first, limits_connect(port) as second, \
                limits_connect(port) as waiting:
            for sock in (first, second):
                sock.sendall(LIMITS_GET)
                assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
            waiting.sendall(LIMITS_GET)              # waits in the kernel's backlog
            wait_for(lambda: not server.accepting)
            # Policy: not accepted, so not answered (no 503) while both stay.
            assert select.select([waiting], [], [], 0.3)[0] == []
            assert len(server.connections) == 2
            first.close()                            # ... until one leaves
            assert ResponseReader(waiting).read_exact(len(limits_ok(0))) == limits_ok(0)
            second.sendall(LIMITS_GET)               # the other one still works
            assert ResponseReader(second).read_exact(len(limits_ok(0))) == limits_ok(0)
            second.close()
        wait_for(lambda: not server.connections)
        assert limits_status(port) == 200            # a new client, served at once
        assert thread.is_alive()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["the selector is full (2 connections): not accepting for now"]
    assert "accepting connections again" in caplog.messages    # none waits now
    limits_no_tracebacks(caplog)


def test_limits_selector_refusing_a_socket_closes_only_it(monkeypatch, caplog):
    # A selector may refuse a socket (epoll: ENOMEM, or the user's
    # max_user_watches). That connection alone is closed.
    caplog.set_level(logging.INFO, logger="gateway")
    refused: set = set()
    with ops_serving("wsgi", limits_reader_app("wsgi", []), date_header=False,
                     timeout_graceful_shutdown=1.0) as (server, thread, port):
        register = server.selector.register

        def refusing_register(fileobj, events, data=None):
            if data not in ("accept", "wake") and fileobj.getpeername()[1] in refused:
                raise ValueError("too many file descriptors in select()")
            return register(fileobj, events, data)

        monkeypatch.setattr(server.selector, "register", refusing_register)
        with limits_bound_client(port, refused) as sock:
            sock.sendall(LIMITS_GET)
            assert limits_closed_by_server(sock)
        assert limits_status(port) == 200
        assert thread.is_alive()
    limits_no_tracebacks(caplog)


def test_limits_connection_dead_on_arrival_is_closed_quietly(interface, monkeypatch,
                                                              caplog):
    # macOS refuses TCP_NODELAY (EINVAL) on a connection the client reset
    # before the server got to it; Linux does not, so that is simulated.
    caplog.set_level(logging.DEBUG)
    dead: set = set()
    kind = socket.socket if interface == "wsgi" else asyncio.trsock.TransportSocket
    setsockopt = kind.setsockopt

    def failing_setsockopt(self, level, option, *value):
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            try:
                peer = self.getpeername()[1]
            except OSError:
                peer = None
            if peer in dead:
                raise OSError(errno.EINVAL, "Invalid argument")
        return setsockopt(self, level, option, *value)

    monkeypatch.setattr(kind, "setsockopt", failing_setsockopt)
    with limits_server(interface, limits_reader_app(interface, [])) as port:
        with contextlib.ExitStack() as stack:
            burst = [stack.enter_context(limits_bound_client(port, dead))
                     for _ in range(5)]
            alive = stack.enter_context(limits_connect(port))   # accepted among them
            for sock in burst:
                sock.sendall(LIMITS_GET)
            alive.sendall(LIMITS_GET)
            assert ResponseReader(alive).read_exact(len(limits_ok(0))) == limits_ok(0)
            for sock in burst:
                assert limits_closed_by_server(sock)
        assert limits_status(port) == 200
    limits_no_tracebacks(caplog)


# -- 2. timeouts -------------------------------------------------------------------


def test_limits_keep_alive_timeout_closes_quietly(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       timeout_keep_alive=0.3, timeout_request_head=5.0) as port:
        with limits_connect(port) as sock:
            sock.sendall(LIMITS_GET)
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
            idle_from = time.monotonic()
            srv_assert_eof(sock)                     # no bytes, just EOF
            assert time.monotonic() - idle_from >= 0.2


def test_limits_request_head_timeout_is_408(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       timeout_request_head=0.3, timeout_keep_alive=5.0) as port:
        with limits_connect(port, LIMITS_SHORT) as sock:
            started = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: te")    # then nothing
            data = read_until_closed(sock)
            assert data.startswith(b"HTTP/1.1 408 ")
            assert data == limits_error(408, "request head not received in time")
            assert time.monotonic() - started >= 0.2
        assert seen == []


def test_limits_request_head_timeout_runs_from_the_heads_first_byte(interface):
    # HEAD_SECONDS is "first byte to end of head": a keep-alive connection idle for
    # longer than that (but not longer than --timeout-keep-alive) still gets the
    # whole timeout for its next head. It used to run from the start of the wait.
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       timeout_request_head=1.0, timeout_keep_alive=10.0) as port:
        with limits_connect(port, LIMITS_SHORT) as sock:
            sock.sendall(LIMITS_GET)
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
            # Not a wait for the server: the idle time itself is what is tested.
            time.sleep(1.3)                    # idle: longer than the head timeout
            sock.sendall(LIMITS_GET[:20])      # part of the next head ...
            sock.settimeout(0.6)               # ... gets no 408 while it is young
            with pytest.raises(socket.timeout):
                sock.recv(1)
            sock.settimeout(LIMITS_SHORT)
            sock.sendall(LIMITS_GET[20:])
            assert ResponseReader(sock).read_exact(len(limits_ok(0))) == limits_ok(0)
        assert seen == ["/", "/"]


def test_limits_read_timeout_fails_the_read_and_answers_408(interface):
    seen: list = []
    with limits_server(interface, limits_reader_app(interface, seen),
                       timeout_read=0.3) as port:
        with limits_connect(port, LIMITS_SHORT) as sock:
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
            assert read_until_closed(sock) == limits_error(408, "request body not received in time")
        failure = "ClientDisconnected" if interface == "wsgi" else "http.disconnect"
        assert seen == ["/slow", failure]


LIMITS_PIECE = b"x" * 65536
LIMITS_PIECES = 4096        # 256 MiB: far more than any socket buffers hold


def test_limits_slow_reader_holds_no_wsgi_worker_and_times_out():
    big_closed = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/big":
            def pieces():
                try:
                    for _ in range(LIMITS_PIECES):
                        yield LIMITS_PIECE
                finally:
                    big_closed.set()        # run_wsgi_app closed us: the worker is free
            start_response("200 OK", [("Content-Type", "text/plain")])
            return pieces()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        return [b"second"]

    with limits_server("wsgi", app, threads=1, timeout_write=0.5) as port:
        with limits_connect(port, rcvbuf=4096) as stuck:
            stuck.sendall(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")   # never read
            with limits_connect(port) as other:
                # /big is parked while its client does not read, so the only
                # worker is free: the second client is answered at once.
                other.sendall(b"GET /second HTTP/1.1\r\nHost: test\r\n\r\n")
                expected = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 6\r\nServer: gateway\r\n\r\nsecond")
                assert ResponseReader(other).read_exact(len(expected)) == expected
                # timeout_write then drops the stuck client and close()s its result.
                wait_for(big_closed.is_set)
            data = read_until_closed(stuck)       # what the kernel held, then EOF
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert len(data) < len(LIMITS_PIECE) * LIMITS_PIECES


def test_limits_write_timeout_asgi_closes():
    failed = threading.Event()
    failures: list = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"Content-Type", b"text/plain")]})
        try:
            for _ in range(LIMITS_PIECES):
                await send({"type": "http.response.body", "body": LIMITS_PIECE,
                            "more_body": True})
        except OSError as error:
            failures.append(type(error).__name__)
            failed.set()
            raise
        await send({"type": "http.response.body", "body": b""})

    with limits_server("asgi", app, timeout_write=0.5) as port:
        with limits_connect(port, rcvbuf=4096) as stuck:
            stuck.sendall(LIMITS_GET)                     # never read
            assert failed.wait(TIMEOUT)
            assert failures == ["ClientDisconnected"]
            data = read_until_closed(stuck)                # what the kernel held, then EOF
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert len(data) < len(LIMITS_PIECE) * LIMITS_PIECES


# -- 3. Expect: 100-continue and an app that does not read -----------------------


def test_limits_expect_continue_app_answers_without_reading(interface):
    calls: list = []
    app = limits_fixed_app(interface, 401, [("Content-Type", "text/plain"),
                                            ("Content-Length", "6")], b"denied", calls)
    with limits_server(interface, app) as port:
        raw = (b"POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
               b"Content-Length: 100\r\n\r\n")          # the body is never sent
        # No "100 Continue", the 401 says it closes, then EOF (no waiting).
        assert limits_exchange(port, raw) == (
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
            b"Server: gateway\r\nConnection: close\r\n\r\ndenied")
        assert calls == ["/upload"]


# -- 4. what the app sends back is checked ---------------------------------------


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nInjected: 1", "a\rInjected: 1"],
                         ids=["CRLF", "LF", "CR"])
def test_limits_header_injection_never_reaches_the_wire(interface, value):
    calls: list = []
    app = limits_fixed_app(interface, 200, [("X", value), ("Content-Length", "2")],
                           b"ok", calls)
    with limits_server(interface, app) as port:
        data = limits_exchange(port, LIMITS_GET)
        assert b"Injected" not in data
        assert calls == ["/"]


@pytest.mark.parametrize("interface", [
    "wsgi",
    "asgi"])
def test_limits_header_injection_is_a_500(interface):
    calls: list = []
    app = limits_fixed_app(interface, 200, [("X", "a\r\nInjected: 1"),
                                            ("Content-Length", "2")], b"ok", calls)
    with limits_server(interface, app) as port:
        assert limits_exchange(port, LIMITS_GET) == LIMITS_APP_FAILED


@pytest.mark.parametrize("status,headers", [
    ("200", []),
    ("OK 200", []),
    ("200 OK\r\nInjected: 1", []),
    ("200 OK\x0bInjected: 1", []),
    ("200 OK", [("Connection", "close")]),
    ("200 OK", [("Transfer-Encoding", "chunked")]),
    ("200 OK", [("Keep-Alive", "timeout=5")]),
], ids=["no reason", "reason first", "CRLF in status", "VT in status", "Connection",
        "Transfer-Encoding", "Keep-Alive"])
def test_limits_wsgi_bad_status_or_hop_by_hop_header_is_500(status, headers):
    def app(environ, start_response):
        start_response(status, headers + [("Content-Length", "2")])
        return [b"ok"]

    with limits_server("wsgi", app) as port:
        data = limits_exchange(port, LIMITS_GET)
        assert data == LIMITS_APP_FAILED
        assert b"Injected" not in data


# W-23: PEP 3333 "The start_response() Callable" (no control characters) and
# RFC 9112 §4 (status-code SP reason-phrase, reason = HTAB / SP / VCHAR / obs-text).
WSGI_BAD_STATUSES = ["200\x00OK", "200 O\x00K", "200 OK\r", "200 OK\n", "200 OK\r\n",
                     "200 O\x01K", "200 O\x08K", "200 O\x0bK", "200 O\x0cK", "200 O\x1bK",
                     "200 O\x1fK", "200 O\x7fK", "200\tOK", " 200 OK", "2000 OK", "20 OK",
                     "099 OK", "\uff12\uff10\uff10 OK",
                     "200 OK\u0100", "200 OK\u2028",    # PEP 3333 "Unicode Issues": latin-1
                     "100 Continue", "101 Switching Protocols", "199 x",   # RFC 9110 §15:
                     "600 x", "999 !~"]                    # interim, or not a status code
WSGI_GOOD_STATUSES = ["200 OK", "200 ", "599 x", "200 O\tK", "200 caf\xe9 \x80\xff",
                      "404 Not  Found ", "299 !~"]


@pytest.mark.parametrize("status", WSGI_BAD_STATUSES, ids=repr)
def test_wsgi_status_outside_the_grammar_raises_in_start_response(status):
    with pytest.raises(ValueError, match="WSGI status"):
        gateway.check_wsgi_headers(status, [])


@pytest.mark.parametrize("status", WSGI_GOOD_STATUSES, ids=repr)
def test_wsgi_status_in_the_grammar_is_accepted(status):
    assert gateway.check_wsgi_headers(status, []) == []


@pytest.mark.parametrize("name,value", [("X", "a\r\nInjected: 1"), ("X: Y", "v"), ("X Y", "v")],
                         ids=["CRLF in value", "colon-space in name", "space in name"])
def test_limits_wsgi_bad_header_raises_in_start_response(name, value):
    # PEP 3333: headers are checked when start_response() is called, so the app
    # can still catch the error and answer otherwise.
    caught: list = []

    def app(environ, start_response):
        try:
            start_response("200 OK", [(name, value)])
        except ValueError as error:
            caught.append(error)
            # PEP 3333: a second call needs exc_info (W-26)
            start_response("400 Bad Request", [("Content-Length", "9")], sys.exc_info())
            return [b"recovered"]
        return [b"not reached"]

    with limits_server("wsgi", app) as port:
        data = limits_exchange(port, b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and data.endswith(b"recovered")
    assert len(caught) == 1 and b"Injected" not in data


@pytest.mark.parametrize("status,headers", [
    ("200 OK", [("X", "a\r\nInjected: 1")]),
    ("200", []),
    (b"200 OK", []),
    ("200 OK", [("Connection", "close")]),
], ids=["bad header", "bad status", "bytes status", "hop-by-hop"])
def test_wsgi_second_start_response_without_exc_info_raises_after_a_failed_first(
        status, headers):
    # W-26, PEP 3333 "The start_response() Callable": calling it again without
    # exc_info is an error "even if the first call itself raised".
    raised: list = []

    def app(environ, start_response):
        try:
            start_response(status, headers)
        except (ValueError, TypeError) as error:
            raised.append(type(error))
        try:
            start_response("400 Bad Request", [("Content-Length", "9")])
        except AssertionError as error:
            raised.append(type(error))
            raise
        return [b"recovered"]

    with limits_server("wsgi", app) as port:
        data = limits_exchange(port, b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert data == LIMITS_APP_FAILED
    assert len(raised) == 2 and raised[1] is AssertionError


@pytest.mark.parametrize("headers", [
    [(b"X", b"a\r\nInjected: 1")],
    [(b"X", b"a\nInjected: 1")],
    [(b"X\r\nInjected", b"1")],
    [("X", b"v")],
    [(b"X", "v")],
], ids=["CRLF in value", "LF in value", "CRLF in name", "str name", "str value"])
def test_limits_asgi_bad_header_is_500(headers):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers + [(b"Content-Length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with limits_server("asgi", app) as port:
        data = limits_exchange(port, LIMITS_GET)
        assert data == LIMITS_APP_FAILED
        assert b"Injected" not in data


def test_limits_content_length_over_run_is_cut(interface):
    calls: list = []
    app = limits_fixed_app(interface, 200, [("Content-Type", "text/plain"),
                                            ("Content-Length", "5")], b"hello world", calls)
    with limits_server(interface, app) as port:
        # A keep-alive request: the server must still close, after exactly 5 bytes.
        assert limits_exchange(port, LIMITS_GET) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Server: gateway\r\n\r\nhello")


def test_limits_content_length_under_run_closes(interface):
    calls: list = []
    app = limits_fixed_app(interface, 200, [("Content-Type", "text/plain"),
                                            ("Content-Length", "10")], b"hello", calls)
    with limits_server(interface, app) as port:
        assert limits_exchange(port, LIMITS_GET) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
            b"Server: gateway\r\n\r\nhello")


LIMITS_CL_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: gateway\r\n\r\nhello"


@pytest.mark.parametrize("headers,expected", [
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], LIMITS_CL_HELLO),
    ([(b"Content-Length", b"5"), (b"transfer-encoding", b"chunked")], LIMITS_CL_HELLO),
    ([(b"Transfer-Encoding", b"gzip, chunked")],
     b"HTTP/1.1 200 OK\r\nServer: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n"),
], ids=["TE then CL", "CL then TE", "TE only"])
def test_limits_asgi_transfer_encoding_and_content_length_never_both(headers, expected):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})

    with limits_server("asgi", app) as port:
        with limits_connect(port) as sock:
            reader = ResponseReader(sock)
            for _ in range(2):             # and the connection stays usable
                sock.sendall(LIMITS_GET)
                assert reader.read_exact(len(expected)) == expected
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            rest = reader.buffer + read_until_closed(sock)
        head = rest.split(b"\r\n\r\n")[0].lower()
        assert head.count(b"transfer-encoding") + head.count(b"content-length") == 1


# -- 5. log injection ----------------------------------------------------------


def limits_raising_app(interface: str):
    """Raises (with a message free of the path) for every request."""
    if interface == "wsgi":
        def app(environ, start_response):
            raise RuntimeError("limits-boom")
        return app

    async def app(scope, receive, send):
        if scope["type"] == "http":
            raise RuntimeError("limits-boom")
    return app


def test_limits_log_injection_is_escaped(interface, caplog):
    raw = b"GET /a%0d%0aFAKE%20LOG%20LINE%1b[31m HTTP/1.1\r\nHost: test\r\n\r\n"
    with caplog.at_level(logging.ERROR, logger="gateway"):
        with limits_server(interface, limits_raising_app(interface)) as port:
            # The record is logged before the 500 is written.
            assert limits_exchange(port, raw) == LIMITS_APP_FAILED
    messages = [record.getMessage() for record in caplog.records
                if record.name == "gateway" and "limits-boom" in str(record.exc_info)]
    assert len(messages) == 1, caplog.text
    message = messages[0]
    assert message.endswith("GET /a\\r\\nFAKE LOG LINE\\x1b[31m"), message
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert not any(line.startswith("FAKE") for line in caplog.text.splitlines())


# =============================================================================
# HTTP/1.1 under hostile input (issue item 8)
#
# 1. A table of malformed requests, each sent over a real socket to both
#    paths: exact status, a correct error response, Connection: close, EOF,
#    and the app is never given what came after the error.
# 2. Request smuggling: one test per framing rule, with a second request
#    hidden behind the first; the app must never see it.
# 3. A seeded random-mutation run of the parser alone: HTTPError or events,
#    never another exception, and the same answer for any split.
# 4. Slow and non-reading clients do not starve a normal client, and the
#    server recovers once they leave.
#
# Names start with hostile_ / test_hostile_ so that this part can be pasted
# into test_gateway.py.
# =============================================================================

HOSTILE_MAX_LINE = 8 * 1024          # SPEC H1-09: request-line limit -> 414
HOSTILE_MAX_HEAD = 64 * 1024         # SPEC H1-21: head limit -> 431
HOSTILE_MAX_FIELDS = 100             # SPEC H1-21: field-line limit -> 431
HOSTILE_MAX_METHOD = 32              # SPEC H1-07: method limit -> 501
HOSTILE_MAX_CHUNK_LINE = 4 * 1024    # SPEC H1-36: chunk-size line limit -> 400

HOSTILE_EVIL = b"EVIL"               # bytes placed after a framing error
HOSTILE_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
HOSTILE_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


# -- helpers --------------------------------------------------------------------


def hostile_head(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    """A request head: `line`, then the given field lines (no Host added)."""
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def hostile_host(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    """A request head with "Host: x" and the given extra field lines."""
    return hostile_head(b"Host: x", *fields, line=line)


def hostile_post(*fields: bytes, body: bytes = b"") -> bytes:
    """A POST head with "Host: x", the given field lines, then `body`."""
    return hostile_host(*fields, line=b"POST / HTTP/1.1") + body


def hostile_recording_app(interface: str, calls: list):
    """An app that records every call and echoes the body with a Content-Length.

    It records ("call", path) when called, ("piece", bytes) for every piece
    of body it is given, ("body", bytes) once the server has reported the body
    complete, and ("disconnect",) on the ASGI path when receive() says the
    body will never be complete. It reads the whole body before it starts its
    response, so a body error always becomes the server's error response.
    """
    if interface == "wsgi":
        def app(environ, start_response):
            calls.append(("call", environ["PATH_INFO"]))
            body = b""
            while piece := environ["wsgi.input"].read(16):   # wsgi.input_terminated
                calls.append(("piece", piece))
                body += piece
            calls.append(("body", body))
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        calls.append(("call", scope["path"]))
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                calls.append(("disconnect",))
                return
            if message.get("body"):
                calls.append(("piece", message["body"]))
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        calls.append(("body", body))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


def hostile_ignoring_app(interface: str, calls: list):
    """An app that records its path and answers "ok" without reading the body."""
    if interface == "wsgi":
        def app(environ, start_response):
            calls.append(("call", environ["PATH_INFO"]))
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        calls.append(("call", scope["path"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


HOSTILE_APPS = {"reads-body": hostile_recording_app, "ignores-body": hostile_ignoring_app}


def hostile_read_error(sock: socket.socket) -> bytes:
    """Everything the server sends until EOF; but if the first response head
    does not say "Connection: close", only what has arrived by then (so that
    a wrong answer fails at once instead of after the keep-alive timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    if b"\r\nconnection: close\r\n" not in data.split(b"\r\n\r\n")[0].lower() + b"\r\n":
        return data
    return data + read_until_closed(sock)


def hostile_send(port: int, raw: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes (then FIN if asked); what the server sends, see above."""
    with connect(port) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return hostile_read_error(sock)


def hostile_check_error_response(data: bytes, status: int) -> None:
    """`data` is exactly one server error response for `status`, then EOF."""
    line = b"HTTP/1.1 %d " % status
    assert data.startswith(line), f"expected {line!r}, got {data[:80]!r}"
    assert b"\r\n\r\n" in data, f"no complete head: {data[:200]!r}"
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == line + HTTPStatus(status).phrase.encode()
    fields = [field.partition(b":") for field in lines[1:]]
    names = [name.lower() for name, _, _ in fields]
    values = {name.lower(): value.strip(b" ") for name, _, value in fields}
    assert len(names) == len(set(names)), f"a repeated field: {head!r}"
    assert b"transfer-encoding" not in values
    assert values[b"connection"] == b"close"
    # read_until_closed() returned, so the body below is all that came before
    # EOF: it must be exactly Content-Length long (one response, nothing after).
    assert values[b"content-length"] == b"%d" % len(body)
    assert values[b"content-type"].startswith(b"text/plain")
    assert body.startswith(b"%d " % status)
    assert b"Traceback" not in body and b"Error(" not in body


def hostile_paths(calls: list) -> list[str]:
    return [entry[1] for entry in calls if entry[0] == "call"]


def hostile_bodies(calls: list) -> list[bytes]:
    return [entry[1] for entry in calls if entry[0] == "body"]


def hostile_check_alive(port: int, echo: bool = True) -> None:
    """A normal request on a new connection is still answered."""
    body = b"still alive"
    raw = b"POST /alive HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)
    status, _, got = request(port, raw)
    assert (status, got) == (200, body if echo else b"ok")


# =============================================================================
# 1. The hostile request table
#
# kind "head":  the error is in the head; the app is never called.
# kind "body":  the error is in the chunked body; the app may have been called
#               (ASGI streams the body; WSGI may start before it all arrived),
#               but it never gets a complete body, nor a byte after the error.
# kind "close": EOF (our FIN) before the request is complete: the server
#               closes without a response, and the app never gets a complete
#               body.
# =============================================================================


def hostile_row(rule: str, raw: bytes, expected, kind: str = "head", bug: str = ""):
    marks = [pytest.mark.xfail(strict=True, reason="BUG: " + bug)] if bug else []
    return pytest.param(raw, expected, kind, id=rule, marks=marks)


HOSTILE_TOO_MANY_FIELDS = tuple(b"X-%d: v" % i for i in range(HOSTILE_MAX_FIELDS))
HOSTILE_LONG_TARGET = b"/" + b"a" * HOSTILE_MAX_LINE
HOSTILE_BIG_FIELD = b"X-Big: " + b"v" * (HOSTILE_MAX_HEAD + 10)
HOSTILE_HALF_FIELD = b"v" * (HOSTILE_MAX_HEAD // 2)


def hostile_chunked(body: bytes) -> bytes:
    return HOSTILE_CHUNKED + body


HOSTILE_ROWS = [
    # -- the request-line: RFC 9112 §2.2, §3 ------------------------------------
    hostile_row("H1-05 two spaces after method", hostile_host(line=b"GET  / HTTP/1.1"), 400),
    hostile_row("H1-05 leading space", hostile_host(line=b" GET / HTTP/1.1"), 400),
    hostile_row("H1-05 trailing space", hostile_host(line=b"GET / HTTP/1.1 "), 400),
    hostile_row("H1-05 HTAB separators", hostile_host(line=b"GET\t/\tHTTP/1.1"), 400),
    hostile_row("H1-05 VT separator", hostile_host(line=b"GET\x0b/ HTTP/1.1"), 400),
    hostile_row("H1-05 FF separator", hostile_host(line=b"GET /\x0cHTTP/1.1"), 400),
    hostile_row("H1-05 missing target", hostile_host(line=b"GET HTTP/1.1"), 400),
    hostile_row("H1-05 missing method", hostile_host(line=b"/ HTTP/1.1"), 400),
    hostile_row("H1-05 method only", hostile_host(line=b"GET"), 400),
    hostile_row("H1-05 empty request-line then fields", b"\r\n\r\nHost: x\r\n\r\n", 400),
    hostile_row("H1-13 lowercase version", hostile_host(line=b"GET / http/1.1"), 400),
    hostile_row("H1-13 version without minor", hostile_host(line=b"GET / HTTP/1"), 400),
    hostile_row("H1-13 two-digit minor", hostile_host(line=b"GET / HTTP/1.10"), 400),
    hostile_row("H1-13 junk after version", hostile_host(line=b"GET / HTTP/1.1x"), 400),
    hostile_row("H1-13 HTTP-2.0", hostile_host(line=b"GET / HTTP/2.0"), 505),
    hostile_row("H1-13 HTTP-0.9 version", hostile_host(line=b"GET / HTTP/0.9"), 505),
    hostile_row("H1-13 HTTP-0.9 style no version", b"GET /\r\n\r\n", 400),
    hostile_row("H1-13 HTTP-2 connection preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    hostile_row("H1-06 method with paren", hostile_host(line=b"G(T / HTTP/1.1"), 400),
    hostile_row("H1-06 method with at-sign", hostile_host(line=b"GE@T / HTTP/1.1"), 400),
    hostile_row("H1-06 method with NUL", hostile_host(line=b"G\x00T / HTTP/1.1"), 400),
    hostile_row("H1-06 method non-ASCII", hostile_host(line=b"G\xc3\x89T / HTTP/1.1"), 400),
    hostile_row("H1-07 method of 33 bytes",
                hostile_host(line=b"M" * (HOSTILE_MAX_METHOD + 1) + b" / HTTP/1.1"), 501),
    hostile_row("H1-07 method of 9000 bytes with a short target",
                hostile_host(line=b"M" * 9000 + b" / HTTP/1.1"), 501),
    hostile_row("H1-08 NUL in target", hostile_host(line=b"GET /a\x00b HTTP/1.1"), 400),
    hostile_row("H1-08 CTL in target", hostile_host(line=b"GET /a\x01b HTTP/1.1"), 400),
    hostile_row("H1-08 DEL in target", hostile_host(line=b"GET /a\x7fb HTTP/1.1"), 400),
    hostile_row("H1-08 fragment in target", hostile_host(line=b"GET /a#b HTTP/1.1"), 400),
    hostile_row("H1-08 space in target", hostile_host(line=b"GET /a b HTTP/1.1"), 400),
    hostile_row("H1-08 non-ASCII target", hostile_host(line=b"GET /\xc3\xa9 HTTP/1.1"), 400),
    hostile_row("H1-09 request-line over 8 KiB",
                hostile_host(line=b"GET " + HOSTILE_LONG_TARGET + b" HTTP/1.1"), 414),
    hostile_row("H1-12 asterisk with GET", hostile_host(line=b"GET * HTTP/1.1"), 400),
    hostile_row("H1-12 CONNECT", hostile_host(line=b"CONNECT x:443 HTTP/1.1"), 501),
    hostile_row("H1-12 authority-form with GET", hostile_host(line=b"GET x:443 HTTP/1.1"), 400),
    hostile_row("H1-11 non-http scheme", hostile_host(line=b"GET ftp://x/ HTTP/1.1"), 400),
    hostile_row("H1-11 absolute-form with an empty host",
                hostile_host(line=b"GET http:///p HTTP/1.1"), 400),
    hostile_row("H1-11 absolute-form with letters in the port",
                hostile_host(line=b"GET http://x:8x/ HTTP/1.1"), 400),
    hostile_row("H1-11 absolute-form with userinfo",
                hostile_host(line=b"GET http://u@x/ HTTP/1.1"), 400),
    hostile_row("H1-04 nine empty CRLF lines first", b"\r\n" * 9 + hostile_host(), 400),
    hostile_row("H1-04 nine empty LF lines first", b"\n" * 9 + hostile_host(), 400),
    hostile_row("H1-03 lone CR in request-line", hostile_host(line=b"GET /\r HTTP/1.1"), 400),
    hostile_row("H1-03 lone CR ends request-line", b"GET / HTTP/1.1\rHost: x\r\n\r\n", 400),
    # -- field lines: RFC 9112 §5, RFC 9110 §5.5 --------------------------------
    hostile_row("H1-16 space before colon", hostile_host(b"X : y"), 400),
    hostile_row("H1-16 HTAB before colon", hostile_host(b"X\t: y"), 400),
    hostile_row("H1-19 obs-fold", hostile_host(b"X: a", b" b"), 400),
    hostile_row("H1-14 whitespace line after request-line",
                b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    hostile_row("H1-15 no colon", hostile_host(b"X-Foo bar"), 400),
    hostile_row("H1-15 empty name", hostile_host(b": v"), 400),
    hostile_row("H1-15 space inside name", hostile_host(b"X Y: v"), 400),
    hostile_row("H1-15 paren in name", hostile_host(b"X(y): v"), 400),
    hostile_row("H1-15 non-ASCII name", hostile_host(b"X\xe9: v"), 400),
    hostile_row("H1-18 NUL in value", hostile_host(b"X: a\x00b"), 400),
    hostile_row("H1-18 lone CR in value", hostile_host(b"X: a\rb"), 400),
    hostile_row("H1-18 VT in value", hostile_host(b"X: a\x0bb"), 400),
    hostile_row("H1-18 ESC in value", hostile_host(b"X: a\x1bb"), 400),
    hostile_row("H1-18 DEL in value", hostile_host(b"X: a\x7fb"), 400),
    hostile_row("H1-21 more than 100 field lines", hostile_host(*HOSTILE_TOO_MANY_FIELDS), 431),
    hostile_row("H1-21 one field over 64 KiB", hostile_host(HOSTILE_BIG_FIELD), 431),
    hostile_row("H1-21 head over 64 KiB in two fields",
                hostile_host(b"A: " + HOSTILE_HALF_FIELD, b"B: " + HOSTILE_HALF_FIELD), 431),
    hostile_row("H1-23 no Host on HTTP-1.1", hostile_head(), 400),
    hostile_row("H1-23 two Host lines", hostile_host(b"Host: x"), 400),
    hostile_row("H1-23 two Host lines differing case", hostile_host(b"hOST: y"), 400),
    hostile_row("H1-23 two Host lines on HTTP-1.0",
                hostile_head(b"Host: a", b"Host: b", line=b"GET / HTTP/1.0"), 400),
    hostile_row("H1-23 Host with space", hostile_head(b"Host: a b"), 400),
    hostile_row("H1-23 Host with slash", hostile_head(b"Host: a/b"), 400),
    hostile_row("H1-23 Host with userinfo", hostile_head(b"Host: u@a"), 400),
    hostile_row("H1-23 Host with letters in port", hostile_head(b"Host: a:8x"), 400),
    hostile_row("H1-23 Host with two ports", hostile_head(b"Host: a:1:2"), 400),
    hostile_row("H1-23 Host with unclosed IPv6", hostile_head(b"Host: [::1"), 400),
    hostile_row("H1-23 Host with obs-text", hostile_head(b"Host: \xe9"), 400),
    # -- Content-Length: RFC 9110 §8.6, RFC 9112 §6.3 ---------------------------
    hostile_row("H1-25 CL plus sign", hostile_post(b"Content-Length: +5", body=b"hello"), 400),
    hostile_row("H1-25 CL negative", hostile_post(b"Content-Length: -1"), 400),
    hostile_row("H1-25 CL hex", hostile_post(b"Content-Length: 0x10"), 400),
    hostile_row("H1-25 CL underscore", hostile_post(b"Content-Length: 1_0"), 400),
    hostile_row("H1-25 CL inner space", hostile_post(b"Content-Length: 5 5"), 400),
    hostile_row("H1-25 CL empty", hostile_post(b"Content-Length:"), 400),
    hostile_row("H1-25 CL decimal point", hostile_post(b"Content-Length: 5.0"), 400),
    hostile_row("H1-25 CL non-ASCII digit", hostile_post(b"Content-Length: \xb2"), 400),
    hostile_row("H1-26 CL list differs", hostile_post(b"Content-Length: 5, 6"), 400),
    hostile_row("H1-26 CL list with empty member", hostile_post(b"Content-Length: 5,"), 400),
    hostile_row("H1-26 CL two differing lines",
                hostile_post(b"Content-Length: 5", b"Content-Length: 6"), 400),
    hostile_row("H1-27 CL of 19 digits", hostile_post(b"Content-Length: " + b"9" * 19), 413),
    hostile_row("H1-27 CL of 100 digits", hostile_post(b"Content-Length: " + b"1" * 100), 413),
    # -- Transfer-Encoding: RFC 9112 §6.1, §6.3 ---------------------------------
    hostile_row("H1-32 TE then CL",
                hostile_post(b"Transfer-Encoding: chunked", b"Content-Length: 5",
                             body=b"0\r\n\r\n"), 400),
    hostile_row("H1-32 CL then TE",
                hostile_post(b"Content-Length: 5", b"Transfer-Encoding: chunked",
                             body=b"0\r\n\r\n"), 400),
    hostile_row("H1-33 TE on HTTP-1.0",
                hostile_head(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0")
                + b"0\r\n\r\n", 400),
    hostile_row("H1-29 TE gzip", hostile_post(b"Transfer-Encoding: gzip"), 400),
    hostile_row("H1-29 TE xchunked", hostile_post(b"Transfer-Encoding: xchunked"), 400),
    hostile_row("H1-29 TE chunked then identity",
                hostile_post(b"Transfer-Encoding: chunked, identity"), 400),
    hostile_row("H1-29 TE quoted chunked", hostile_post(b'Transfer-Encoding: "chunked"'), 400),
    hostile_row("H1-29 TE lines chunked then gzip",
                hostile_post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"), 400),
    hostile_row("H1-30 TE gzip then chunked",
                hostile_post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
    hostile_row("H1-30 TE identity then chunked",
                hostile_post(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n"), 501),
    hostile_row("H1-31 TE chunked twice",
                hostile_post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), 400),
    hostile_row("H1-31 TE chunked on two lines",
                hostile_post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                             body=b"0\r\n\r\n"), 400),
    hostile_row("H1-31 TE chunked with a parameter",
                hostile_post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n"), 400),
    hostile_row("H1-28 TE empty", hostile_post(b"Transfer-Encoding:"), 400),
    hostile_row("H1-28 TE only commas", hostile_post(b"Transfer-Encoding: , ,"), 400),
    hostile_row("H1-19 TE by obs-fold",
                hostile_post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), 400),
    # -- chunked bodies: RFC 9112 §7.1 ------------------------------------------
    hostile_row("H1-35 chunk size not hex",
                hostile_chunked(b"zz\r\n" + HOSTILE_EVIL + b"\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 chunk size 0x prefix",
                hostile_chunked(b"0x4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 chunk size negative",
                hostile_chunked(b"-4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 chunk size plus sign",
                hostile_chunked(b"+4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 chunk size underscore",
                hostile_chunked(b"0_4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 chunk size of 17 hex digits",
                hostile_chunked(b"1" + b"0" * 15 + b"4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 space inside chunk size",
                hostile_chunked(b"0 4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 space before chunk size",
                hostile_chunked(b" 4\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 empty chunk size line",
                hostile_chunked(b"\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 no CRLF after chunk data",
                hostile_chunked(b"5\r\nhelloEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 bare LF after chunk data",
                hostile_chunked(b"5\r\nhello\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 bare LF ends chunk size line",
                hostile_chunked(b"4\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-35 bare LF ends last chunk",
                hostile_chunked(b"0\nEVIL\r\n\r\n"), 400, "body"),
    hostile_row("H1-36 chunk-ext over 4 KiB",
                hostile_chunked(b"4;" + b"e" * HOSTILE_MAX_CHUNK_LINE + b"\r\nEVIL\r\n0\r\n\r\n"),
                400, "body"),
    hostile_row("H1-36 chunk-ext without a name",
                hostile_chunked(b"4;=x\r\nEVIL\r\n0\r\n\r\n"), 400, "body"),
    hostile_row("H1-36 chunk-ext with a bad quoted value",
                hostile_chunked(b'4;a="x\r\nEVIL\r\n0\r\n\r\n'), 400, "body"),
    hostile_row("H1-37 trailer with space before colon",
                hostile_chunked(b"0\r\nX : EVIL\r\n\r\n"), 400, "body"),
    hostile_row("H1-37 trailer obs-fold",
                hostile_chunked(b"0\r\nX: a\r\n EVIL\r\n\r\n"), 400, "body"),
    hostile_row("H1-37 trailer with NUL",
                hostile_chunked(b"0\r\nX: \x00EVIL\r\n\r\n"), 400, "body"),
    hostile_row("H1-37 trailer without colon",
                hostile_chunked(b"0\r\nEVIL\r\n\r\n"), 400, "body"),
    hostile_row("H1-37 more than 100 trailer fields",
                hostile_chunked(b"0\r\n" + b"".join(f + b"\r\n" for f in HOSTILE_TOO_MANY_FIELDS)
                                + b"X-Last: v\r\n\r\n"), 431, "body"),
    # -- Expect: RFC 9110 §10.1.1 -----------------------------------------------
    hostile_row("HF-22 Expect other than 100-continue", hostile_host(b"Expect: fly"), 417),
    hostile_row("HF-22 Expect list with an unknown member",
                hostile_post(b"Expect: 100-continue, fly", b"Content-Length: 2"), 417),
    hostile_row("HF-22 Expect 100-continue with a parameter",
                hostile_post(b"Expect: 100-continue;x=1", b"Content-Length: 2"), 417),
    # -- EOF before the request is complete: RFC 9112 §8, §9.5 ------------------
    hostile_row("HF-18 EOF in the request-line", b"GET / HT", "close", "close"),
    hostile_row("HF-18 EOF in the head", b"GET / HTTP/1.1\r\nHost: x\r\n", "close", "close"),
    hostile_row("HF-18 EOF after empty lines", b"\r\n\r\n", "close", "close"),
    hostile_row("H1-39 EOF in a Content-Length body",
                hostile_post(b"Content-Length: 10", body=b"hello"), "close", "close"),
    hostile_row("H1-39 EOF in a chunk",
                hostile_chunked(b"a\r\nhello"), "close", "close"),
    hostile_row("H1-39 EOF before the end of the trailers",
                hostile_chunked(b"5\r\nhello\r\n0\r\n"), "close", "close"),
]


@pytest.mark.parametrize("raw,expected,kind", HOSTILE_ROWS)
def test_hostile_request(interface, raw, expected, kind):
    calls: list = []
    with running_server(interface, hostile_recording_app(interface, calls)) as port:
        data = hostile_send(port, raw, half_close=(kind == "close"))
        if expected == "close":
            assert data == b"", "an incomplete request got a response"
        else:
            hostile_check_error_response(data, expected)
        if kind == "head":
            assert calls == [], "the app was called for a request with a bad head"
        else:
            # At most the one request, and never a complete body (H1-39).
            assert set(hostile_paths(calls)) <= {"/"}, calls
            assert hostile_bodies(calls) == [], "an invalid body was reported complete"
        assert not any(HOSTILE_EVIL in repr(entry).encode() for entry in calls)
        hostile_check_alive(port)


def test_hostile_table_is_large_enough():
    assert len(HOSTILE_ROWS) >= 60
    ids = [row.id for row in HOSTILE_ROWS]
    assert len(ids) == len(set(ids))


# =============================================================================
# 2. Request smuggling (RFC 9112 §11.2)
#
# Each request hides "GET /smuggled" where a server that framed it another way
# would read it as the next request. The app must never be called for it, and
# the connection closes right after the one error response.
# =============================================================================

HOSTILE_SMUGGLING = {
    # rule: (raw, status)
    "H1-32 TE then CL": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(HOSTILE_SMUGGLED), HOSTILE_SMUGGLED), 400),
    "H1-32 CL then TE": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n%s" % (5 + len(HOSTILE_SMUGGLED), HOSTILE_SMUGGLED), 400),
    "H1-26 two differing CL": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n%s"
        % (len(HOSTILE_SMUGGLED), HOSTILE_SMUGGLED), 400),
    "H1-26 CL list differs": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d, 0\r\n\r\n%s"
        % (len(HOSTILE_SMUGGLED), HOSTILE_SMUGGLED), 400),
    "H1-29 TE not final chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
    "H1-19 TE by obs-fold": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n"
        b"0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
    "H1-35 chunk size overflows 64 bits": (
        # 0x1_0000_0000_0000_0005 is 5 in a 64-bit parser: "hello", then the end.
        HOSTILE_CHUNKED + b"10000000000000005\r\nhello\r\n0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
    "H1-35 bad chunk terminator": (
        # A parser that skips two bytes after the data without checking them
        # reads "0\r\n\r\n" here and then the hidden request.
        HOSTILE_CHUNKED + b"5\r\nhelloXX0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
    "H1-33 TE on HTTP-1.0": (
        b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
    "H1-25 CL with a sign": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n" + HOSTILE_SMUGGLED, 400),
}


@pytest.mark.parametrize("app_kind", HOSTILE_APPS)
@pytest.mark.parametrize("rule", HOSTILE_SMUGGLING)
def test_hostile_smuggling(interface, rule, app_kind):
    raw, status = HOSTILE_SMUGGLING[rule]
    calls: list = []
    with running_server(interface, HOSTILE_APPS[app_kind](interface, calls)) as port:
        data = hostile_send(port, raw)            # the server closes: EOF
        if data.startswith(b"HTTP/1.1 200 ") and app_kind == "ignores-body" and \
                rule.startswith("H1-35"):
            # The app answered before the body was read, so the framing error
            # was found afterwards: that one response, then EOF.
            assert data.endswith(b"\r\n\r\nok") and data.count(b"HTTP/1.1") == 1, data
        else:
            hostile_check_error_response(data, status)
        assert "/smuggled" not in hostile_paths(calls), calls
        assert set(hostile_paths(calls)) <= {"/"}, calls
        assert hostile_bodies(calls) == [], "an invalid body was reported complete"
        hostile_check_alive(port, echo=app_kind == "reads-body")


@pytest.mark.parametrize("app_kind", HOSTILE_APPS)
def test_hostile_smuggling_detector_control(interface, app_kind):
    """Control: a valid request followed by the same hidden request IS served.

    This shows that the smuggling tests above would see /smuggled if the
    server read it as a request.
    """
    raw = HOSTILE_CHUNKED + b"0\r\n\r\n" + HOSTILE_SMUGGLED
    calls: list = []
    with running_server(interface, HOSTILE_APPS[app_kind](interface, calls)) as port:
        with connect(port) as sock:
            sock.sendall(raw)
            reader = ResponseReader(sock)
            assert reader.read_response()[0] == 200
            assert reader.read_response()[0] == 200
        assert hostile_paths(calls) == ["/", "/smuggled"]


@pytest.mark.parametrize("app_kind", HOSTILE_APPS)
def test_hostile_unread_body_is_not_a_request(interface, app_kind):
    """RFC 9112 §6.3: a Content-Length body that holds a request is still body,
    also when the app never reads it (the server must skip it itself)."""
    raw = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
           % (len(HOSTILE_SMUGGLED), HOSTILE_SMUGGLED))
    after = b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    calls: list = []
    with running_server(interface, HOSTILE_APPS[app_kind](interface, calls)) as port:
        with connect(port) as sock:
            sock.sendall(raw + after)
            reader = ResponseReader(sock)
            responses = []
            while True:
                status, headers, _ = reader.read_response()
                responses.append(status)
                if headers.get(b"connection") == b"close":
                    break
            assert reader.buffer + read_until_closed(sock) == b""
        assert "/smuggled" not in hostile_paths(calls), calls
        # The body was skipped: either /after was served, or the server chose
        # to close after the first response (HF-16); never a third request.
        assert hostile_paths(calls) in (["/"], ["/", "/after"])
        assert len(responses) == len(hostile_paths(calls))


# =============================================================================
# 3. Random mutations of valid requests, fed to the parser alone
# =============================================================================

HOSTILE_SEEDS = [
    b"GET /a/b?c=d&e HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n"
    b"Connection: keep-alive\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: x:80\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 11\r\n\r\nhello world",
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"5;name=value;q=\"a b\"\r\nhello\r\n3\r\nabc\r\n0;last\r\nX-Trailer: t\r\nX-Sum: 8\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"DELETE http://h/p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
]
HOSTILE_INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"0",
                   b"\x7f", b"\xff", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
                   b"Content-Length: 3\r\n", b"99999999999999999999"]
HOSTILE_ALLOWED_STATUSES = {400, 413, 414, 417, 431, 501, 505}
HOSTILE_MUTATIONS = 20000


def hostile_mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        operation = rng.randrange(6)
        at = rng.randrange(len(data) + 1) if data else 0
        if operation == 0 and data:                          # flip a byte
            at = min(at, len(data) - 1)
            data[at] = rng.choice([data[at] ^ (1 << rng.randrange(8)), rng.randrange(256)])
        elif operation == 1:                                 # insert
            data[at:at] = rng.choice(HOSTILE_INSERTS)
        elif operation == 2 and data:                        # delete a few bytes
            del data[at:at + rng.randint(1, 4)]
        elif operation == 3:                                 # duplicate a line
            lines = bytes(data).split(b"\r\n")
            index = rng.randrange(len(lines))
            lines[index:index] = [lines[index]] * rng.choice([1, 1, 1, 120])
            data = bytearray(b"\r\n".join(lines))
        elif operation == 4:                                 # truncate
            del data[at:]
        else:                                                # swap two bytes
            if len(data) > 1:
                i, j = rng.randrange(len(data)), rng.randrange(len(data))
                data[i], data[j] = data[j], data[i]
    return bytes(data)


def hostile_random_split(rng: random.Random, raw: bytes) -> list[bytes]:
    if rng.random() < 0.1:
        return [raw[i:i + 1] for i in range(len(raw))]
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 8)))) \
        if len(raw) > 1 else []
    edges = [0] + cuts + [len(raw)]
    return [raw[a:b] for a, b in zip(edges, edges[1:])]


def hostile_parse(pieces: list[bytes]) -> tuple[list, int | None]:
    """(events, error status or None); body pieces are joined."""
    parser = RequestParser()
    events: list = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (event := parser.next_event()) is not None:
                if isinstance(event, bytes) and events and isinstance(events[-1], bytes):
                    events[-1] += event
                else:
                    events.append(event)
    except HTTPError as error:
        return events, error.status
    return events, None


def hostile_check_events(events: list) -> None:
    """Request, then body bytes, then END, repeated; the last may be unfinished."""
    expect_request = True
    for event in events:
        if expect_request:
            assert isinstance(event, Request), events
            request_event = event
            expect_request = False
            body = b""
            continue
        if event is END:
            if not request_event.chunked:
                assert len(body) == request_event.content_length
            expect_request = True
        else:
            assert type(event) is bytes and event, events
            body += event
            if not request_event.chunked:
                assert len(body) <= request_event.content_length


def test_hostile_random_mutations():
    rng = random.Random(20240806)
    outcomes = collections.Counter()
    for round_number in range(HOSTILE_MUTATIONS):
        seed = HOSTILE_SEEDS[round_number % len(HOSTILE_SEEDS)]
        raw = hostile_mutate(rng, seed)
        pieces = hostile_random_split(rng, raw)
        try:
            whole = hostile_parse([raw])
            split = hostile_parse(pieces)
        except Exception as error:   # anything but HTTPError is a parser bug
            pytest.fail(f"{type(error).__name__}: {error} for {raw!r} split {pieces!r}")
        events, status = whole
        assert status is None or status in HOSTILE_ALLOWED_STATUSES, (status, raw)
        hostile_check_events(events)
        assert split == whole, f"whole and split differ for {raw!r} split {pieces!r}"
        outcomes[status] += 1
    # The mutations must reach both sides: accepted inputs and several errors.
    assert outcomes[None] > 100 and outcomes[400] > 100, outcomes
    assert len(outcomes) >= 3, outcomes


# =============================================================================
# 4. Slow clients and clients that never read
# =============================================================================

HOSTILE_BIG_PIECE = 64 * 1024
HOSTILE_BIG_PIECES = 64                 # 4 MiB in all
HOSTILE_TRICKLE_HEAD = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40


def hostile_big_app(interface: str, state: dict):
    """/big: a 4 MiB response in 64 KiB pieces; anything else: echo with CL.

    state["started"] and state["ended"] count /big calls begun and finished
    (finished includes being cut short because the client went away).
    """
    lock = threading.Lock()

    def count(key):
        with lock:
            state[key] += 1

    if interface == "wsgi":
        def pieces():
            try:
                for _ in range(HOSTILE_BIG_PIECES):
                    yield b"b" * HOSTILE_BIG_PIECE
            finally:
                count("ended")

        def app(environ, start_response):
            if environ["PATH_INFO"] == "/big":
                count("started")
                start_response("200 OK", [
                    ("Content-Length", str(HOSTILE_BIG_PIECE * HOSTILE_BIG_PIECES))])
                return pieces()
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        return app

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/big":
            count("started")
            try:
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-length", b"%d" % (HOSTILE_BIG_PIECE * HOSTILE_BIG_PIECES))]})
                for _ in range(HOSTILE_BIG_PIECES):
                    await send({"type": "http.response.body", "body": b"b" * HOSTILE_BIG_PIECE,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                count("ended")
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


def hostile_echo_answered(port: int, body: bytes) -> None:
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert request(port, raw)[::2] == (200, body)


def hostile_nothing_from(socks: list, wait: float) -> None:
    """Wait up to `wait` seconds: none of the sockets has data or EOF from the server."""
    readable, _, _ = select.select(socks, [], [], wait)
    assert readable == [], "the server answered or closed a slow client"


def hostile_unread_client(port: int) -> socket.socket:
    """A client that asks for /big and never reads (a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_hostile_slow_and_unread_clients(interface):
    """30 clients trickle a head, 10 never read a 4 MiB response; a normal
    client is still answered, and the server recovers once they leave.

    The WSGI pool gets more threads than there are non-reading clients, as
    each of them holds a worker while its response cannot be sent; the next
    test is about the default pool.
    """
    state = {"started": 0, "ended": 0}
    trickling: list[socket.socket] = []
    unread: list[socket.socket] = []
    with running_server(interface, hostile_big_app(interface, state), threads=16) as port:
        hostile_echo_answered(port, b"warm-up")
        threads_before = threading.active_count()
        try:
            for _ in range(30):
                sock = connect(port)
                sock.sendall(HOSTILE_TRICKLE_HEAD[:1])
                trickling.append(sock)
            unread = [hostile_unread_client(port) for _ in range(10)]
            # Every big response is under way (bounded wait), and none is done:
            # the clients read nothing, so 4 MiB cannot all be sent.
            wait_for(lambda: state["started"] == 10)
            assert state["ended"] == 0
            # Trickle the heads, one byte per socket per round; a short select
            # both paces the rounds and checks that nobody got an answer.
            for index in range(1, len(HOSTILE_TRICKLE_HEAD)):
                for sock in trickling:
                    sock.sendall(HOSTILE_TRICKLE_HEAD[index:index + 1])
                hostile_nothing_from(trickling, 0.01)
                if index % 20 == 0:
                    hostile_echo_answered(port, b"normal client %d" % index)
            assert state["ended"] == 0
        finally:
            for sock in trickling + unread:
                sock.close()
        # Recovery: every big response ends (its app call is released), no
        # thread is left over, and a new request works.
        wait_for(lambda: state["ended"] == 10)
        wait_for(lambda: threading.active_count() <= threads_before)
        hostile_echo_answered(port, b"after")


@pytest.mark.parametrize("interface", [
    "wsgi",
    "asgi"])
def test_hostile_unread_clients_do_not_starve_the_default_pool(interface):
    state = {"started": 0, "ended": 0}
    unread: list[socket.socket] = []
    with running_server(interface, hostile_big_app(interface, state)) as port:
        hostile_echo_answered(port, b"warm-up")
        try:
            unread = [hostile_unread_client(port) for _ in range(10)]
            wait_for(lambda: state["started"] >= 8)
            body = b"normal client"
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                try:
                    answer = ResponseReader(sock).read_response()
                except socket.timeout:
                    pytest.fail("a normal client got no answer within 2 s")
            assert answer[::2] == (200, body)
        finally:
            for sock in unread:
                sock.close()
        wait_for(lambda: state["ended"] == state["started"] == 10)
        hostile_echo_answered(port, b"after")


# =============================================================================
# WSGI, complete: every PEP 3333 rule - the WSGI path over real sockets
#
# 1. wsgiref.validate-wrapped apps, served with no validator error or warning
# 2. the environ, key by key          5. close() exactly once
# 3. wsgi.input, every method         6. HEAD and the framing of app bodies
# 4. start_response and write()       7. wsgi.file_wrapper
#                                     8. the worker pool and its queue
#
# Names start with wsgi_ / test_wsgi_ so that this part can be pasted into
# test_gateway.py. Every server runs with date_header=False, so most
# responses are compared byte for byte.
# =============================================================================

WSGI_TEXT = [("Content-Type", "text/plain")]

# The server's own 500, with date_header=False: status, fields, body, then EOF.
WSGI_500 = (b"HTTP/1.1 500 Internal Server Error\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 50\r\n"
            b"Server: gateway\r\n"
            b"Connection: close\r\n\r\n"
            b"500 Internal Server Error: the application failed\n")


@contextlib.contextmanager
def wsgi_serve(app, **options):
    """Serve a WSGI app on 127.0.0.1 (no Date header); yield (port, server)."""
    options.setdefault("date_header", False)
    listener = gateway.make_listener("127.0.0.1", 0)
    server = gateway.WSGIServer(app, listener, gateway.Config(**options))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], server
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "server did not stop"


def wsgi_get(path: str = "/", version: str = "1.1", method: str = "GET",
             close: bool = True, extra: bytes = b"") -> bytes:
    """A request without a body; `close` adds "Connection: close"."""
    return (b"%s %s HTTP/%s\r\nHost: test\r\n%s%s\r\n"
            % (method.encode(), path.encode(), version.encode(),
               b"Connection: close\r\n" if close else b"", extra))


def wsgi_chunked(*pieces: bytes) -> bytes:
    """A chunked body of these pieces, with its last-chunk."""
    return b"".join(gateway.encode_chunk(piece) for piece in pieces) + b"0\r\n\r\n"


def wsgi_split(raw: bytes) -> tuple[bytes, bytes]:
    """(head up to and including the empty line, the rest) of a raw response."""
    assert b"\r\n\r\n" in raw, f"no complete head in {raw!r}"
    head, rest = raw.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


class WsgiTracked:
    """An app iterable without len(): yields `items` (callables raise), counts close()."""

    def __init__(self, items=(), endless: bytes | None = None) -> None:
        self.items = list(items)
        self.endless = endless
        self.close_calls = 0
        self.closed = threading.Event()
        self.yielded = 0

    def __iter__(self):
        for item in self.items:
            if callable(item):
                item()
            self.yielded += 1
            yield item
        while self.endless is not None:
            self.yielded += 1
            yield self.endless

    def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


class WsgiTrackedList(list):
    """A list (so len() works: the one-item fast path) that counts close()."""

    def __init__(self, items) -> None:
        super().__init__(items)
        self.close_calls = 0
        self.closed = threading.Event()

    def close(self) -> None:
        self.close_calls += 1
        self.closed.set()


def wsgi_fail():
    raise RuntimeError("app failed mid-iteration")


def wsgi_assert_closed_once(tracked) -> None:
    assert tracked.closed.wait(TIMEOUT), "close() was never called"
    assert tracked.close_calls == 1


# -- 1. wsgiref.validate ------------------------------------------------------


@contextlib.contextmanager
def wsgi_recorded_warnings():
    """Record every warning, from any thread (3.11: the filters are global)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def wsgi_validator_messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, WSGIWarning)]


def wsgi_validated_app(file_path, served: list):
    """One app behind wsgiref.validate.validator; the validator's iterable is
    wrapped to count close() (the validator itself only complains in __del__)."""

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        stream = environ["wsgi.input"]
        if path == "/hello":
            start_response("200 OK", WSGI_TEXT)
            return [b"hello ", b"world"]
        if path == "/read":          # read(n) only: the validator wants one argument
            remaining, body = int(environ.get("CONTENT_LENGTH") or 0), b""
            while remaining:
                piece = stream.read(min(4, remaining))
                assert piece, "body ended early"
                body += piece
                remaining -= len(piece)
            assert stream.read(1) == b""
            start_response("200 OK", WSGI_TEXT + [("Content-Length", str(len(body)))])
            return [body]
        if path == "/lines":         # readline() and iteration on the same input
            first = stream.readline()
            rest = b"|".join(stream)
            start_response("200 OK", WSGI_TEXT)
            return [first, b"+", rest]
        if path == "/write":
            write = start_response("200 OK", WSGI_TEXT)
            write(b"one ")
            write(b"two")
            return []
        if path == "/stream":
            start_response("200 OK", WSGI_TEXT)
            return (piece for piece in [b"a", b"", b"bc", b"def"])
        if path == "/file":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return environ["wsgi.file_wrapper"](open(file_path, "rb"), 4096)
        start_response("404 Not Found", WSGI_TEXT)
        return [b"no such path"]

    checked = validator(app)

    def outer(environ, start_response):
        wrapper = WsgiValidatedResult(checked(environ, start_response))
        served.append(wrapper)
        return wrapper

    return outer


class WsgiValidatedResult:
    """Forwards iteration and close() to the validator's iterable, counting close()."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.close_calls = 0
        self.closed = threading.Event()

    def __iter__(self):
        return iter(self.inner)

    def close(self) -> None:
        self.close_calls += 1
        self.inner.close()
        self.closed.set()


WSGI_FILE_DATA = bytes(range(256)) * 40 + b"tail"      # 10244 bytes


def wsgi_chunked_response(*pieces: bytes, close: bool = True,
                          content_type: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
            b"Server: gateway\r\nTransfer-Encoding: chunked\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"\r\n"
            + wsgi_chunked(*[piece for piece in pieces if piece]))


WSGI_VALIDATED_CASES = {
    "GET": (wsgi_get("/hello"), wsgi_chunked_response(b"hello ", b"world")),
    "POST Content-Length, read(n)": (
        b"POST /read HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 10\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
        b"Server: gateway\r\nConnection: close\r\n\r\n0123456789"),
    "POST chunked, read(n)": (
        b"POST /read HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + wsgi_chunked(b"0123", b"456789a"),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
        b"Server: gateway\r\nConnection: close\r\n\r\n0123456789a"),
    "POST chunked, readline and iteration": (
        b"POST /lines HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + wsgi_chunked(b"one\ntw", b"o\nthree"),
        wsgi_chunked_response(b"one\n", b"+", b"two\n|three")),
    "write()": (wsgi_get("/write"), wsgi_chunked_response(b"one ", b"two")),
    "generator": (wsgi_get("/stream"), wsgi_chunked_response(b"a", b"bc", b"def")),
    "file_wrapper": (wsgi_get("/file"), wsgi_chunked_response(
        WSGI_FILE_DATA[:4096], WSGI_FILE_DATA[4096:8192], WSGI_FILE_DATA[8192:],
        content_type=b"application/octet-stream")),
}


@pytest.mark.parametrize("case", list(WSGI_VALIDATED_CASES))
def test_wsgi_validator_finds_nothing(case, tmp_path):
    raw, expected = WSGI_VALIDATED_CASES[case]
    file_path = tmp_path / "data.bin"
    file_path.write_bytes(WSGI_FILE_DATA)
    served: list = []
    with wsgi_recorded_warnings() as caught:
        with wsgi_serve(wsgi_validated_app(file_path, served)) as (port, _):
            # an AssertionError of the validator would have made this a 500
            assert exchange(port, raw) == expected
            assert len(served) == 1
            wsgi_assert_closed_once(served[0])
    assert wsgi_validator_messages(caught) == []


def test_wsgi_validator_head_finds_nothing(tmp_path):
    served: list = []
    with wsgi_recorded_warnings() as caught:
        with wsgi_serve(wsgi_validated_app(tmp_path / "none", served)) as (port, _):
            raw = exchange(port, wsgi_get("/hello", method="HEAD", close=False)
                           + wsgi_get("/write"))
            head, rest = wsgi_split(raw)
            assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
            assert b"\r\nContent-Length:" not in head
            # no body bytes: the next bytes are the pipelined GET's response
            assert rest == wsgi_chunked_response(b"one ", b"two")
            assert len(served) == 2
            wsgi_assert_closed_once(served[0])
            wsgi_assert_closed_once(served[1])
    assert wsgi_validator_messages(caught) == []


def test_wsgi_validator_warnings_from_workers_are_recorded(tmp_path):
    """The control for the tests above: a warning in a worker thread is seen."""
    served: list = []
    with wsgi_recorded_warnings() as caught:
        with wsgi_serve(wsgi_validated_app(tmp_path / "none", served)) as (port, _):
            raw = exchange(port, wsgi_get("/hello", method="PURGE"))
            assert raw == wsgi_chunked_response(b"hello ", b"world")
    assert wsgi_validator_messages(caught) == ["Unknown REQUEST_METHOD: 'PURGE'"]


def test_wsgi_validator_single_thread_finds_nothing(tmp_path):
    # PEP 3333 "Thread Support" (checklist W-40): --threads 1 is as clean as the
    # default under wsgiref.validate; every case above, one after another.
    file_path = tmp_path / "data.bin"
    file_path.write_bytes(WSGI_FILE_DATA)
    served: list = []
    with wsgi_recorded_warnings() as caught:
        with wsgi_serve(wsgi_validated_app(file_path, served), threads=1) as (port, server):
            assert len(server.pool.threads) == 1
            for case, (raw, expected) in WSGI_VALIDATED_CASES.items():
                assert exchange(port, raw) == expected, case
            assert len(served) == len(WSGI_VALIDATED_CASES)
            for wrapper in served:
                wsgi_assert_closed_once(wrapper)
    assert wsgi_validator_messages(caught) == []


# -- 2. the environ -------------------------------------------------------------


def wsgi_environ_app(seen: list):
    """Records the environ; answers with a JSON object of its CGI keys and body."""

    def app(environ, start_response):
        seen.append((type(environ), dict(environ)))
        body = environ["wsgi.input"].read()
        cgi = {key: value for key, value in environ.items() if "." not in key}
        data = json.dumps({"cgi": cgi, "body": body.decode("latin-1")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data)))])
        return [data]

    return app


def wsgi_environ(raw: bytes, **options) -> tuple[dict, str, dict, int, int]:
    """Send `raw`; return (CGI keys as the app saw them, body, environ, server
    port, client port)."""
    seen: list = []
    with wsgi_serve(wsgi_environ_app(seen), **options) as (port, _):
        with connect(port) as sock:
            sock.sendall(raw)
            status, _, body = ResponseReader(sock).read_response()
            client_port = sock.getsockname()[1]
    assert status == 200, body
    assert len(seen) == 1
    kind, environ = seen[0]
    assert kind is dict                  # PEP 3333: a builtin dict, not a subclass
    answer = json.loads(body)
    # PEP 3333 "Unicode Issues": every CGI value is a native str of latin-1 code points
    for key, value in environ.items():
        if "." not in key:
            assert type(value) is str, key
            assert all(ord(c) <= 0xFF for c in value), (key, value)
    return answer["cgi"], answer["body"], environ, port, client_port


def test_wsgi_environ_get():
    cgi, body, environ, port, client_port = wsgi_environ(
        b"GET /caf%C3%A9/a%2Fb?x=%20&y=%2F HTTP/1.1\r\nHost: test:80\r\n\r\n")
    software = cgi.pop("SERVER_SOFTWARE")
    assert type(software) is str and software
    assert cgi == {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/caf\xc3\xa9/a/b",      # percent-decoded, bytes as latin-1
        "QUERY_STRING": "x=%20&y=%2F",        # raw, without "?"
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(client_port),
        "HTTP_HOST": "test:80",
    }
    assert body == ""
    assert environ["wsgi.version"] == (1, 0) and type(environ["wsgi.version"]) is tuple
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is False
    assert environ["wsgi.run_once"] is False
    assert environ["wsgi.input_terminated"] is True
    assert callable(environ["wsgi.file_wrapper"])
    for name in ("write", "writelines", "flush"):
        assert callable(getattr(environ["wsgi.errors"], name))
    for name in ("read", "readline", "readlines", "__iter__"):
        assert callable(getattr(environ["wsgi.input"], name))


@pytest.mark.parametrize("threads", [1, 8])
def test_wsgi_environ_multithread_follows_threads(threads):
    # PEP 3333 "Thread Support": wsgi.multithread says whether another thread
    # may call the app at the same time; with --threads 1 none can.
    _, _, environ, _, _ = wsgi_environ(wsgi_get("/"), threads=threads)
    assert environ["wsgi.multithread"] is (threads > 1)


def test_wsgi_environ_http10_without_query():
    cgi, _, _, _, _ = wsgi_environ(b"GET /plain HTTP/1.0\r\n\r\n")
    assert cgi["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert cgi["PATH_INFO"] == "/plain"
    assert cgi["QUERY_STRING"] == ""
    assert "HTTP_HOST" not in cgi


def test_wsgi_environ_absolute_form_target():
    cgi, _, _, _, _ = wsgi_environ(
        b"GET http://example.com/a%20b?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (cgi["PATH_INFO"], cgi["QUERY_STRING"]) == ("/a b", "q=1")


def test_wsgi_environ_content_headers_only_when_sent():
    cgi, body, _, _, _ = wsgi_environ(
        b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain; charset=x\r\n"
        b"Content-Length: 5\r\n\r\nhello")
    assert (cgi["CONTENT_TYPE"], cgi["CONTENT_LENGTH"], body) == (
        "text/plain; charset=x", "5", "hello")
    assert "HTTP_CONTENT_TYPE" not in cgi and "HTTP_CONTENT_LENGTH" not in cgi
    cgi, _, _, _, _ = wsgi_environ(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert not {"CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_CONTENT_TYPE",
                "HTTP_CONTENT_LENGTH"} & set(cgi)


def test_wsgi_environ_chunked_has_the_dechunked_length():
    cgi, body, _, _, _ = wsgi_environ(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + wsgi_chunked(b"abc", b"defgh", b"i" * 300))
    assert cgi["CONTENT_LENGTH"] == "308"
    assert body == "abcdefgh" + "i" * 300
    assert "HTTP_CONTENT_LENGTH" not in cgi and "CONTENT_TYPE" not in cgi


def test_wsgi_environ_repeated_headers_join_in_order():
    cgi, _, _, _, _ = wsgi_environ(
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Multi: a\r\nX-Other: z\r\n"
        b"X-Multi: b, c\r\nx-multi: d\r\n\r\n")
    assert cgi["HTTP_X_MULTI"] == "a, b, c, d"
    assert cgi["HTTP_X_OTHER"] == "z"


@pytest.mark.parametrize("fields", [
    b"X_Forwarded_For: evil\r\nX-Forwarded-For: 10.0.0.1\r\n",
    b"X-Forwarded-For: 10.0.0.1\r\nX_Forwarded_For: evil\r\n",
], ids=["underscore first", "underscore last"])
def test_wsgi_environ_underscore_headers_are_dropped(fields):
    cgi, _, _, _, _ = wsgi_environ(b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    assert cgi["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"
    assert "evil" not in json.dumps(cgi)


def test_wsgi_environ_underscore_header_alone_never_arrives():
    cgi, _, _, _, _ = wsgi_environ(b"GET / HTTP/1.1\r\nHost: t\r\nX_Forwarded_For: evil\r\n\r\n")
    assert "HTTP_X_FORWARDED_FOR" not in cgi
    assert set(cgi) == {"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                        "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "SERVER_SOFTWARE",
                        "REMOTE_ADDR", "REMOTE_PORT", "HTTP_HOST"}


def test_wsgi_environ_obs_text_header_is_latin1():
    cgi, _, _, _, _ = wsgi_environ(b"GET / HTTP/1.1\r\nHost: t\r\nX-Name: caf\xc3\xa9\xff\r\n\r\n")
    assert cgi["HTTP_X_NAME"] == "caf\xc3\xa9\xff"


@pytest.mark.parametrize("target,script_name,path_info", [
    (b"/app/x/y?q=1", "/app", "/x/y"),
    (b"/app", "/app", ""),
    (b"/app/", "/app", "/"),
])
@pytest.mark.parametrize("root_path", ["/app", "/app/"])
def test_wsgi_environ_root_path(root_path, target, script_name, path_info):
    cgi, _, _, _, _ = wsgi_environ(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target,
                                   root_path=root_path)
    assert (cgi["SCRIPT_NAME"], cgi["PATH_INFO"]) == (script_name, path_info)


def test_wsgi_environ_root_path_is_a_whole_segment():
    cgi, _, _, _, _ = wsgi_environ(b"GET /apple HTTP/1.1\r\nHost: t\r\n\r\n",
                                   root_path="/app")
    assert cgi["PATH_INFO"] == "" or cgi["PATH_INFO"].startswith("/")
    assert cgi["PATH_INFO"] != "le"


# -- 3. wsgi.input ---------------------------------------------------------------

WSGI_INPUT_BODY = b"first line\nsecond\n\nthird line is longer\nno newline at end"

# name -> operations on wsgi.input, each (method, *args); "iter" is list(input)
WSGI_INPUT_OPS = {
    "read": [("read", 5), ("read", 0), ("read", 12), ("read",), ("read", 1), ("read",)],
    "read-none": [("read", 3), ("read", None), ("read", 4)],
    "readline": [("readline",), ("readline", 3), ("readline", 0), ("readline", 100),
                 ("readline",), ("readline",), ("readline",), ("readline",),
                 ("readline", 5)],
    "readlines": [("read", 2), ("readlines",), ("readlines",), ("read", 1)],
    "readlines-hint": [("readlines", 15), ("readlines",), ("readline",)],
    "iter": [("readline", 4), ("iter",), ("read", 1), ("readline",)],
}


def wsgi_apply(stream, ops) -> list:
    results = []
    for name, *args in ops:
        results.append(list(stream) if name == "iter" else getattr(stream, name)(*args))
    return results


def wsgi_input_app(results: dict, entered: threading.Event):
    def app(environ, start_response):
        entered.set()
        path = environ["PATH_INFO"]
        ops = WSGI_INPUT_OPS.get(path[1:], [("read",), ("read", 1), ("readline",)])
        results[path] = wsgi_apply(environ["wsgi.input"], ops)
        start_response("200 OK", WSGI_TEXT + [("Content-Length", "2")])
        return [b"ok"]
    return app


@pytest.mark.parametrize("ops", list(WSGI_INPUT_OPS))
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_wsgi_input_methods(framing, ops):
    body = WSGI_INPUT_BODY
    expected = wsgi_apply(io.BytesIO(body), WSGI_INPUT_OPS[ops])
    assert expected[-1] in (b"", [])         # every sequence runs past the end
    results: dict = {}
    entered = threading.Event()
    pipelined = b"POST /next HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nNXT"
    with wsgi_serve(wsgi_input_app(results, entered)) as (port, _):
        with connect(port) as sock:
            if framing == "content-length":
                sock.sendall(b"POST /%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                             % (ops.encode(), len(body)))
                assert entered.wait(TIMEOUT)   # the app reads while the body arrives
                sock.sendall(body[:7])
                sock.sendall(body[7:30])
                sock.sendall(body[30:] + pipelined)
            else:
                sock.sendall(b"POST /%s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n" % ops.encode())
                sock.sendall(b"7\r\n" + body[:7] + b"\r\n1")   # a size line split
                sock.sendall(b"7\r\n" + body[7:30] + b"\r\n")
                sock.sendall(wsgi_chunked(body[30:]) + pipelined)
            reader = ResponseReader(sock)
            assert reader.read_response()[::2] == (200, b"ok")
            assert reader.read_response()[::2] == (200, b"ok")
    assert results["/" + ops] == expected
    # the second request got exactly its own body, not a byte of the first
    assert results["/next"] == [b"NXT", b"", b""]


def test_wsgi_input_spooled_chunked_body_past_the_memory_limit():
    size = gateway.SPOOL_BYTES + 300_000
    body = hashlib.sha256(b"seed").digest() * (size // 32) + b"end"
    seen: dict = {}

    def app(environ, start_response):
        stream, digest, total = environ["wsgi.input"], hashlib.sha256(), 0
        while piece := stream.read(50_000):
            digest.update(piece)
            total += len(piece)
        seen.update(length=environ["CONTENT_LENGTH"], total=total,
                    digest=digest.hexdigest(), after=stream.read(1))
        start_response("200 OK", WSGI_TEXT + [("Content-Length", "4")])
        return [b"done"]

    pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    with wsgi_serve(app) as (port, _):
        with connect(port) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + wsgi_chunked(*pieces) + wsgi_get("/x", close=True))
            reader = ResponseReader(sock)
            assert reader.read_response()[::2] == (200, b"done")
    assert seen == {"length": str(len(body)), "total": len(body),
                    "digest": hashlib.sha256(body).hexdigest(), "after": b""}


# -- 4. start_response and write() -------------------------------------------------


def wsgi_exc_info_early_list(environ, start_response):
    start_response("200 OK", WSGI_TEXT + [("X-First", "1")])
    try:
        raise ValueError("changed my mind")
    except ValueError:
        start_response("500 Oops", WSGI_TEXT + [("X-Second", "2")], sys.exc_info())
    return [b"oops"]


def wsgi_exc_info_early_generator(environ, start_response):
    start_response("200 OK", WSGI_TEXT + [("X-First", "1")])
    yield b""                        # an empty item: the head is still unsent
    try:
        raise ValueError("changed my mind")
    except ValueError:
        start_response("500 Oops", WSGI_TEXT + [("X-Second", "2")], sys.exc_info())
    yield b"oops"


@pytest.mark.parametrize("app,body", [
    (wsgi_exc_info_early_list,
     b"Content-Length: 4\r\nServer: gateway\r\nConnection: close\r\n\r\noops"),
    (wsgi_exc_info_early_generator,
     b"Server: gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
     b"4\r\noops\r\n0\r\n\r\n"),
], ids=["list", "generator"])
def test_wsgi_exc_info_before_the_head_replaces_it(app, body):
    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get()) == (
            b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nX-Second: 2\r\n" + body)


def wsgi_exc_info_late_generator(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    yield b"part"
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Oops", WSGI_TEXT, sys.exc_info())   # re-raises
    yield b"never"


def wsgi_exc_info_late_write(environ, start_response):
    write = start_response("200 OK", WSGI_TEXT)
    write(b"part")
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Oops", WSGI_TEXT, sys.exc_info())   # re-raises
    return [b"never"]


@pytest.mark.parametrize("app", [wsgi_exc_info_late_generator, wsgi_exc_info_late_write],
                         ids=["generator", "write"])
def test_wsgi_exc_info_after_the_head_reraises_and_cuts(app):
    reraised = []

    def recording(environ, start_response):
        def checked_start_response(*args):
            try:
                return start_response(*args)
            except ValueError as error:
                reraised.append(str(error))
                raise
        return app(environ, checked_start_response)

    with wsgi_serve(recording) as (port, _):
        # keep-alive asked for, but the server must close: no 0-chunk, then EOF
        assert exchange(port, wsgi_get(close=False)) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: gateway\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
    assert reraised == ["too late"]


def wsgi_start_twice(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    start_response("201 Created", WSGI_TEXT)
    return [b"body"]


def wsgi_empty_then_raise(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    yield b""
    yield b""
    raise RuntimeError("before any byte")


def wsgi_str_in_list(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    return ["text"]


def wsgi_str_in_generator(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    yield b""
    yield "text"


def wsgi_str_to_write(environ, start_response):
    start_response("200 OK", WSGI_TEXT)("text")
    return []


def wsgi_no_start_response(environ, start_response):
    return [b"body"]


def wsgi_bad_status(environ, start_response):
    start_response("200", WSGI_TEXT)
    return [b"body"]


def wsgi_hop_by_hop(environ, start_response):
    start_response("200 OK", WSGI_TEXT + [("Connection", "close")])
    return [b"body"]


@pytest.mark.parametrize("app", [
    wsgi_start_twice, wsgi_empty_then_raise, wsgi_str_in_list, wsgi_str_in_generator,
    wsgi_str_to_write, wsgi_no_start_response, wsgi_bad_status, wsgi_hop_by_hop,
])
def test_wsgi_app_errors_before_any_body_byte_are_a_clean_500(app):
    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get(close=False)) == WSGI_500
        # the server goes on serving
        assert exchange(port, wsgi_get()) == WSGI_500


def test_wsgi_str_item_after_body_bytes_cuts_the_response():
    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT)
        yield b"abc"
        yield "text"

    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get(close=False)) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: gateway\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")


def test_wsgi_write_comes_before_the_iterable_in_order():
    def app(environ, start_response):
        write = start_response("200 OK", WSGI_TEXT)
        write(b"a")
        write(b"")
        write(b"bc")
        if environ["PATH_INFO"] == "/one":
            return [b"def"]               # one item, but the head is already sent
        return WsgiTracked([b"de", b"", b"f"])

    with wsgi_serve(app) as (port, _):
        for path in ("/one", "/many"):
            assert exchange(port, wsgi_get(path)) == wsgi_chunked_response(
                b"a", b"bc", *([b"def"] if path == "/one" else [b"de", b"f"]))


def test_wsgi_write_with_content_length():
    def app(environ, start_response):
        write = start_response("200 OK", WSGI_TEXT + [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]

    with wsgi_serve(app) as (port, _):
        with connect(port) as sock:
            sock.sendall(wsgi_get(close=False) + wsgi_get())
            assert read_until_closed(sock) == (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                b"Server: gateway\r\n\r\nabcdef"
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                b"Server: gateway\r\nConnection: close\r\n\r\nabcdef")


WSGI_HELLO_5 = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                b"Server: gateway\r\n\r\nhello")


def test_wsgi_iteration_stops_once_content_length_is_sent():
    # HF-10, PEP 3333 "Handling the Content-Length Header": the server "should
    # stop iterating over the response when enough data has been sent"; the
    # response is whole, so the connection stays open.
    made: list = []

    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT + [("Content-Length", "5")])
        made.append(WsgiTracked([b"hel", b"lo", b"MORE"]))
        return made[-1]

    with wsgi_serve(app) as (port, _):
        with connect(port) as sock:
            sock.sendall(wsgi_get(close=False) + wsgi_get())
            assert read_until_closed(sock) == WSGI_HELLO_5 + WSGI_HELLO_5.replace(
                b"gateway\r\n", b"gateway\r\nConnection: close\r\n")
    assert [(t.yielded, t.close_calls) for t in made] == [(2, 1), (2, 1)]


def test_wsgi_item_past_content_length_is_cut_and_iteration_stops():
    # HF-10: never more than Content-Length bytes; the rest is dropped (and
    # logged), no further item is asked for, and the connection closes.
    made: list = []

    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT + [("Content-Length", "5")])
        made.append(WsgiTracked([b"hel", b"lo world", b"MORE"]))
        return made[-1]

    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get(close=False)) == WSGI_HELLO_5
    assert [(t.yielded, t.close_calls) for t in made] == [(2, 1)]


@pytest.mark.parametrize("path", ["/caught", "/uncaught"])
def test_wsgi_write_past_content_length_raises_in_the_app(path):
    # HF-10, PEP 3333 "Handling the Content-Length Header": "raise an error if
    # the application tries to write() past that point". What fits is sent, so
    # the client gets the declared body, then the connection closes.
    raised: list = []

    def app(environ, start_response):
        write = start_response("200 OK", WSGI_TEXT + [("Content-Length", "5")])
        write(b"hel")
        try:
            write(b"lo world")
        except ValueError as error:
            raised.append(str(error))
            if environ["PATH_INFO"] == "/uncaught":
                raise
        return []

    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get(path, close=False)) == WSGI_HELLO_5
    assert raised == ["write() past Content-Length: 6 bytes not sent"]


# -- 5. close() exactly once ----------------------------------------------------


@pytest.mark.parametrize("kind", ["one-item list", "iterable", "write", "HEAD"])
def test_wsgi_close_called_once_after_a_normal_end(kind):
    made: list = []

    def app(environ, start_response):
        write = start_response("200 OK", WSGI_TEXT)
        if kind == "write":
            write(b"xy")
            result = WsgiTrackedList([])
        elif kind == "iterable":
            result = WsgiTracked([b"x", b"y"])
        else:
            result = WsgiTrackedList([b"xy"])
        made.append(result)
        return result

    # HEAD: neither (RFC 9110 §8.6: the server cannot know the GET body's length)
    framing = {"one-item list": {b"content-length"}, "HEAD": set()}.get(
        kind, {b"transfer-encoding"})
    with wsgi_serve(app) as (port, _):
        with connect(port) as sock:
            reader = ResponseReader(sock)
            method = "HEAD" if kind == "HEAD" else "GET"
            sock.sendall(wsgi_get(method=method, close=False))
            status, headers, body = reader.read_response(method)
            assert (status, body) == (200, b"" if method == "HEAD" else b"xy")
            assert {b"content-length", b"transfer-encoding"} & set(headers) == framing
            # a second request on the same connection: the first call is over
            sock.sendall(wsgi_get())
            assert reader.read_response()[::2] == (200, b"xy")
            assert reader.buffer == b"" and read_until_closed(sock) == b""
    assert len(made) == 2
    wsgi_assert_closed_once(made[0])
    wsgi_assert_closed_once(made[1])


def test_wsgi_close_called_once_after_an_error_mid_iteration():
    made: list = []

    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT)
        made.append(WsgiTracked([b"abc", wsgi_fail]))
        return made[-1]

    with wsgi_serve(app) as (port, _):
        assert exchange(port, wsgi_get(close=False)) == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: gateway\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert len(made) == 1
    wsgi_assert_closed_once(made[0])


def test_wsgi_close_called_once_when_the_client_leaves_mid_stream():
    made: list = []

    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT)
        if environ["PATH_INFO"] != "/":
            return [b"ok"]
        made.append(WsgiTracked(endless=b"z" * 4096))
        return made[-1]

    with wsgi_serve(app) as (port, _):
        sock = connect(port)
        reader = ResponseReader(sock)
        sock.sendall(wsgi_get(close=False))
        assert reader.read_head()[0] == 200
        assert reader.read_exact(20_000).count(b"z") > 19_000   # streaming goes on
        # unread bytes in our buffer: close() sends a reset, the server sees it
        sock.close()
        assert len(made) == 1
        wsgi_assert_closed_once(made[0])
        yielded = made[0].yielded
        # and the app is not iterated any more (the server answers others meanwhile)
        assert exchange(port, wsgi_get("/again", close=True)).startswith(
            b"HTTP/1.1 200 OK\r\n")
        assert made[0].yielded == yielded
        assert len(made) == 1 and made[0].close_calls == 1


class WsgiFailingCloseList(list):
    """A one-item body whose close() raises (an app bug the server must survive)."""

    def close(self) -> None:
        raise RuntimeError("close() failed")


def test_wsgi_close_raising_after_a_one_item_body_still_answers():
    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT)
        return WsgiFailingCloseList([b"hello"])

    with wsgi_serve(app) as (port, _):
        raw = exchange(port, wsgi_get())
    assert raw in (WSGI_500, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: 5\r\nServer: gateway\r\nConnection: close\r\n\r\nhello")


# -- 6. HEAD and the framing of app bodies ------------------------------------------


def wsgi_framing_app(environ, start_response):
    start_response("200 OK", WSGI_TEXT)
    if environ["PATH_INFO"] == "/one":
        return [b"hello"]
    return [b"hel", b"lo"]


WSGI_ONE_GET = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                b"Server: gateway\r\nConnection: close\r\n\r\nhello")


@pytest.mark.parametrize("path", ["/one", "/two"])
def test_wsgi_head_sends_no_body_bytes(path):
    with wsgi_serve(wsgi_framing_app) as (port, _):
        raw = exchange(port, wsgi_get(path, method="HEAD", close=False) + wsgi_get("/one"))
    head, rest = wsgi_split(raw)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
    assert b"Content-Length" not in head          # RFC 9110 §8.6: see below
    assert b"Connection: close" not in head        # the connection stays open
    assert rest == WSGI_ONE_GET                    # the next bytes: the GET's answer


# RFC 9110 §8.6, §9.3.2 (SPEC HF-06): a HEAD response's Content-Length is the
# length of the GET body, which only the app knows. The one-item shortcut adds
# Content-Length for GET, never for HEAD; an app's own Content-Length is kept.
# (method, the one item, the app's Content-Length, the Content-Length line sent)
WSGI_ONE_ITEM_LENGTHS = [
    ("HEAD", b"", None, b""),                        # never an invented "0"
    ("HEAD", b"hello", None, b""),                   # nor a guess from the HEAD body
    ("HEAD", b"", "42", b"Content-Length: 42\r\n"),   # the app's, kept
    ("GET", b"", None, b"Content-Length: 0\r\n"),
    ("GET", b"hello", None, b"Content-Length: 5\r\n"),
]


@pytest.mark.parametrize("method, item, app_length, length_line", WSGI_ONE_ITEM_LENGTHS)
def test_wsgi_head_one_item_gets_no_invented_content_length_rfc9110_8_6(
        method, item, app_length, length_line):
    def app(environ, start_response):
        start_response("200 OK", WSGI_TEXT + ([("Content-Length", app_length)]
                                              if app_length else []))
        return [item]

    with wsgi_serve(app) as (port, _):
        raw = exchange(port, wsgi_get("/", method=method))
    assert raw == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + length_line
                   + b"Server: gateway\r\nConnection: close\r\n\r\n"
                   + (item if method == "GET" else b""))


def test_wsgi_head_http10_ends_with_eof_and_no_body():
    with wsgi_serve(wsgi_framing_app) as (port, _):
        raw = exchange(port, b"HEAD /two HTTP/1.0\r\n\r\n")
    head, rest = wsgi_split(raw)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
    assert rest == b""


@pytest.mark.parametrize("path,version,expected", [
    ("/one", "1.1", WSGI_ONE_GET),
    ("/two", "1.1", wsgi_chunked_response(b"hel", b"lo")),
    ("/one", "1.0", WSGI_ONE_GET),
    ("/two", "1.0", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: gateway\r\n"
                    b"Connection: close\r\n\r\nhello"),
])
def test_wsgi_body_framing(path, version, expected):
    with wsgi_serve(wsgi_framing_app) as (port, _):
        assert exchange(port, wsgi_get(path, version=version, close=version == "1.1")) \
            == expected


def test_wsgi_http10_two_items_close_even_with_keep_alive():
    with wsgi_serve(wsgi_framing_app) as (port, _):
        raw = exchange(port, b"GET /two HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                             b"GET /one HTTP/1.0\r\n\r\n")
    assert raw == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: gateway\r\n"
                   b"Connection: close\r\n\r\nhello")


# -- 7. wsgi.file_wrapper ------------------------------------------------------------


class WsgiRecordingFile:
    """A real file (it has a fileno) that records read() and close() calls."""

    def __init__(self, path, skip: int) -> None:
        self.file = open(path, "rb")
        self.file.read(skip)              # buffered: the fd is further on than tell()
        self.reads = 0
        self.close_calls = 0
        self.closed = threading.Event()

    def fileno(self) -> int:
        return self.file.fileno()

    def tell(self) -> int:
        return self.file.tell()

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return self.file.read(size)

    def close(self) -> None:
        self.close_calls += 1
        self.file.close()
        self.closed.set()


def wsgi_file_app(path, made: list):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        if environ["PATH_INFO"] == "/bytesio":
            filelike = io.BytesIO(WSGI_FILE_DATA)
            filelike.seek(10)
            made.append(filelike)
            return environ["wsgi.file_wrapper"](filelike, 4000)
        made.append(WsgiRecordingFile(path, skip=100))
        return environ["wsgi.file_wrapper"](made[-1])
    return app


def test_wsgi_file_wrapper_sends_from_the_current_position(tmp_path):
    # A regular file's length is known: the response gets a Content-Length for
    # what is left of it from its position, and the connection stays.
    path = tmp_path / "data.bin"
    path.write_bytes(WSGI_FILE_DATA)
    made: list = []
    rest = WSGI_FILE_DATA[100:]
    with wsgi_serve(wsgi_file_app(path, made)) as (port, _):
        raw = exchange(port, wsgi_get("/file", close=False) + wsgi_get("/file"))
    one = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: %d\r\nServer: gateway\r\n" % len(rest))
    assert raw == one + b"\r\n" + rest + one + b"Connection: close\r\n\r\n" + rest
    assert len(made) == 2
    for filelike in made:
        wsgi_assert_closed_once(filelike)


def test_wsgi_file_wrapper_bytes_sent_are_in_the_access_log(tmp_path, caplog):
    # The access line counts the file's bytes; iterating stops once the app's
    # Content-Length is sent, as for any iterable (PEP 3333 "Handling the
    # Content-Length Header"), and the connection stays.
    caplog.set_level(logging.INFO, logger="gateway.access")
    path = tmp_path / "data.bin"
    path.write_bytes(WSGI_FILE_DATA)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "100")])
        return environ["wsgi.file_wrapper"](open(path, "rb"), 50)

    with wsgi_serve(app) as (port, _):
        raw = exchange(port, wsgi_get(close=False) + wsgi_get())
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nServer: gateway\r\n"
    assert raw == (one + b"\r\n" + WSGI_FILE_DATA[:100] + one + b"Connection: close\r\n\r\n"
                   + WSGI_FILE_DATA[:100])
    access = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(access) == 2 and all('"GET / HTTP/1.1" 200 100 ' in line for line in access)


def test_wsgi_file_wrapper_head_has_no_body(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(WSGI_FILE_DATA)
    made: list = []
    with wsgi_serve(wsgi_file_app(path, made)) as (port, _):
        raw = exchange(port, wsgi_get("/file", method="HEAD", close=False)
                       + wsgi_get("/file", method="HEAD"))
    # RFC 9110 §9.3.2: no body, and the Content-Length the GET would have.
    one = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: %d\r\nServer: gateway\r\n" % (len(WSGI_FILE_DATA) - 100))
    assert raw == one + b"\r\n" + one + b"Connection: close\r\n\r\n"
    assert len(made) == 2
    for filelike in made:
        wsgi_assert_closed_once(filelike)


def test_wsgi_file_wrapper_app_content_length_wins(tmp_path, caplog):
    # A file longer than the app's Content-Length is read only that far: the
    # client gets the 7 bytes promised, nothing is dropped, the connection stays.
    path = tmp_path / "data.bin"
    path.write_bytes(WSGI_FILE_DATA)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", "7")])
        filelike = open(path, "rb")
        filelike.seek(1000)
        return environ["wsgi.file_wrapper"](filelike)

    with wsgi_serve(app) as (port, _):
        raw = exchange(port, wsgi_get(close=False) + wsgi_get())
    one = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Length: 7\r\nServer: gateway\r\n")
    data = WSGI_FILE_DATA[1000:1007]
    assert raw == one + b"\r\n" + data + one + b"Connection: close\r\n\r\n" + data
    assert "dropped" not in caplog.text


def test_wsgi_file_wrapper_without_fileno_is_iterated(tmp_path):
    made: list = []
    with wsgi_serve(wsgi_file_app(tmp_path / "unused", made)) as (port, _):
        raw = exchange(port, wsgi_get("/bytesio"))
    rest = WSGI_FILE_DATA[10:]
    assert raw == wsgi_chunked_response(
        *[rest[i:i + 4000] for i in range(0, len(rest), 4000)],
        content_type=b"application/octet-stream")
    assert len(made) == 1 and made[0].closed     # BytesIO.close() was passed on


# -- 8. the worker pool and its queue -----------------------------------------------


def wsgi_blocking_app(blocked: dict, calls: list):
    """Paths in `blocked` ({path: (entered, release)}) wait for their release."""

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        calls.append(path)
        if path in blocked:
            entered, release = blocked[path]
            entered.set()
            assert release.wait(TIMEOUT)
        body = path.encode()
        start_response("200 OK", WSGI_TEXT + [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_wsgi_queued_request_is_answered_when_a_worker_frees_up():
    blocked = {path: (threading.Event(), threading.Event()) for path in ("/a", "/b")}
    calls: list = []
    try:
        with wsgi_serve(wsgi_blocking_app(blocked, calls), threads=2) as (port, server):
            with connect(port) as a, connect(port) as b, connect(port) as c:
                a.sendall(wsgi_get("/a", close=False))
                assert blocked["/a"][0].wait(TIMEOUT)
                b.sendall(wsgi_get("/b", close=False))
                assert blocked["/b"][0].wait(TIMEOUT)
                c.sendall(wsgi_get("/c", close=False))
                wait_for(lambda: len(server.pool.jobs) == 1)   # queued, not refused
                assert calls == ["/a", "/b"]
                blocked["/a"][1].set()
                assert ResponseReader(c).read_response()[::2] == (200, b"/c")
                assert ResponseReader(a).read_response()[::2] == (200, b"/a")
                assert calls == ["/a", "/b", "/c"]
                blocked["/b"][1].set()
                assert ResponseReader(b).read_response()[::2] == (200, b"/b")
    finally:
        for _, release in blocked.values():
            release.set()


def test_wsgi_client_reset_while_queued_is_never_handed_to_the_app():
    blocked = {path: (threading.Event(), threading.Event()) for path in ("/a", "/b")}
    calls: list = []
    try:
        with wsgi_serve(wsgi_blocking_app(blocked, calls), threads=2) as (port, server):
            with connect(port) as a, connect(port) as b:
                a.sendall(wsgi_get("/a", close=False))
                assert blocked["/a"][0].wait(TIMEOUT)
                b.sendall(wsgi_get("/b", close=False))
                assert blocked["/b"][0].wait(TIMEOUT)
                gone = connect(port)
                gone_port = gone.getsockname()[1]
                gone.sendall(wsgi_get("/gone", close=False))
                wait_for(lambda: len(server.pool.jobs) == 1)
                conn = next(conn for conn in list(server.connections)
                            if conn.client[1] == gone_port)
                # A reset: a FIN alone would be a half-close, still answered.
                gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                gone.close()
                wait_for(lambda: conn.closed)   # the loop saw it
                blocked["/a"][1].set()
                assert ResponseReader(a).read_response()[::2] == (200, b"/a")
                # one worker is free; "/gone" was queued first, so by the time
                # "/after" is answered the worker is done with "/gone"
                assert exchange(port, wsgi_get("/after")) == (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                    b"Server: gateway\r\nConnection: close\r\n\r\n/after")
                assert calls == ["/a", "/b", "/after"]
                wait_for(lambda: conn.closed)
                blocked["/b"][1].set()
                assert ResponseReader(b).read_response()[::2] == (200, b"/b")
    finally:
        for _, release in blocked.values():
            release.set()


# -- WSGI under faults: nothing one client or app does ends or stalls the loop --


def wsgi_hello(environ, start_response):
    start_response("200 OK", WSGI_TEXT + [("Content-Length", "5")])
    return [b"hello"]


WSGI_HELLO_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                    b"Server: gateway\r\nConnection: close\r\n\r\nhello")


@contextlib.contextmanager
def wsgi_sends_fail_to(monkeypatch, client_port_of):
    """Make the server's send() to one client fail as if that client had just
    reset: `client_port_of()` names the client's port once it is known."""
    real_send = socket.socket.send

    def send(sock, data, *flags):
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        if isinstance(peer, tuple) and peer[1] == client_port_of():
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_send(sock, data, *flags)

    monkeypatch.setattr(socket.socket, "send", send)
    yield


@pytest.mark.parametrize("sent, timeout", [
    (b"GET / HTTP/1.1\r\nHost: te", "timeout_request_head"),            # 408 for the head
    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
     "timeout_read"),                                                    # 408 for the body
], ids=["head", "chunked-body"])
def test_wsgi_a_408_that_cannot_be_written_closes_only_that_connection(
        monkeypatch, sent, timeout):
    # RFC 9110 §15.5.9: the 408 goes to a client that has just reset, so the
    # write fails; the loop must close that connection and serve the rest.
    bad = {}
    with wsgi_sends_fail_to(monkeypatch, lambda: bad.get("port")), \
            wsgi_serve(wsgi_hello, **{timeout: 0.2}) as (port, server):
        with connect(port) as sock:
            bad["port"] = sock.getsockname()[1]
            sock.sendall(sent)
            assert sock.recv(100) == b""      # closed, no 408: it could not be sent
        wait_for(lambda: not server.connections)
        assert exchange(port, wsgi_get()) == WSGI_HELLO_CLOSE


def test_wsgi_an_error_of_ours_on_one_connection_closes_only_it(monkeypatch, caplog):
    real = gateway.WSGIConnection.on_readable
    bad = {}

    def on_readable(conn):
        if conn.client and conn.client[1] == bad.get("port"):
            raise RuntimeError("a bug in the loop")
        return real(conn)

    monkeypatch.setattr(gateway.WSGIConnection, "on_readable", on_readable)
    with wsgi_serve(wsgi_hello) as (port, server), connect(port) as good:
        good.sendall(wsgi_get(close=False))
        assert ResponseReader(good).read_response()[::2] == (200, b"hello")
        with connect(port) as sock:
            bad["port"] = sock.getsockname()[1]
            sock.sendall(wsgi_get())
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass              # closed with the request unread: a reset
        good.sendall(wsgi_get(close=False))    # the same keep-alive connection
        assert ResponseReader(good).read_response()[::2] == (200, b"hello")
        assert exchange(port, wsgi_get()) == WSGI_HELLO_CLOSE
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "a bug in the loop" in errors[0].exc_text


WSGI_APP_EXITS = [SystemExit(1), KeyboardInterrupt(), GeneratorExit()]


@pytest.mark.parametrize("exit_", WSGI_APP_EXITS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("where", ["before-start", "mid-body"])
def test_wsgi_an_app_raising_a_base_exception_gets_a_500_and_the_pool_keeps_its_size(
        exit_, where, caplog):
    # PEP 3333, "Error Handling": the server answers for an app that fails.
    # sys.exit() or Ctrl+C in an app are failures of that request, not of the
    # server: every worker thread must live on to serve the next ones.
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/ok":
            return wsgi_hello(environ, start_response)
        if where == "before-start":
            raise exit_
        start_response("200 OK", WSGI_TEXT)

        def body():
            yield b"first"
            raise exit_
        return body()

    with wsgi_serve(app, threads=2) as (port, server):
        for _ in range(3):             # more failures than threads
            raw = exchange(port, wsgi_get("/fail"))
            if where == "before-start":
                assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
            else:                      # the head is out: cut short, no last chunk
                assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
                assert raw.endswith(b"5\r\nfirst\r\n")
        assert exchange(port, wsgi_get("/ok")) == WSGI_HELLO_CLOSE
        assert all(thread.is_alive() for thread in server.pool.threads)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 3 and all(r.exc_info[0] is type(exit_) for r in failures)


def test_wsgi_threads_zero_is_refused(caplog):
    # --threads 0 would queue every request for ever: refused before listening.
    with pytest.raises(ValueError, match="--threads must be 1 or more"):
        gateway.Config(threads=0)
    caplog.set_level(logging.ERROR, logger="gateway")
    code = gateway.main(["--wsgi", "echo_wsgi:application", "--threads", "0",
                         "--port", "0"])
    assert code == 1
    assert [r.getMessage() for r in caplog.records if r.name == "gateway"] == [
        "--threads must be 1 or more (1: one app call at a time), not 0"]


def test_wsgi_single_thread_runs_calls_one_after_another():
    # PEP 3333 "Thread Support": with --threads 1 the app is never called while
    # another call runs; a second request waits in the queue until the first ends.
    blocked = {path: (threading.Event(), threading.Event()) for path in ("/a", "/b")}
    calls: list = []
    threads: set = set()
    inner = wsgi_blocking_app(blocked, calls)

    def app(environ, start_response):
        threads.add(threading.get_ident())
        return inner(environ, start_response)

    try:
        with wsgi_serve(app, threads=1) as (port, server):
            with connect(port) as a, connect(port) as b:
                a.sendall(wsgi_get("/a", close=False))
                assert blocked["/a"][0].wait(TIMEOUT)
                b.sendall(wsgi_get("/b", close=False))
                wait_for(lambda: len(server.pool.jobs) == 1)   # parsed, and queued
                assert calls == ["/a"] and not blocked["/b"][0].is_set()
                blocked["/a"][1].set()
                assert ResponseReader(a).read_response()[::2] == (200, b"/a")
                assert blocked["/b"][0].wait(TIMEOUT)           # only now
                assert calls == ["/a", "/b"]
                blocked["/b"][1].set()
                assert ResponseReader(b).read_response()[::2] == (200, b"/b")
        assert len(threads) == 1
    finally:
        for _, release in blocked.values():
            release.set()


WSGI_PARKED_PIECES = 128     # of 64 KiB: 8 MiB, more than the socket buffers hold


def test_wsgi_single_thread_parked_response_lets_the_next_request_run():
    # With --threads 1, a client that does not read its large response parks
    # it (§6): the only thread serves the next client, then resumes the first.
    finished = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/big":
            def pieces():
                try:
                    for _ in range(WSGI_PARKED_PIECES):
                        yield LIMITS_PIECE
                finally:       # PEP 3333: iteration stops once Content-Length is sent
                    finished.set()
            start_response("200 OK", [("Content-Type", "text/plain"), (
                "Content-Length", str(len(LIMITS_PIECE) * WSGI_PARKED_PIECES))])
            return pieces()
        return wsgi_hello(environ, start_response)

    with wsgi_serve(app, threads=1) as (port, server):
        with limits_connect(port, rcvbuf=4096) as stuck:
            stuck.sendall(wsgi_get("/big", close=False))       # not read, for now
            wait_for(lambda: any(conn.parked is not None
                                 for conn in list(server.connections)))
            assert exchange(port, wsgi_get("/hello")) == WSGI_HELLO_CLOSE
            assert not finished.is_set()
            reader = ResponseReader(stuck)
            status, headers, _ = reader.read_head()
            size = int(headers[b"content-length"])
            parts = [reader.buffer]          # read_exact() would copy it all each time
            while sum(map(len, parts)) < size:
                parts.append(stuck.recv(65536))
                assert parts[-1], "connection closed mid-body"
            assert status == 200
            assert b"".join(parts) == LIMITS_PIECE * WSGI_PARKED_PIECES
            assert finished.is_set()


def test_wsgi_a_half_closed_client_still_gets_its_response():
    # RFC 9112 §9.6: a client that has finished sending (shutdown(SHUT_WR), as
    # netcat does) still reads its response. Here the FIN arrives while the
    # request waits for the only worker, the case that lost the response.
    blocked = {"/a": (threading.Event(), threading.Event())}
    calls: list = []
    try:
        with wsgi_serve(wsgi_blocking_app(blocked, calls), threads=1) as (port, server):
            with connect(port) as a, connect(port) as b:
                a.sendall(wsgi_get("/a"))
                assert blocked["/a"][0].wait(TIMEOUT)
                b_port = b.getsockname()[1]
                b.sendall(wsgi_get("/b", close=False))
                b.shutdown(socket.SHUT_WR)
                wait_for(lambda: any(conn.peer_eof for conn in list(server.connections)
                                     if conn.client and conn.client[1] == b_port))
                blocked["/a"][1].set()
                assert ResponseReader(a).read_response()[::2] == (200, b"/a")
                # It asked for keep-alive; the close comes after the response.
                assert read_until_closed(b) == (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                    b"Server: gateway\r\n\r\n/b")
                assert calls == ["/a", "/b"]
    finally:
        blocked["/a"][1].set()


def test_srv_half_close_after_pipelined_requests_answers_them_all(echo_server):
    # RFC 9112 §9.3.2: every request sent before the client's FIN is answered.
    for _ in range(10):       # the FIN may be read with, before or after them
        with connect(echo_server) as sock:
            sock.sendall(srv_post(b"one") + srv_post(b"two"))
            sock.shutdown(socket.SHUT_WR)
            reader = ResponseReader(sock)
            assert reader.read_response()[::2] == (200, b"one")
            assert reader.read_response()[::2] == (200, b"two")
            srv_assert_eof(sock)


def wsgi_chunked_upload(port: int, size: int, piece: int = 64 * 1024) -> bytes:
    """POST `size` bytes in chunks from a thread; the whole response."""
    head = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(port) as sock:
        def upload():
            with contextlib.suppress(OSError):     # the server may stop reading
                sock.sendall(head)
                for _ in range(size // piece):
                    sock.sendall(gateway.encode_chunk(b"x" * piece))
                sock.sendall(b"0\r\n\r\n")
        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        try:
            return read_until_closed(sock)
        except ConnectionResetError:
            return b""
        finally:
            sender.join(TIMEOUT)


def test_wsgi_a_chunked_body_over_the_spool_limit_is_413():
    # Limit: a chunked body is stored before the app runs; --limit-spool keeps
    # one client from filling the temporary directory (RFC 9110 §15.5.14).
    with wsgi_serve(echo_wsgi.application, limit_spool=2 * 1024 * 1024) as (port, server):
        raw = wsgi_chunked_upload(port, 3 * 1024 * 1024)
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
        assert b"Connection: close\r\n" in raw
        status, _, body = request(port, srv_post(b"after"), "POST")
        assert (status, body) == (200, b"after")


@pytest.mark.parametrize("code, status", [(errno.ENOSPC, 503), (errno.EMFILE, 503),
                                          (errno.EIO, 500)])
def test_wsgi_a_spool_that_cannot_be_written_fails_only_that_request(
        monkeypatch, caplog, code, status):
    # A full disk (or file table) while a chunked body is stored: that request
    # gets its answer, the server keeps serving.
    class FailingSpool(tempfile.SpooledTemporaryFile):
        def write(self, data):
            if self.tell() + len(data) > gateway.SPOOL_BYTES:    # once on disk
                self.failed = True
                raise OSError(code, os.strerror(code))
            return super().write(data)

        def close(self):
            super().close()
            if getattr(self, "failed", False):   # the buffered bytes fail to flush
                raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gateway.tempfile, "SpooledTemporaryFile", FailingSpool)
    with wsgi_serve(echo_wsgi.application) as (port, server):
        raw = wsgi_chunked_upload(port, 2 * 1024 * 1024)
        assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:100]
        status_after, _, body = request(port, srv_post(b"after"), "POST")
        assert (status_after, body) == (200, b"after")
    assert [r.levelname for r in caplog.records if r.name == "gateway"] == ["WARNING"]


@pytest.mark.skipif(os.name != "posix",
                    reason="RLIMIT_FSIZE is POSIX")
def test_wsgi_cli_a_spool_past_the_file_size_limit_is_413(tmp_path):
    # The operating system's own refusal: RLIMIT_FSIZE makes the spool's write
    # fail with EFBIG (Python ignores SIGXFSZ), as a full quota would.
    import resource
    limit = 2 * 1024 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with ops_cli("--wsgi", "echo_wsgi:application", "--port", "0", "--no-access-log",
                 cwd=SRV_HERE, preexec_fn=small_files) as cli:
        port = cli.port()
        raw = wsgi_chunked_upload(port, 3 * 1024 * 1024)
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
        assert request(port, srv_post(b"after"), "POST")[::2] == (200, b"after")
        assert cli.proc.poll() is None


def wsgi_reading_app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", WSGI_TEXT + [("Content-Length", str(len(body)))])
    return [body]


@pytest.mark.parametrize("leave", ["fin", "reset"])
def test_wsgi_a_client_leaving_mid_body_is_not_an_error(caplog, leave):
    # A client leaving is not a server error: nothing above DEBUG, and the
    # access line says it was sent nothing ("-", 0 bytes).
    caplog.set_level(logging.DEBUG)
    with wsgi_serve(wsgi_reading_app) as (port, server):
        sock = connect(port)
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhalf")
        wait_for(lambda: any(conn.body is not None for conn in list(server.connections)))
        if leave == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_for(lambda: any(r.name == "gateway.access" for r in caplog.records))
        assert exchange(port, wsgi_get()).startswith(b"HTTP/1.1 200 OK\r\n")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    access = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert ' "POST /up HTTP/1.1" - 0 ' in access[0], access


def test_wsgi_keep_alive_after_a_partly_read_body_follows_what_is_left_unread():
    # The worker decides on "Connection: close" from what the loop tells it
    # through wsgi.input (how much of the body has not arrived), never from
    # the loop's own parser: RFC 9112 §9.3, up to DRAIN_BYTES left are skipped.
    size = 3 * gateway.DRAIN_BYTES

    def app(environ, start_response):
        wanted = int(environ["QUERY_STRING"])
        got = environ["wsgi.input"].read(wanted)
        start_response("200 OK", WSGI_TEXT + [("Content-Length", str(len(got)))])
        return [b"x" * len(got)]

    with wsgi_serve(app) as (port, server), connect(port) as sock:
        def post(wanted: int) -> tuple:
            head = b"POST /?%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (
                wanted, size)
            def send():
                with contextlib.suppress(OSError):   # a closing server may reset
                    sock.sendall(head + b"b" * size)
            sender = threading.Thread(target=send)
            sender.start()
            status, headers, body = ResponseReader(sock).read_response()
            sender.join(TIMEOUT)
            return status, headers.get(b"connection"), len(body)

        # most of it read: the rest is skipped, the connection stays
        assert post(size - gateway.DRAIN_BYTES // 2) == (
            200, None, size - gateway.DRAIN_BYTES // 2)
        # little of it read and the rest not sent yet: close rather than skip
        assert post(1000) == (200, b"close", 1000)


# -- memory: free heap pages go back to the system ------------------------------


GLIBC = pytest.mark.skipif(gateway.glibc() is None, reason="malloc_trim is glibc's")

MEMORY_FRAGMENTED_HEAP = '''
import gateway
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
blocks = [bytearray(b"x" * 16384) for _ in range(4000)]    # 64 MiB on the heap
kept = blocks[::8]               # one block in eight stays: no page can go back
del blocks                       # ... unless someone trims the heap
before = rss_mib()
gateway.release_memory()
print(before, rss_mib())
'''


@GLIBC
def test_release_memory_gives_a_fragmented_heaps_free_pages_back():
    done = subprocess.run([sys.executable, "-c", MEMORY_FRAGMENTED_HEAP], cwd=SRV_HERE,
                          capture_output=True, text=True, timeout=TIMEOUT)
    before, after = map(int, done.stdout.split())
    assert after < before - 30, (before, after)     # 56 MiB of it was free


def test_both_servers_release_memory_every_so_often(interface, monkeypatch):
    # Under a mixed load RSS crept up with the same live data: each server
    # hands free heap pages back every MEMORY_TRIM_SECONDS, busy or idle.
    calls = []
    monkeypatch.setattr(gateway, "MEMORY_TRIM_SECONDS", 0.05)
    monkeypatch.setattr(gateway, "release_memory", lambda: calls.append(1))
    with running_server(interface, ECHO_APPS[interface], timeout_keep_alive=0.2):
        wait_for(lambda: len(calls) >= 3)


# =============================================================================
# ASGI, complete (issue "ASGI, complete", item 5)
#
# 1. The http scope, key by key, for tricky request-targets (§7 build_scope).
# 2. receive() and send() of an HTTPCycle: streaming, disconnects, misuse.
# 3. Lifespan: ordering, state copies, failures (in-process and CLI), modes.
# 4. ASGI 2 (double-callable) apps.
# 5. WebSocket over raw sockets: handshake, echo, fragments, every close rule,
#    permessage-deflate and keepalive pings.
# 6. The pure WebSocket codec: FrameParser, encode_frame, unmask.
#
# Client frames are built by hand (ws_client_frame) and server frames read by
# WsClient.read_frame(); no WebSocket library is used. Exact bytes are
# compared wherever the server's output is deterministic (date_header=False).
# Names start with asgi_/ws_ so that this part can be pasted into
# test_gateway.py. SPEC ids refer to /work/shared/SPEC-CHECKLIST.md.
# =============================================================================

ASGI_NO_DATE = {"date_header": False}      # makes whole responses exact bytes


def asgi_error_bytes(status: int, message: str) -> bytes:
    """The server's own error response (§4 error_response), with no Date."""
    phrase = {400: "Bad Request", 403: "Forbidden", 426: "Upgrade Required",
              500: "Internal Server Error"}[status]
    body = f"{status} {phrase}: {message}\n".encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nServer: gateway\r\nConnection: close\r\n\r\n%s"
            % (status, phrase.encode(), len(body), body))


def asgi_params(rows: list) -> list:
    """Table rows (id, *values), some wrapped in pytest.param for marks, as params."""
    params = []
    for row in rows:
        marks = ()
        if hasattr(row, "values"):
            row, marks = row.values, row.marks
        params.append(pytest.param(*row[1:], id=row[0], marks=marks))
    return params


def asgi_jsonable(value):
    """A scope as JSON: bytes become latin-1 str, tuples become lists."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {key: asgi_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [asgi_jsonable(item) for item in value]
    return value


def asgi_scope_app(scopes: list):
    """Records each http scope and sends it back as a JSON body."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        scopes.append(scope)
        body = json.dumps(asgi_jsonable(scope)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


@contextlib.contextmanager
def asgi_serving(app, **options):
    """Like running_server("asgi", ...), but yields (server, port) so that a
    test can call server.shutdown() itself (a second call forces the stop)."""
    listener = gateway.make_listener("127.0.0.1", 0)
    server = gateway.ASGIServer(app, listener, gateway.Config(**options))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        yield server, listener.getsockname()[1]
    finally:
        wait_for(lambda: server.stopping is not None)
        server.shutdown()
        thread.join(TIMEOUT)
        listener.close()
        assert not thread.is_alive(), "server did not stop"


def asgi_post_chunked_head(path: bytes = b"/") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" % path)


# =============================================================================
# 1. The http scope (SPEC AH-01..AH-09, A-03, A-04, A-11, A-12)
# =============================================================================

ASGI_SCOPE_KEYS = {"type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
                   "query_string", "root_path", "headers", "client", "server", "state",
                   "extensions"}

# (method, request-target, path, raw_path, query_string)
ASGI_TARGETS = [
    ("GET", b"/caf%C3%A9", "/café", b"/caf%C3%A9", b""),
    ("GET", b"/a%2Fb", "/a/b", b"/a%2Fb", b""),
    ("GET", b"/%E2%82%AC%20x?q=%20x&y", "/€ x", b"/%E2%82%AC%20x", b"q=%20x&y"),
    ("GET", b"/p?a=1?b=2", "/p", b"/p", b"a=1?b=2"),        # split at the first "?"
    ("GET", b"/x?", "/x", b"/x", b""),
    ("GET", b"/sp%25ace", "/sp%ace", b"/sp%25ace", b""),     # decoded once only
    ("DELETE", b"http://example.com/abs?z=1", "/abs", b"/abs", b"z=1"),  # absolute-form
    ("OPTIONS", b"*", "*", b"*", b""),
]


@pytest.mark.parametrize("method, target, path, raw_path, query", ASGI_TARGETS,
                         ids=[row[1].decode() for row in ASGI_TARGETS])
def test_asgi_scope_for_tricky_targets(method, target, path, raw_path, query):
    scopes: list = []
    with running_server("asgi", asgi_scope_app(scopes)) as port:
        with connect(port) as sock:
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\n\r\n" % (method.encode(), target))
            status, _, body = ResponseReader(sock).read_response()
            client_port = sock.getsockname()[1]
    assert status == 200
    scope = scopes[0]
    assert set(scope) == ASGI_SCOPE_KEYS
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.5"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == method
    assert scope["scheme"] == "http"
    assert scope["path"] == path and type(scope["path"]) is str
    assert scope["raw_path"] == raw_path and type(scope["raw_path"]) is bytes
    assert scope["query_string"] == query and type(scope["query_string"]) is bytes
    assert scope["root_path"] == ""
    # RFC 9112 §3.2.2: with absolute-form, the target's authority replaces Host.
    host = b"example.com" if target.startswith(b"http:") else b"t"
    assert scope["headers"] == [[b"host", host]]
    assert list(scope["client"]) == ["127.0.0.1", client_port]
    assert list(scope["server"]) == ["127.0.0.1", port]
    assert scope["state"] == {} and scope["extensions"] == {"http.response.trailers": {}, "http.response.pathsend": {},
                                                            "http.response.early_hint": {},
                                                            "http.response.zerocopysend": {}}
    # ... and the same thing went over the wire as JSON (bytes as latin-1).
    assert json.loads(body) == asgi_jsonable(scope)


def test_asgi_scope_headers_are_lower_case_in_order_with_duplicates():
    scopes: list = []
    raw = (b"GET / HTTP/1.1\r\nHost: t\r\nX-Dup: 1\r\nAccept: a/b\r\nX-DUP: 2\r\n"
           b"X-Mixed-Case:  v w  \r\nX-Latin: \xe9\r\n\r\n")
    with running_server("asgi", asgi_scope_app(scopes)) as port:
        status, _, body = request(port, raw)
    assert status == 200
    expected = [[b"host", b"t"], [b"x-dup", b"1"], [b"accept", b"a/b"], [b"x-dup", b"2"],
                [b"x-mixed-case", b"v w"], [b"x-latin", b"\xe9"]]
    assert scopes[0]["headers"] == expected
    assert all(type(n) is bytes and type(v) is bytes for n, v in scopes[0]["headers"])
    assert json.loads(body)["headers"] == asgi_jsonable(expected)


def test_asgi_scope_http10_and_a_new_scope_per_request():
    scopes: list = []
    with running_server("asgi", asgi_scope_app(scopes)) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            sock.sendall(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
            assert reader.read_response()[0] == 200
            sock.sendall(b"GET /two HTTP/1.0\r\n\r\n")
            assert reader.read_response()[0] == 200
    assert [s["http_version"] for s in scopes] == ["1.1", "1.0"]
    assert [s["path"] for s in scopes] == ["/one", "/two"]
    assert scopes[0] is not scopes[1] and scopes[0]["state"] is not scopes[1]["state"]


def test_asgi_scope_root_path_prefixes_path():
    scopes: list = []
    with running_server("asgi", asgi_scope_app(scopes), root_path="/app") as port:
        status, _, body = request(port, b"GET /x%20y?q=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200
    scope = json.loads(body)
    assert (scope["root_path"], scope["path"], scope["raw_path"], scope["query_string"]) == \
        ("/app", "/app/x y", "/x%20y", "q=1")
    assert scopes[0]["raw_path"] == b"/x%20y"


# One mount-point rule for both adapters (SPEC AH-04, AH-26, W-04). ASGI HTTP
# "Connection Scope": `path` is the whole path, `root_path` included, and
# `raw_path` the bytes sent; PEP 3333 "environ Variables": SCRIPT_NAME + PATH_INFO
# is the whole path. A proxy may strip the mount point or forward it unchanged.
# (request-target, raw_path, ASGI path, WSGI PATH_INFO); root_path is "/api" always.
ROOT_PATH_TARGETS = [
    (b"/x%20y?q=1", b"/x%20y", "/api/x y", "/x y"),          # the proxy stripped it
    (b"/api/x%20y?q=1", b"/api/x%20y", "/api/x y", "/x y"),  # ... or forwarded it
    (b"/api", b"/api", "/api", ""),                          # exactly the root
    (b"/api/", b"/api/", "/api/", "/"),
    (b"/apix", b"/apix", "/api/apix", "/apix"),             # not under "/api"
]


@pytest.mark.parametrize("target, raw_path, path, path_info", ROOT_PATH_TARGETS,
                         ids=[row[0].decode() for row in ROOT_PATH_TARGETS])
@pytest.mark.parametrize("root_path", ["/api", "/api/"])
def test_asgi_scope_and_wsgi_environ_share_the_root_path_rule(interface, root_path, target,
                                                              raw_path, path, path_info):
    raw = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target
    if interface == "wsgi":
        cgi, _, _, _, _ = wsgi_environ(raw, root_path=root_path)
        assert (cgi["SCRIPT_NAME"], cgi["PATH_INFO"]) == ("/api", path_info)
        return
    scopes: list = []
    with running_server("asgi", asgi_scope_app(scopes), root_path=root_path) as port:
        status, _, _ = request(port, raw)
    assert status == 200
    scope = scopes[0]
    assert (scope["root_path"], scope["path"], scope["raw_path"]) == ("/api", path, raw_path)
    assert scope["path"] == scope["root_path"] + path_info    # ASGI "WSGI Compatibility"


# =============================================================================
# 2. receive() and send() (SPEC AH-11, AH-13, AH-19..AH-22, A-07, A-10)
# =============================================================================


def test_asgi_streaming_both_ways_last_event_has_more_body_false():
    events: list = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            event = await receive()
            events.append(event)
            await send({"type": "http.response.body", "body": event["body"],
                        "more_body": event["more_body"]})
            if not event["more_body"]:
                return

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            sock.sendall(asgi_post_chunked_head())
            for number, piece in enumerate((b"abc", b"def")):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                if number == 0:      # SPEC AH-16: the head waits for the first body
                    assert reader.read_head()[0] == 200
                echoed = b""
                while len(echoed) < len(piece):       # comes back before the next
                    echoed += asgi_read_chunk(reader)
                assert echoed == piece
            sock.sendall(b"0\r\n\r\n")
            assert asgi_read_chunk(reader) == b""       # the last-chunk
    assert b"".join(e["body"] for e in events) == b"abcdef"
    assert all(e["type"] == "http.request" for e in events)
    assert [e["more_body"] for e in events[:-1]] == [True] * (len(events) - 1)
    assert events[-1] == {"type": "http.request", "body": b"", "more_body": False}


def asgi_read_chunk(reader: ResponseReader) -> bytes:
    """One chunk of a chunked body; b"" for the last-chunk (its CRLF read too)."""
    while b"\r\n" not in reader.buffer:
        assert reader._fill(), "connection closed mid-chunk"
    line, reader.buffer = reader.buffer.split(b"\r\n", 1)
    size = int(line, 16)
    data = reader.read_exact(size)
    assert reader.read_exact(2) == b"\r\n"
    return data


def test_asgi_get_gives_one_empty_request_event_then_disconnect_after_response():
    events: list = []
    done = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        events.append(await receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        events.append(await receive())      # the response is complete
        events.append(await receive())      # ... and again, at once
        done.set()

    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert ResponseReader(sock).read_response()[::2] == (200, b"ok")
            assert done.wait(TIMEOUT)
    assert events == [{"type": "http.request", "body": b"", "more_body": False},
                      {"type": "http.disconnect"}, {"type": "http.disconnect"}]


def test_asgi_client_closing_mid_body_is_disconnect_and_send_raises():
    events: list = []
    errors: list = []
    got_first, done = threading.Event(), threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            events.append(await receive())
            got_first.set()
            events.append(await receive())      # the client is gone
            events.append(await receive())
            try:
                await send({"type": "http.response.start", "status": 200, "headers": []})
            except Exception as error:
                errors.append(error)
        finally:
            done.set()

    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabcd")
            assert got_first.wait(TIMEOUT)
        assert done.wait(TIMEOUT)
    assert events == [{"type": "http.request", "body": b"abcd", "more_body": True},
                      {"type": "http.disconnect"}, {"type": "http.disconnect"}]
    assert len(errors) == 1 and type(errors[0]) is gateway.ClientDisconnected
    assert isinstance(errors[0], OSError)           # SPEC AH-20


def leave(sock: socket.socket, how: str) -> None:
    """The client goes away: "close" sends a FIN, "reset" an RST (SO_LINGER 0)."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def asgi_leaving_client_app(plan: str, events: list, got_first: threading.Event,
                            gone: threading.Event):
    """An app for a client that leaves mid-body. It answers only after the whole
    body ("reads-first"), sends its start first ("starts-first"), echoes the first
    piece ("echoes"), or keeps sending until send() raises, and returns ("sends")."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        start = {"type": "http.response.start", "status": 200, "headers": []}
        if plan == "starts-first":
            await send(start)
        while True:
            events.append(await receive())
            if events[-1]["type"] == "http.disconnect":
                return
            if plan in ("echoes", "sends"):
                await send(start)
                await send({"type": "http.response.body", "body": events[-1]["body"],
                            "more_body": True})
            got_first.set()
            if plan == "sends":
                await asyncio.get_running_loop().run_in_executor(None, gone.wait, TIMEOUT)
                for _ in range(3):      # the first may still reach the socket
                    try:
                        await send({"type": "http.response.body", "body": b"more",
                                    "more_body": True})
                    except gateway.ClientDisconnected as error:
                        events.append(error)
                        return
                return
    return app


# Policy (gateway.py HTTPCycle.run): "-" when nothing was sent; the app's status
# (and its body bytes) once its head went out. "sends" sends a varying amount.
ASGI_LEAVING = [("reads-first", "close", "- 0"), ("reads-first", "reset", "- 0"),
                ("starts-first", "close", "- 0"), ("starts-first", "reset", "- 0"),
                ("echoes", "close", "200 4"), ("echoes", "reset", "200 4"),
                ("sends", "reset", r"200 \d+")]


@pytest.mark.parametrize("plan, how, access", ASGI_LEAVING,
                         ids=[f"{plan}-{how}" for plan, how, _ in ASGI_LEAVING])
def test_asgi_client_leaving_mid_body_is_no_error_and_logged_as_sent(plan, how, access,
                                                                     caplog):
    caplog.set_level(logging.DEBUG, logger="gateway")
    events: list = []
    got_first, gone = threading.Event(), threading.Event()
    app = asgi_leaving_client_app(plan, events, got_first, gone)
    with asgi_serving(app, access_log_format="%(status)s %(bytes)s") as (server, port):
        sock = connect(port)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabcd")
        assert got_first.wait(TIMEOUT)
        if plan in ("echoes", "sends"):
            reader = ResponseReader(sock)
            assert reader.read_head()[0] == 200
            assert reader.read_exact(len(b"4\r\nabcd\r\n")) == b"4\r\nabcd\r\n"
        leave(sock, how)
        gone.set()
        wait_for(lambda: ops_access_lines(caplog) and not server.connections)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len(ops_access_lines(caplog)) == 1
    assert re.fullmatch(access, ops_access_lines(caplog)[0])
    assert events[0] == {"type": "http.request", "body": b"abcd", "more_body": True}
    if plan == "sends":
        assert type(events[-1]) is gateway.ClientDisconnected
    else:
        assert events[1:] == [{"type": "http.disconnect"}]


@pytest.mark.parametrize("when", ["as-it-fires", "after-it-came"])
def test_asgi_client_resetting_around_its_408_is_no_error(when, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway")
    timed_out = threading.Event()
    next_request = gateway.ASGIConnection.next_request

    async def reset_as_408_fires(self):
        """The real next_request(), but its 408 waits until the client's reset has
        closed the transport: the reset comes just as the 408 is to be written."""
        try:
            return await next_request(self)
        except HTTPError as error:
            if error.status == 408:
                timed_out.set()
                deadline = time.monotonic() + TIMEOUT
                while not self.writer.transport.is_closing() and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
            raise

    if when == "as-it-fires":
        monkeypatch.setattr(gateway.ASGIConnection, "next_request", reset_as_408_fires)
    with asgi_serving(echo_asgi.app, timeout_request_head=0.3) as (server, port):
        sock = connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")          # half a head
        if when == "as-it-fires":
            assert timed_out.wait(TIMEOUT)
        else:
            assert ResponseReader(sock).read_head()[0] == 408
        leave(sock, "reset")
        wait_for(lambda: not server.connections)
        assert request(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    if when == "as-it-fires":
        assert "client left before its 408 answer" in [r.getMessage() for r in caplog.records]


def test_asgi_a_bug_in_the_server_is_still_logged_as_an_internal_error(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="gateway")

    async def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.ASGIConnection, "next_request", broken)
    with asgi_serving(echo_asgi.app) as (server, port):
        assert exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == b""
        wait_for(lambda: app_error_records(caplog))
    assert app_error_records(caplog) == [
        ("gateway", "internal error on a connection", RuntimeError)]


async def asgi_body_first(send):
    await send({"type": "http.response.body", "body": b"x"})


async def asgi_start_twice(send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.start", "status": 200, "headers": []})


async def asgi_str_header(send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [("content-type", "text/plain")]})


async def asgi_str_body(send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": "text"})


async def asgi_unknown_type(send):
    await send({"type": "http.response.bogus"})


def asgi_status(status):
    """A misuse: http.response.start with this status (AH-15, "Response Start")."""
    async def misuse(send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})
    misuse.__name__ = f"asgi_status_{status!r}"
    return misuse


ASGI_MISUSES = [(asgi_body_first, RuntimeError), (asgi_start_twice, RuntimeError),
                (asgi_str_header, TypeError), (asgi_str_body, TypeError),
                (asgi_unknown_type, RuntimeError),
                # AH-15: an int (not a bool: True is an int), and a final status
                (asgi_status(True), TypeError), (asgi_status("200"), TypeError),
                (asgi_status(200.0), TypeError), (asgi_status(None), TypeError),
                (asgi_status(99), ValueError), (asgi_status(100), ValueError),
                (asgi_status(101), ValueError), (asgi_status(103), ValueError),
                (asgi_status(199), ValueError), (asgi_status(600), ValueError),
                (asgi_status(-200), ValueError)]


@pytest.mark.parametrize("misuse, error", ASGI_MISUSES,
                         ids=[row[0].__name__[5:] for row in ASGI_MISUSES])
def test_asgi_send_misuse_raises_in_the_app_and_the_client_gets_500(misuse, error):
    errors: list = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            await misuse(send)
        except Exception as caught:
            errors.append(caught)
            raise

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [type(e) for e in errors] == [error]
    assert data == asgi_error_bytes(500, "the application failed")


def asgi_request_and_close(port: int, raw: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(raw)
        return read_until_closed(sock)


@pytest.mark.parametrize("status", [200, 599, HTTPStatus.NOT_FOUND])
def test_asgi_final_status_is_accepted(status):
    # AH-15: 200-599; an int subclass (HTTPStatus) counts as its value.
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET / HTTP/1.1\r\nHost: t\r\n"
                                            b"Connection: close\r\n\r\n")
    assert data == (b"HTTP/1.1 %d %s\r\ncontent-length: 2\r\nServer: gateway\r\n"
                    b"Connection: close\r\n\r\nok"
                    % (status, gateway.REASONS.get(int(status), b"")))


def test_asgi_send_after_complete_response_is_a_no_op():
    errors: list = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        try:
            await send({"type": "http.response.body", "body": b"EXTRA"})
            await send({"type": "http.response.body", "body": b"MORE", "more_body": True})
        except Exception as error:          # pragma: no cover - the failure case
            errors.append(error)

    one = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nServer: gateway\r\n\r\nok"
    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
                                 b"GET /2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert errors == []
    assert data == one + one.replace(b"Server: gateway\r\n",
                                     b"Server: gateway\r\nConnection: close\r\n")


def test_asgi_app_returning_without_a_response_is_500():
    async def app(scope, receive, send):
        return

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data == asgi_error_bytes(500, "the application sent no response")


ASGI_PARTIAL = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nServer: gateway\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n")


@pytest.mark.parametrize("ending", ["raises", "returns"])
def test_asgi_app_ending_after_start_closes_without_last_chunk(ending):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        if ending == "raises":
            raise RuntimeError("late")

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data == ASGI_PARTIAL          # no "0\r\n\r\n": the client sees it cut


# What an app may raise that is not an Exception; uvicorn answers all of them with a 500.
APP_BASE_EXCEPTIONS = [SystemExit, KeyboardInterrupt, GeneratorExit, asyncio.CancelledError]


async def asgi_answer_ok(send):
    """A whole 200 response with the body "ok"."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def app_error_records(caplog) -> list:
    """(logger, message, exception type) of every record at ERROR or above."""
    return [(r.name, r.getMessage(), r.exc_info and r.exc_info[0])
            for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "after-start"])
@pytest.mark.parametrize("kind", APP_BASE_EXCEPTIONS, ids=lambda kind: kind.__name__)
def test_asgi_app_raising_a_base_exception_is_an_app_error_and_serving_goes_on(
        kind, started, caplog):
    caplog.set_level(logging.INFO, logger="gateway")

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/next":
            await asgi_answer_ok(send)
            return
        if started:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"partial",
                        "more_body": True})
        raise kind()

    with running_server("asgi", app, access_log_format="%(status)s %(bytes)s",
                        **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert request(port, b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")[::2] == (200, b"ok")
    assert data == (ASGI_PARTIAL if started else
                    asgi_error_bytes(500, "the application failed"))
    assert app_error_records(caplog) == [("gateway", "error in ASGI app for GET /", kind)]
    assert ops_access_lines(caplog)[0] == ("200 7" if started else "500 0")


# =============================================================================
# 3. Lifespan (SPEC L-01..L-11, AH-09)
# =============================================================================


def asgi_lifespan_app(record: list, startup=None, held: threading.Event | None = None):
    """Records lifespan messages; `startup` is what it answers to the startup."""
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            record.append(("scope", copy.deepcopy(scope)))
            while True:
                message = await receive()
                record.append(message["type"])
                if message["type"] == "lifespan.startup":
                    if held is not None:
                        loop = asyncio.get_running_loop()
                        await loop.run_in_executor(None, held.wait, TIMEOUT)
                    scope["state"]["ready"] = True
                    scope["state"]["shared"] = []
                    await send(startup or {"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        record.append(("request", scope["path"], copy.deepcopy(scope["state"])))
        scope["state"]["x"] = scope["path"]            # must not leak
        scope["state"]["shared"].append(scope["path"])   # a shallow copy: shared
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def test_asgi_lifespan_startup_completes_before_the_first_request():
    record: list = []
    held = threading.Event()
    try:
        with running_server("asgi", asgi_lifespan_app(record, held=held)) as port:
            with connect(port) as sock:
                # Sent while startup is held: the server must not answer it yet
                # (a bounded wait for something that must not happen).
                sock.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
                sock.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    sock.recv(1)
                sock.settimeout(TIMEOUT)
                held.set()
                assert ResponseReader(sock).read_response()[::2] == (200, b"ok")
    finally:
        held.set()
    assert record[0] == ("scope", {"type": "lifespan", "state": {},
                                   "asgi": {"version": "3.0", "spec_version": "2.0"}})
    assert record[1:3] == ["lifespan.startup",
                           ("request", "/first", {"ready": True, "shared": []})]


def test_asgi_lifespan_state_is_a_shallow_copy_per_request():
    record: list = []
    with running_server("asgi", asgi_lifespan_app(record)) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for path in (b"/a", b"/b"):
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
                assert reader.read_response()[::2] == (200, b"ok")
        requests = [r for r in record if r[0] == "request"]
        # "/a" set state["x"] in its copy; "/b" does not see it. The list is
        # the same object in every copy (shallow), so "/b" sees "/a" in it.
        assert requests == [("request", "/a", {"ready": True, "shared": []}),
                            ("request", "/b", {"ready": True, "shared": ["/a"]})]
        assert "lifespan.shutdown" not in record       # not before shutdown()
    assert record[-1] == "lifespan.shutdown"           # SPEC L-07


def test_asgi_lifespan_startup_failed_raises_lifespan_failure():
    record: list = []
    app = asgi_lifespan_app(record, startup={"type": "lifespan.startup.failed",
                                             "message": "db down"})
    listener = gateway.make_listener("127.0.0.1", 0)
    server = gateway.ASGIServer(app, listener, gateway.Config())
    caught: list = []

    def run():
        try:
            asyncio.run(server.serve())
        except BaseException as error:     # noqa: B902 - reported to the test
            caught.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    listener.close()
    assert not thread.is_alive()
    assert [type(e) for e in caught] == [gateway.LifespanFailure]
    assert str(caught[0]) == "application startup failed: db down"
    assert not any(r[0] == "request" for r in record if isinstance(r, tuple))


ASGI_CLI_FAILED_APP = '''
async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "db down"})
'''

ASGI_CLI_RAISING_APP = '''
async def app(scope, receive, send):
    raise ValueError("no lifespan here")
'''


def asgi_run_cli(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "asgi_cli_app.py").write_text(source)
    here = os.path.dirname(os.path.abspath(gateway.__file__))
    return subprocess.run([sys.executable, os.path.join(here, "gateway.py"), "--asgi",
                           "asgi_cli_app:app", "--port", "0", "--app-dir", str(tmp_path),
                           *args], cwd=here, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_asgi_cli_startup_failed_exits_3_with_the_message(tmp_path):
    result = asgi_run_cli(tmp_path, ASGI_CLI_FAILED_APP)
    assert result.returncode == 3
    assert "gateway: application startup failed: db down\n" in result.stderr


def test_asgi_cli_lifespan_on_with_a_raising_app_exits_3(tmp_path):
    result = asgi_run_cli(tmp_path, ASGI_CLI_RAISING_APP, "--lifespan", "on")
    assert result.returncode == 3
    assert "application startup failed" in result.stderr


# The CLI tests below use the ops_* helpers and apps (section "Operations").
LIFESPAN_CLI_POSIX = pytest.mark.skipif(os.name != "posix",
                                        reason="signals to a child need POSIX")


def lifespan_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lifespan_hung_cli(tmp_path, where: str):
    """gateway.py with ops_apps:hung_start_asgi on a free TCP port or a unix
    socket; returns (cli, a function that connects to it)."""
    ops_write_apps(tmp_path)
    if where == "uds":
        path = str(tmp_path / "hung.sock")
        args = ("--uds", path)

        def connect_to() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(TIMEOUT)
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
            return sock
    else:
        port = lifespan_free_port()
        args = ("--port", str(port))

        def connect_to() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    cli = OpsCLIProcess("--asgi", "ops_apps:hung_start_asgi", "--app-dir", str(tmp_path),
                        *args, cwd=tmp_path)
    return cli, connect_to


@LIFESPAN_CLI_POSIX
@pytest.mark.parametrize("where", ["tcp", "uds"])
def test_asgi_cli_connection_during_a_hung_startup_is_refused(tmp_path, where):
    """ASGI Lifespan "Startup Complete": nothing is accepted before it. A
    single process binds, and listen()s only once startup is complete, so a
    client is refused at once instead of waiting in the backlog forever."""
    if where == "uds" and not hasattr(socket, "AF_UNIX"):
        pytest.skip("no AF_UNIX sockets")
    cli, connect_to = lifespan_hung_cli(tmp_path, where)
    try:
        cli.wait_line(lambda line: line.startswith("ops-starting "))
        with pytest.raises(ConnectionRefusedError):
            connect_to().close()
        assert not any(line.startswith("gateway: serving") for line in cli.seen), cli.seen
    finally:
        cli.close()


@LIFESPAN_CLI_POSIX
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_asgi_cli_signal_during_a_hung_startup_stops_it(tmp_path, signum):
    """A startup that never completes is ended by SIGTERM or Ctrl+C: exit 0,
    one line that says so, no traceback, and no lifespan.shutdown (ASGI
    Lifespan "Shutdown" follows a completed startup only)."""
    cli, _ = lifespan_hung_cli(tmp_path, "tcp")
    try:
        cli.wait_line(lambda line: line.startswith("ops-starting "))
        cli.proc.send_signal(signum)
        try:
            code = cli.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"exit {code}; stderr: {''.join(cli.seen)}"
        stderr = cli.rest()
        assert ("gateway: shutdown requested during the application startup: "
                "stopping without serving\n") in stderr, stderr
        assert ops_last_line(stderr) == "gateway: stopped", stderr
        assert "ops-then-got" not in stderr, stderr
        assert "gateway: serving" not in stderr, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        cli.close()


@LIFESPAN_CLI_POSIX
def test_asgi_cli_shutdown_failed_exits_4_with_the_message(tmp_path):
    """ASGI Lifespan "Shutdown Failed": log the message, exit non-zero (4)."""
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:bad_shutdown_asgi", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        cli.port()          # logged once the startup is complete
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 4
        stderr = cli.rest()
    assert "ops-shutting-down" in stderr, stderr
    assert "gateway: application shutdown failed: ops-cannot-flush\n" in stderr, stderr
    assert "Traceback" not in stderr, stderr


@LIFESPAN_CLI_POSIX
def test_asgi_cli_shutdown_wait_is_timeout_graceful_shutdown(tmp_path):
    """ASGI Lifespan "Shutdown Complete" is waited for --timeout-graceful-shutdown
    seconds; an app that never sends it is a failed shutdown: exit 4."""
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:bad_shutdown_asgi", "--port", "0",
                 "--timeout-graceful-shutdown", "0.5", "--app-dir", str(tmp_path),
                 cwd=tmp_path, env={"OPS_SHUTDOWN": "hang"}) as cli:
        cli.port()          # logged once the startup is complete
        sent = time.monotonic()
        cli.proc.send_signal(signal.SIGTERM)
        try:
            code = cli.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - sent
        assert code == 4, f"exit {code}; stderr: {''.join(cli.seen)}"
        stderr = cli.rest()
    assert 0.5 <= elapsed < 5.0, elapsed
    assert "ops-shutting-down" in stderr, stderr
    assert ("gateway: application shutdown did not complete within 0.5 s "
            "(--timeout-graceful-shutdown)\n") in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_asgi_lifespan_auto_with_a_raising_app_keeps_serving(caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    types: list = []

    async def app(scope, receive, send):
        types.append(scope["type"])
        if scope["type"] == "lifespan":
            raise ValueError("no lifespan here")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with running_server("asgi", app) as port:
        assert request(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[::2] == (200, b"ok")
    assert types == ["lifespan", "http"]         # and never called for shutdown
    assert any(r.name == "gateway" and r.levelno == logging.INFO
               and "unsupported" in r.getMessage() for r in caplog.records)


def test_asgi_lifespan_off_never_calls_the_app_with_lifespan():
    types: list = []

    async def app(scope, receive, send):
        types.append(scope["type"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    with running_server("asgi", app, lifespan="off") as port:
        assert request(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 204
    assert types == ["http"]


def test_asgi_lifespan_out_of_order_message_raises():
    errors: list = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            try:
                await send({"type": "lifespan.shutdown.complete"})   # not its turn
            except RuntimeError as error:
                errors.append(error)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    with running_server("asgi", app) as port:
        assert request(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 204
    assert [type(e) for e in errors] == [RuntimeError]


# =============================================================================
# 4. ASGI 2 apps (SPEC A-02)
# =============================================================================


class AsgiTwoApp:
    """An ASGI 2 app: instantiated with the scope, then called."""

    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        if self.scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b"asgi2 " + self.scope["path"].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def asgi_two_factory(scope):
    """A plain (not async) function returning the instance: also ASGI 2."""
    return AsgiTwoApp(scope)


@pytest.mark.parametrize("app, interface", [(AsgiTwoApp, "auto"), (AsgiTwoApp, "asgi2"),
                                            (asgi_two_factory, "auto")],
                         ids=["class-auto", "class-asgi2", "function-auto"])
def test_asgi2_double_callable_is_served(app, interface):
    with asgi_serving(app, interface=interface) as (_, port):
        assert request(port, b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n")[::2] == (200, b"asgi2 /p")


def test_asgi3_app_detection():
    async def single(scope, receive, send):
        pass

    class Instance:
        async def __call__(self, scope, receive, send):
            pass

    instance = Instance()
    assert gateway.asgi3_app(single) is single
    assert gateway.asgi3_app(instance) is instance
    assert gateway.asgi3_app(AsgiTwoApp) is not AsgiTwoApp        # wrapped
    assert gateway.asgi3_app(asgi_two_factory) is not asgi_two_factory
    assert gateway.asgi3_app(single, "asgi2") is not single


# =============================================================================
# 5. WebSocket over raw sockets (SPEC AW-*, WS-*, E-08)
# =============================================================================

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="              # RFC 6455 §1.3
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
WS_MASK = b"\x37\xfa\x21\x3d"                     # RFC 6455 §5.7


def ws_client_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv1: bool = False,
                    mask: bool = True, rsv23: int = 0, length: bytes | None = None) -> bytes:
    """One client frame; `length` overrides the length encoding (bytes after byte 1's
    7 bits are given whole, e.g. b"\\x7e\\x00\\x05" for a non-minimal 5)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | rsv23 | opcode
    size = len(payload)
    if length is None:
        if size < 126:
            length = bytes([size])
        elif size < 1 << 16:
            length = b"\x7e" + size.to_bytes(2, "big")
        else:
            length = b"\x7f" + size.to_bytes(8, "big")
    if not mask:
        return bytes([first]) + length + payload
    masked = bytes(b ^ WS_MASK[i % 4] for i, b in enumerate(payload))
    return bytes([first, length[0] | 0x80]) + length[1:] + WS_MASK + masked


def ws_close_frame(code: int, reason: bytes = b"") -> bytes:
    return ws_client_frame(8, code.to_bytes(2, "big") + reason)


def ws_handshake(extra: bytes = b"", path: bytes = b"/") -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
            % (path, WS_KEY, extra))


def ws_101(*lines: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                         b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + WS_ACCEPT,
                         *lines]) + b"\r\n\r\n"


class WsClient:
    """The client end of one WebSocket: reads the 101 head and server frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            piece = self.sock.recv(65536)
            assert piece, f"connection closed; have {self.buffer[:80]!r}"
            self.buffer += piece

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            piece = self.sock.recv(65536)
            assert piece, f"connection closed mid-head: {self.buffer!r}"
            self.buffer += piece
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def read_frame(self) -> tuple[int, int, bytes]:
        """(byte 0, opcode, payload) of one server frame, checked per WS-11/WS-26."""
        self._need(2)
        first, second = self.buffer[0], self.buffer[1]
        assert not second & 0x80, "a server frame must not be masked"
        size, start = second & 0x7F, 2
        if size == 126:
            self._need(4)
            size, start = int.from_bytes(self.buffer[2:4], "big"), 4
            assert size >= 126, "non-minimal 16-bit length"
        elif size == 127:
            self._need(10)
            size, start = int.from_bytes(self.buffer[2:10], "big"), 10
            assert size >= 1 << 16, "non-minimal 64-bit length"
        self._need(start + size)
        payload = self.buffer[start:start + size]
        self.buffer = self.buffer[start + size:]
        return first, first & 0x0F, payload

    def read_close(self) -> tuple[int | None, bytes]:
        """The next frame must be a final Close: (code or None, reason bytes)."""
        first, opcode, payload = self.read_frame()
        assert (first, opcode) == (0x88, 8), (hex(first), payload)
        if not payload:
            return None, b""
        reason = payload[2:]
        reason.decode("utf-8")                   # a valid reason, at most 123 bytes
        assert len(reason) <= 123
        return int.from_bytes(payload[:2], "big"), reason

    def assert_eof(self) -> None:
        assert self.buffer == b"", f"unexpected bytes {self.buffer[:80]!r}"
        try:
            assert self.sock.recv(65536) == b""
        except ConnectionResetError:
            pass                                  # closed, too


@contextlib.contextmanager
def ws_connection(port: int, extra: bytes = b"", head: bytes | None = None):
    """Open a socket, send the handshake and check the 101 head (exact, if given)."""
    with connect(port) as sock:
        sock.sendall(ws_handshake(extra))
        client = WsClient(sock)
        got = client.read_head()
        if head is not None:
            assert got == head
        else:
            assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), got
        yield client


class WsRecorder:
    """An ASGI 3 app (an instance with an async __call__) that accepts with
    `accept`, echoes every message and records every event it receives."""

    def __init__(self, accept: dict | None = None) -> None:
        self.accept = accept or {}
        self.events: list = []
        self.scopes: list = []
        self.errors: list = []
        self.done = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return
        self.scopes.append(scope)
        try:
            self.events.append(await receive())
            await send({"type": "websocket.accept", **self.accept})
            while True:
                event = await receive()
                self.events.append(event)
                if event["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": event.get("text"),
                            "bytes": event.get("bytes")})
        except Exception as error:
            self.errors.append(error)
            raise
        finally:
            self.done.set()

    def messages(self) -> list:
        """The websocket.receive events as ("text", str) / ("bytes", bytes)."""
        out = []
        for event in self.events:
            if event["type"] == "websocket.receive":
                assert set(event) <= {"type", "text", "bytes"}
                assert (event.get("text") is None) != (event.get("bytes") is None)
                out.append(("text", event["text"]) if event.get("text") is not None
                           else ("bytes", event["bytes"]))
        return out

    def disconnect(self) -> dict:
        assert self.done.wait(TIMEOUT), "the app did not finish"
        assert self.errors == []
        assert self.events[-1]["type"] == "websocket.disconnect"
        return self.events[-1]


# -- handshake ------------------------------------------------------------------


def test_ws_handshake_101_is_exact_and_the_scope_is_complete():
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with ws_connection(port, b"Origin: http://example.com\r\n", head=ws_101()) as ws:
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")
            ws.assert_eof()
        assert app.disconnect() == {"type": "websocket.disconnect", "code": 1000,
                                    "reason": ""}
    scope = app.scopes[0]
    assert set(scope) == ASGI_SCOPE_KEYS | {"subprotocols"}
    assert (scope["type"], scope["scheme"], scope["http_version"]) == ("websocket", "ws", "1.1")
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.5"}
    assert scope["subprotocols"] == []
    assert scope["extensions"] == {"websocket.http.response": {}}
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/", b"/", b"")
    assert [b"origin", b"http://example.com"] in scope["headers"]
    assert app.events[0] == {"type": "websocket.connect"}


def test_ws_subprotocol_echoed_only_when_picked_and_extra_headers():
    offered = b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    picked = WsRecorder({"subprotocol": "superchat", "headers": [(b"x-extra", b"1")]})
    with running_server("asgi", picked) as port:
        head = ws_101(b"Sec-WebSocket-Protocol: superchat", b"x-extra: 1")
        with ws_connection(port, offered, head=head) as ws:
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")
    assert picked.scopes[0]["subprotocols"] == ["chat", "superchat"]
    not_picked = WsRecorder()
    with running_server("asgi", not_picked) as port:
        with ws_connection(port, offered, head=ws_101()) as ws:
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")


def test_ws_subprotocols_keep_their_case():
    app = WsRecorder({"subprotocol": "SuperChat"})
    with running_server("asgi", app) as port:
        with ws_connection(port, b"Sec-WebSocket-Protocol: Chat, SuperChat\r\n") as ws:
            ws.sock.sendall(ws_close_frame(1000))
            ws.read_close()
    assert app.scopes[0]["subprotocols"] == ["Chat", "SuperChat"]


def test_ws_accepting_an_unoffered_subprotocol_raises():
    app = WsRecorder({"subprotocol": "other"})
    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(ws_handshake(b"Sec-WebSocket-Protocol: chat\r\n"))
            assert not WsClient(sock).read_head().startswith(b"HTTP/1.1 101")
        assert app.done.wait(TIMEOUT)
    assert [type(e) for e in app.errors] == [RuntimeError]


def test_ws_early_frames_after_the_handshake_are_kept():
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(ws_handshake() + ws_client_frame(1, b"early"))   # SPEC WS-08
            ws = WsClient(sock)
            assert ws.read_head() == ws_101()
            assert ws.read_frame() == (0x81, 1, b"early")


WS_H = b"GET / HTTP/1.1\r\nHost: t\r\n"
WS_UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
WS_KEY_LINE = b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
WS_V13 = b"Sec-WebSocket-Version: 13\r\n"

WS_BAD_HANDSHAKES = [
    ("no-key", WS_H + WS_UPGRADE + WS_V13 + b"\r\n", 400),
    ("short-key", WS_H + WS_UPGRADE + WS_V13 + b"Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4P\r\n\r\n", 400),
    ("key-not-base64", WS_H + WS_UPGRADE + WS_V13 + b"Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n\r\n", 400),
    ("two-keys", WS_H + WS_UPGRADE + WS_V13 + WS_KEY_LINE + WS_KEY_LINE + b"\r\n", 400),
    ("post", WS_H.replace(b"GET", b"POST") + WS_UPGRADE + WS_V13 + WS_KEY_LINE
     + b"Content-Length: 0\r\n\r\n", 400),
    ("no-connection-upgrade", WS_H + b"Upgrade: websocket\r\n" + WS_V13 + WS_KEY_LINE
     + b"\r\n", 400),
    ("connection-keep-alive-only", WS_H + b"Upgrade: websocket\r\nConnection: keep-alive\r\n"
     + WS_V13 + WS_KEY_LINE + b"\r\n", 400),
    ("no-host", b"GET / HTTP/1.1\r\n" + WS_UPGRADE + WS_V13 + WS_KEY_LINE + b"\r\n", 400),
    pytest.param("two-versions", WS_H + WS_UPGRADE + WS_V13 + WS_V13 + WS_KEY_LINE + b"\r\n",
                 400),
]


@pytest.mark.parametrize("raw, status", asgi_params(WS_BAD_HANDSHAKES))
def test_ws_bad_handshake_is_an_http_error(raw, status):
    app = WsRecorder()
    with running_server("asgi", app) as port:
        data = asgi_request_and_close(port, raw)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n")[0] + b"\r\n"
    assert app.scopes == []                  # the app never saw it


def test_ws_version_8_is_426():
    raw = WS_H + WS_UPGRADE + b"Sec-WebSocket-Version: 8\r\n" + WS_KEY_LINE + b"\r\n"
    with running_server("asgi", WsRecorder()) as port:
        data = asgi_request_and_close(port, raw)
    assert data.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")


def test_ws_version_8_426_names_version_13():
    raw = WS_H + WS_UPGRADE + b"Sec-WebSocket-Version: 8\r\n" + WS_KEY_LINE + b"\r\n"
    with running_server("asgi", WsRecorder()) as port:
        head = asgi_request_and_close(port, raw).split(b"\r\n\r\n")[0].split(b"\r\n")
    assert b"Sec-WebSocket-Version: 13" in head
    assert b"Upgrade: websocket" in head


def test_ws_connection_list_with_upgrade_member_is_accepted():
    raw = (WS_H + b"Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n" + WS_V13
           + WS_KEY_LINE + b"\r\n")
    with running_server("asgi", WsRecorder()) as port:
        with connect(port) as sock:
            sock.sendall(raw)
            assert WsClient(sock).read_head() == ws_101()


def test_ws_upgrade_on_http10_is_ignored_rfc9110_7_8(interface):
    """RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored (SPEC H1-40, WS-01):
    a complete WebSocket handshake in all but the version is served as plain HTTP."""
    raw = (b"GET /chat HTTP/1.0\r\nHost: t\r\n" + WS_UPGRADE + WS_KEY_LINE + WS_V13
           + b"\r\n")
    if interface == "wsgi":
        cgi, _, _, _, _ = wsgi_environ(raw)
        assert (cgi["SERVER_PROTOCOL"], cgi["PATH_INFO"]) == ("HTTP/1.0", "/chat")
        assert cgi["HTTP_UPGRADE"] == "websocket"
        return
    scopes: list = []
    with running_server("asgi", asgi_scope_app(scopes)) as port:
        data = asgi_request_and_close(port, raw)      # HTTP/1.0: closed after one
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:80]
    assert b"\r\nUpgrade:" not in data.split(b"\r\n\r\n")[0]
    assert [(s["type"], s["http_version"], s["path"]) for s in scopes] == \
        [("http", "1.0", "/chat")]
    assert [b"upgrade", b"websocket"] in scopes[0]["headers"]   # the app may still look


def ws_refusing_app(how: str, errors: list):
    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        assert await receive() == {"type": "websocket.connect"}
        try:
            await send({"type": "websocket.send", "text": "too early"})    # SPEC AW-08
        except RuntimeError as error:
            errors.append(error)
        if how == "close":
            await send({"type": "websocket.close", "code": 1000})
        elif how == "raise":
            raise ValueError("refused")
    return app


@pytest.mark.parametrize("how, status", [("close", 403), ("return", 403), ("raise", 500)])
def test_ws_refused_before_accept_is_http(how, status):
    errors: list = []
    with running_server("asgi", ws_refusing_app(how, errors), **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, ws_handshake())
    assert data == asgi_error_bytes(status, "WebSocket refused")
    assert [type(e) for e in errors] == [RuntimeError]


def test_ws_denial_response_is_sent_exactly():
    errors: list = []

    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "websocket.http.response.body", "body": b"den",
                    "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"ied"})
        try:
            await send({"type": "websocket.accept"})
        except Exception as error:
            errors.append(error)

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, ws_handshake())
    assert data == (b"HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\n"
                    b"Server: gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                    b"\r\n3\r\nden\r\n3\r\nied\r\n0\r\n\r\n")
    assert len(errors) == 1 and isinstance(errors[0], (RuntimeError, OSError))   # SPEC E-08


@pytest.mark.parametrize("status", [101, 600, True, "401"])
def test_ws_denial_status_is_checked_as_for_http(status):
    # ASGI "WebSocket Denial Response": websocket.http.response.start is an
    # http.response.start; its status gets the same check (an int, 200-599).
    errors: list = []

    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        await receive()
        try:
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": []})
        except (TypeError, ValueError) as error:
            errors.append(error)
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": []})
            await send({"type": "websocket.http.response.body", "body": b""})

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        data = asgi_request_and_close(port, ws_handshake())
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n"), data
    assert len(errors) == 1


# -- messages -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_ws_echo_at_length_boundaries(kind, size):
    app = WsRecorder()
    payload = bytes(i % 26 + 97 for i in range(size))
    opcode = 1 if kind == "text" else 2
    with running_server("asgi", app) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(ws_client_frame(opcode, payload))
            assert ws.read_frame() == (0x80 | opcode, opcode, payload)
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")
            ws.assert_eof()
        app.disconnect()
    value = payload.decode() if kind == "text" else payload
    assert app.messages() == [(kind, value)]


def test_ws_fragments_with_a_ping_between_them():
    app = WsRecorder()
    frames = (ws_client_frame(1, b"Hel", fin=False) + ws_client_frame(9, b"p1")
              + ws_client_frame(0, b"lo, ", fin=False) + ws_client_frame(0, b"World"))
    with running_server("asgi", app) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(frames)
            assert ws.read_frame() == (0x8A, 10, b"p1")        # the pong, same payload
            assert ws.read_frame() == (0x81, 1, b"Hello, World")
            ws.sock.sendall(ws_client_frame(10, b"unsolicited") + ws_close_frame(1000, b"bye"))
            assert ws.read_close() == (1000, b"")
            ws.assert_eof()
        assert app.disconnect() == {"type": "websocket.disconnect", "code": 1000,
                                    "reason": "bye"}
    assert app.messages() == [("text", "Hello, World")]


def test_ws_utf8_split_across_fragments_is_delivered():
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(ws_client_frame(1, b"caf\xc3", fin=False)
                            + ws_client_frame(0, b"\xa9"))
            assert ws.read_frame() == (0x81, 1, "café".encode())
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")
    assert app.messages() == [("text", "café")]


# -- closing --------------------------------------------------------------------

# (id, frames, the Close payload the server echoes, app's disconnect (code, reason))
WS_CLIENT_CLOSES = [
    ("1000-bye", ws_close_frame(1000, b"bye"), b"\x03\xe8", (1000, "bye")),
    ("empty", ws_client_frame(8, b""), b"", (1005, "")),
    ("3000", ws_close_frame(3000, b"ok"), b"\x0b\xb8", (3000, "ok")),
    ("4999", ws_close_frame(4999), b"\x13\x87", (4999, "")),
    ("1014-utf8", ws_close_frame(1014, "é".encode()), b"\x03\xf6", (1014, "é")),
]


@pytest.mark.parametrize("frames, echoed, disconnect", asgi_params(WS_CLIENT_CLOSES))
def test_ws_client_close_is_echoed(frames, echoed, disconnect):
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(frames)
            assert ws.read_frame() == (0x88, 8, echoed)     # SPEC WS-23
            ws.assert_eof()
        assert app.disconnect() == {"type": "websocket.disconnect",
                                    "code": disconnect[0], "reason": disconnect[1]}


# (id, frames, the code the server closes with, Config options)
WS_FAILURES = [
    ("close-1-byte", ws_client_frame(8, b"\x03"), 1002, {}),
    ("close-1005", ws_close_frame(1005), 1002, {}),
    ("close-1006", ws_close_frame(1006), 1002, {}),
    ("close-1015", ws_close_frame(1015), 1002, {}),
    ("close-1004", ws_close_frame(1004), 1002, {}),
    ("close-999", ws_close_frame(999), 1002, {}),
    ("close-2000", ws_close_frame(2000), 1002, {}),
    ("close-5000", ws_close_frame(5000), 1002, {}),
    ("close-bad-utf8", ws_close_frame(1000, b"\xff"), 1007, {}),
    ("text-bad-utf8", ws_client_frame(1, b"ok\xff"), 1007, {}),
    ("text-surrogate", ws_client_frame(1, b"\xed\xa0\x80"), 1007, {}),
    ("text-overlong", ws_client_frame(1, b"\xc0\x80"), 1007, {}),
    ("text-bad-utf8-split", ws_client_frame(1, b"caf\xc3", fin=False)
     + ws_client_frame(0, b"\x28"), 1007, {}),
    ("unmasked", ws_client_frame(1, b"hi", mask=False), 1002, {}),
    ("rsv1-without-deflate", ws_client_frame(1, b"hi", rsv1=True), 1002, {}),
    ("rsv2", ws_client_frame(1, b"hi", rsv23=0x20), 1002, {}),
    ("rsv3", ws_client_frame(2, b"hi", rsv23=0x10), 1002, {}),
    ("opcode-3", ws_client_frame(3, b"hi"), 1002, {}),
    ("opcode-11", ws_client_frame(11, b"hi"), 1002, {}),
    ("ping-126", ws_client_frame(9, b"p" * 126), 1002, {}),
    ("close-126", ws_client_frame(8, b"\x03\xe8" + b"r" * 124), 1002, {}),
    ("fragmented-ping", ws_client_frame(9, b"p", fin=False), 1002, {}),
    ("continuation-first", ws_client_frame(0, b"hi"), 1002, {}),
    ("text-inside-fragments", ws_client_frame(1, b"a", fin=False)
     + ws_client_frame(1, b"b"), 1002, {}),
    ("length-top-bit", ws_client_frame(2, b"", length=b"\x7f\x80" + bytes(7)), 1002, {}),
    ("oversize", ws_client_frame(2, b"x" * 1001), 1009, {"ws_max_size": 1000}),
    ("oversize-fragments", ws_client_frame(2, b"x" * 600, fin=False)
     + ws_client_frame(0, b"x" * 600), 1009, {"ws_max_size": 1000}),
    pytest.param("non-minimal-length", ws_client_frame(2, b"hello", length=b"\x7e\x00\x05"),
                 1002, {}),
]


@pytest.mark.parametrize("frames, code, options", asgi_params(WS_FAILURES))
def test_ws_protocol_violation_fails_the_connection(frames, code, options):
    app = WsRecorder()
    with running_server("asgi", app, **options) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(frames)                  # one send: all of it is read
            assert ws.read_close()[0] == code        # the first frame: no echo
            ws.assert_eof()
        assert app.disconnect()["code"] == code       # SPEC AW-13 (DECIDE)
    assert app.messages() == []


def test_ws_max_size_itself_is_accepted():
    app = WsRecorder()
    with running_server("asgi", app, ws_max_size=1000) as port:
        with ws_connection(port) as ws:
            ws.sock.sendall(ws_client_frame(2, b"y" * 500, fin=False)
                            + ws_client_frame(0, b"y" * 500))
            assert ws.read_frame() == (0x82, 2, b"y" * 1000)
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")


def ws_closing_app(close: dict | None, errors: list, events: list, done: threading.Event,
                   end: str = "return"):
    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        try:
            await receive()
            await send({"type": "websocket.accept"})
            if end == "raise":
                raise ValueError("app failed")
            if close is None:
                return
            await send(close)
            try:
                await send({"type": "websocket.send", "text": "after close"})
            except Exception as error:
                errors.append(error)
            events.append(await receive())
            events.append(await receive())        # the disconnect, again
        finally:
            done.set()
    return app


def test_ws_app_close_sends_that_close_frame_then_send_raises():
    errors, events, done = [], [], threading.Event()
    app = ws_closing_app({"type": "websocket.close", "code": 4001, "reason": "x"},
                         errors, events, done)
    with running_server("asgi", app) as port:
        with ws_connection(port) as ws:
            assert ws.read_frame() == (0x88, 8, b"\x0f\xa1x")
            ws.sock.sendall(ws_close_frame(4001, b"x"))
            ws.assert_eof()
        assert done.wait(TIMEOUT)
    assert len(errors) == 1 and type(errors[0]) is gateway.ClientDisconnected   # SPEC AW-14
    assert events == [{"type": "websocket.disconnect", "code": 4001, "reason": "x"}] * 2


@pytest.mark.parametrize("end, payload", [("return", b"\x03\xe8"), ("raise", b"\x03\xf3")])
def test_ws_app_ending_after_accept_closes_1000_or_1011(end, payload):
    done = threading.Event()
    with running_server("asgi", ws_closing_app(None, [], [], done, end)) as port:
        with ws_connection(port) as ws:
            assert ws.read_frame() == (0x88, 8, payload)         # SPEC AW-16
            ws.sock.sendall(ws_client_frame(8, payload))
            ws.assert_eof()
        assert done.wait(TIMEOUT)


@pytest.mark.parametrize("accepted", [False, True], ids=["before-accept", "after-accept"])
@pytest.mark.parametrize("kind", APP_BASE_EXCEPTIONS, ids=lambda kind: kind.__name__)
def test_ws_app_raising_a_base_exception_is_500_or_1011_and_serving_goes_on(
        kind, accepted, caplog):
    caplog.set_level(logging.INFO, logger="gateway")

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await asgi_answer_ok(send)
            return
        if scope["type"] != "websocket":
            return
        await receive()
        if accepted:
            await send({"type": "websocket.accept"})
        raise kind()

    with running_server("asgi", app, **ASGI_NO_DATE) as port:
        if accepted:
            with ws_connection(port) as ws:
                assert ws.read_frame() == (0x88, 8, b"\x03\xf3")        # 1011
                ws.sock.sendall(ws_close_frame(1011))
                ws.assert_eof()
        else:
            data = asgi_request_and_close(port, ws_handshake())
            assert data == asgi_error_bytes(500, "WebSocket refused")
        assert request(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")[::2] == (200, b"ok")
    assert app_error_records(caplog) == [("gateway", "error in ASGI websocket app", kind)]


def test_ws_client_dropping_tcp_is_1006():
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with ws_connection(port):
            pass
        assert app.disconnect() == {"type": "websocket.disconnect", "code": 1006,
                                    "reason": ""}


def test_ws_server_shutdown_closes_with_1001():
    app = WsRecorder()
    with asgi_serving(app, timeout_graceful_shutdown=1.0) as (server, port):
        with ws_connection(port) as ws:
            ws.sock.sendall(ws_client_frame(1, b"up"))
            assert ws.read_frame() == (0x81, 1, b"up")
            server.shutdown()
            assert ws.read_close()[0] == 1001


# -- permessage-deflate (RFC 7692) ------------------------------------------------

WS_DEFLATE_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def ws_deflate(compressor, data: bytes) -> bytes:
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_ws_permessage_deflate_both_ways():
    app = WsRecorder()
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)     # context kept: takeover
    decompressor = zlib.decompressobj(-15)
    head = ws_101(b"Sec-WebSocket-Extensions: permessage-deflate")
    with running_server("asgi", app) as port:
        with ws_connection(port, WS_DEFLATE_OFFER, head=head) as ws:
            ws.sock.sendall(ws_client_frame(1, ws_deflate(compressor, b"Hello"), rsv1=True))
            # RFC 7692 §7.2.3.1: "Hello" compresses to f2 48 cd c9 c9 07 00.
            assert ws.read_frame() == (0xC1, 1, b"\xf2\x48\xcd\xc9\xc9\x07\x00")
            assert decompressor.decompress(b"\xf2\x48\xcd\xc9\xc9\x07\x00"
                                           b"\x00\x00\xff\xff") == b"Hello"
            big = b"Hello again, " * 500
            ws.sock.sendall(ws_client_frame(2, ws_deflate(compressor, big), rsv1=True))
            first, opcode, payload = ws.read_frame()
            assert (first, opcode) == (0xC2, 2) and len(payload) < 200
            assert decompressor.decompress(payload + b"\x00\x00\xff\xff") == big
            ws.sock.sendall(ws_client_frame(1, b"plain"))   # RSV1 clear: not compressed
            first, opcode, payload = ws.read_frame()
            assert decompressor.decompress(payload + b"\x00\x00\xff\xff") == b"plain"
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")
    assert app.messages() == [("text", "Hello"), ("bytes", big), ("text", "plain")]


def test_ws_deflate_bomb_is_1009():
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = ws_deflate(compressor, bytes(100_000))      # ~100 bytes on the wire
    app = WsRecorder()
    with running_server("asgi", app, ws_max_size=1000) as port:
        with ws_connection(port, WS_DEFLATE_OFFER) as ws:
            ws.sock.sendall(ws_client_frame(2, bomb, rsv1=True))
            assert ws.read_close()[0] == 1009


def test_ws_corrupt_deflate_data_is_1007_then_eof():
    """RSV1 set on bytes that are not DEFLATE data (07: a final block of the
    reserved type 3): the server fails the connection with 1007 and closes."""
    app = WsRecorder()
    with running_server("asgi", app) as port:
        with ws_connection(port, WS_DEFLATE_OFFER) as ws:
            ws.sock.sendall(ws_client_frame(2, b"\x07\xff\xff\xff\xff", rsv1=True))
            assert ws.read_close() == (1007, b"invalid compressed data")
            ws.assert_eof()
        assert app.disconnect()["code"] == 1007


def test_ws_unexpected_error_reading_frames_ends_only_that_connection(monkeypatch, caplog):
    """A bug of ours while reading frames (here: a planted one) must not leave
    the client waiting: 1011 and EOF for it; other connections carry on."""
    real = gateway.FrameParser._on_frame

    def on_frame(self, first, opcode, payload):
        if payload == b"boom":
            raise RuntimeError("a planted bug")
        return real(self, first, opcode, payload)
    monkeypatch.setattr(gateway.FrameParser, "_on_frame", on_frame)
    with running_server("asgi", WsRecorder()) as port:
        with ws_connection(port) as other, ws_connection(port) as ws:
            ws.sock.sendall(ws_client_frame(1, b"boom"))
            assert ws.read_close() == (1011, b"internal error")
            ws.assert_eof()
            other.sock.sendall(ws_client_frame(1, b"still here"))
            assert other.read_frame() == (0x81, 1, b"still here")
    assert "a planted bug" in caplog.text


def test_ws_rsv1_on_a_continuation_is_1002_even_with_deflate():
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = ws_deflate(compressor, b"Hello")
    with running_server("asgi", WsRecorder()) as port:
        with ws_connection(port, WS_DEFLATE_OFFER) as ws:
            ws.sock.sendall(ws_client_frame(1, data[:3], fin=False, rsv1=True)
                            + ws_client_frame(0, data[3:], rsv1=True))
            assert ws.read_close()[0] == 1002


@pytest.mark.parametrize("extra, options", [(b"", {}), (WS_DEFLATE_OFFER,
                                                      {"ws_per_message_deflate": False})],
                         ids=["not-offered", "disabled"])
def test_ws_no_deflate_when_not_offered_or_disabled(extra, options):
    app = WsRecorder()
    with running_server("asgi", app, **options) as port:
        with ws_connection(port, extra, head=ws_101()) as ws:
            ws.sock.sendall(ws_client_frame(1, b"Hello"))
            assert ws.read_frame() == (0x81, 1, b"Hello")      # no RSV1
            ws.sock.sendall(ws_close_frame(1000))
            assert ws.read_close() == (1000, b"")


# -- keepalive pings (SPEC AW-15, WS-19) --------------------------------------------


def test_ws_keepalive_ping_unanswered_closes_1011():
    app = WsRecorder()
    with running_server("asgi", app, ws_ping_interval=0.2, ws_ping_timeout=0.2) as port:
        with ws_connection(port) as ws:
            assert ws.read_frame() == (0x89, 9, b"")
            assert ws.read_close()[0] == 1011          # no pong came back
            ws.sock.sendall(ws_close_frame(1011))
            ws.assert_eof()
        app.disconnect()


def test_ws_keepalive_ping_answered_keeps_the_connection():
    app = WsRecorder()
    # 40 pings 0.02 s apart outlast the 0.4 s timeout many times over: had a
    # pong not counted, the server would have closed 1011 part way through.
    with running_server("asgi", app, ws_ping_interval=0.02, ws_ping_timeout=0.4) as port:
        with ws_connection(port) as ws:
            for _ in range(40):
                first, opcode, payload = ws.read_frame()
                assert (first, opcode) == (0x89, 9)
                ws.sock.sendall(ws_client_frame(10, payload))
            ws.sock.sendall(ws_client_frame(1, b"still open"))
            while True:                               # pings may come in between
                frame = ws.read_frame()
                if frame[1] != 9:
                    break
            assert frame == (0x81, 1, b"still open")


# =============================================================================
# 6. The WebSocket codec, without sockets (SPEC WS-06, WS-09..WS-22)
# =============================================================================


def test_ws_websocket_accept_sample():
    assert gateway.websocket_accept(WS_KEY) == WS_ACCEPT     # RFC 6455 §1.3


@pytest.mark.parametrize("size, header", [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")])
def test_ws_encode_frame_lengths(size, header):
    payload = b"z" * size
    assert gateway.encode_frame(1, payload) == header + payload


def test_ws_encode_frame_opcodes_and_close():
    assert gateway.encode_frame(2, b"ab") == b"\x82\x02ab"
    assert gateway.encode_frame(1, b"ab", rsv1=True) == b"\xc1\x02ab"
    assert gateway.encode_frame(9, b"") == b"\x89\x00"
    assert gateway.encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert gateway.encode_close(4001, "é") == b"\x88\x04\x0f\xa1\xc3\xa9"
    assert gateway.encode_close(1005) == b"\x88\x00"        # 1005 never on the wire


def test_ws_unmask():
    assert gateway.unmask(b"\x7f\x9f\x4d\x51\x58", WS_MASK) == b"Hello"   # RFC 6455 §5.7
    for size in list(range(10)) + [1000, 65537]:
        data = bytes((i * 7 + 3) % 256 for i in range(size))
        masked = bytes(b ^ WS_MASK[i % 4] for i, b in enumerate(data))
        assert gateway.unmask(masked, WS_MASK) == data
        assert gateway.unmask(gateway.unmask(data, WS_MASK), WS_MASK) == data


# (id, bytes, the messages, or the WebSocketError code)
WS_PARSER_ROWS = [
    ("rfc-hello", b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", [("text", "Hello")]),
    ("fragments", ws_client_frame(1, b"Hel", fin=False) + ws_client_frame(0, b"lo"),
     [("text", "Hello")]),
    ("ping-between", ws_client_frame(2, b"a", fin=False) + ws_client_frame(9, b"p")
     + ws_client_frame(0, b"b"), [("ping", b"p"), ("bytes", b"ab")]),
    ("pong", ws_client_frame(10, b"q"), [("pong", b"q")]),
    ("empty-text", ws_client_frame(1, b""), [("text", "")]),
    ("len-126", ws_client_frame(2, b"b" * 126), [("bytes", b"b" * 126)]),
    ("len-65536", ws_client_frame(2, b"c" * 65536), [("bytes", b"c" * 65536)]),
    ("utf8-split", ws_client_frame(1, b"\xe2\x82", fin=False) + ws_client_frame(0, b"\xac"),
     [("text", "€")]),
    ("close-empty", ws_client_frame(8, b""), [("close", 1005, "")]),
    ("close-1000-bye", ws_close_frame(1000, b"bye"), [("close", 1000, "bye")]),
    ("close-3000", ws_close_frame(3000), [("close", 3000, "")]),
    ("two-messages", ws_client_frame(1, b"a") + ws_client_frame(2, b"b"),
     [("text", "a"), ("bytes", b"b")]),
    ("unmasked", ws_client_frame(1, b"a", mask=False), 1002),
    ("rsv1", ws_client_frame(1, b"a", rsv1=True), 1002),
    ("rsv2", ws_client_frame(1, b"a", rsv23=0x20), 1002),
    ("opcode-3", ws_client_frame(3, b""), 1002),
    ("opcode-15", ws_client_frame(15, b""), 1002),
    ("ping-126", ws_client_frame(9, b"p" * 126), 1002),
    ("fragmented-close", ws_client_frame(8, b"", fin=False), 1002),
    ("continuation-first", ws_client_frame(0, b"a"), 1002),
    ("text-in-text", ws_client_frame(1, b"a", fin=False) + ws_client_frame(1, b"b"), 1002),
    ("close-1-byte", ws_client_frame(8, b"\x03"), 1002),
    ("close-1005", ws_close_frame(1005), 1002),
    ("close-1006", ws_close_frame(1006), 1002),
    ("close-999", ws_close_frame(999), 1002),
    ("close-2000", ws_close_frame(2000), 1002),
    ("close-bad-reason", ws_close_frame(1000, b"\xc3"), 1007),
    ("bad-utf8", ws_client_frame(1, b"\xff"), 1007),
    ("bad-utf8-split", ws_client_frame(1, b"\xe2", fin=False) + ws_client_frame(0, b"a"), 1007),
    ("truncated-utf8-end", ws_client_frame(1, b"\xe2\x82"), 1007),
    ("length-top-bit", ws_client_frame(2, b"", length=b"\x7f\x80" + bytes(7)), 1002),
    ("over-max-size", ws_client_frame(2, b"m" * 70000), 1009),
    ("over-max-size-fragments", ws_client_frame(2, b"m" * 40000, fin=False)
     + ws_client_frame(0, b"m" * 40000), 1009),
]


def ws_parse(pieces: list[bytes], deflate=None):
    """Feed `pieces` to a FrameParser; (messages, the error code or None)."""
    parser = gateway.FrameParser(65536 + 1000, deflate)
    messages = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (message := parser.next_message()) is not None:
                messages.append(message)
    except gateway.WebSocketError as error:
        return messages, error.code
    return messages, None


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("raw, expected", asgi_params(WS_PARSER_ROWS))
def test_ws_frame_parser_table(raw, expected, how):
    if how == "bytewise" and len(raw) > 5000:
        pieces = [raw[i:i + 997] for i in range(0, len(raw), 997)]   # still split
    else:
        pieces = [raw] if how == "whole" else [raw[i:i + 1] for i in range(len(raw))]
    messages, code = ws_parse(pieces)
    if isinstance(expected, int):
        assert code == expected
    else:
        assert (messages, code) == (expected, None)


def test_ws_frame_parser_decompresses():
    codec = gateway.PerMessageDeflate(reset_each_message=False)
    parser = gateway.FrameParser(1000, codec)
    parser.feed(ws_client_frame(1, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv1=True))
    assert parser.next_message() == ("text", "Hello")
    assert codec.compress(b"Hello") == b"\xf2\x48\xcd\xc9\xc9\x07\x00"


# (id, bytes, the messages, or the WebSocketError code), with permessage-deflate
WS_DEFLATE_PARSER_ROWS = [
    ("rfc-hello", ws_client_frame(1, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv1=True),
     [("text", "Hello")]),
    ("not-compressed", ws_client_frame(1, b"plain"), [("text", "plain")]),
    ("reserved-block-type", ws_client_frame(2, b"\x07\xff\xff\xff\xff", rsv1=True), 1007),
    ("bad-stored-length", ws_client_frame(2, b"\x00\x05\x00\x00\x00", rsv1=True), 1007),
    ("bad-first-fragment", ws_client_frame(1, b"\x07\xff", fin=False, rsv1=True)
     + ws_client_frame(0, b"\xff\xff\xff"), 1007),
]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("raw, expected", asgi_params(WS_DEFLATE_PARSER_ROWS))
def test_ws_frame_parser_deflate_table(raw, expected, how):
    pieces = [raw] if how == "whole" else [raw[i:i + 1] for i in range(len(raw))]
    codec = gateway.PerMessageDeflate(reset_each_message=False)
    messages, code = ws_parse(pieces, codec)
    if isinstance(expected, int):
        assert code == expected
    else:
        assert (messages, code) == (expected, None)


WS_NEGOTIATIONS = [
    ([b"permessage-deflate; client_max_window_bits"], b"permessage-deflate"),
    ([b"permessage-deflate"], b"permessage-deflate"),
    ([b"x-webkit-deflate-frame, permessage-deflate"], b"permessage-deflate"),
    ([b"permessage-deflate; server_no_context_takeover"],
     b"permessage-deflate; server_no_context_takeover"),
    ([b"permessage-deflate; server_max_window_bits=10"],
     b"permessage-deflate; server_max_window_bits=10"),   # RFC 7692 §7.1.2.1
    ([b"permessage-deflate; server_max_window_bits=8", b"permessage-deflate"],
     b"permessage-deflate"),     # zlib has no 8-bit window: the first offer is declined
    ([b"permessage-deflate; client_no_context_takeover; client_no_context_takeover"], None),
    ([b"x-other"], None),
    pytest.param([b"permessage-deflate; foo=1"], None),
    pytest.param([b"permessage-deflate; client_max_window_bits=7"], None),
]


@pytest.mark.parametrize("offers, answer", WS_NEGOTIATIONS)
def test_ws_deflate_negotiation(offers, answer):
    codec, got = gateway.PerMessageDeflate.negotiate(offers)
    if answer is None:
        assert (codec, got) == (None, b"")
    else:
        assert codec is not None and got == answer


# -- --trace: the protocol, visible (§11) ---------------------------------------


def test_trace_shows_head_interface_and_response_in_order(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.trace")
    with running_server(interface, ECHO_APPS[interface], trace=True) as port:
        status, _, body = request(port, b"POST /t HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 5\r\n\r\nhello")
    assert (status, body) == (200, b"hello")
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert all(line.startswith("#") and "s " in line for line in lines)
    kinds = [line.split(" ", 3)[2] for line in lines]
    first_out = kinds.index("<")
    assert kinds[0] == ">" and lines[0].endswith("> POST /t HTTP/1.1")
    assert "app" in kinds[:first_out]             # environ or scope before the answer
    assert any(line.endswith("< HTTP/1.1 200 OK") for line in lines)
    name = "environ" if interface == "wsgi" else "scope"
    assert any(line.endswith(f"app {name}") for line in lines)
    if interface == "asgi":
        assert any("receive {'type': 'http.request', 'body': b'hello'" in line
                   for line in lines)
    else:
        assert any("start_response('200 OK'" in line for line in lines)


def test_trace_escapes_control_characters_and_is_off_by_default(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.trace")
    with running_server(interface, ECHO_APPS[interface]) as port:
        assert request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert not [r for r in caplog.records if r.name == "gateway.trace"]
    with running_server(interface, ECHO_APPS[interface], trace=True) as port:
        # a tab and obs-text (NEL, 0x85) are legal in a value but not printable
        assert request(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\tb\x85\r\n\r\n")[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert any(line.endswith("X-A: a\\tb\\x85") for line in lines)
    assert not any("\t" in line or "\x85" in line for line in lines)


# -- ASGI extensions: http.response.trailers and http.response.pathsend ----------


def trailers_app(trailer_pieces):
    """An ASGI app that sends a chunked body, then its trailers in pieces."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        assert "http.response.trailers" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"trailer", b"x-sum")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": False})
        for index, piece in enumerate(trailer_pieces):
            await send({"type": "http.response.trailers", "headers": piece,
                        "more_trailers": index < len(trailer_pieces) - 1})
    return app


@pytest.mark.parametrize("te,expected_end", [
    (b"TE: trailers\r\n", b"3\r\nabc\r\n0\r\nx-sum: 3\r\nx-more: 1\r\n\r\n"),
    (b"", b"3\r\nabc\r\n0\r\n\r\n"),
], ids=["client accepts trailers", "client did not ask: dropped"])
def test_asgi_trailers_extension(te, expected_end):
    app = trailers_app([[(b"x-sum", b"3")], [(b"x-more", b"1")]])
    with running_server("asgi", app, date_header=False) as port:
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n"
                         b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_until_closed(sock)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in first
    assert rest.startswith(expected_end)          # the response ends where it should
    assert rest[len(expected_end):].startswith(b"HTTP/1.1 200 OK\r\n")   # keep-alive


def test_asgi_pathsend_extension(tmp_path):
    payload = bytes(range(256)) * 4096 + b"tail"           # 1 MiB and a bit
    path = tmp_path / "file.bin"
    path.write_bytes(payload)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        assert "http.response.pathsend" in scope["extensions"]
        headers = [(b"content-length", b"%d" % len(payload))] if scope["path"] == "/cl" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.pathsend", "path": str(path)})

    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(b"GET /cl HTTP/1.1\r\nHost: x\r\n\r\n"     # Content-Length
                         b"HEAD /cl HTTP/1.1\r\nHost: x\r\n\r\n"    # no body at all
                         b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")  # read and framed
            reader = ResponseReader(sock)
            status, headers, body = reader.read_response()
            assert (status, headers[b"content-length"], body) == (
                200, b"%d" % len(payload), payload)
            status, headers, body = reader.read_response("HEAD")
            assert (status, headers[b"content-length"], body) == (200, b"%d" % len(payload), b"")
            status, headers, body = reader.read_response()
            assert (status, headers[b"transfer-encoding"], body) == (200, b"chunked", payload)


@pytest.mark.parametrize("content_length, message", [
    (100, "response ended 40 bytes short of its Content-Length"),
    (10, "response body longer than its Content-Length; 50 bytes dropped"),
], ids=["file shorter", "file longer"])
def test_asgi_pathsend_file_and_content_length_disagree(tmp_path, caplog, content_length,
                                                        message):
    # RFC 9112 §6.3, §8: what the file really holds is what counts; the response
    # then ends like any other that breaks its Content-Length: logged, and the
    # connection closed, so the pipelined request behind it is never answered.
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(range(60)))

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % content_length)]})
        await send({"type": "http.response.pathsend", "path": str(path)})

    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data == (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nServer: gateway\r\n\r\n"
                    % content_length + bytes(range(60))[:content_length])
    assert message in [r.getMessage() for r in caplog.records if r.name == "gateway"]

# -- ASGI extension: http.response.zerocopysend (extensions.rst "Zero Copy Send") ----

ZC_PAYLOAD = bytes(range(256)) * 4096 + b"tail"          # 1 MiB and a bit


@pytest.fixture
def zc_file(tmp_path):
    """ZC_PAYLOAD in a file the test (the app's side) opens and closes."""
    path = tmp_path / "payload.bin"
    path.write_bytes(ZC_PAYLOAD)
    with open(path, "rb") as file:
        yield file


def zc(**keys) -> dict:
    """An http.response.zerocopysend message; the app fills in "file"."""
    return {"type": "http.response.zerocopysend", **keys}


def zc_body(body: bytes, more_body: bool = True) -> dict:
    return {"type": "http.response.body", "body": body, "more_body": more_body}


def zerocopy_app(file, messages, headers=(), seek: int = 0):
    """An ASGI app: seek `file`, start, then send `messages` with `file` in them."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        assert scope["extensions"]["http.response.zerocopysend"] == {}
        file.seek(seek)
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        for message in messages:
            if message["type"] == "http.response.zerocopysend":
                message = {**message, "file": file}
            await send(message)
    return app


def test_asgi_zerocopysend_with_content_length(zc_file):
    # extensions.rst "Zero Copy Send": no offset is the file's position, no count
    # its end. The file's bytes go out as the body the Content-Length promised.
    length = b"%d" % len(ZC_PAYLOAD)
    app = zerocopy_app(zc_file, [zc()], [(b"content-length", length)])
    with running_server("asgi", app) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for _ in range(2):                      # and the connection stays open
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = reader.read_response()
                assert (status, headers.get(b"connection"), headers[b"content-length"],
                        body == ZC_PAYLOAD) == (200, None, length, True)
    assert not zc_file.closed and zc_file.tell() == len(ZC_PAYLOAD)   # the app's to close


def test_asgi_zerocopysend_over_tls(zc_file, ops_cert):
    # Through TLS the same bytes arrive, decrypted by the client.
    app = zerocopy_app(zc_file, [zc()], [(b"content-length", b"%d" % len(ZC_PAYLOAD))])
    with ops_tls_server("asgi", app, ops_cert) as port:
        with ops_tls_connect(port, ops_cert[0]) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = ResponseReader(sock).read_response()
    assert (status, headers[b"content-length"], body == ZC_PAYLOAD) == (
        200, b"%d" % len(ZC_PAYLOAD), True)
    assert not zc_file.closed and zc_file.tell() == len(ZC_PAYLOAD)


def test_asgi_zerocopysend_chunked(zc_file):
    # Without Content-Length the file's bytes are chunk-framed like any body.
    with running_server("asgi", zerocopy_app(zc_file, [zc()])) as port:
        status, headers, body = request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, headers[b"transfer-encoding"], body == ZC_PAYLOAD) == (
        200, b"chunked", True)
    assert not zc_file.closed and zc_file.tell() == len(ZC_PAYLOAD)


# body, 20 bytes from offset 10, body, 5 more from where the file now is, last body
ZC_MIXED = [zc_body(b"<"), zc(offset=10, count=20, more_body=True), zc_body(b">"),
            zc(count=5, more_body=True), zc_body(b"!", more_body=False)]
ZC_MIXED_BODY = b"<" + ZC_PAYLOAD[10:30] + b">" + ZC_PAYLOAD[30:35] + b"!"


@pytest.mark.parametrize("version, headers, expected", [
    (b"1.1", [(b"content-length", b"28")],
     b"HTTP/1.1 200 OK\r\ncontent-length: 28\r\nServer: gateway\r\nConnection: close\r\n"
     b"\r\n" + ZC_MIXED_BODY),
    (b"1.1", [],
     b"HTTP/1.1 200 OK\r\nServer: gateway\r\nTransfer-Encoding: chunked\r\n"
     b"Connection: close\r\n\r\n1\r\n<\r\n14\r\n" + ZC_PAYLOAD[10:30] + b"\r\n1\r\n>\r\n"
     b"5\r\n" + ZC_PAYLOAD[30:35] + b"\r\n1\r\n!\r\n0\r\n\r\n"),
    (b"1.0", [],
     b"HTTP/1.1 200 OK\r\nServer: gateway\r\nConnection: close\r\n\r\n"
     + ZC_MIXED_BODY),
], ids=["content-length", "chunked", "HTTP/1.0 close-delimited"])
def test_asgi_zerocopysend_mixed_with_body_messages(zc_file, version, headers,
                                                     expected):
    # extensions.rst "Zero Copy Send": it may repeat and mix with body messages,
    # and otherwise behaves like one.
    app = zerocopy_app(zc_file, ZC_MIXED, headers)
    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/%s\r\nHost: x\r\nConnection: close\r\n\r\n"
                        % version)
    assert data == expected
    assert not zc_file.closed and zc_file.tell() == 35


@pytest.mark.parametrize("keys, seek, start, end", [
    ({"offset": 100}, 7, 100, len(ZC_PAYLOAD)),              # to the end of the file
    ({"count": 50}, 7, 7, 57),                                # from the file's position
    ({"offset": 100, "count": 50}, 7, 100, 150),
    ({"offset": len(ZC_PAYLOAD) - 10, "count": 100}, 0, len(ZC_PAYLOAD) - 10,
     len(ZC_PAYLOAD)),                                        # count past the end
], ids=["offset", "count", "offset and count", "count past the end"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_asgi_zerocopysend_offset_and_count(zc_file, framing, keys, seek, start, end):
    headers = [(b"content-length", b"%d" % (end - start))] if framing != "chunked" else []
    app = zerocopy_app(zc_file, [zc(**keys)], headers, seek=seek)
    with running_server("asgi", app) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for _ in range(2):          # the response ended where it should: keep-alive
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = reader.read_response()
                assert (status, headers.get(b"connection"), body == ZC_PAYLOAD[start:end]
                        ) == (200, None, True)
    assert not zc_file.closed and zc_file.tell() == end     # never read past `count`


@pytest.mark.parametrize("keys", [{"more_body": False}, {}],
                         ids=["more_body False", "more_body absent"])
def test_asgi_zerocopysend_more_body_false_ends_the_response(zc_file, keys):
    # extensions.rst "Zero Copy Send": more_body defaults to False; the response is
    # then complete and later messages are ignored.
    app = zerocopy_app(zc_file, [zc(count=3, **keys), zc_body(b"ignored", False)])
    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first = (b"HTTP/1.1 200 OK\r\nServer: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\n" + ZC_PAYLOAD[:3] + b"\r\n0\r\n\r\n")
    assert data.startswith(first)
    assert data[len(first):].startswith(b"HTTP/1.1 200 OK\r\n")       # keep-alive
    assert b"ignored" not in data


def test_asgi_zerocopysend_needs_a_file_of_the_os():
    # extensions.rst "Zero Copy Send": a file with a descriptor ("not BytesIO"). It
    # raises in the app before the head is taken, so the app can still answer.
    raised = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        assert "http.response.zerocopysend" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"4")]})
        try:
            await send(zc(file=io.BytesIO(b"file")))
        except Exception as exc:   # noqa: BLE001 - the test looks at it below
            raised.append(type(exc))
        await send(zc_body(b"body", more_body=False))

    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raised == [io.UnsupportedOperation]
    assert data == (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nServer: gateway\r\n"
                    b"Connection: close\r\n\r\nbody")

# -- ASGI extension: http.response.early_hint (extensions.rst "Early Hints") ---------

PRELOAD_CSS = b"</style.css>; rel=preload; as=style"
PRELOAD_JS = b"</app.js>; rel=preload; as=script"
PRECONNECT = b"<https://cdn.example>; rel=preconnect"


def early_hint_app(before_body: list, after_first_body: list = (), after_last_body=()):
    """An ASGI app: start (Content-Length: 2), early hints, body b"o", b"k".

    Each list holds the `links` of one http.response.early_hint message, sent
    before the first body message, after it, or after the last one.
    """
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        assert scope["extensions"]["http.response.early_hint"] == {}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        for links in before_body:
            await send({"type": "http.response.early_hint",
                        "links": (link for link in links)})   # any iterable
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
        for links in after_first_body:
            await send({"type": "http.response.early_hint", "links": links})
        await send({"type": "http.response.body", "body": b"k"})
        for links in after_last_body:
            await send({"type": "http.response.early_hint", "links": links})
    return app


def early_hints(*links: bytes) -> bytes:
    """One 103 response on the wire: a Link field line per link."""
    return b"HTTP/1.1 103 Early Hints\r\n" + b"".join(b"Link: %s\r\n" % link
                                                      for link in links) + b"\r\n"


OK_CLOSE = (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nServer: gateway\r\n"
            b"Connection: close\r\n\r\nok")


@pytest.mark.parametrize("messages", [
    [[PRELOAD_CSS]],
    [[PRELOAD_CSS, PRELOAD_JS, PRECONNECT]],
    [[PRELOAD_CSS], [PRELOAD_JS, PRECONNECT]],
], ids=["one link", "several links", "two messages: two 103s"])
def test_asgi_early_hint_extension(messages):
    # extensions.rst "Early Hints", RFC 8297: a 103 with the links as Link fields,
    # before the final head (held back until the first body message).
    with running_server("asgi", early_hint_app(messages), date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data == b"".join(early_hints(*links) for links in messages) + OK_CLOSE


def test_asgi_early_hint_not_sent_to_http_1_0_client():
    # RFC 9110 §15.2: no 1xx response to an HTTP/1.0 client; ignored, not an error.
    with running_server("asgi", early_hint_app([[PRELOAD_CSS]]), date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert data == OK_CLOSE


def test_asgi_early_hint_ignored_once_the_final_head_went_out():
    # extensions.rst "Early Hints": only before the final response; after the first
    # (or the last) body message the head is on the wire, so the hints are dropped.
    app = early_hint_app([], after_first_body=[[PRELOAD_CSS]], after_last_body=[[PRELOAD_JS]])
    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data == OK_CLOSE


def test_asgi_early_hint_without_links_sends_nothing():
    # Policy: a 103 without a Link field would tell the client nothing.
    with running_server("asgi", early_hint_app([[]]), date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data == OK_CLOSE


@pytest.mark.parametrize("link, error", [
    (b"</a.css>; rel=preload\r\nSet-Cookie: x=1", ValueError),   # RFC 9112 §11.1
    (b"</a.css>\x00", ValueError),
    ("</a.css>; rel=preload", TypeError),                          # str, not bytes
], ids=["CRLF", "NUL", "str"])
def test_asgi_early_hint_bad_link_raises_in_the_app(link, error):
    raised = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        try:
            await send({"type": "http.response.early_hint", "links": [PRELOAD_CSS, link]})
        except Exception as exc:   # noqa: BLE001 - the test looks at it below
            raised.append(exc)
        await send({"type": "http.response.body", "body": b"ok"})

    with running_server("asgi", app, date_header=False) as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [type(exc) for exc in raised] == [error]
    assert data == OK_CLOSE          # nothing of the bad 103 went out, not even PRELOAD_CSS


try:
    import ssl
except ImportError:          # a Python built without OpenSSL
    ssl = None


# =============================================================================
# Operations - running it for real (§11 and §12, issue "Running it for real")
#
# Names start with ops_ / Ops / test_ops_ so that they cannot clash with the
# rest of test_gateway.py once this part is pasted into it. Processes started
# here run in their own session and are killed by process group id at the end.
# =============================================================================

OPS_GATEWAY = os.path.abspath(gateway.__file__)
OPS_POSIX = pytest.mark.skipif(os.name != "posix", reason="signals to a child need POSIX")
OPS_FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="--workers needs os.fork()")
OPS_UNIX = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no AF_UNIX sockets")
OPS_SERVING = re.compile(r"gateway: serving (?:WSGI|ASGI) app \S+ on "
                         r"(?:https?://127\.0\.0\.1:(\d+)|unix:(.+)) \(Ctrl\+C to quit\)\n")
OPS_GET = b"GET /ops?x=1 HTTP/1.1\r\nHost: test\r\n\r\n"
OPS_CLOSE = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
OPS_SLOW = b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n"
OPS_FAST = b"GET /fast HTTP/1.1\r\nHost: test\r\n\r\n"
# The whole answer to OPS_SLOW while the server shuts down (no Date header),
# and the same without its "Connection: close".
OPS_SLOW_CLOSING = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n"
                    b"Server: gateway\r\nConnection: close\r\n\r\nslow done")
OPS_SLOW_ANSWER = OPS_SLOW_CLOSING.replace(b"Connection: close\r\n", b"")


# -- apps for the command line (written into tmp_path as ops_apps.py) ----------

OPS_APPS_SOURCE = r'''
import asyncio, json, os, select, signal, sys, time


def _say(*words):
    os.write(2, (" ".join(map(str, words)) + "\n").encode())   # one write: one line


def _gate_fd():
    return int(os.environ["OPS_GATE_FD"])


def _reply(start_response, body, ctype="text/plain"):
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


async def _asgi_reply(send, body, ctype=b"text/plain"):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"Content-Type", ctype),
                            (b"Content-Length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


def gate_wsgi(environ, start_response):
    """/slow waits until the test closes the write end of a pipe."""
    if environ["PATH_INFO"] == "/slow":
        _say("ops-entered")
        select.select([_gate_fd()], [], [], 30)
        return _reply(start_response, b"slow done")
    return _reply(start_response, b"fast")


_opened = None


async def gate_asgi(scope, receive, send):
    global _opened
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["path"] == "/slow":
        _say("ops-entered")
        loop = asyncio.get_running_loop()
        if _opened is None:
            _opened = loop.create_future()

            def readable():
                loop.remove_reader(_gate_fd())
                if not _opened.done():
                    _opened.set_result(None)
            loop.add_reader(_gate_fd(), readable)
        await asyncio.wait_for(asyncio.shield(_opened), 30)
        await _asgi_reply(send, b"slow done")
    else:
        await _asgi_reply(send, b"fast")


def hello_wsgi(environ, start_response):
    return _reply(start_response, b"hello")


async def hello_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _asgi_reply(send, b"hello")


def pid_wsgi(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "ppid": os.getppid(),
                       "multiprocess": environ["wsgi.multiprocess"]}).encode()
    return _reply(start_response, body, "application/json")


async def pid_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = json.dumps({"pid": os.getpid(), "ppid": os.getppid()}).encode()
    await _asgi_reply(send, body, b"application/json")


def scope_wsgi(environ, start_response):
    body = json.dumps({"remote_addr": environ.get("REMOTE_ADDR", "absent"),
                       "server_name": environ["SERVER_NAME"]}).encode()
    return _reply(start_response, body, "application/json")


async def scope_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = json.dumps({"server": scope["server"], "client": scope["client"]}).encode()
    await _asgi_reply(send, body, b"application/json")


def env_wsgi(environ, start_response):
    names = ["OPS_PLAIN", "OPS_DOUBLE", "OPS_SINGLE", "OPS_SPACED", "OPS_COMMENTED",
             "OPS_EMPTY", "OPS_EQUALS"]
    body = json.dumps({name: os.environ.get(name) for name in names}).encode()
    return _reply(start_response, body, "application/json")


def make_wsgi():
    """--factory: called with no arguments, returns the app."""
    def made(environ, start_response):
        return _reply(start_response, b"made by the factory")
    return made


def make_asgi():
    async def made(scope, receive, send):
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await _asgi_reply(send, b"made by the factory")
    return made


async def failing_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "ops-no-database"})
        return
    await _asgi_reply(send, b"should not be served")


async def slow_start_asgi(scope, receive, send):
    """Its startup is running when the worker gets SIGTERM (held pending
    with a signal mask, so that the order of events is certain)."""
    if scope["type"] == "lifespan":
        await receive()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _say("ops-starting", os.getpid())
        deadline = time.monotonic() + 10
        while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # delivered now
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await _asgi_reply(send, b"served")


async def hung_start_asgi(scope, receive, send):
    """Its startup never completes: it waits for another message, and says
    so if it ever gets one (the server must not send lifespan.shutdown)."""
    if scope["type"] == "lifespan":
        await receive()
        _say("ops-starting", os.getpid())
        _say("ops-then-got", (await receive())["type"])
        return
    await _asgi_reply(send, b"served")


async def bad_shutdown_asgi(scope, receive, send):
    """Starts; answers lifespan.shutdown with lifespan.shutdown.failed, or
    (OPS_SHUTDOWN=hang) never answers it."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        _say("ops-started", os.getpid())
        await receive()
        _say("ops-shutting-down", os.getpid())
        if os.environ.get("OPS_SHUTDOWN") == "hang":
            await asyncio.Event().wait()
        await send({"type": "lifespan.shutdown.failed", "message": "ops-cannot-flush"})
        return
    await _asgi_reply(send, b"served")
'''


def ops_write_apps(folder) -> None:
    (folder / "ops_apps.py").write_text(OPS_APPS_SOURCE)


class OpsCLIProcess:
    """gateway.py in a subprocess of its own session; stderr read line by line."""

    def __init__(self, *args: str, cwd, pass_fds=(), env: dict | None = None,
                 preexec_fn=None, launch: tuple = (OPS_GATEWAY,)) -> None:
        environ = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        environ.pop("WEB_CONCURRENCY", None)
        children_get_sigint()
        self.proc = subprocess.Popen(
            [sys.executable, *launch, *args], cwd=str(cwd), env=environ,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, pass_fds=tuple(pass_fds), start_new_session=True,
            preexec_fn=preexec_fn)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no stderr line in time; so far: {self.seen}") from None
        if line is not None:
            self.seen.append(line)
        return line

    def wait_line(self, predicate, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(deadline)
            assert line is not None, f"stderr ended; it said: {''.join(self.seen)}"
            if predicate(line):
                return line

    def serving(self) -> re.Match:
        line = self.wait_line(lambda text: text.startswith("gateway: serving"))
        match = OPS_SERVING.fullmatch(line)
        assert match, line
        return match

    def port(self) -> int:
        return int(self.serving().group(1))

    def rest(self) -> str:
        """All of stderr, up to EOF."""
        deadline = time.monotonic() + TIMEOUT
        while self.next_line(deadline) is not None:
            pass
        return "".join(self.seen)

    def close(self) -> None:
        """Kill whatever is left of this process group (the workers too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT)


def ops_last_line(stderr: str) -> str:
    """The last line that is not an access line. A WSGI worker thread logs its
    access line after the response is sent, so one may come after "stopped"
    (or, racing the exit of the process, never)."""
    others = [line for line in stderr.splitlines() if not line.startswith("gateway.access: ")]
    return others[-1] if others else ""


@contextlib.contextmanager
def ops_cli(*args: str, cwd, pass_fds=(), env: dict | None = None, preexec_fn=None,
            launch: tuple = (OPS_GATEWAY,)):
    cli = OpsCLIProcess(*args, cwd=cwd, pass_fds=pass_fds, env=env, preexec_fn=preexec_fn,
                        launch=launch)
    try:
        yield cli
    finally:
        cli.close()


# -- in-process servers, clients and apps -------------------------------------


@contextlib.contextmanager
def ops_serving(interface: str, app, listener: socket.socket | None = None, **options):
    """running_server() that also yields the server and its thread: (server,
    thread, port) - port is the unix socket path for a unix listener."""
    options.setdefault("timeout_graceful_shutdown", 5.0)
    config = gateway.Config(**options)
    listener = listener if listener is not None else gateway.make_listener("127.0.0.1", 0)
    name = listener.getsockname()
    port = name if isinstance(name, str) else name[1]
    if interface == "wsgi":
        server = gateway.WSGIServer(app, listener, config)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
    else:
        server = gateway.ASGIServer(app, listener, config)
        thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        if interface == "wsgi":
            wait_for(lambda: server.running or not thread.is_alive())
        else:
            wait_for(lambda: server.stopping is not None or not thread.is_alive())
        yield server, thread, port
    finally:
        if thread.is_alive():
            server.shutdown()
            thread.join(TIMEOUT)
        assert not thread.is_alive(), "server did not stop"


def ops_read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset counts as closed."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def ops_assert_refused(port: int) -> None:
    """A new connection is refused, or closed without an answer."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    except ConnectionRefusedError:
        return
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(OPS_FAST)
        assert ops_read_all(sock) == b"", "a new connection was served during shutdown"


class OpsGate:
    """Holds app calls (threads or coroutines) until release(); counts them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.entered = 0
        self.opened = False
        self.waiters: list = []

    def enter(self) -> None:
        with self.cond:
            self.entered += 1
            self.cond.notify_all()

    def wait_entered(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.entered >= count, TIMEOUT), \
                f"only {self.entered} of {count} requests reached the app"

    def release(self) -> None:
        with self.cond:
            self.opened = True
            waiters, self.waiters = self.waiters, []
            self.cond.notify_all()
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):     # that loop has ended
                loop.call_soon_threadsafe(
                    lambda f=future: f.done() or f.set_result(None))

    def wait_sync(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.opened, TIMEOUT)

    async def wait_async(self) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.cond:
            if self.opened:
                return
            self.waiters.append((loop, future))
        await asyncio.wait_for(future, TIMEOUT)


def ops_fixed_wsgi(body: bytes, extra: list | None = None):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body))), *(extra or [])])
        return [body]
    return app


def ops_fixed_asgi(body: bytes, extra: list | None = None):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % len(body))]
        headers += [(n.encode(), v.encode()) for n, v in (extra or [])]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    return app


def ops_fixed_app(interface: str, body: bytes, extra: list | None = None):
    return (ops_fixed_wsgi if interface == "wsgi" else ops_fixed_asgi)(body, extra)


def ops_json_app(interface: str, describe_wsgi, describe_asgi):
    """An app that answers JSON: describe_wsgi(environ) / describe_asgi(scope)."""
    if interface == "wsgi":
        def app(environ, start_response):
            body = json.dumps(describe_wsgi(environ)).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return app

    async def asgi_app(scope, receive, send):
        if scope["type"] == "http":
            body = json.dumps(describe_asgi(scope)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(describe_asgi(scope))})
            await send({"type": "websocket.close", "code": 1000})
    return asgi_app


def ops_gate_app(interface: str, gate: OpsGate):
    """/slow waits at the gate and answers "slow done"; anything else "fast"."""
    if interface == "wsgi":
        def app(environ, start_response):
            body = b"fast"
            if environ["PATH_INFO"] == "/slow":
                gate.enter()
                gate.wait_sync()
                body = b"slow done"
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return app

    async def asgi_app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b"fast"
        if scope["path"] == "/slow":
            gate.enter()
            await gate.wait_async()
            body = b"slow done"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"Content-Type", b"text/plain"),
                                (b"Content-Length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return asgi_app


def ops_buffered_echo(interface: str):
    """Reads the whole body, then sends it back with a Content-Length."""
    if interface == "wsgi":
        def app(environ, start_response):
            stream, remaining, pieces = environ["wsgi.input"], int(environ["CONTENT_LENGTH"]), []
            while remaining:          # in pieces: see test_ops_wsgi_read_of_a_large_body
                piece = stream.read(min(remaining, 65536))
                assert piece, "body ended early"
                pieces.append(piece)
                remaining -= len(piece)
            body = b"".join(pieces)
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return app

    async def asgi_app(scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return asgi_app


def ops_post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


# =============================================================================
# 1. Graceful shutdown
# =============================================================================


def ops_check_graceful(port: int, stop, release) -> list[bytes]:
    """Ten requests held in the app, one idle keep-alive connection; stop()
    must close the idle one at once, refuse new ones, and, after release(),
    answer all ten in full. Returns the ten answers, as sent."""
    with connect(port) as idle:
        idle.sendall(OPS_FAST)
        status, headers, body = ResponseReader(idle).read_response()
        assert (status, body, headers.get(b"connection")) == (200, b"fast", None)
        slow = [connect(port) for _ in range(10)]
        try:
            for sock in slow:
                sock.sendall(OPS_SLOW)
            stop()
            assert ops_read_all(idle) == b"", "the idle connection was not closed"
            ops_assert_refused(port)
            release()
            answers = [read_until_closed(sock) for sock in slow]
        finally:
            for sock in slow:
                sock.close()
    # Whole, then closed (read_until_closed); "Connection: close" is checked
    # on its own in test_ops_shutdown_responses_say_connection_close.
    assert [a.replace(b"Connection: close\r\n", b"") for a in answers] == \
        [OPS_SLOW_ANSWER] * 10
    return answers


def test_ops_shutdown_in_process_finishes_accepted_requests(interface):
    gate = OpsGate()
    try:
        with ops_serving(interface, ops_gate_app(interface, gate), threads=16,
                         date_header=False) as (server, thread, port):
            def stop():
                gate.wait_entered(10)      # all ten are in the app
                server.shutdown()
            ops_check_graceful(port, stop, gate.release)
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "the server did not stop after draining"
    finally:
        gate.release()


def test_ops_shutdown_lets_a_large_response_finish(interface):
    """4 MiB, written in 64 KiB pieces after the shutdown began, arrive whole."""
    big = random.Random(9).randbytes(4 * 1024 * 1024)
    pieces = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    gate = OpsGate()
    if interface == "wsgi":
        def app(environ, start_response):
            gate.enter()
            gate.wait_sync()
            start_response("200 OK", [("Content-Length", str(len(big)))])
            return pieces
    else:
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            gate.enter()
            await gate.wait_async()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"Content-Length", b"%d" % len(big))]})
            for piece in pieces:
                await send({"type": "http.response.body", "body": piece,
                            "more_body": True})
            await send({"type": "http.response.body", "body": b""})
    try:
        with ops_serving(interface, app) as (server, thread, port):
            with connect(port) as sock:
                sock.sendall(OPS_SLOW)
                gate.wait_entered(1)
                server.shutdown()
                gate.release()
                data = ops_read_all(sock)
            thread.join(TIMEOUT)
            assert not thread.is_alive()
    finally:
        gate.release()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (len(body), hashlib.sha256(body).digest()) == (len(big), hashlib.sha256(big).digest())


def test_ops_shutdown_responses_say_connection_close(interface):
    gate = OpsGate()
    try:
        with ops_serving(interface, ops_gate_app(interface, gate), threads=16,
                         date_header=False) as (server, thread, port):
            def stop():
                gate.wait_entered(10)
                server.shutdown()
            answers = ops_check_graceful(port, stop, gate.release)
    finally:
        gate.release()
    assert answers == [OPS_SLOW_CLOSING] * 10


def test_ops_second_shutdown_in_process_stops_at_once(interface):
    gate = OpsGate()
    try:
        with ops_serving(interface, ops_gate_app(interface, gate),
                         timeout_graceful_shutdown=30.0) as (server, thread, port):
            with connect(port) as idle, connect(port) as held:
                idle.sendall(OPS_FAST)
                assert ResponseReader(idle).read_response()[::2] == (200, b"fast")
                held.sendall(OPS_SLOW)
                gate.wait_entered(1)
                server.shutdown()
                assert ops_read_all(idle) == b""       # the drain has begun
                started = time.monotonic()
                server.shutdown()                        # the second one: at once
                thread.join(5.0)
                assert not thread.is_alive(), "a second shutdown() did not stop it"
                assert time.monotonic() - started < 5.0
                assert ops_read_all(held) == b""        # cut off, no answer
    finally:
        gate.release()


def test_ops_graceful_shutdown_times_out(interface):
    """timeout_graceful_shutdown bounds the drain: a request still in the app
    after it is cut off without an answer."""
    gate = OpsGate()
    try:
        with ops_serving(interface, ops_gate_app(interface, gate),
                         timeout_graceful_shutdown=0.5) as (server, thread, port):
            with connect(port) as held:
                held.sendall(OPS_SLOW)
                gate.wait_entered(1)
                started = time.monotonic()
                server.shutdown()
                thread.join(5.0)
                assert not thread.is_alive()
                assert 0.45 <= time.monotonic() - started < 5.0
                assert ops_read_all(held) == b""
    finally:
        gate.release()


def test_ops_shutdown_before_the_server_runs_is_not_lost(interface):
    listener = gateway.make_listener("127.0.0.1", 0)
    app = ops_fixed_app(interface, b"x")
    if interface == "wsgi":
        server = gateway.WSGIServer(app, listener, gateway.Config())
        target, args = server.serve_forever, ()
    else:
        server = gateway.ASGIServer(app, listener, gateway.Config())
        target, args = asyncio.run, (server.serve(),)
    server.shutdown()                    # e.g. a signal that came early
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    try:
        thread.join(1.0)
        assert not thread.is_alive(), "the early shutdown() was lost"
    finally:
        if thread.is_alive():
            wait_for(lambda: getattr(server, "running", None) is True
                     or getattr(server, "stopping", None) is not None)
            server.shutdown()
            thread.join(TIMEOUT)


@OPS_POSIX
def test_ops_cli_sigterm_finishes_accepted_requests(interface, tmp_path):
    ops_write_apps(tmp_path)
    gate_read, gate_write = os.pipe()
    try:
        with ops_cli(f"--{interface}", f"ops_apps:gate_{interface}", "--port", "0",
                     "--threads", "16", "--no-date-header", "--app-dir", str(tmp_path),
                     cwd=tmp_path, pass_fds=[gate_read],
                     env={"OPS_GATE_FD": str(gate_read)}) as cli:
            os.close(gate_read)
            gate_read = None
            port = cli.port()

            def stop():
                for _ in range(10):
                    cli.wait_line(lambda line: line == "ops-entered\n")
                cli.proc.send_signal(signal.SIGTERM)

            def release():
                nonlocal gate_write
                os.close(gate_write)        # EOF on the pipe wakes every /slow
                gate_write = None

            ops_check_graceful(port, stop, release)
            assert cli.proc.wait(TIMEOUT) == 0
            stderr = cli.rest()
            assert ops_last_line(stderr) == "gateway: stopped", stderr
            assert "Traceback" not in stderr, stderr
    finally:
        for fd in (gate_read, gate_write):
            if fd is not None:
                os.close(fd)


@OPS_POSIX
def test_ops_cli_second_sigterm_stops_at_once(interface, tmp_path):
    ops_write_apps(tmp_path)
    gate_read, gate_write = os.pipe()
    try:
        with ops_cli(f"--{interface}", f"ops_apps:gate_{interface}", "--port", "0",
                     "--app-dir", str(tmp_path), cwd=tmp_path, pass_fds=[gate_read],
                     env={"OPS_GATE_FD": str(gate_read)}) as cli:
            ops_second_signal_stops_at_once(cli, signal.SIGTERM)
    finally:
        os.close(gate_read)
        os.close(gate_write)


def ops_second_signal_stops_at_once(cli, signum: int) -> str:
    """With one request in progress, the first `signum` starts a graceful
    shutdown, the second ends it at once; exit status 0. Returns stderr."""
    port = cli.port()
    with connect(port) as idle, connect(port) as held:
        idle.sendall(OPS_FAST)
        assert ResponseReader(idle).read_response()[::2] == (200, b"fast")
        held.sendall(OPS_SLOW)
        cli.wait_line(lambda line: line == "ops-entered\n")
        cli.proc.send_signal(signum)
        assert ops_read_all(idle) == b""       # the first one was handled
        started = time.monotonic()
        cli.proc.send_signal(signum)
        assert cli.proc.wait(5.0) == 0
        assert time.monotonic() - started < 5.0
        assert ops_read_all(held) == b""
    stderr = cli.rest()
    assert ops_last_line(stderr) == "gateway: stopped", stderr
    return stderr


class OpsCommand(OpsCLIProcess):
    """OpsCLIProcess for any command line, started with the signal dispositions
    this process has (no children_get_sigint(): the command decides)."""

    def __init__(self, command: list, cwd, pass_fds=(), env: dict | None = None) -> None:
        environ = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        environ.pop("WEB_CONCURRENCY", None)
        self.proc = subprocess.Popen(
            command, cwd=str(cwd), env=environ, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            pass_fds=tuple(pass_fds), start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()


# A script that starts its arguments as a background job, as `gateway.py ... &`
# in a deploy script or CI step does: bash (no job control) starts the job with
# SIGINT ignored. A first job shows that it is so; all output goes to stderr.
OPS_BACKGROUND_JOB = (
    '"$1" -c "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)" '
    '>&2 & wait $!; '
    '"$@" & echo "job-pid $!" >&2; wait $!; echo "job-exit $?" >&2')


@OPS_POSIX
@pytest.mark.skipif(shutil.which("bash") is None, reason="starts a job with bash")
def test_ops_cli_sigint_stops_a_background_job_gracefully(interface, tmp_path):
    """`gateway.py ... & pid=$!; ...; kill -INT $pid`: SIGINT came in ignored
    and still means "shut down gracefully"; requests in flight are answered."""
    ops_write_apps(tmp_path)
    gate_read, gate_write = os.pipe()
    command = ["bash", "-c", OPS_BACKGROUND_JOB, "bash", sys.executable, OPS_GATEWAY,
               f"--{interface}", f"ops_apps:gate_{interface}", "--port", "0",
               "--threads", "16", "--no-date-header", "--app-dir", str(tmp_path)]
    cli = OpsCommand(command, cwd=tmp_path, pass_fds=[gate_read],
                     env={"OPS_GATE_FD": str(gate_read)})
    try:
        assert cli.wait_line(lambda line: True) == "True\n", "SIGINT not ignored"
        port = cli.port()
        pid = int(next(line for line in cli.seen if line.startswith("job-pid ")).split()[1])

        def stop():
            for _ in range(10):
                cli.wait_line(lambda line: line == "ops-entered\n")
            os.kill(pid, signal.SIGINT)

        def release():
            nonlocal gate_write
            os.close(gate_write)        # EOF on the pipe wakes every /slow
            gate_write = None

        ops_check_graceful(port, stop, release)
        cli.wait_line(lambda line: line == "job-exit 0\n")
        assert cli.proc.wait(TIMEOUT) == 0
        stderr = cli.rest()
        assert ops_last_line(stderr.replace("job-exit 0\n", "")) == "gateway: stopped", stderr
        assert "Traceback" not in stderr, stderr
    finally:
        cli.close()
        for fd in (gate_read, gate_write):
            if fd is not None:
                os.close(fd)


# Runs gateway.main() where the event loop has no add_signal_handler(), as on
# Windows: argv[1] is the folder of gateway.py, the rest its arguments.
OPS_NO_LOOP_SIGNALS_SOURCE = r'''
import asyncio, os, sys


def refuse(self, signum, callback, *args):
    os.write(2, b"ops-no-add-signal-handler\n")
    raise NotImplementedError


asyncio.SelectorEventLoop.add_signal_handler = refuse
sys.path.insert(0, sys.argv.pop(1))
import gateway
sys.exit(gateway.main())
'''

OPS_SIGNAL_APP_SOURCE = r'''
from ops_apps import _say, gate_asgi


async def app(scope, receive, send):
    """gate_asgi, a WebSocket that stays open, and a lifespan that says when
    its shutdown runs."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        _say("ops-lifespan-shutdown")
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
    else:
        await gate_asgi(scope, receive, send)
'''


def ops_without_loop_signals(tmp_path, gate_read: int, *args: str) -> OpsCommand:
    """The ASGI server through OPS_NO_LOOP_SIGNALS_SOURCE, SIGINT as from a terminal."""
    ops_write_apps(tmp_path)
    (tmp_path / "ops_signal_app.py").write_text(OPS_SIGNAL_APP_SOURCE)
    wrapper = tmp_path / "ops_no_loop_signals.py"
    wrapper.write_text(OPS_NO_LOOP_SIGNALS_SOURCE)
    children_get_sigint()       # so that asyncio.run() (3.11+) puts its own on SIGINT
    return OpsCommand([sys.executable, str(wrapper), os.path.dirname(OPS_GATEWAY),
                       "--asgi", "ops_signal_app:app", "--port", "0", "--no-date-header",
                       "--app-dir", str(tmp_path), *args],
                      cwd=tmp_path, pass_fds=[gate_read], env={"OPS_GATE_FD": str(gate_read)})


@OPS_POSIX
def test_ops_cli_ctrl_c_without_loop_signal_handlers_is_graceful(tmp_path):
    """Where the loop cannot watch signals (Windows), Ctrl+C still drains: the
    request in flight is answered, the WebSocket gets 1001, lifespan shutdown runs."""
    gate_read, gate_write = os.pipe()
    cli = ops_without_loop_signals(tmp_path, gate_read)
    try:
        port = cli.port()
        with ws_connection(port) as ws, connect(port) as held:
            held.sendall(OPS_SLOW)
            cli.wait_line(lambda line: line == "ops-entered\n")
            assert "ops-no-add-signal-handler\n" in cli.seen
            cli.proc.send_signal(signal.SIGINT)
            assert ws.read_close() == (1001, b"server shutting down")
            ws.sock.sendall(ws_close_frame(1001))
            ws.assert_eof()
            ops_assert_refused(port)              # draining, not stopped
            os.close(gate_write)
            gate_write = None
            assert ops_read_all(held) == OPS_SLOW_CLOSING
        assert cli.proc.wait(TIMEOUT) == 0
        stderr = cli.rest()
        assert "ops-lifespan-shutdown\n" in stderr, stderr
        assert ops_last_line(stderr) == "gateway: stopped", stderr
        assert "Traceback" not in stderr, stderr
    finally:
        cli.close()
        for fd in (gate_read, gate_write):
            if fd is not None:
                os.close(fd)


@OPS_POSIX
def test_ops_cli_second_ctrl_c_without_loop_signal_handlers_stops_at_once(tmp_path):
    gate_read, gate_write = os.pipe()
    cli = ops_without_loop_signals(tmp_path, gate_read, "--timeout-graceful-shutdown", "30")
    try:
        stderr = ops_second_signal_stops_at_once(cli, signal.SIGINT)
        assert "Traceback" not in stderr, stderr
    finally:
        cli.close()
        os.close(gate_read)
        os.close(gate_write)


# =============================================================================
# 2. Worker processes
# =============================================================================


def ops_ask_pid(port: int) -> dict:
    status, headers, body = request(port, OPS_CLOSE)
    assert status == 200, body
    return json.loads(body)


def ops_pid_from_another_worker(port: int, busy: int) -> dict:
    """Stop worker `busy` (SIGSTOP) so that another one must accept; ask."""
    os.kill(busy, signal.SIGSTOP)
    try:
        return ops_ask_pid(port)
    finally:
        os.kill(busy, signal.SIGCONT)


def ops_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@OPS_POSIX
@OPS_FORK
def test_ops_workers_share_the_socket_and_are_replaced(interface, tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli(f"--{interface}", f"ops_apps:pid_{interface}", "--workers", "2",
                 "--port", "0", "--no-access-log", "--app-dir", str(tmp_path),
                 cwd=tmp_path) as cli:
        parent = cli.proc.pid
        port = cli.port()
        first = ops_ask_pid(port)
        a = first["pid"]
        assert first["ppid"] == parent and a != parent
        if interface == "wsgi":
            assert first["multiprocess"] is True
        second = ops_pid_from_another_worker(port, a)
        b = second["pid"]
        assert second["ppid"] == parent and b not in (a, parent)

        os.kill(a, signal.SIGKILL)
        died = f"gateway: worker {a} died (exit -{int(signal.SIGKILL)}); starting another\n"
        cli.wait_line(lambda line: line == died)
        third = ops_pid_from_another_worker(port, b)
        c = third["pid"]
        assert third["ppid"] == parent and c not in (a, b, parent)
        assert ops_ask_pid(port)["pid"] in (b, c)

        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 0
        assert ops_gone(b) and ops_gone(c), "a worker outlived the parent"
        stderr = cli.rest()
        assert "Traceback" not in stderr, stderr


@OPS_POSIX
@OPS_FORK
def test_ops_workers_lifespan_startup_failure_exits_3(tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:failing_asgi", "--workers", "2", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        assert cli.proc.wait(TIMEOUT) == 3
        stderr = cli.rest()
    assert "gateway: application startup failed: ops-no-database\n" in stderr, stderr
    assert "Traceback" not in stderr, stderr


@OPS_POSIX
@OPS_FORK
def test_ops_workers_sigterm_during_lifespan_startup_stops_them(tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:slow_start_asgi", "--workers", "2", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        cli.port()
        workers = {int(cli.wait_line(lambda line: line.startswith("ops-starting ")).split()[1])
                   for _ in range(2)}
        assert len(workers) == 2
        cli.proc.send_signal(signal.SIGTERM)       # both are in their startup
        try:   # well before the 10 s after which a startup that ignored it ends
            code = cli.proc.wait(8.0)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "the parent did not exit: its workers ignored SIGTERM"
        assert all(ops_gone(pid) for pid in workers)


@OPS_POSIX
@OPS_FORK
def test_ops_workers_sigterm_during_a_hung_startup_stops_them(tmp_path):
    """A startup that never completes, in every worker: the relayed SIGTERM
    stops each one as it stops a single process (the line, exit 0, no
    lifespan.shutdown), and the parent exits 0."""
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:hung_start_asgi", "--workers", "2", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        cli.port()
        workers = {int(cli.wait_line(lambda line: line.startswith("ops-starting ")).split()[1])
                   for _ in range(2)}
        assert len(workers) == 2
        cli.proc.send_signal(signal.SIGTERM)
        try:
            code = cli.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"exit {code}; stderr: {''.join(cli.seen)}"
        stderr = cli.rest()
        assert all(ops_gone(pid) for pid in workers)
    assert stderr.count("gateway: shutdown requested during the application startup: "
                        "stopping without serving\n") == 2, stderr
    assert "ops-then-got" not in stderr, stderr
    assert "Traceback" not in stderr, stderr


@OPS_POSIX
@OPS_FORK
def test_ops_workers_lifespan_shutdown_failure_exits_4(tmp_path):
    """ASGI Lifespan "Shutdown Failed" in a worker: the parent exits with the
    worker's status, 4."""
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:bad_shutdown_asgi", "--workers", "2", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        cli.port()
        workers = {int(cli.wait_line(lambda line: line.startswith("ops-started ")).split()[1])
                   for _ in range(2)}
        assert len(workers) == 2
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 4
        stderr = cli.rest()
        assert all(ops_gone(pid) for pid in workers)
    assert stderr.count("gateway: application shutdown failed: ops-cannot-flush\n") == 2, stderr
    assert "Traceback" not in stderr, stderr


def ops_children(pid: int) -> set[int]:
    """The processes whose parent is `pid`, from /proc (Linux)."""
    children = set()
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.add(int(name))
    return children


@OPS_POSIX
@OPS_FORK
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds workers in /proc")
def test_ops_workers_ctrl_c_to_the_process_group_counts_once(interface, tmp_path):
    """Ctrl+C in a terminal reaches the parent and every worker. A worker leaves
    it to the SIGTERM its parent relays: one shutdown signal, so a graceful one."""
    ops_write_apps(tmp_path)
    gate_read, gate_write = os.pipe()
    try:
        with ops_cli(f"--{interface}", f"ops_apps:gate_{interface}", "--workers", "2",
                     "--port", "0", "--no-date-header", "--app-dir", str(tmp_path),
                     cwd=tmp_path, pass_fds=[gate_read],
                     env={"OPS_GATE_FD": str(gate_read)}) as cli:
            port = cli.port()
            wait_for(lambda: len(ops_children(cli.proc.pid)) == 2)
            with connect(port) as held:
                held.sendall(OPS_SLOW)
                cli.wait_line(lambda line: line == "ops-entered\n")
                os.killpg(cli.proc.pid, signal.SIGINT)     # the whole group, as a terminal
                # The idle worker drains at once and leaves; by then the busy one
                # has had every signal it is going to get.
                wait_for(lambda: len(ops_children(cli.proc.pid)) <= 1)
                os.close(gate_write)
                gate_write = None
                answer = ops_read_all(held)    # "Connection: close" if it saw the SIGTERM
                assert answer.replace(b"Connection: close\r\n", b"") == OPS_SLOW_ANSWER
            assert cli.proc.wait(TIMEOUT) == 0
    finally:
        os.close(gate_read)
        if gate_write is not None:
            os.close(gate_write)

OPS_SLOW_SECOND_CHILD_SOURCE = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
gate = int(os.environ["OPS_FORK_GATE_FD"])
real_fork, real_kill, forks = os.fork, os.kill, []

def fork():
    """The second worker is slow to start: it waits on a pipe just after fork()."""
    forks.append(1)
    pid = real_fork()
    if pid == 0 and len(forks) == 2:
        print("ops-second-child-waits", file=sys.stderr, flush=True)
        os.read(gate, 1)
    return pid

def kill(pid, signum):
    """Say who relays a signal to whom."""
    print(f"ops-kill from {os.getpid()} to {pid}", file=sys.stderr, flush=True)
    real_kill(pid, signum)

os.fork, os.kill = fork, kill
import gateway
sys.exit(gateway.main(sys.argv[2:]))
'''


@OPS_POSIX
@OPS_FORK
def test_ops_workers_a_child_never_runs_the_parents_signal_handler(tmp_path):
    """A signal that reaches a new worker before it has set its own handlers
    (it may not have run at all yet) must not run the parent's: that would
    relay it to the other workers a second time, a forced stop."""
    ops_write_apps(tmp_path)
    wrapper = tmp_path / "ops_slow_second_child.py"
    wrapper.write_text(OPS_SLOW_SECOND_CHILD_SOURCE)
    gate_read, gate_write = os.pipe()
    cli = OpsCommand([sys.executable, str(wrapper), os.path.dirname(OPS_GATEWAY),
                      "--wsgi", "ops_apps:hello_wsgi", "--workers", "2", "--port", "0",
                      "--app-dir", str(tmp_path)],
                     cwd=tmp_path, pass_fds=[gate_read],
                     env={"OPS_FORK_GATE_FD": str(gate_read)})
    try:
        cli.port()
        cli.wait_line(lambda line: line == "ops-second-child-waits\n")
        os.killpg(cli.proc.pid, signal.SIGINT)      # Ctrl+C, while it waits
        cli.wait_line(lambda line: line.startswith("ops-kill from"))
        os.write(gate_write, b"go")
        assert cli.proc.wait(TIMEOUT) == 0
        kills = [line.split() for line in cli.rest().splitlines()
                 if line.startswith("ops-kill from")]
        assert kills and {int(line[2]) for line in kills} == {cli.proc.pid}, kills
    finally:
        cli.close()
        os.close(gate_read)
        os.close(gate_write)



def test_ops_workers_refused_without_fork(monkeypatch, caplog):
    monkeypatch.delattr(os, "fork", raising=False)
    caplog.set_level(logging.ERROR, logger="gateway")
    code = gateway.main(["--wsgi", "echo_wsgi:application", "--workers", "2",
                         "--port", "0"])
    assert code == 1
    assert [r.getMessage() for r in caplog.records if r.name == "gateway"] == [
        "--workers needs os.fork(), which this platform does not have"]


# =============================================================================
# 3. TLS
# =============================================================================


@pytest.fixture(scope="session")
def ops_cert(tmp_path_factory):
    """(certfile, keyfile) of a throwaway self-signed certificate for localhost."""
    if ssl is None:
        pytest.skip("this Python has no ssl module")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate with")
    folder = tmp_path_factory.mktemp("ops_tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def ops_tls_connect(port: int, cert: str, client_cert: tuple | None = None,
                    version: str | None = None):
    """A TLS client of `cert`; with `client_cert` (certfile, keyfile) it shows
    one; `version` ("TLSv1.2", "TLSv1.3") pins the protocol."""
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False            # CN only, no subjectAltName
    context.verify_mode = ssl.CERT_REQUIRED   # still: it must be this certificate
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    if version is not None:
        context.minimum_version = context.maximum_version = getattr(
            ssl.TLSVersion, version.replace(".", "_"))
    return context.wrap_socket(connect(port), server_hostname="localhost")


def ops_tls_server(interface: str, app, cert, **options):
    return running_server(interface, app, ssl_certfile=cert[0], ssl_keyfile=cert[1],
                          **options)


def test_ops_tls_echo_keep_alive(interface, ops_cert):
    with ops_tls_server(interface, ECHO_APPS[interface], ops_cert) as port:
        with ops_tls_connect(port, ops_cert[0]) as sock:
            reader = ResponseReader(sock)
            for body in (b"first over TLS", b"second, same connection"):
                sock.sendall(ops_post(body))
                status, headers, got = reader.read_response()
                assert (status, got, headers.get(b"connection")) == (200, body, None)


def test_ops_tls_3_mib_intact(interface, ops_cert):
    body = random.Random(7).randbytes(3 * 1024 * 1024)
    with ops_tls_server(interface, ops_buffered_echo(interface), ops_cert) as port:
        with ops_tls_connect(port, ops_cert[0]) as sock:
            sock.sendall(ops_post(body))
            status, headers, got = ResponseReader(sock).read_response()
    assert status == 200 and headers[b"content-length"] == b"%d" % len(body)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("how", ["read()", "read(CONTENT_LENGTH)"])
def test_ops_wsgi_read_of_a_large_body(how):
    def app(environ, start_response):
        stream = environ["wsgi.input"]
        body = stream.read() if how == "read()" else stream.read(
            int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    body = random.Random(8).randbytes(1_000_000)
    with running_server("wsgi", app, timeout_graceful_shutdown=0.5) as port:
        with connect(port) as sock:
            sock.settimeout(1.5)
            try:
                sock.sendall(ops_post(body))
                status, _, got = ResponseReader(sock).read_response()
            except socket.timeout:
                status, got = None, b""
    assert (status, len(got), got == body) == (200, len(body), True)


def test_ops_tls_scheme(interface, ops_cert):
    app = ops_json_app(interface,
                       lambda env: {"scheme": env["wsgi.url_scheme"],
                                    "https": env.get("HTTPS")},
                       lambda scope: {"scheme": scope["scheme"], "type": scope["type"]})
    with ops_tls_server(interface, app, ops_cert) as port:
        with ops_tls_connect(port, ops_cert[0]) as sock:
            sock.sendall(OPS_GET)
            status, _, body = ResponseReader(sock).read_response()
        assert status == 200
        if interface == "wsgi":
            assert json.loads(body) == {"scheme": "https", "https": "on"}
            return
        assert json.loads(body) == {"scheme": "https", "type": "http"}
        with ops_tls_connect(port, ops_cert[0]) as sock:    # a WebSocket: wss
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            reader = ResponseReader(sock)
            status, headers, _ = reader.read_head()
            assert status == 101
            text = json.dumps({"scheme": "wss", "type": "websocket"}).encode()
            assert reader.read_exact(2 + len(text)) == bytes([0x81, len(text)]) + text


def test_ops_tls_plain_client_is_dropped(interface, ops_cert):
    with ops_tls_server(interface, ECHO_APPS[interface], ops_cert) as port:
        with connect(port) as plain:
            plain.settimeout(5.0)
            plain.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            data = ops_read_all(plain)      # socket.timeout here would be a hang
        # Nothing but, at most, a TLS alert record (content type 21).
        assert data == b"" or data.startswith(b"\x15\x03"), data
        with ops_tls_connect(port, ops_cert[0]) as sock:
            sock.sendall(ops_post(b"still serving"))
            assert ResponseReader(sock).read_response()[::2] == (200, b"still serving")


def test_ops_tls_silent_client_dropped_without_stalling_others(interface, ops_cert):
    with ops_tls_server(interface, ECHO_APPS[interface], ops_cert,
                        timeout_request_head=0.5) as port:
        with connect(port) as silent:
            started = time.monotonic()
            with ops_tls_connect(port, ops_cert[0]) as sock:   # served meanwhile
                sock.sendall(ops_post(b"not stalled"))
                assert ResponseReader(sock).read_response()[::2] == (200, b"not stalled")
            assert select.select([silent], [], [], 0)[0] == [], \
                "the silent client was dropped before the other one was served"
            assert ops_read_all(silent) == b""
            elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 5.0, elapsed


# -- the ASGI TLS extension (tls.rst v0.2; checklist E-09, E-10) ----------------

# RFC 4514 §2.4: these need a backslash; the O and OU below use two of them.
OPS_CLIENT_SUBJECT = "/C=DE/O=Example, Inc./OU=#ops/CN=alice"
OPS_CLIENT_NAME = r"CN=alice,OU=\#ops,O=Example\, Inc.,C=DE"


@pytest.fixture(scope="session")
def ops_client_cert(ops_cert, tmp_path_factory):
    """(ca_file, certfile, keyfile): a test CA and a client certificate it signed."""
    openssl = shutil.which("openssl")
    folder = tmp_path_factory.mktemp("ops_client_tls")
    ca, ca_key = str(folder / "ca.pem"), str(folder / "ca.key")
    cert, key, csr = (str(folder / name) for name in ("client.pem", "client.key",
                                                       "client.csr"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # The extensions that VERIFY_X509_STRICT (Python 3.13's default) asks for.
    extensions = folder / "client.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                          "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\n"
                          "authorityKeyIdentifier=keyid\n")
    for command in (
            [openssl, "req", "-x509", *ec, "-subj", "/CN=gateway test CA", "-days", "1",
             "-addext", "keyUsage=critical,keyCertSign", "-keyout", ca_key, "-out", ca],
            [openssl, "req", *ec, "-subj", OPS_CLIENT_SUBJECT, "-keyout", key, "-out", csr],
            [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
             "-set_serial", "2", "-days", "1", "-extfile", str(extensions), "-out", cert]):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return ca, cert, key


def ops_pem(path: str) -> str:
    """The certificate in a PEM file, as ssl.DER_cert_to_PEM_cert writes it."""
    with open(path) as file:
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(file.read()))


def ops_tls_scope_app():
    """ASGI: answers scope["extensions"].get("tls", "absent") as JSON, over
    HTTP or as one WebSocket text message."""
    return ops_json_app("asgi", None, lambda scope: scope["extensions"].get("tls", "absent"))


def ops_ws_text(sock) -> str:
    """Upgrade `sock` to a WebSocket and read one unmasked text message."""
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    reader = ResponseReader(sock)
    assert reader.read_head()[0] == 101
    first, length = reader.read_exact(2)
    assert first == 0x81
    if length == 126:
        length = struct.unpack("!H", reader.read_exact(2))[0]
    return reader.read_exact(length).decode()


def ops_expected_cipher_suite(sock) -> int:
    """The IANA id of the client's cipher, worked out on the client's side."""
    name = sock.cipher()[0]
    ids = [c["id"] & 0xFFFF for c in sock.context.get_ciphers() if c["name"] == name]
    assert len(ids) == 1, name
    return ids[0]


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_ops_tls_extension_without_client_cert(version, ops_cert, monkeypatch):
    # ASGI TLS extension: the keys of "tls" on a connection with no client cert.
    made, original = [], gateway.tls_extension
    monkeypatch.setattr(gateway, "tls_extension", lambda *args: made.append(args)
                        or original(*args))
    with ops_tls_server("asgi", ops_tls_scope_app(), ops_cert) as port:
        with ops_tls_connect(port, ops_cert[0], version=version) as sock:
            reader = ResponseReader(sock)
            answers = []
            for _ in range(2):            # two requests, one connection
                sock.sendall(OPS_GET)
                status, _, body = reader.read_response()
                assert status == 200
                answers.append(json.loads(body))
            sent = ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True))
            expected = {
                "server_cert": sent,
                "client_cert_chain": [],
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}[version],
                "cipher_suite": ops_expected_cipher_suite(sock),
            }
            assert sock.version() == version
    assert answers == [expected, expected]
    assert sent == ops_pem(ops_cert[0])         # the certificate of --ssl-certfile
    assert len(made) == 1                       # once per connection, not per request
    if version == "TLSv1.3":                    # RFC 8446 B.4: TLS_AES_*, TLS_CHACHA20_*
        assert expected["cipher_suite"] in (0x1301, 0x1302, 0x1303)


def test_ops_tls_extension_with_client_cert(ops_cert, ops_client_cert):
    # ASGI TLS extension: client_cert_chain starts with the client's certificate,
    # client_cert_name is its subject in RFC 4514 form; http and websocket alike.
    ca, cert, key = ops_client_cert
    with ops_tls_server("asgi", ops_tls_scope_app(), ops_cert, ssl_ca_certs=ca) as port:
        with ops_tls_connect(port, ops_cert[0], client_cert=(cert, key)) as sock:
            sock.sendall(OPS_GET)
            status, _, body = ResponseReader(sock).read_response()
            cipher_suite = ops_expected_cipher_suite(sock)
        assert status == 200
        tls = json.loads(body)
        assert tls == {
            "server_cert": ops_pem(ops_cert[0]),
            "client_cert_chain": [ops_pem(cert)],
            "client_cert_name": OPS_CLIENT_NAME,
            "client_cert_error": None,      # verified: a failed one ends the handshake
            "tls_version": 0x0304,
            "cipher_suite": cipher_suite,
        }
        with ops_tls_connect(port, ops_cert[0], client_cert=(cert, key)) as sock:
            assert json.loads(ops_ws_text(sock)) == tls           # wss: the same
        with ops_tls_connect(port, ops_cert[0]) as sock:          # CERT_OPTIONAL
            sock.sendall(OPS_GET)
            status, _, body = ResponseReader(sock).read_response()
        assert status == 200
        assert json.loads(body)["client_cert_chain"] == []
        assert json.loads(body)["client_cert_name"] is None


def test_ops_tls_extension_absent_without_tls():
    # ASGI TLS extension: "forbidden" on a connection that is not TLS.
    with running_server("asgi", ops_tls_scope_app()) as port:
        with connect(port) as sock:
            sock.sendall(OPS_GET)
            status, _, body = ResponseReader(sock).read_response()
            assert (status, json.loads(body)) == (200, "absent")
        with connect(port) as sock:
            assert json.loads(ops_ws_text(sock)) == "absent"


def test_ops_tls_wsgi_environ_gets_only_https(ops_cert, ops_client_cert):
    # PEP 3333 has no variable for certificates or ciphers: with a client
    # certificate, the environ differs from a plain one by HTTPS=on alone.
    ca, cert, key = ops_client_cert
    seen: list = []

    def app(environ, start_response):
        seen.append(environ)
        start_response("200 OK", [("Content-Length", "0")])
        return []

    with running_server("wsgi", app) as port:
        with connect(port) as sock:
            sock.sendall(OPS_GET)
            assert ResponseReader(sock).read_response()[0] == 200
    with ops_tls_server("wsgi", app, ops_cert, ssl_ca_certs=ca) as port:
        with ops_tls_connect(port, ops_cert[0], client_cert=(cert, key)) as sock:
            sock.sendall(OPS_GET)
            assert ResponseReader(sock).read_response()[0] == 200
    plain, tls = seen
    assert set(tls) - set(plain) == {"HTTPS"} and set(plain) <= set(tls)
    assert (tls["HTTPS"], tls["wsgi.url_scheme"]) == ("on", "https")
    assert not any("alice" in value for value in tls.values() if isinstance(value, str))


@pytest.mark.parametrize("subject, name", [
    ((), ""),
    (((("commonName", "a"),),), "CN=a"),
    # RDNs last first; one RDN's attributes joined with "+"
    (((("countryName", "DE"),), (("organizationName", "O1"), ("commonName", "b"))),
     "O=O1+CN=b,C=DE"),
    # RFC 4514 §2.4: specials anywhere; a leading "#" or space, a trailing space; NUL
    (((("commonName", 'x"+,;<>\\y'),),), r'CN=x\"\+\,\;\<\>\\y'),
    (((("commonName", " #a "),),), r"CN=\ #a\ "),
    (((("commonName", " "),),), "CN=\\ "),
    (((("commonName", "a\0b"),),), r"CN=a\00b"),
    # types without an RFC 4514 §3 short name keep ssl's (LDAP) name or OID
    (((("emailAddress", "a@b"),), (("2.5.4.97", "v"),)), "2.5.4.97=v,emailAddress=a@b"),
])
def test_ops_tls_rfc4514_name(subject, name):
    assert gateway.rfc4514_name(subject) == name


# =============================================================================
# 4. Sockets: unix, inherited, backlog
# =============================================================================


def ops_unix_request(path: str) -> tuple[int, bytes]:
    """One GET over the unix socket at `path`: (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(OPS_GET)
        status, _, body = ResponseReader(sock).read_response()
    return status, body


def ops_assert_unix_view(interface: str, path: str, body: bytes) -> None:
    """What the app saw of a unix-socket peer: no client address, the path."""
    if interface == "wsgi":
        assert json.loads(body) == {"remote_addr": "absent", "server_name": path}
    else:
        assert json.loads(body) == {"server": [path, None], "client": None}


@OPS_UNIX
def test_ops_unix_socket_in_process(interface, tmp_path):
    path = str(tmp_path / "ops.sock")
    listener = gateway.make_listener("127.0.0.1", 0, uds=path)
    app = ops_json_app(interface,
                       lambda env: {"remote_addr": env.get("REMOTE_ADDR", "absent"),
                                    "server_name": env["SERVER_NAME"]},
                       lambda scope: {"server": scope["server"], "client": scope["client"]})
    with ops_serving(interface, app, listener=listener):
        status, body = ops_unix_request(path)
    assert status == 200
    ops_assert_unix_view(interface, path, body)


@OPS_UNIX
def test_ops_unix_socket_replaces_a_stale_socket(tmp_path):
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(path)                  # left behind by a past run
    with gateway.make_listener("127.0.0.1", 0, uds=path) as listener:
        assert listener.getsockname() == path


@OPS_UNIX
def test_ops_unix_socket_never_deletes_a_regular_file(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_bytes(b"keep me")
    try:
        gateway.make_listener("127.0.0.1", 0, uds=str(precious)).close()
    except OSError:
        pass                            # refusing is fine
    assert precious.read_bytes() == b"keep me"


@OPS_POSIX
@OPS_UNIX
def test_ops_cli_unix_socket(interface, tmp_path):
    ops_write_apps(tmp_path)
    path = str(tmp_path / "cli.sock")
    with ops_cli(f"--{interface}", f"ops_apps:scope_{interface}", "--uds", path,
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        assert cli.serving().group(2) == path
        status, body = ops_unix_request(path)
        assert status == 200
        ops_assert_unix_view(interface, path, body)
        line = cli.wait_line(lambda text: text.startswith("gateway.access: "))
        assert re.fullmatch(r'gateway\.access: - - "GET /ops\?x=1 HTTP/1\.1" 200 \d+ '
                            r'\d+\.\dms\n', line), line
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 0


@OPS_POSIX
def test_ops_cli_inherited_socket(interface, tmp_path):
    ops_write_apps(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        fd = listener.fileno()
        with ops_cli(f"--{interface}", f"ops_apps:hello_{interface}", "--fd", str(fd),
                     "--app-dir", str(tmp_path), cwd=tmp_path, pass_fds=[fd]) as cli:
            listener.close()                 # only the server holds it now
            assert cli.port() == port
            assert request(port, OPS_CLOSE)[::2] == (200, b"hello")
            cli.proc.send_signal(signal.SIGTERM)
            assert cli.proc.wait(TIMEOUT) == 0


def ops_listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:port: for a LISTEN
    socket, `ss -ltn` shows it as Send-Q (Linux)."""
    shown = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                           text=True, timeout=TIMEOUT, check=True).stdout.split()
    assert shown[0] == "LISTEN" and shown[3] == f"127.0.0.1:{port}", shown
    return int(shown[2])


@OPS_POSIX
@pytest.mark.skipif(shutil.which("ss") is None, reason="reads the backlog with ss (Linux)")
def test_ops_cli_backlog(interface, tmp_path):
    args = [f"--{interface}", f"ops_apps:hello_{interface}", "--port", "0", "--backlog", "7"]
    assert gateway.config_from(gateway.build_arg_parser().parse_args(args)).backlog == 7
    ops_write_apps(tmp_path)
    with ops_cli(*args, "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        port = cli.port()
        # Answered: the server is serving, so asyncio has called listen() too.
        assert request(port, OPS_CLOSE)[::2] == (200, b"hello")
        assert ops_listen_backlog(port) == 7


OPS_NOFILE = 40           # the server's descriptor limit in the test below
OPS_HOLD_SECONDS = 2.5    # long enough for a few retries on both paths


def ops_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@OPS_POSIX
def test_ops_cli_out_of_descriptors_backs_off(interface, tmp_path):
    wrapper = tmp_path / "low_nofile.py"
    wrapper.write_text(
        "import resource, sys\n"
        f"sys.path.insert(0, {os.path.dirname(OPS_GATEWAY)!r})\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({OPS_NOFILE}, hard))\n"
        "import gateway\n"
        "sys.exit(gateway.main())\n")
    spec = "echo_wsgi:application" if interface == "wsgi" else "echo_asgi:app"
    cli = SrvCLIProcess(f"--{interface}", spec, "--port", "0", "--no-access-log",
                        "--timeout-keep-alive", "60", launch=(str(wrapper),))
    held: list[socket.socket] = []
    try:
        port = int(OPS_SERVING.fullmatch(cli.next_line()).group(1))
        # More clients than descriptors: the last ones wait in the backlog.
        held = [connect(port) for _ in range(OPS_NOFILE + 20)]
        line = cli.next_line()
        assert line == "gateway: out of file descriptors (EMFILE): not accepting for now\n"
        cpu = ops_cpu_seconds(cli.proc.pid)
        deadline = time.monotonic() + OPS_HOLD_SECONDS
        during: list[str] = []
        with contextlib.suppress(queue.Empty):
            while (left := deadline - time.monotonic()) > 0:
                during.append(cli.lines.get(timeout=left))
        assert during == []                      # not one line more while it lasts
        if cpu is not None:                      # and no spinning
            assert ops_cpu_seconds(cli.proc.pid) - cpu < 0.25 * OPS_HOLD_SECONDS
        for sock in held:
            sock.close()
        assert request(port, OPS_CLOSE)[0] == 200
        assert cli.next_line() == "gateway: accepting connections again\n"
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 0
        assert cli.rest().endswith("gateway: stopped\n")
        assert "Traceback" not in "".join(cli.seen)
    finally:
        for sock in held:
            sock.close()
        cli.kill()


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_NOFILE is POSIX")
def test_asgi_listener_pauses_accept_after_running_out_of_descriptors():
    # asyncio makes up to 100 accept() calls per wake-up and goes on after one
    # fails for want of descriptors, each failure adding a retry; ASGIListener
    # answers "nobody waits" (BlockingIOError) to the calls after the failure.
    import resource
    with socket.create_server(("127.0.0.1", 0)) as plain:
        listener = gateway.ASGIListener(plain.family, plain.type,
                                        fileno=socket.dup(plain.fileno()))
        with listener, socket.create_connection(plain.getsockname(), timeout=TIMEOUT):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                with pytest.raises(OSError) as failure:
                    listener.accept()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert failure.value.errno == errno.EMFILE
            with pytest.raises(BlockingIOError):     # paused: the kernel is not asked
                listener.accept()
            listener.paused_until = 0.0              # as if the pause were over
            conn, _ = listener.accept()
            conn.close()


# =============================================================================
# 5. Proxy headers
# =============================================================================


def ops_proxy_app(interface: str):
    return ops_json_app(
        interface,
        lambda env: {"client": env["REMOTE_ADDR"], "port": env["REMOTE_PORT"],
                     "scheme": env["wsgi.url_scheme"], "host": env["HTTP_HOST"]},
        lambda scope: {"client": scope["client"][0], "port": str(scope["client"][1]),
                       "scheme": scope["scheme"],
                       "host": dict(scope["headers"])[b"host"].decode("latin-1")})


OPS_ALL_FORWARDED = (b'Forwarded: for="[2001:db8::1]:4711";proto=https;host=example.com\r\n'
                     b"X-Forwarded-For: 5.6.7.8\r\nX-Forwarded-Proto: http\r\n"
                     b"X-Forwarded-Host: other.example\r\n")

OPS_PROXY_CASES = {
    # name: (options, extra request fields, (client or None for the peer, scheme, host))
    "off": ({}, b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
                b"X-Forwarded-Host: evil.example\r\n", (None, "http", "test")),
    "right-most-untrusted": (
        {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1,10.0.0.0/8"},
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n", ("1.2.3.4", "http", "test")),
    "only-the-peer-trusted": (
        {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n", ("10.0.0.1", "http", "test")),
    "proto-and-host": (
        {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: example.org\r\n", ("1.2.3.4", "https", "example.org")),
    "forwarded-wins": ({"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"},
                       OPS_ALL_FORWARDED, ("2001:db8::1", "https", "example.com")),
    "untrusted-peer": ({"proxy_headers": True, "forwarded_allow_ips": "10.9.9.9"},
                       OPS_ALL_FORWARDED, (None, "http", "test")),
    "star-trusts-all": ({"proxy_headers": True, "forwarded_allow_ips": "*"},
                        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n",
                        ("1.2.3.4", "https", "test")),
}


@pytest.mark.parametrize("case", list(OPS_PROXY_CASES))
def test_ops_proxy_headers(interface, case):
    options, fields, (client, scheme, host) = OPS_PROXY_CASES[case]
    with ops_serving(interface, ops_proxy_app(interface), **options) as (_, _, port):
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + fields + b"\r\n")
            status, _, body = ResponseReader(sock).read_response()
            peer_port = str(sock.getsockname()[1])
    assert status == 200
    expected = {"client": client or "127.0.0.1", "port": "0" if client else peer_port,
                "scheme": scheme, "host": host}
    assert json.loads(body) == expected


@pytest.mark.parametrize("address, allow, trusted", [
    (None, "127.0.0.1", True),               # a unix socket peer
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.2", "127.0.0.1", False),
    ("10.1.2.3", "127.0.0.1, 10.0.0.0/8", True),
    ("11.0.0.1", "127.0.0.1,10.0.0.0/8", False),
    ("2001:db8::5", "2001:db8::/32", True),
    ("2001:db9::5", "2001:db8::/32", False),
    ("1.2.3.4", "*", True),
    ("unknown", "127.0.0.1", False),
    ("_hidden", "*", True),
])
def test_ops_trusted_proxy(address, allow, trusted):
    assert gateway.trusted_proxy(address, Config(forwarded_allow_ips=allow)) is trusted


@pytest.mark.parametrize("headers, hops", [
    ([], []),
    ([(b"x-forwarded-for", b"1.2.3.4, 10.0.0.1")],
     [{"for": "1.2.3.4"}, {"for": "10.0.0.1"}]),
    ([(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-for", b"10.0.0.1")],
     [{"for": "1.2.3.4"}, {"for": "10.0.0.1"}]),
    ([(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-proto", b"https"),
      (b"x-forwarded-host", b"example.org")],
     [{"for": "1.2.3.4", "proto": "https", "host": "example.org"}]),
    ([(b"x-forwarded-proto", b"https")], [{"proto": "https"}]),
    ([(b"forwarded", b'for="[2001:db8::1]:4711";proto=https;host=example.com, '
                     b"for=10.0.0.1")],
     [{"for": "2001:db8::1", "proto": "https", "host": "example.com"},
      {"for": "10.0.0.1"}]),
    ([(b"forwarded", b"For=192.0.2.60:8080;Proto=http;by=203.0.113.43")],
     [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}]),
    ([(b"forwarded", b"for=1.2.3.4"), (b"forwarded", b"for=10.0.0.1")],
     [{"for": "1.2.3.4"}, {"for": "10.0.0.1"}]),
    ([(b"x-forwarded-for", b"5.6.7.8"), (b"forwarded", b"for=1.2.3.4")],
     [{"for": "1.2.3.4"}]),
])
def test_ops_forwarded_hops(headers, hops):
    assert gateway.forwarded_hops(headers) == hops


def test_ops_behind_proxy():
    request_ = Request(method="GET", target=b"/", path=b"/", query=b"", version="1.1",
                       headers=[(b"host", b"t"), (b"x-forwarded-for", b"1.2.3.4, 10.0.0.1"),
                                (b"x-forwarded-proto", b"HTTPS"),
                                (b"x-forwarded-host", b"example.org")],
                       chunked=False, content_length=0, keep_alive=True,
                       expect_continue=False)
    peer = ("127.0.0.1", 5555)
    on = Config(proxy_headers=True, forwarded_allow_ips="127.0.0.1,10.0.0.0/8")
    assert gateway.behind_proxy(request_, peer, "http", Config()) == (peer, "http", None)
    assert gateway.behind_proxy(request_, peer, "http", on) == (
        ("1.2.3.4", 0), "https", "example.org")
    assert gateway.behind_proxy(request_, None, "http", on) == (   # unix peer: trusted
        ("1.2.3.4", 0), "https", "example.org")
    untrusted = ("192.0.2.1", 5555)
    assert gateway.behind_proxy(request_, untrusted, "http", on) == (untrusted, "http", None)
    bare = dataclasses.replace(request_, headers=[(b"host", b"t")])
    assert gateway.behind_proxy(bare, peer, "https", on) == (peer, "https", None)


# =============================================================================
# 6. Access log and response headers
# =============================================================================


def ops_access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.access"]


def test_ops_access_log_one_line_per_request(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    with running_server(interface, ops_fixed_app(interface, b"hello"), threads=1) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for _ in range(2):
                sock.sendall(OPS_GET)
                assert reader.read_response()[::2] == (200, b"hello")
            client = "127.0.0.1:%d" % sock.getsockname()[1]
        wait_for(lambda: len(ops_access_lines(caplog)) >= 2)
    lines = ops_access_lines(caplog)
    assert len(lines) == 2, lines
    for line in lines:
        assert re.fullmatch(re.escape(f'{client} - "GET /ops?x=1 HTTP/1.1" 200 5 ')
                            + r"\d+\.\dms", line), line


def test_ops_access_log_off(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    with running_server(interface, ops_fixed_app(interface, b"hello"), threads=1,
                        access_log=False) as port:
        with connect(port) as sock:
            reader = ResponseReader(sock)
            for _ in range(2):    # one thread, one connection: the first is logged by now
                sock.sendall(OPS_GET)
                assert reader.read_response()[::2] == (200, b"hello")
            assert ops_access_lines(caplog) == []


def test_ops_access_log_format_and_escaping(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    with running_server(interface, ops_fixed_app(interface, b"hello"),
                        access_log_format="%(status)s %(request_line)s") as port:
        raw = b"GET /a%0d%0aFAKE%1b[31m HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        assert request(port, raw)[::2] == (200, b"hello")
        wait_for(lambda: ops_access_lines(caplog))
    assert ops_access_lines(caplog) == ["200 GET /a%0d%0aFAKE%1b[31m HTTP/1.1"]


def test_ops_access_log_reaches_a_users_handler_and_level(interface):
    # Access lines are records on the "gateway.access" logger: a handler of
    # one's own there gets them, and a level set there silences them.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gateway.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    paths = lambda: [r.args["request_line"].split()[1] for r in records]
    try:
        with running_server(interface, ops_fixed_app(interface, b"hello"),
                            access_log_format="%(status)s %(bytes)s") as port:
            with connect(port) as sock:
                reader = ResponseReader(sock)

                def get(path: bytes) -> None:
                    sock.sendall(OPS_GET.replace(b"/ops", path))
                    assert reader.read_response()[::2] == (200, b"hello")
                get(b"/first")
                wait_for(lambda: records)        # ASGI logs once the response is sent
                logger.setLevel(logging.WARNING)
                get(b"/silenced")
                get(b"/after")     # one connection: /silenced was logged before this
                logger.setLevel(logging.INFO)
                get(b"/last")
                wait_for(lambda: "/last?x=1" in paths())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert paths()[0] == "/first?x=1" and "/silenced?x=1" not in paths(), paths()
    assert {r.getMessage() for r in records} == {"200 5"}
    assert records[0].funcName == "log_access" and records[0].levelno == logging.INFO


def ops_batched_handler() -> tuple[gateway.BatchedStreamHandler, io.StringIO]:
    """main()'s handler, writing to a StringIO in main()'s format."""
    stream = io.StringIO()
    handler = gateway.BatchedStreamHandler()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler, stream


def ops_record(name: str, level: int, text: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 0, text, None, None)


def test_ops_batched_handler_other_lines_go_at_once_behind_waiting_ones():
    # A WSGI worker's access lines wait for the loop's flush; a WARNING (or
    # any line not an access line) is written at once, after them, in order.
    handler, stream = ops_batched_handler()
    handler.handle(ops_record("gateway.access", logging.INFO, "one"))
    handler.handle(ops_record("gateway.access", logging.INFO, "two"))
    assert stream.getvalue() == ""
    handler.handle(ops_record("gateway", logging.WARNING, "warned"))
    assert stream.getvalue() == "gateway.access: one\ngateway.access: two\ngateway: warned\n"
    handler.handle(ops_record("app", logging.INFO, "app line"))
    handler.handle(ops_record("gateway.access", logging.ERROR, "error access"))
    handler.handle(ops_record("gateway.access", logging.INFO, "three"))
    handler.flush()
    assert stream.getvalue().splitlines()[3:] == [
        "app: app line", "gateway.access: error access", "gateway.access: three"]


def test_ops_batched_handler_writes_at_the_end_of_the_loop_turn():
    handler, stream = ops_batched_handler()

    async def main():
        for text in ("a", "b", "c"):
            handler.handle(ops_record("gateway.access", logging.INFO, text))
        assert stream.getvalue() == ""     # same turn of the loop: they wait
        await asyncio.sleep(0)             # the next turn runs flush() first
        assert stream.getvalue() == "gateway.access: a\ngateway.access: b\ngateway.access: c\n"
        handler.handle(ops_record("gateway.access", logging.INFO, "d"))
        await asyncio.sleep(0)
        return stream.getvalue().splitlines()[-1]

    assert asyncio.run(main()) == "gateway.access: d"


@contextlib.contextmanager
def ops_root_handled_by(handler: logging.Handler):
    """The root logger as main() leaves it: `handler` alone, level INFO (not
    pytest's capture handlers, which would make every access line a record)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def ops_log_one_access(line_format: str = "") -> None:
    parser = gateway.RequestParser()
    parser.feed(b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    gateway.log_access(gateway.Config(access_log_format=line_format),
                       ("10.0.0.7", 4242), parser.next_event(), 200, 13,
                       time.monotonic() - 0.0021)


# How each bit of logging configuration is put back: the test undoes it.
OPS_CONFIGURED = {
    "a handler on gateway.access": lambda h: ops_undo(
        logging.getLogger("gateway.access").addHandler, logging.NullHandler(),
        logging.getLogger("gateway.access").removeHandler),
    "a handler on gateway": lambda h: ops_undo(
        logging.getLogger("gateway").addHandler, logging.NullHandler(),
        logging.getLogger("gateway").removeHandler),
    "a second root handler": lambda h: ops_undo(
        logging.getLogger().addHandler, logging.NullHandler(),
        logging.getLogger().removeHandler),
    "a filter on gateway.access": lambda h: ops_undo(
        logging.getLogger("gateway.access").addFilter, logging.Filter(),
        logging.getLogger("gateway.access").removeFilter),
    "a filter on the handler": lambda h: ops_undo(h.addFilter, logging.Filter(),
                                                  h.removeFilter),
    "a format of one's own": lambda h: ops_undo(
        h.setFormatter, logging.Formatter("%(asctime)s %(message)s"),
        lambda _: h.setFormatter(h.own_formatter)),
    "no propagation": lambda h: ops_undo(
        lambda on: setattr(logging.getLogger("gateway.access"), "propagate", on),
        False, lambda _: setattr(logging.getLogger("gateway.access"), "propagate", True)),
}


def ops_undo(do, value, undo):
    do(value)
    return lambda: undo(value)


def test_ops_access_line_skips_the_log_record_only_while_logging_is_as_main_set_it():
    handler, stream = gateway.BatchedStreamHandler(), io.StringIO()
    handler.setStream(stream)
    with ops_root_handled_by(handler):
        assert gateway.untouched_handler() is handler
        ops_log_one_access()
        handler.flush()
        fast = stream.getvalue()
        for what, configure in OPS_CONFIGURED.items():
            undo = configure(handler)
            try:
                assert gateway.untouched_handler() is None, what
            finally:
                undo()
        assert gateway.untouched_handler() is handler
        # The record's way, forced by a filter that passes everything, writes
        # the same line, byte for byte.
        keep_all = logging.Filter()
        gateway.access_log.addFilter(keep_all)
        try:
            ops_log_one_access()
        finally:
            gateway.access_log.removeFilter(keep_all)
        handler.flush()
    line = r'gateway\.access: 10\.0\.0\.7:4242 - "GET /a\?q=1 HTTP/1\.1" 200 13 2\.\dms\n'
    assert re.fullmatch(line, fast), fast
    assert re.fullmatch(line * 2, stream.getvalue()), stream.getvalue()


def test_ops_access_line_with_a_bad_format_is_reported_as_logging_does(capsys):
    handler, stream = gateway.BatchedStreamHandler(), io.StringIO()
    handler.setStream(stream)
    with ops_root_handled_by(handler):
        ops_log_one_access("%(nope)s")      # no such field: logging's own report
        ops_log_one_access("%(status)s")    # and the next line is written
        handler.flush()
    assert stream.getvalue() == "gateway.access: 200\n"
    assert "--- Logging error ---" in capsys.readouterr().err


def test_ops_batched_handler_loses_no_line_to_threads_adding_while_it_flushes():
    # add() takes no lock (a deque's append and popleft are atomic): threads
    # that add access lines, and one that logs other lines (each written at
    # once), run beside a thread that flushes all the time; every line is
    # written once, and each thread's lines stay in their order.
    handler, stream = ops_batched_handler()
    count, done = 3000, threading.Event()

    def adder(name: str) -> None:
        for n in range(count):
            handler.add(f"{name} {n}\n", batched=True)

    def logger() -> None:
        for n in range(count // 10):
            handler.handle(ops_record("gateway", logging.WARNING, f"w {n}"))

    def flusher() -> None:
        while not done.is_set():
            handler.flush()

    threads = [threading.Thread(target=adder, args=(name,)) for name in "abc"]
    threads.append(threading.Thread(target=logger))
    flushing = threading.Thread(target=flusher)
    flushing.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    done.set()
    flushing.join(TIMEOUT)
    handler.flush()
    lines = stream.getvalue().splitlines()
    for name, total in [("a", count), ("b", count), ("c", count),
                        ("gateway: w", count // 10)]:
        numbers = [int(line.rsplit(" ", 1)[1]) for line in lines
                   if line.rsplit(" ", 1)[0] == name]
        assert numbers == list(range(total)), name
    assert len(lines) == 3 * count + count // 10


def test_ops_batched_handler_survives_a_broken_stream():
    handler, stream = ops_batched_handler()
    handler.handle(ops_record("gateway.access", logging.INFO, "lost"))
    stream.close()                       # ValueError on write, as a closed stderr
    handler.flush()
    handler.handle(ops_record("gateway", logging.WARNING, "also lost"))
    assert not handler.waiting


@OPS_POSIX
def test_ops_cli_access_line_appears_while_the_server_is_idle(interface, tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli(f"--{interface}", f"ops_apps:hello_{interface}", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        port = cli.port()
        assert request(port, OPS_GET)[::2] == (200, b"hello")
        line = cli.wait_line(lambda text: text.startswith("gateway.access: "))
        assert '"GET /ops?x=1 HTTP/1.1" 200 5 ' in line, line
        assert cli.proc.poll() is None          # written while it serves on
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 0


@OPS_POSIX
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ops_cli_sigterm_loses_no_access_line_and_keeps_their_order(interface, workers,
                                                                    tmp_path):
    # Requests one after another on one connection, the last one still in
    # the app when SIGTERM comes: every line reaches stderr, in the order of
    # the requests, also from a worker process (which leaves by os._exit()).
    ops_write_apps(tmp_path)
    count = 100
    gate_read, gate_write = os.pipe()
    try:
        with ops_cli(f"--{interface}", f"ops_apps:gate_{interface}", "--port", "0",
                     "--workers", workers, "--app-dir", str(tmp_path), cwd=tmp_path,
                     pass_fds=[gate_read], env={"OPS_GATE_FD": str(gate_read)}) as cli:
            port = cli.port()
            with connect(port) as sock:
                reader = ResponseReader(sock)
                for n in range(count):
                    sock.sendall(b"GET /%d HTTP/1.1\r\nHost: test\r\n\r\n" % n)
                    assert reader.read_response()[::2] == (200, b"fast")
                sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
                cli.wait_line(lambda line: line == "ops-entered\n")
                cli.proc.send_signal(signal.SIGTERM)
                os.close(gate_write)        # EOF on the pipe: /slow answers
                gate_write = None
                assert reader.read_response()[::2] == (200, b"slow done")
            assert cli.proc.wait(TIMEOUT) == 0
            stderr = cli.rest()
    finally:
        for fd in (gate_read, gate_write):
            if fd is not None:
                os.close(fd)
    paths = re.findall(r'^gateway\.access: \S+ - "GET /(\w+) HTTP/1\.1" 200 \d+ ', stderr,
                       re.MULTILINE)
    assert paths == [str(n) for n in range(count)] + ["slow"], stderr[-2000:]


def test_ops_log_access_escapes_control_characters(caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    request_ = Request(method="GET", target=b"/a\x1b[31m\r\nB\x85\x00", path=b"/",
                       query=b"", version="1.1", headers=[], chunked=False,
                       content_length=0, keep_alive=True, expect_continue=False)
    gateway.log_access(Config(), ("127.0.0.1", 5), request_, 404, 12, time.monotonic())
    gateway.log_access(Config(), None, request_, 200, 0, time.monotonic())
    lines = ops_access_lines(caplog)
    assert len(lines) == 2
    assert re.fullmatch(re.escape('127.0.0.1:5 - "GET /a\\x1b[31m\\r\\nB\\x85\\x00 '
                                  'HTTP/1.1" 404 12 ') + r"\d+\.\dms", lines[0]), lines[0]
    assert lines[1].startswith('- - "GET /a\\x1b[31m')
    for line in lines:
        assert not any(ch in line for ch in "\r\n\x1b\x85\x00")


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_ops_access_log_names_the_forwarded_client(interface, caplog):
    caplog.set_level(logging.INFO, logger="gateway.access")
    with running_server(interface, ops_fixed_app(interface, b"hello"), proxy_headers=True,
                        access_log_format="%(client)s") as port:
        raw = (b"GET / HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\n"
               b"Connection: close\r\n\r\n")
        assert request(port, raw)[::2] == (200, b"hello")
        wait_for(lambda: ops_access_lines(caplog))
    assert ops_access_lines(caplog) == ["1.2.3.4:0"]


OPS_HELLO_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"


def test_ops_extra_headers_on_every_response(interface):
    app = ops_fixed_app(interface, b"hello")
    with running_server(interface, app, date_header=False,
                        headers=[(b"X-Test", b"1")]) as port:
        assert exchange(port, OPS_CLOSE) == (
            OPS_HELLO_HEAD + b"Server: gateway\r\nX-Test: 1\r\nConnection: close\r\n\r\nhello")
        refused = exchange(port, b"GET / HTTP/1.1\r\n\r\n")     # no Host: 400
        head = refused.split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"HTTP/1.1 400 Bad Request"
        assert head.count(b"X-Test: 1") == 1
    own_app = ops_fixed_app(interface, b"hello", [("X-Test", "app")])
    with running_server(interface, own_app, date_header=False,
                        headers=[(b"X-Test", b"1")]) as port:
        assert exchange(port, OPS_CLOSE) == (
            OPS_HELLO_HEAD + b"X-Test: app\r\nServer: gateway\r\nConnection: close\r\n\r\n"
            b"hello")


OPS_BAD_EXTRA_HEADERS = [
    ((b"X-A", b"a\r\nInjected: 1"), "CRLF in value"), ((b"X-A", b"a\nInjected: 1"), "LF in value"),
    ((b"X-A", b"a\rb"), "CR in value"), ((b"X-A", b"a\x00b"), "NUL in value"),
    ((b"X\r\nInjected", b"1"), "CRLF in name"), ((b"X A", b"1"), "space in name"),
    ((b"X: Y", b"1"), "colon in name"), ((b"", b"1"), "empty name"),
    ((b"Content-Length", b"0"), "Content-Length"),
    ((b"transfer-encoding", b"chunked"), "Transfer-Encoding"),
    ((b"Connection", b"close"), "Connection"), ((b"Keep-Alive", b"timeout=5"), "Keep-Alive"),
]


@pytest.mark.parametrize("header", [row[0] for row in OPS_BAD_EXTRA_HEADERS],
                         ids=[row[1] for row in OPS_BAD_EXTRA_HEADERS])
def test_ops_bad_extra_header_is_refused_by_config(header):
    # HF-03, RFC 9112 §11.1: Config.headers get the app's field check, at startup.
    with pytest.raises(ValueError, match=r"extra header \(--header\)"):
        gateway.Config(headers=[(b"X-Fine", b"1"), header])


def test_ops_extra_header_must_be_bytes():
    with pytest.raises(TypeError, match="bytes"):
        gateway.Config(headers=[("X-A", "1")])


@pytest.mark.parametrize("option", ["X-A:a\r\nInjected: 1", "X-A:a\nInjected: 1",
                                    "X A:1", "X\rInjected:1", "Content-Length:0"],
                         ids=["CRLF in value", "LF in value", "space in name",
                              "CR in name", "Content-Length"])
def test_ops_cli_bad_header_exits_1(option):
    # HF-03: refused before the server listens, in one clear line, exit status 1.
    done = srv_run_cli("--wsgi", "echo_wsgi:application", "--port", "0", "--header", option)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: extra header (--header): ")
    assert "Traceback" not in done.stderr


def test_ops_no_server_and_no_date_header(interface):
    app = ops_fixed_app(interface, b"hello")
    with running_server(interface, app, server_header=False, date_header=False) as port:
        assert exchange(port, OPS_CLOSE) == (
            OPS_HELLO_HEAD + b"Connection: close\r\n\r\nhello")
    with running_server(interface, app) as port:
        status, headers, _ = request(port, OPS_CLOSE)
        assert headers[b"server"] == b"gateway"
        assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT",
                            headers[b"date"])


@OPS_POSIX
def test_ops_cli_headers(interface, tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli(f"--{interface}", f"ops_apps:hello_{interface}", "--port", "0",
                 "--header", "X-A:1", "--header", "X-B: two words",
                 "--no-server-header", "--no-date-header", "--app-dir", str(tmp_path),
                 cwd=tmp_path) as cli:
        assert exchange(cli.port(), OPS_CLOSE) == (
            OPS_HELLO_HEAD + b"X-A: 1\r\nX-B: two words\r\nConnection: close\r\n\r\nhello")


@OPS_POSIX
def test_ops_cli_log_level_warning_is_quiet(tmp_path):
    ops_write_apps(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port, fd = listener.getsockname()[1], listener.fileno()
        with ops_cli("--wsgi", "ops_apps:hello_wsgi", "--fd", str(fd), "--log-level",
                     "warning", "--app-dir", str(tmp_path), cwd=tmp_path,
                     pass_fds=[fd]) as cli:
            listener.close()
            assert request(port, OPS_CLOSE)[::2] == (200, b"hello")
            cli.proc.send_signal(signal.SIGTERM)
            assert cli.proc.wait(TIMEOUT) == 0
            assert cli.rest() == ""     # no start-up line, access line or "stopped"


# =============================================================================
# 7. Command-line comfort: --factory, --env-file, --reload
# =============================================================================


@OPS_POSIX
def test_ops_cli_factory(interface, tmp_path):
    ops_write_apps(tmp_path)
    with ops_cli(f"--{interface}", f"ops_apps:make_{interface}", "--factory", "--port",
                 "0", "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        assert request(cli.port(), OPS_CLOSE)[::2] == (200, b"made by the factory")


OPS_ENV_FILE = """\
# a comment line, then a blank one

OPS_PLAIN=plain value
OPS_DOUBLE="double # quoted"
OPS_SINGLE='single quoted'
  OPS_SPACED  =  spaced out
# OPS_COMMENTED=never
OPS_EMPTY=
OPS_EQUALS=a=b=c
"""
OPS_ENV_VALUES = {"OPS_PLAIN": "plain value", "OPS_DOUBLE": "double # quoted",
                  "OPS_SINGLE": "single quoted", "OPS_SPACED": "spaced out",
                  "OPS_COMMENTED": None, "OPS_EMPTY": "", "OPS_EQUALS": "a=b=c"}


@OPS_POSIX
def test_ops_cli_env_file(tmp_path):
    ops_write_apps(tmp_path)
    (tmp_path / "ops.env").write_text(OPS_ENV_FILE)
    with ops_cli("--wsgi", "ops_apps:env_wsgi", "--env-file", str(tmp_path / "ops.env"),
                 "--port", "0", "--app-dir", str(tmp_path), cwd=tmp_path) as cli:
        status, _, body = request(cli.port(), OPS_CLOSE)
    assert status == 200
    assert json.loads(body) == OPS_ENV_VALUES


def test_ops_load_env_file(tmp_path, monkeypatch):
    for name in OPS_ENV_VALUES:
        monkeypatch.setenv(name, "before")       # restored after the test
    monkeypatch.delenv("OPS_COMMENTED")
    (tmp_path / "ops.env").write_text(OPS_ENV_FILE)
    gateway.load_env_file(str(tmp_path / "ops.env"))
    assert {name: os.environ.get(name) for name in OPS_ENV_VALUES} == OPS_ENV_VALUES


OPS_RELOAD_APP = '''
def application(environ, start_response):
    body = %r
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


@OPS_POSIX
@pytest.mark.parametrize("bytecode", [False, True], ids=["script", "from-bytecode"])
def test_ops_cli_reload(tmp_path, bytecode):
    # from-bytecode: a copy of gateway.py that may cache its bytecode, so the
    # reloader and each child it starts replace themselves (run_from_bytecode).
    launch, env = (OPS_GATEWAY,), None
    if bytecode:
        launch, env = (ops_copy_of_gateway(tmp_path),), {"PYTHONDONTWRITEBYTECODE": ""}
    source = tmp_path / "ops_reload_app.py"
    source.write_text(OPS_RELOAD_APP % b"first version")
    with ops_cli("--wsgi", "ops_reload_app:application", "--reload", "--port", "0",
                 "--app-dir", str(tmp_path), cwd=tmp_path, launch=launch, env=env) as cli:
        port = cli.port()
        assert request(port, OPS_CLOSE)[::2] == (200, b"first version")
        source.write_text(OPS_RELOAD_APP % b"the second, longer version")
        later = os.stat(source).st_mtime + 5       # a change even on coarse clocks
        os.utime(source, (later, later))
        cli.wait_line(lambda line: line == "gateway: a .py file changed; restarting\n")
        new_port = cli.port()                      # the restarted child's line
        assert request(new_port, OPS_CLOSE)[::2] == (200, b"the second, longer version")
        cli.proc.send_signal(signal.SIGINT)
        assert cli.proc.wait(TIMEOUT) == 0
        stderr = cli.rest()
        assert ops_last_line(stderr) == "gateway: stopped", stderr   # the child's


def ops_copy_of_gateway(tmp_path) -> str:
    """A copy of gateway.py in a folder of its own whose name has a space and a
    non-ASCII letter; a test that lets it write its __pycache__ keeps the
    checkout clean."""
    folder = tmp_path / "gateway dir \u00fc"
    folder.mkdir()
    return str(shutil.copy(OPS_GATEWAY, folder / "gateway.py"))


OPS_EXEC_APP = '''
import json, os, sys

def application(environ, start_response):
    """What the app can see of the process that serves it."""
    if environ["PATH_INFO"] == "/process":
        main = sys.modules["__main__"]
        seen = {"pid": os.getpid(), "main_file": getattr(main, "__file__", None)}
    else:
        seen = {"argv": sys.argv, "path": sys.path, "script_name": environ["SCRIPT_NAME"],
                "dev_mode": sys.flags.dev_mode, "optimize": sys.flags.optimize,
                "warnoptions": sys.warnoptions, "cwd": os.getcwd()}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@OPS_POSIX
@pytest.mark.parametrize("options", [(), ("-X", "dev", "-W", "error::DeprecationWarning"),
                                     ("-O", "--")])
def test_ops_cli_script_replaces_itself_with_its_bytecode(tmp_path, options):
    # `python gateway.py` runs as a script only until it can load itself from
    # __pycache__ instead (run_from_bytecode(): os.execv, same process id).
    # Three starts from another folder: without bytecode (PYTHONDONTWRITEBYTECODE,
    # none cached: it runs as the script), then allowed to write it (the first
    # start caches it), then with it cached. The app sees the same arguments,
    # sys.path, folder and interpreter options each time, byte for byte; the
    # process id that Popen returned is the one that serves and obeys signals.
    gateway_py = ops_copy_of_gateway(tmp_path)
    cache = os.path.join(os.path.dirname(gateway_py), "__pycache__")
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "ops_exec_app.py").write_text(OPS_EXEC_APP)
    args = ("--wsgi", "ops_exec_app:application", "--port", "0", "--no-date-header",
            "--root-path", "/a mount/\u00fc")
    answers = []
    for may_write, stop, executed in [("1", signal.SIGTERM, False),
                                      ("", signal.SIGINT, True),
                                      ("1", signal.SIGTERM, True)]:
        with ops_cli(*args, cwd=app_dir, launch=(*options, gateway_py),
                     env={"PYTHONDONTWRITEBYTECODE": may_write}) as cli:
            port = cli.port()
            with connect(port) as sock:
                sock.sendall(OPS_CLOSE)
                answers.append(read_until_closed(sock))
            process = json.loads(request(port, b"GET /process HTTP/1.1\r\nHost: test\r\n"
                                                b"Connection: close\r\n\r\n")[2])
            assert process["pid"] == cli.proc.pid
            assert process["main_file"] == (None if executed else gateway_py)
            assert os.path.isdir(cache) == executed      # written by the first start
            cli.proc.send_signal(stop)
            assert cli.proc.wait(TIMEOUT) == 0
            assert ops_last_line(cli.rest()) == "gateway: stopped", cli.seen
    assert answers[0] == answers[1] == answers[2]
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nServer: gateway\r\nConnection: close" % len(body))
    seen = json.loads(body)
    # sys.path: --app-dir's folder first (main()), then the folder of gateway.py.
    assert seen.pop("path")[:2] == [str(app_dir), os.path.dirname(gateway_py)]
    assert seen == {"argv": [gateway_py, *args], "script_name": "/a mount/\u00fc",
                    "cwd": str(app_dir), "dev_mode": "dev" in options,
                    "optimize": int("-O" in options),
                    "warnoptions": ["default", "error::DeprecationWarning"]   # -X dev, -W
                    if "dev" in options else []}


@OPS_POSIX
def test_ops_cli_first_start_serves_from_bytecode_written_before_the_exec(tmp_path):
    # Nothing cached yet: run_from_bytecode() writes __pycache__ before os.execv,
    # so the process that serves loads gateway from bytecode, as later starts do,
    # and does not compile it (which would raise its peak memory). `python -v`
    # (passed on to the new process) says which of the two the import did.
    gateway_py = ops_copy_of_gateway(tmp_path)
    cached = importlib.util.cache_from_source(gateway_py)
    ops_write_apps(tmp_path)
    with ops_cli("--asgi", "ops_apps:hello_asgi", "--port", "0", "--app-dir", str(tmp_path),
                 cwd=tmp_path, launch=("-v", gateway_py),
                 env={"PYTHONDONTWRITEBYTECODE": ""}) as cli:
        assert request(cli.port(), OPS_GET)[::2] == (200, b"hello")
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(TIMEOUT) == 0
        stderr = "".join(cli.seen) + cli.rest()
    assert f"# code object from {cached!r}" in stderr
    assert f"# wrote {cached!r}" not in stderr


def test_ops_importing_gateway_never_replaces_the_process(tmp_path):
    # Only `python gateway.py` replaces itself: a program that imports gateway
    # (bytecode cached and writable, arguments that main() would take) goes on.
    folder = os.path.dirname(ops_copy_of_gateway(tmp_path))
    environ = dict(os.environ, PYTHONDONTWRITEBYTECODE="")
    for _ in range(2):                  # the second import finds the bytecode cached
        proc = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, gateway; "
             "print(os.getpid(), sys.argv[1:], gateway.__name__)", "--asgi", "x:app"],
            cwd=folder, env=environ, stdout=subprocess.PIPE, text=True)
        output, _ = proc.communicate(timeout=TIMEOUT)
        assert (proc.returncode, output) == (0, f"{proc.pid} ['--asgi', 'x:app'] gateway\n")


def test_ws_deflate_with_a_smaller_server_window_round_trips():
    codec, answer = gateway.PerMessageDeflate.negotiate(
        [b"permessage-deflate; server_max_window_bits=9; server_no_context_takeover"])
    assert answer == (b"permessage-deflate; server_max_window_bits=9; "
                      b"server_no_context_takeover")
    text = b"abcdefgh" * 2000
    for _ in range(2):                      # no context kept between messages
        wire = codec.compress(text)
        assert zlib.decompressobj(-9).decompress(wire + b"\x00\x00\xff\xff") == text


def test_ws_a_message_ending_in_a_bfinal_block_leaves_the_next_one_readable():
    # RFC 7692 §7.2.3.4: a sender may end a message with a DEFLATE block that
    # has BFINAL set (a zlib Z_FINISH); the next message is a new stream.
    codec, _ = gateway.PerMessageDeflate.negotiate([b"permessage-deflate"])
    finished = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert codec.decompress(finished.compress(b"hello") + finished.flush(), 100, True) \
        == b"hello"
    flushed = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = flushed.compress(b"again") + flushed.flush(zlib.Z_SYNC_FLUSH)
    assert codec.decompress(wire[:-4], 100, True) == b"again"
    trailing = zlib.compressobj(6, zlib.DEFLATED, -15)
    with pytest.raises(gateway.WebSocketError) as caught:
        codec.decompress(trailing.compress(b"x") + trailing.flush() + b"junk", 100, True)
    assert caught.value.code == 1007


# -- the file as a reference: every section number names its spec -------------


def test_every_spec_section_number_names_its_spec():
    # A student who copies one section of gateway.py out must be able to tell
    # "§5.2" of RFC 6455 from section 5 of the file: a spec section number
    # ("§x.y") comes after the name of its spec on the same line.
    with open(gateway.__file__, encoding="utf-8") as source:
        bare = [(number, line.strip()) for number, line in enumerate(source, 1)
                for match in re.finditer(r"§\d+(?:\.\d+)+", line)
                if not re.search(r"RFC ?\d{4}", line[:match.start()])]
    assert bare == []


def test_the_files_own_sections_are_never_written_as_a_bare_section_sign():
    # "§" is kept for specs: a section sign is on a banner ("# §5  WSGI
    # adapter"), on the module map, or after the name of its spec on the same
    # line ("RFC 9112 §2-§7"). The file's own sections read "section 5".
    with open(gateway.__file__, encoding="utf-8") as source:
        lines = source.read().splitlines()
    map_lines = set(range(1, len(gateway.__doc__.splitlines()) + 1))
    bare = [(number, line.strip()) for number, line in enumerate(lines, 1)
            for match in re.finditer(r"§\d", line)
            if number not in map_lines and not re.match(r"# §\d+  ", line)
            and not re.search(r"RFC ?\d{4}", line[:match.start()])]
    assert bare == []


def test_the_module_docstring_maps_every_section_in_order():
    with open(gateway.__file__, encoding="utf-8") as source:
        banners = re.findall(r"^# §(\d+)  (.+)$", source.read(), re.MULTILINE)
    mapped = dict(re.findall(r"§(\d+) +(.+?)(?:  |\(|$)", gateway.__doc__))
    assert [int(number) for number, _ in banners] == list(range(1, len(banners) + 1))
    assert sorted(mapped, key=int) == [number for number, _ in banners]
    for number, title in banners:
        assert title.startswith(mapped[number].strip()), (number, title)


def test_readme_reading_guide_line_ranges_are_whole_sections():
    # The reading guide's "lines A-B" must follow the file: each range starts
    # at its section's banner (or at line 1) and ends where the next begins.
    here = os.path.dirname(gateway.__file__)
    with open(os.path.join(here, "gateway.py"), encoding="utf-8") as source:
        lines = source.read().splitlines()
    with open(os.path.join(here, "README.md"), encoding="utf-8") as readme:
        rows = re.findall(r"^\| §(\d+)[^|]*\| (\d+)-(\d+) \|", readme.read(), re.M)
    assert len(rows) >= 10
    for number, first, last in rows:
        first, last = int(first), int(last)
        moved = f"section {number} moved: run python3 .ci/readme_ranges.py"
        assert first == 1 or lines[first - 1].startswith(f"# §{number}  "), moved
        assert last == len(lines) or lines[last].startswith("# §"), moved


def size_of_gateway():
    """.ci/size.py's measure() of gateway.py: the numbers `make size` prints."""
    spec = importlib.util.spec_from_file_location(
        "size", os.path.join(os.path.dirname(gateway.__file__), ".ci", "size.py"))
    size = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(size)
    with open(gateway.__file__, encoding="utf-8") as source:
        return size.measure(source.read())


def test_reading_budget_kept_parts():
    # The parts of the reading budget (`make size`) that gateway.py meets;
    # a change that breaks one fails here, not only in `make size`.
    size = size_of_gateway()
    assert size["long_functions"] == []
    assert size["undocumented"] == []
    assert size["commentary"] >= 0.35
    assert [(name, lines) for name, lines, _, _ in size["sections"] if lines > 500] == []


# --- teaching edition: ASGI (§7-§8) ---


def test_asgi_build_scope_docstring_example_runs():
    # The example in build_scope's docstring is part of the teaching text.
    import doctest
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(gateway.build_scope,
                                             globs=dict(vars(gateway))):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted >= 4 and failed == 0


@pytest.mark.parametrize("target", [b"/api/x", b"/x"])
@pytest.mark.parametrize("root_path", ["/api", "/api/"])
def test_asgi_scope_splits_root_path_as_wsgi_does(root_path, target):
    # ASGI HTTP "WSGI Compatibility": root_path is SCRIPT_NAME and path is the
    # whole path, split by the same rule as the WSGI environ (split_root_path).
    request = gateway.parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: t")
    scope = gateway.build_scope(request, ("127.0.0.1", 80), None,
                                gateway.Config(root_path=root_path), {})
    environ_split = gateway.split_root_path(root_path, target.decode())
    assert (scope["root_path"], scope["path"]) == ("/api", "/api/x")
    assert scope["root_path"] + scope["path"][len(scope["root_path"]):] == \
        "".join(environ_split)


def test_asgi_close_is_decided_when_the_head_goes_out():
    # The head waits for the first body message (ASGI HTTP "Response Start"),
    # so must_close() sees the body the app read after http.response.start:
    # the 100-continue is no longer pending and the connection is kept.
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        message = await receive()
        await send({"type": "http.response.body", "body": message["body"]})

    with running_server("asgi", app) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        reader = ResponseReader(sock)
        assert reader.read_head()[0] == 100
        sock.sendall(b"hello")
        status, headers, _ = reader.read_head()
        assert (status, reader.read_exact(5)) == (200, b"hello")
        assert b"connection" not in headers
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert reader.read_head()[0] == 200 and reader.read_exact(3) == b"abc"


def test_asgi_connection_keeps_the_lifespan_state_under_its_own_name():
    # "state" means a state machine elsewhere in gateway.py; the lifespan's
    # dict is lifespan_state, and each scope gets a shallow copy of it.
    server = gateway.ASGIServer(echo_asgi.app, gateway.make_listener("127.0.0.1", 0))
    server.listener.close()
    server.lifespan.state["db"] = "pool"

    class Writer:
        """The one thing a new connection asks of its StreamWriter."""
        def get_extra_info(self, name):
            return None

    conn = gateway.ASGIConnection(server, None, Writer())
    scope = conn.scope_for(gateway.parse_head(b"GET / HTTP/1.1\r\nHost: t"))
    assert not hasattr(conn, "state")
    assert scope["state"] == {"db": "pool"}
    assert scope["state"] is not server.lifespan.state

# --- teaching edition: core (§1-§4) ---


def core_excerpt() -> str:
    """gateway.py from its first line up to the section 5 banner: sections 1-4."""
    with open(gateway.__file__, encoding="utf-8") as source:
        text = source.read()
    return text[:re.search(r"^# §5 ", text, re.M).start()]


def test_sections_1_to_4_run_on_their_own(monkeypatch):
    # The parser and the writer, cut out with the module header, run alone and
    # their examples pass: they name nothing defined after section 4. (A fresh
    # module, because @dataclass looks its class's module up in sys.modules.)
    import builtins
    import doctest
    import symtable
    import types
    text = core_excerpt()
    module = types.ModuleType("excerpt")
    monkeypatch.setitem(sys.modules, "excerpt", module)
    namespace = module.__dict__
    exec(compile(text, "excerpt", "exec"), namespace)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for name, value in list(namespace.items()):
        if getattr(value, "__module__", None) == "excerpt":
            for test in finder.find(value, name, module=False, globs=namespace):
                runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
    tables, used = [symtable.symtable(text, "excerpt", "exec")], set()
    while tables:           # every global name that any function or class reads
        table = tables.pop()
        tables += table.get_children()
        used |= {symbol.get_name() for symbol in table.get_symbols()    # (assigned:
                 if symbol.is_global() and symbol.is_referenced()   # a comprehension's
                 and not symbol.is_assigned()}                      # own, from 3.12)
    assert used - set(namespace) - set(dir(builtins)) == set()


def test_doctests_in_gateway_pass():
    import doctest
    results = doctest.testmod(gateway)
    assert results.failed == 0 and results.attempted >= 10


def test_head_terminator_and_line_endings_match_the_leniency_rules():
    # RFC 9112 §2.2: the head ends at "\n\r\n" or "\n\n", whichever comes first;
    # one CR is taken off each line, and a CR left anywhere else is refused.
    def head(raw):
        parser = RequestParser()
        parser.feed(raw)
        return parser.next_event(), bytes(parser.buffer)
    request, rest = head(b"GET / HTTP/1.1\nHost: a\n\r\nX")
    assert request.headers == [(b"host", b"a")] and rest == b"X"
    request, rest = head(b"GET / HTTP/1.1\r\nHost: a\r\n\nX")
    assert request.headers == [(b"host", b"a")] and rest == b"X"
    with pytest.raises(HTTPError):
        head(b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n")


def test_http_date_is_cached_per_second_only():
    # The per-second cache holds the last second alone; 0.0 is a second like any other.
    gateway.http_date_of_second.cache_clear()
    assert http_date(0.0) == b"Thu, 01 Jan 1970 00:00:00 GMT"
    assert http_date(0.9) == http_date(0.0)
    assert http_date(-0.5) == b"Wed, 31 Dec 1969 23:59:59 GMT"


def test_limits_is_what_parser_and_writer_read_and_config_extends_it():
    limits = gateway.Limits(limit_request_fields=1, date_header=False)
    parser = RequestParser(limits)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n")
    with pytest.raises(HTTPError) as caught:
        parser.next_event()
    assert caught.value.status == 431
    assert b"Date:" not in Response("GET", "1.1", True, limits).head(200, [], 0.0)
    assert isinstance(Config(), gateway.Limits)

# --- teaching edition: operations and command line (§11-§12) ---


def cli_args(*options: str):
    """The parsed command line `--wsgi m:app` plus `options` (nothing imported)."""
    return gateway.build_arg_parser().parse_args(["--wsgi", "m:app", *options])


def test_cli_every_config_field_is_an_option_whose_default_is_the_fields(monkeypatch):
    # Section 12: the options are made from Config's fields, so a command line
    # with no options gives Config() itself, field for field.
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    dests = {action.dest for action in gateway.build_arg_parser()._actions}
    assert {f.name for f in dataclasses.fields(gateway.Config)} <= dests
    assert gateway.config_from(cli_args()) == gateway.Config()


def test_cli_each_help_row_names_a_config_field():
    # A row of OPTION_HELP whose option no field makes would never show up.
    fields = {f.name for f in dataclasses.fields(gateway.Config)}
    for option in gateway.OPTION_HELP:
        name = option.removeprefix("--").removeprefix("no-").replace("-", "_")
        assert name in fields, option


def test_cli_help_explains_every_option():
    parser = gateway.build_arg_parser()
    assert all(action.help for action in parser._actions)
    text = parser.format_help()
    for option in [*gateway.OPTION_HELP, "--header", "--ws-per-message-deflate",
                   "--asgi", "--wsgi", "--factory", "--app-dir", "--env-file",
                   "--reload", "--log-level"]:
        assert option in text, option


def test_cli_option_types_come_from_the_field_annotations():
    config = gateway.config_from(cli_args(
        "--port", "0", "--limit-request-body", "10", "--timeout-read", "1.5",
        "--uds", "/tmp/x.sock", "--fd", "3", "--lifespan", "on", "--no-date-header",
        "--trace", "--ws-ping-interval", "0", "--ws-per-message-deflate", "false",
        "--header", "X-A: 1"))
    assert (config.port, config.limit_request_body, config.timeout_read, config.uds,
            config.fd, config.lifespan) == (0, 10, 1.5, "/tmp/x.sock", 3, "on")
    assert (config.date_header, config.trace, config.ws_ping_interval,
            config.ws_per_message_deflate, config.headers) == (
        False, True, None, False, [(b"X-A", b"1")])


@pytest.mark.parametrize("options", [
    ("--port", "eighty"), ("--limit-request-body", "1.5"), ("--timeout-read", "soon"),
    ("--lifespan", "maybe"), ("--interface", "asgi4"), ("--ws-per-message-deflate", "yes"),
    ("--no-trace",), ("--date-header",)])
def test_cli_a_bad_value_is_a_usage_error(options, capsys):
    with pytest.raises(SystemExit) as caught:
        cli_args(*options)
    assert caught.value.code == 2


def test_cli_a_header_without_a_colon_is_refused():
    with pytest.raises(ValueError, match="--header needs NAME:VALUE"):
        gateway.config_from(cli_args("--header", "X-A 1"))


def test_cli_workers_default_is_web_concurrency(monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert gateway.config_from(cli_args()).workers == 3
    assert gateway.config_from(cli_args("--workers", "2")).workers == 2


def test_ops_set_nodelay_on_tcp_and_unix_sockets():
    # Section 11: TCP_NODELAY on a TCP connection; any other socket is left alone.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            assert gateway.set_nodelay(client) is True
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    if hasattr(socket, "AF_UNIX"):
        left, right = socket.socketpair(socket.AF_UNIX)
        with left, right:
            assert gateway.set_nodelay(left) is True

# --- teaching edition: WSGI (§5-§6) ---


@pytest.mark.parametrize("function", ["split_root_path", "build_environ"])
def test_wsgi_teaching_doctests_run(function):
    # The examples in these docstrings are what a reader tries first: they must run.
    import doctest
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(getattr(gateway, function), function, globs=vars(gateway)):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_wsgi_call_wsgi_app_runs_in_pep_3333_order():
    # PEP 3333 "Specification Details": app(environ, start_response) once, each
    # non-empty item handed on, a pause after each, and close() at the end.
    events: list = []

    class Result(list):
        def close(self):
            events.append("close")

    class Recorder:
        def start_response(self, status, headers, exc_info=None):
            events.append(("start_response", status))
        def send_whole(self, result):
            return False
        def send(self, data):
            events.append(("send", data))
        def length_sent(self):
            return False
        def close_result(self, result):
            result.close()

    def app(environ, start_response):
        events.append("app")
        start_response("200 OK", [])
        return Result([b"a", b"", b"b"])

    steps = gateway.call_wsgi_app(app, {}, Recorder())
    assert events == []                      # a generator: nothing runs until asked
    assert sum(1 for _ in steps) == 2        # one pause per non-empty item
    assert events == ["app", ("start_response", "200 OK"), ("send", b"a"),
                      ("send", b"b"), "close"]


def test_wsgi_threads_1_is_one_worker_thread_and_not_multithread():
    # PEP 3333 "Thread Support" (W-40): --threads 1 runs the app on one thread.
    seen: list = []

    def app(environ, start_response):
        seen.append((environ["wsgi.multithread"], threading.current_thread().name))
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with wsgi_serve(app, threads=1) as (port, server):
        assert len(server.pool.threads) == 1
        for _ in range(3):
            assert exchange(port, wsgi_get()).endswith(b"\r\n\r\nok")
    assert [multithread for multithread, _ in seen] == [False] * 3
    assert len({name for _, name in seen}) == 1

# --- teaching edition: WebSocket and lifespan (§9-§10) ---


@pytest.mark.parametrize("name", ["websocket_accept", "encode_frame", "unmask",
                                  "FrameParser"])
def test_ws_docstring_examples_run(name):
    # The codec's docstrings carry RFC 6455 §1.3's and §5.7's examples; they
    # are part of the text a student reads, so they must stay true.
    import doctest
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(getattr(gateway, name), name, module=gateway,
                            globs=dict(vars(gateway))):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert (failed, attempted > 0) == (0, True)


def test_ws_close_codes_are_checked_the_same_both_ways():
    # RFC 6455 §7.4.1-§7.4.2: one rule for the client's Close and the app's close.
    sendable = [c for c in range(6000) if c in gateway.SENDABLE_CLOSE_CODES]
    assert sendable == [1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)]
    for code in (1004, 1005, 1006, 1015, 2999, 5000):
        assert ws_parse([ws_close_frame(code)]) == ([], 1002)
    for code in (1000, 1014, 3000, 4999):
        assert ws_parse([ws_close_frame(code)]) == ([("close", code, "")], None)


@pytest.mark.parametrize("size, length, expected", [
    (5, b"\x05", [("bytes", b"z" * 5)]),                          # 7-bit form
    (5, b"\x7e\x00\x05", 1002),                                   # 16-bit, not minimal
    (200, b"\x7e\x00\xc8", [("bytes", b"z" * 200)]),              # 16-bit form
    (200, b"\x7f" + (200).to_bytes(8, "big"), 1002),              # 64-bit, not minimal
    (65535, b"\x7f" + (65535).to_bytes(8, "big"), 1002),
    (65536, b"\x7f" + (65536).to_bytes(8, "big"), [("bytes", b"z" * 65536)]),
], ids=["7-bit", "16-bit-for-5", "16-bit", "64-bit-for-200", "64-bit-for-65535",
        "64-bit"])
def test_ws_payload_length_forms(size, length, expected):
    # RFC 6455 §5.2: three forms, and the minimal one is required (our policy
    # holds clients to it); fed whole and one byte at a time.
    raw = ws_client_frame(2, b"z" * size, length=length)
    for pieces in ([raw], [raw[i:i + 1] for i in range(min(len(raw), 200))]
                   + [raw[200:]]):
        messages, code = ws_parse([piece for piece in pieces if piece])
        if isinstance(expected, int):
            assert code == expected
        else:
            assert (messages, code) == (expected, None)


def test_ws_unmask_is_the_rfc_formula():
    # RFC 6455 §5.3: "j = i MOD 4; transformed-octet-i = original-octet-i XOR
    # masking-key-octet-j", for every length up to a few key repetitions.
    key = bytes([0x37, 0xFA, 0x21, 0x3D])
    for size in range(0, 40):
        data = bytes(range(size))
        assert gateway.unmask(data, key) == bytes(o ^ key[i % 4] for i, o in enumerate(data))


@pytest.mark.parametrize("offer, answer", [
    (b'permessage-deflate; server_max_window_bits="10"',
     b"permessage-deflate; server_max_window_bits=10"),           # a quoted value
    (b"permessage-deflate; server_max_window_bits=010",
     b"permessage-deflate; server_max_window_bits=10"),           # leading zeros
    (b"permessage-deflate; client_max_window_bits=8", b"permessage-deflate"),
    (b"permessage-deflate; server_max_window_bits=8", None),       # zlib: no 8 bits
    (b"permessage-deflate; server_max_window_bits", None),          # needs a value
    (b"permessage-deflate; client_max_window_bits=", None),
    (b"permessage-deflate; server_no_context_takeover=1", None),    # takes no value
    (b"permessage-deflate; client_no_context_takeover; server_no_context_takeover",
     b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    (b"permessage-deflate; x=1, permessage-deflate", b"permessage-deflate"),
])
def test_ws_deflate_offer_parameters(offer, answer):
    # RFC 7692 §5.1 and §7.1: what an offer may hold, and our answer's fixed order.
    codec, got = gateway.PerMessageDeflate.negotiate([offer])
    assert (got if codec else None) == answer


@pytest.mark.parametrize("key, ok", [
    (b"dGhlIHNhbXBsZSBub25jZQ==", True),            # RFC 6455 §1.3's key
    (b"AAAAAAAAAAAAAAAAAAAAAB==", True),            # the last digit's spare bits
    (b"AAAAAAAAAAAAAAAAAAAAAAA=", False),           # 17 bytes
    (b"AAAAAAAAAAAAAAAAAAAAAA", False),             # no padding
    (b"AAAAAAAAAAAAAAAAAAAA====", False),           # 15 bytes, padded out
    (b"AAAAAAAAAAA AAAAAAAAAA==", False),
])
def test_ws_key_must_decode_to_16_bytes(key, ok):
    # RFC 6455 §4.2.1 item 5: base64 that decodes to exactly 16 bytes.
    head = (b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key)
    request = gateway.parse_head(head)
    if ok:
        assert gateway.check_handshake(request) == key
    else:
        with pytest.raises(gateway.HTTPError) as caught:
            gateway.check_handshake(request)
        assert caught.value.status == 400


def test_lifespan_message_out_of_turn_raises_and_in_turn_does_not():
    # ASGI "Error Handling": the lifespan answers are accepted only in their turn.
    sent = []

    async def app(scope, receive, send):
        await receive()
        for kind in ("lifespan.shutdown.complete", "lifespan.startup.complete",
                     "lifespan.startup.complete"):
            try:
                await send({"type": kind})
                sent.append(kind)
            except RuntimeError:
                sent.append("raised")
        await receive()
        await send({"type": "lifespan.shutdown.failed", "message": "boom"})

    async def main():
        lifespan = gateway.Lifespan(app, "on", timeout=2)
        await lifespan.startup()
        with pytest.raises(gateway.LifespanFailure) as caught:
            await lifespan.shutdown()
        return caught.value
    failure = asyncio.run(main())
    assert sent == ["raised", "lifespan.startup.complete", "raised"]
    assert (str(failure), failure.status) == ("application shutdown failed: boom",
                                              gateway.EXIT_SHUTDOWN_FAILED)

# --- round 2: asgi ---


def asgi_wait_for_inline(awaitable, timeout):
    """asyncio.wait_for as Python 3.12+ runs it: in the caller's task, not a new one."""
    async def waiting():
        async with asyncio.timeout(timeout):
            return await awaitable
    return waiting()


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout is 3.11+")
def test_asgi_close_takes_over_the_read_left_waiting_for_disconnect(monkeypatch, caplog):
    # The read that raced the response (HTTPCycle.wait_for_disconnect) still
    # waits when a "Connection: close" response ends. close() must read through
    # it: a second read on the socket is a RuntimeError in asyncio (it showed on
    # Python 3.12+, whose wait_for() runs the read in the caller's task).
    monkeypatch.setattr(asyncio, "wait_for", asgi_wait_for_inline)
    reading = []
    start_read = gateway.ASGIConnection.start_read

    def start_read_seen(self):
        """The real start_read(), noted: the disconnect listener starts a read."""
        reading.append(self.reader)
        return start_read(self)

    monkeypatch.setattr(gateway.ASGIConnection, "start_read", start_read_seen)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        listener = asyncio.ensure_future(receive())     # waits for http.disconnect
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not (     # until its read waits
                reading and reading[0]._waiter is not None):  # (StreamReader's own)
            await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})
        listener.cancel()                               # as Starlette does

    with running_server("asgi", app, lifespan="off") as port:
        raw = exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert raw.endswith(b"2\r\nhi\r\n0\r\n\r\n")
    assert "internal error on a connection" not in caplog.messages


# --- round 2: edges ---


def test_import_app_tells_a_missing_import_from_a_missing_module(tmp_path, monkeypatch):
    # A module whose own import fails is not "no such module", even when the
    # name it fails on is the start of its own name ("edges_r2" in "edges_r2x").
    (tmp_path / "edges_r2x.py").write_text("import edges_r2\napp = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(gateway.AppImportError) as caught:
        gateway.import_app("edges_r2x:app")
    assert "error while importing 'edges_r2x'" in str(caught.value)
    with pytest.raises(gateway.AppImportError) as caught:
        gateway.import_app("edges_r2_absent.sub:app")
    assert "no such module" in str(caught.value)

# --- round 2: ws ---


@pytest.mark.parametrize("offer", [
    b"permessage-deflate; server_max_window_bits=" + b"0" * 4300 + b"10",
    b"permessage-deflate; client_max_window_bits=" + b"0" * 4300 + b"10",
])
def test_ws_deflate_window_bits_beyond_int_digits_declines_the_offer(offer):
    # A value int() will not read (over 4,300 digits) is an invalid parameter:
    # that offer is declined like any other (RFC 7692 §7.1), the next one taken.
    codec, answer = gateway.PerMessageDeflate.negotiate([offer, b"permessage-deflate"])
    assert codec is not None and answer == b"permessage-deflate"
    assert gateway.PerMessageDeflate.negotiate([offer]) == (None, b"")


def test_ws_handshake_with_a_huge_window_bits_value_opens_without_deflate():
    app = WsRecorder()
    offer = (b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="
             + b"0" * 5000 + b"9\r\n")
    with running_server("asgi", app) as port:
        with connect(port) as sock:
            sock.sendall(ws_handshake(offer))
            ws = WsClient(sock)
            head = ws.read_head()
            assert head.startswith(b"HTTP/1.1 101 ") and b"Extensions" not in head
            sock.sendall(ws_client_frame(1, b"hi"))
            assert ws.read_frame() == (0x81, 1, b"hi")


@pytest.mark.parametrize("refusal", [
    [{"type": "websocket.close"}],
    [{"type": "websocket.http.response.start", "status": 403},
     {"type": "websocket.http.response.body", "body": b"no"}],
])
def test_ws_receive_after_a_refusal_is_a_disconnect_not_the_connect_again(refusal):
    # ASGI "Disconnect - receive event": once the server has refused the
    # handshake, receive() says the connection is gone (1006: no Close frame);
    # a loop that waits for websocket.disconnect must not get websocket.connect
    # again, at once, for ever.
    events, done = [], threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        try:
            events.append(await receive())
            for message in refusal:
                await send(message)
            events.append(await asyncio.wait_for(receive(), TIMEOUT))
            events.append(await asyncio.wait_for(receive(), TIMEOUT))
        finally:
            done.set()

    with running_server("asgi", app) as port:
        asgi_request_and_close(port, ws_handshake())
        assert done.wait(TIMEOUT)
    disconnect = {"type": "websocket.disconnect", "code": 1006, "reason": ""}
    assert events == [{"type": "websocket.connect"}, disconnect, disconnect]


# --- fix: a half-closed client with an unfinished chunked body ---


@pytest.mark.parametrize("body", [
    hostile_chunked(b"a\r\nhello"),                        # H1-39, in a chunk
    hostile_post(b"Content-Length: 10", body=b"hello"),    # H1-39, Content-Length
], ids=["chunked", "content-length"])
def test_wsgi_fin_mid_body_read_during_the_previous_response_closes(body):
    # RFC 9112 §8: a body the client's FIN cuts short is incomplete, also when
    # the FIN was read while the request before it ran. The connection then
    # closes as on a fresh one (test_hostile_request's H1-39 rows, both
    # interfaces: EOF, no answer), and the server still stops.
    calls: list = []
    entered, release = threading.Event(), threading.Event()
    recording = hostile_recording_app("wsgi", calls)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/first":
            entered.set()
            assert release.wait(TIMEOUT)
        return recording(environ, start_response)

    try:
        with wsgi_serve(app) as (port, server), connect(port) as sock:
            sock.sendall(wsgi_get("/first", close=False) + body)
            sock.shutdown(socket.SHUT_WR)
            assert entered.wait(TIMEOUT)
            wait_for(lambda: any(conn.peer_eof for conn in list(server.connections)))
            release.set()
            assert ResponseReader(sock).read_response()[::2] == (200, b"")
            srv_assert_eof(sock)          # each recv() waits TIMEOUT at most
            wait_for(lambda: not server.connections)
    finally:
        release.set()
    assert set(hostile_paths(calls)) <= {"/first", "/"}, calls
    assert hostile_bodies(calls) == [b""], "an incomplete body was reported complete"


# --- fix: a signal while asyncio closes its loop ---


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32",
                    reason="loop signal handlers are POSIX")
def test_ops_the_loops_signal_handlers_leave_with_the_server():
    # asyncio closes its self-pipe before it removes its signal handlers, so a
    # SIGTERM in between (a parent stopping its workers) finds a closed wakeup
    # fd: "Exception ignored ... Bad file descriptor" on stderr. The server
    # takes its handlers back itself, while the loop still runs.
    seen = {}

    async def serve_and_stop():
        restore = gateway.on_signals(lambda: None, asyncio.get_running_loop())
        seen["during"] = signal.getsignal(signal.SIGTERM)
        restore()
        wakeup = signal.set_wakeup_fd(-1)      # and put it back as it was
        signal.set_wakeup_fd(wakeup)
        seen["wakeup after"] = wakeup
        seen["after"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    asyncio.run(serve_and_stop())
    assert seen["during"] is not before        # the loop's own handler
    assert seen["wakeup after"] == -1          # no wakeup fd left to write to
    assert seen["after"] == before


def test_ops_the_wsgi_servers_signal_handlers_leave_with_the_server():
    # Like the ASGI server's, its handlers must not outlive it: after serve()
    # returns, Ctrl+C would call a stopped server's shutdown() and do nothing.
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT,
                                                                 signal.SIGTERM)}
    server = gateway.WSGIServer(lambda environ, start_response: [],
                                gateway.make_listener("127.0.0.1", 0))
    server.shutdown()          # before it serves: it stops as soon as it starts
    try:
        server.serve_forever()
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for signum, handler in before.items():     # the rest of the run needs them
            signal.signal(signum, handler)
