"""Tests for gateway.py, in the order of its sections.

Every server test starts a real server on a free loopback port (port 0) in a
thread, talks raw bytes to it, and waits on conditions with bounded timeouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time

import pytest

import echo_asgi
import echo_wsgi
import gateway
from gateway import END, HTTPError, RequestParser

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
        thread = threading.Thread(target=gateway.asyncio.run, args=(server.serve(),),
                                  daemon=True)
    thread.start()
    try:
        yield port
    finally:
        deadline = time.monotonic() + TIMEOUT
        while interface == "asgi" and server.stopping is None:   # not started yet
            assert time.monotonic() < deadline
            time.sleep(0.001)
        server.shutdown()
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
