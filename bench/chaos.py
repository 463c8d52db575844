#!/usr/bin/env python3
"""bench/chaos.py - a mixed-load fault run: can anything a client does stop or stall gateway?

    python3 bench/chaos.py --interface asgi --seconds 300          # make chaos: both paths
    python3 bench/chaos.py --interface wsgi --seconds 60 --json out.json -- --threads 4

Starts gateway.py as a subprocess on a free loopback port (options after `--` go to it),
then for --seconds runs --clients concurrent clients, half of them well-behaved (keep-alive
GETs, POST echo with Content-Length and chunked, pipelining, HTTP/1.0, WebSocket echo with
and without permessage-deflate on ASGI, plus a probe GET every half second) and half of them
misbehaving (resets mid-head/body/response, slowloris, never reading, half-close, hanging
heads, mutated bytes, bad WebSocket frames, connection floods). The server's fds, threads,
RSS and CPU are sampled every second. At the end the misbehaving clients stop, the server
should go back to idle, and it gets SIGTERM. The report says what happened; the exit status
is 1 if the server died, a well-behaved request failed (no answer, a wrong one, a timeout),
fds or threads leaked, or the server did not exit cleanly on SIGTERM (bench/README.md).

Standard library only. Only 127.0.0.1 is used. Imported by the server as `chaos:asgi_app`
(the ASGI default: echo_asgi.app for HTTP plus a WebSocket echo).
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import random
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
GATEWAY = os.path.join(ROOT, "gateway.py")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MiB = 1024 * 1024


# --- the ASGI app the server runs (imported by gateway.py, not by this script) -------------

async def asgi_app(scope, receive, send):
    """echo_asgi.app for HTTP and lifespan; a WebSocket echo (text stays text)."""
    if scope["type"] != "websocket":
        import echo_asgi        # gateway's own echo app, from the repository root
        await echo_asgi.app(scope, receive, send)
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return                                      # websocket.disconnect
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


# --- a raw client connection ----------------------------------------------------------------

class Timeout(Exception):
    """No progress before the deadline."""


class Closed(Exception):
    """The server closed the connection (EOF)."""


class BadResponse(Exception):
    """Bytes that are not a valid HTTP response or WebSocket frame."""


class WrongAnswer(Exception):
    """A valid response, but not the one the request asked for."""


class WSClosed(Exception):
    """A WebSocket Close frame arrived."""

    def __init__(self, code, reason=""):
        super().__init__(f"close {code} {reason!r}")
        self.code, self.reason = code, reason


def rst_close(sock):
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Conn:
    """A non-blocking client socket with a receive buffer and one deadline for waits.

    send() reads whatever arrives while it writes (the echo apps answer while the body is
    still coming, so a client that only writes would deadlock against them)."""

    def __init__(self, port, timeout, rcvbuf=None):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((HOST, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.received = 0

    def renew(self, timeout=None):
        self.deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

    def _poll(self, events):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout()
        poller = select.poll()
        poller.register(self.sock, events)
        ready = poller.poll(remaining * 1000)
        if not ready:
            raise Timeout()
        return ready[0][1]

    def _recv(self):
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            raise Closed()
        self.received += len(data)
        self.buf += data

    def fill(self):
        """Wait for more bytes (Closed at EOF, Timeout at the deadline)."""
        if self.eof:
            raise Closed()
        self._poll(select.POLLIN)
        self._recv()

    def send(self, data, stop_after=None):
        """Send it all, reading meanwhile; False if stop_after bytes arrived first."""
        view = memoryview(data)
        while view:
            ready = self._poll(select.POLLOUT | (0 if self.eof else select.POLLIN))
            if ready & (select.POLLIN | select.POLLERR | select.POLLHUP) and not self.eof:
                try:
                    self._recv()
                except Closed:
                    pass              # the next send() says whether it is really gone
            if ready & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                try:
                    view = view[self.sock.send(view[:262144]):]
                except BlockingIOError:
                    pass
            if stop_after is not None and len(self.buf) >= stop_after:
                return False
        return True

    def read_line(self, limit=65536):
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > limit:
                raise BadResponse(f"no CRLF in {len(self.buf)} bytes")
            start = max(0, len(self.buf) - 1)
            self.fill()

    def read_exact(self, n):
        while len(self.buf) < n:
            self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_to_eof(self):
        try:
            while True:
                self.fill()
        except Closed:
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def close(self, reset=False):
        if reset:
            rst_close(self.sock)
        else:
            self.sock.close()


Response = collections.namedtuple("Response", "status headers body close")


def read_response(conn, method="GET"):
    """One HTTP/1.x response (1xx but 101 skipped): Content-Length, chunked or to EOF."""
    while True:
        line = conn.read_line()
        match = re.match(rb"HTTP/1\.([01]) (\d{3})(?: |$)", line)
        if not match:
            raise BadResponse(f"status line {line[:60]!r}")
        minor, status = int(match[1]), int(match[2])
        headers = {}
        while True:
            field = conn.read_line()
            if not field:
                break
            name, colon, value = field.partition(b":")
            if not colon:
                raise BadResponse(f"header line {field[:60]!r}")
            headers.setdefault(name.strip().lower(), []).append(value.strip(b" \t"))
        if not (100 <= status < 200) or status == 101:
            break
    tokens = [t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")]
    close = b"close" in tokens or (minor == 0 and b"keep-alive" not in tokens)
    coding = b",".join(headers.get(b"transfer-encoding", [])).lower()
    if method == "HEAD" or status in (101, 204, 304):
        body = b""
    elif coding:
        if not coding.endswith(b"chunked"):
            raise BadResponse(f"transfer-encoding {coding!r}")
        parts = []
        while True:
            size_line = conn.read_line()
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadResponse(f"chunk size {size_line[:40]!r}") from None
            if size == 0:
                while conn.read_line():
                    pass                  # trailer fields
                break
            parts.append(conn.read_exact(size))
            if conn.read_exact(2) != b"\r\n":
                raise BadResponse("no CRLF after chunk data")
        body = b"".join(parts)
    elif b"content-length" in headers:
        body = conn.read_exact(int(headers[b"content-length"][0]))
    else:
        body, close = conn.read_to_eof(), True
    return Response(status, headers, body, close)


def expect_echo(response, body, what="echo"):
    if response.status != 200:
        raise WrongAnswer(f"status {response.status} (body {response.body[:80]!r})")
    if response.body != body:
        raise WrongAnswer(f"{what}: {len(response.body)} bytes back for {len(body)} sent"
                          + ("" if len(response.body) != len(body) else ", different bytes"))


def post_head(path, length=None, chunked=False, version="1.1", extra=b""):
    head = f"POST {path} HTTP/{version}\r\nHost: {HOST}\r\n".encode()
    head += b"Content-Type: application/octet-stream\r\n" + extra
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    elif length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + b"\r\n"


def get_request(path="/", extra=b""):
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n".encode() + extra + b"\r\n"


def chunked_body(body, rng, trailer=False):
    out, i = [], 0
    while i < len(body):
        n = min(len(body) - i, rng.choice((1, 7, 100, 1000, 4096, 16384, 65536)))
        out.append(b"%x\r\n" % n + body[i:i + n] + b"\r\n")
        i += n
    out.append(b"0\r\nX-Trailer: t\r\n\r\n" if trailer else b"0\r\n\r\n")
    return b"".join(out)


def body_of_size(rng):
    size = rng.choices((0, rng.randint(1, 1024), rng.randint(1025, 65536),
                        rng.randint(65537, 300_000), MiB), (1, 4, 3, 2, 0.3))[0]
    return os.urandom(size)


# --- a tiny WebSocket client (RFC 6455, RFC 7692) -------------------------------------------

def mask(key, data):
    if not data:
        return data
    n = len(data)
    return (int.from_bytes(data, "big")
            ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")


def ws_frame(opcode, payload, fin=True, rsv=0, masked=True, length=None):
    """One client frame; length= lies about the payload length (for bad frames)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if masked:
        key = os.urandom(4)
        return head + key + mask(key, payload)
    return head + payload


def ws_handshake(conn, deflate=False):
    """Send the upgrade, check the 101; returns whether permessage-deflate is on."""
    key = base64.b64encode(os.urandom(16))
    request = (f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n").encode()
    request += b"Sec-WebSocket-Key: " + key + b"\r\n"
    if deflate:
        request += b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    conn.send(request + b"\r\n")
    response = read_response(conn)
    if response.status != 101:
        raise WrongAnswer(f"handshake: status {response.status} {response.body[:80]!r}")
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    if response.headers.get(b"sec-websocket-accept", [b""])[0] != accept:
        raise WrongAnswer("handshake: wrong Sec-WebSocket-Accept")
    extensions = b",".join(response.headers.get(b"sec-websocket-extensions", []))
    if deflate and b"permessage-deflate" not in extensions:
        raise WrongAnswer(f"handshake: permessage-deflate not accepted ({extensions!r})")
    return b"permessage-deflate" in extensions


def ws_read_frame(conn):
    head = conn.read_exact(2)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", conn.read_exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", conn.read_exact(8))[0]
    key = conn.read_exact(4) if head[1] & 0x80 else None
    if key is not None:
        raise BadResponse("the server masked a frame (RFC 6455 §5.1)")
    return bool(head[0] & 0x80), head[0] & 0x70, head[0] & 0x0F, conn.read_exact(n)


def ws_read_message(conn, inflater):
    """The next data message (opcode, payload); answers pings, raises WSClosed."""
    opcode, parts, compressed = None, [], False
    while True:
        fin, rsv, op, payload = ws_read_frame(conn)
        if op == 0x9:
            conn.send(ws_frame(0xA, payload))
            continue
        if op == 0xA:
            continue
        if op == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            raise WSClosed(code, payload[2:].decode("utf-8", "replace"))
        if op in (0x1, 0x2):
            if opcode is not None:
                raise BadResponse("a new message inside a fragmented one")
            opcode, compressed = op, bool(rsv & 0x40)
        elif op != 0x0 or opcode is None:
            raise BadResponse(f"frame with opcode {op:#x}")
        parts.append(payload)
        if fin:
            data = b"".join(parts)
            if compressed:
                if inflater is None:
                    raise BadResponse("RSV1 without permessage-deflate")
                data = inflater.decompress(data + b"\x00\x00\xff\xff")
            return opcode, data


def ws_message_frames(opcode, data, deflate, rng):
    """A client message as 1-3 frames, compressed (RSV1 on the first) when deflate is on."""
    rsv = 0
    if deflate and rng.random() < 0.8:
        compressor = zlib.compressobj(wbits=-15)
        data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        data, rsv = (data[:-4] if data.endswith(b"\x00\x00\xff\xff") else data), 0x40
    pieces = [data]
    if len(data) > 2 and rng.random() < 0.3:
        cut = sorted(rng.sample(range(1, len(data)), min(2, len(data) - 1)))
        pieces = [data[i:j] for i, j in zip([0] + cut, cut + [len(data)])]
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(ws_frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1,
                               rsv=rsv if i == 0 else 0))
    return b"".join(frames)


def encode_close(code, reason=b""):
    return ws_frame(0x8, struct.pack("!H", code) + reason)


# --- results -----------------------------------------------------------------------------

class Stats:
    """Per kind: attempts, outcomes; every well-behaved failure; latencies."""

    def __init__(self, started, server_dead):
        self.started = started
        self.server_dead = server_dead   # () -> True once the server process has exited
        self.lock = threading.Lock()
        self.kinds = {}            # kind -> {"good", "attempts", "ok", "outcomes": Counter}
        self.failures = []         # well-behaved requests that failed (server alive)
        self.after_death = collections.Counter()   # kind: reason -> failures once it died
        self.unexpected = []       # misbehaving clients the server did not treat as it should
        self.latency = []          # seconds, every answered well-behaved request
        self.slowest = []          # (seconds, kind, what), the slowest well-behaved answers

    def _kind(self, kind, good):
        entry = self.kinds.get(kind)
        if entry is None:
            entry = self.kinds[kind] = {"good": good, "attempts": 0, "ok": 0,
                                        "outcomes": collections.Counter()}
        return entry

    def good(self, kind, what, error=None, latency=None, phase=""):
        """One well-behaved request: error is None when it got the right answer."""
        now = time.monotonic() - self.started
        dead = error is not None and self.server_dead(
            2.0 if isinstance(error, ConnectionRefusedError) else 0)
        with self.lock:
            entry = self._kind(kind, True)
            entry["attempts"] += 1
            if error is None:
                entry["ok"] += 1
                entry["outcomes"]["ok"] += 1
                if latency is not None:
                    self.latency.append(latency)
                    self.slowest.append((latency, kind, what))
                    if len(self.slowest) > 200:
                        self.slowest.sort(reverse=True)
                        del self.slowest[20:]
                return
            reason = failure_reason(error)
            if dead:
                entry["outcomes"]["server dead"] += 1
                self.after_death[f"{kind}: {reason}"] += 1
                return
            entry["outcomes"][reason] += 1
            self.failures.append({"t": round(now, 2), "kind": kind, "request": what,
                                  "reason": reason, "detail": describe(error, phase)[:300],
                                  "after_s": None if latency is None else round(latency, 2)})

    def bad(self, kind, outcome, expected=True, detail=""):
        """One misbehaving client: what the server did, and whether that is what it should."""
        now = time.monotonic() - self.started
        dead = not expected and self.server_dead(2.0 if "refused" in detail else 0)
        with self.lock:
            entry = self._kind(kind, False)
            entry["attempts"] += 1
            if dead:
                entry["outcomes"]["server dead"] += 1
                return
            entry["outcomes"][outcome] += 1
            if expected:
                entry["ok"] += 1
            elif len(self.unexpected) < 5000:
                self.unexpected.append({"t": round(now, 2), "kind": kind, "outcome": outcome,
                                        "detail": detail[:300]})

    def counts(self):
        with self.lock:
            good = sum(e["attempts"] for e in self.kinds.values() if e["good"])
            bad = sum(e["attempts"] for e in self.kinds.values() if not e["good"])
            return good, bad, len(self.failures), len(self.unexpected)


def failure_reason(error):
    names = {Timeout: "timeout (no answer in time)", Closed: "closed without a full answer",
             ConnectionResetError: "reset by the server", BrokenPipeError: "broken pipe",
             ConnectionRefusedError: "connection refused", socket.timeout: "connect timeout",
             BadResponse: "invalid response", WrongAnswer: "wrong answer",
             WSClosed: "unexpected WebSocket close"}
    for cls, name in names.items():
        if isinstance(error, cls):
            return name
    return type(error).__name__


def describe(error, phase):
    return f"{phase}: {type(error).__name__} {error}".strip()


# --- well-behaved clients: every request must get the right answer ---------------------

class Client:
    """One client thread: shares the server port, options, stats and the stop flag."""

    def __init__(self, run, rng):
        self.run, self.rng, self.port, self.stats = run, rng, run.port, run.stats
        self.args = run.args

    def conn(self, timeout=None, rcvbuf=None):
        return Conn(self.port, self.args.request_timeout if timeout is None else timeout,
                    rcvbuf)

    def requests(self, kind, exchanges):
        """Run (what, bytes, method, expected body) exchanges over keep-alive connections."""
        conn = None
        try:
            for what, data, method, body in exchanges:
                if self.run.stop.is_set():
                    return
                started = time.monotonic()
                phase = "connect"
                try:
                    if conn is None:
                        conn = self.conn()
                    conn.renew()
                    phase = "send"
                    conn.send(data)
                    phase = "read the response"
                    response = read_response(conn, method)
                    expect_echo(response, body)
                except Exception as error:   # a failure of this request; the connection is done
                    self.stats.good(kind, what, error, time.monotonic() - started, phase)
                    if conn is not None:
                        conn.close()
                    conn = None
                    return
                self.stats.good(kind, what, None, time.monotonic() - started)
                if response.close:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def keepalive_get(self):
        n = self.rng.randint(2, 6)
        self.requests("keep-alive GET", [
            (f"GET {i + 1}/{n}", get_request(f"/ka?i={i}&r={self.rng.random()}"), "GET", b"")
            for i in range(n)])

    def post_length(self):
        exchanges = []
        for i in range(self.rng.randint(1, 3)):
            body = body_of_size(self.rng)
            exchanges.append((f"POST Content-Length {len(body)}",
                              post_head("/cl", len(body)) + body, "POST", body))
        self.requests("POST Content-Length", exchanges)

    def post_chunked(self):
        exchanges = []
        for i in range(self.rng.randint(1, 3)):
            body = body_of_size(self.rng)
            trailer = self.rng.random() < 0.2
            exchanges.append((f"POST chunked {len(body)}" + (" +trailer" if trailer else ""),
                              post_head("/chunked", chunked=True)
                              + chunked_body(body, self.rng, trailer), "POST", body))
        self.requests("POST chunked", exchanges)

    def pipelined(self):
        """Two or three requests in one write; the answers must come back in order."""
        kind = "pipelined"
        bodies = [b""] + [os.urandom(self.rng.randint(0, 20000))
                          for _ in range(self.rng.randint(1, 2))]
        data = get_request("/pipe/0") + b"".join(
            post_head(f"/pipe/{i + 1}", len(b)) + b for i, b in enumerate(bodies[1:]))
        started = time.monotonic()
        conn, done = None, 0
        try:
            conn = self.conn()
            conn.send(data)
            for i, body in enumerate(bodies):
                response = read_response(conn, "GET" if i == 0 else "POST")
                expect_echo(response, body, f"answer {i + 1}")
                self.stats.good(kind, f"{len(bodies)} pipelined, #{i + 1}", None,
                                time.monotonic() - started)
                done += 1
        except Exception as error:
            self.stats.good(kind, f"{len(bodies)} pipelined, #{done + 1}", error,
                            time.monotonic() - started, "send" if conn is None or done == 0
                            and not conn.received else f"answer {done + 1}")
        finally:
            if conn is not None:
                conn.close()

    def http10(self):
        body = os.urandom(self.rng.choice((0, 10, 5000, 70000)))
        self.requests("HTTP/1.0", [(f"HTTP/1.0 POST {len(body)}",
                                    post_head("/h10", len(body), version="1.0") + body,
                                    "POST", body)])

    def ws_echo(self, deflate=False):
        kind = "WebSocket echo" + (" deflate" if deflate else "")
        started = time.monotonic()
        conn, what, phase = None, "handshake", "connect"
        try:
            conn = self.conn()
            phase = "handshake"
            on = ws_handshake(conn, deflate)
            inflater = zlib.decompressobj(wbits=-15) if on else None
            self.stats.good(kind, what, None, time.monotonic() - started)
            for i in range(self.rng.randint(1, 8)):
                if self.run.stop.is_set():
                    break
                text = self.rng.random() < 0.5
                size = self.rng.choice((0, 5, 125, 126, 1000, 65535, 65536, 200_000))
                data = (random_text(self.rng, size).encode() if text else os.urandom(size))
                what, phase = f"message {i + 1} ({'text' if text else 'binary'} {size})", "send"
                started = time.monotonic()
                conn.renew()
                frames = ws_message_frames(0x1 if text else 0x2, data, on, self.rng)
                if self.rng.random() < 0.2:
                    frames = ws_frame(0x9, b"ping") + frames      # a ping in between
                conn.send(frames)
                phase = "read the echo"
                opcode, back = ws_read_message(conn, inflater)
                if opcode != (0x1 if text else 0x2) or back != data:
                    raise WrongAnswer(f"opcode {opcode} {len(back)} bytes back for "
                                      f"{len(data)}")
                self.stats.good(kind, what, None, time.monotonic() - started)
            what, phase, started = "close handshake", "close", time.monotonic()
            conn.renew()
            conn.send(encode_close(1000))
            try:
                ws_read_message(conn, inflater)
                raise WrongAnswer("a message instead of the Close")
            except WSClosed as close:
                if close.code != 1000:
                    raise WrongAnswer(f"Close {close.code} for our 1000") from None
            conn.read_to_eof()
            self.stats.good(kind, what, None, time.monotonic() - started)
        except Exception as error:
            self.stats.good(kind, what, error, time.monotonic() - started, phase)
        finally:
            if conn is not None:
                conn.close()

    def ws_echo_deflate(self):
        self.ws_echo(deflate=True)

    def probe(self):
        """The heartbeat: one GET on a new connection every half second."""
        started = time.monotonic()
        before = self.stats.kinds.get("probe GET", {}).get("ok", 0)
        self.requests("probe GET", [("probe", get_request("/probe", b"Connection: close\r\n"),
                                     "GET", b"")])
        answered = self.stats.kinds["probe GET"]["ok"] > before
        self.run.probes.append((started - self.run.started, time.monotonic() - started,
                                answered))
        self.run.stop.wait(0.5)


def random_text(rng, size):
    alphabet = "abcdefghijklmnopqrstuvwxyz 0123456789éß€😀"
    return "".join(rng.choice(alphabet) for _ in range(size // 2)).ljust(size, "x")[:size]


# --- misbehaving clients: whatever they do, the server must carry on ----------------------

class Misbehaving(Client):
    """The faults. Each records what the server did and whether that is what it should."""

    @property
    def slack(self):
        return self.args.timeout_request_head * 0.5 + 3.0

    def partial_head(self):
        full = (f"GET /partial?{self.rng.random()} HTTP/1.1\r\nHost: {HOST}\r\n"
                "User-Agent: chaos\r\nAccept: */*\r\n\r\n").encode()
        return full[:self.rng.randint(1, len(full) - 3)]

    def reset_head(self):
        """1-8 sockets each send part of a head, then all reset at once, often right around
        the head timeout (when the server may be answering 408 on that very socket)."""
        head_timeout = self.args.timeout_request_head
        delay = self.rng.choice((0.0, self.rng.uniform(0, head_timeout),
                                 head_timeout + self.rng.uniform(-0.3, 0.3),
                                 head_timeout * 1.5 + self.rng.uniform(-0.3, 0.3)))
        socks = []
        try:
            for _ in range(self.rng.choice((1, 1, 2, 4, 8))):
                sock = socket.create_connection((HOST, self.port), timeout=5)
                socks.append(sock)
                sock.sendall(self.partial_head())
            self.run.stop.wait(delay)
            outcome = "reset " + ("at once" if delay == 0 else "before the head timeout"
                                  if delay < head_timeout - 0.3 else "around the head timeout")
            self.stats.bad("reset mid-head", outcome + f" (x{len(socks)})")
        except OSError as error:
            self.stats.bad("reset mid-head", "connect/send failed", False, describe(error, ""))
        finally:
            for sock in socks:
                rst_close(sock)

    def reset_body(self):
        """A POST whose body stops part way, then a reset (sometimes near the read timeout)."""
        read_timeout = self.args.timeout_read
        delay = self.rng.choice((0.0, self.rng.uniform(0, read_timeout),
                                 read_timeout + self.rng.uniform(-0.3, 0.3)))
        chunked = self.rng.random() < 0.4
        length = self.rng.randint(100, 300_000)
        try:
            conn = self.conn(timeout=5)
        except OSError as error:
            self.stats.bad("reset mid-body", "connect failed", False, describe(error, ""))
            return
        try:
            body = os.urandom(self.rng.randint(0, length - 1))
            conn.send(post_head("/rb", None if chunked else length, chunked)
                      + (chunked_body(body, self.rng)[:-5] if chunked else body))
            self.run.stop.wait(delay)
            self.stats.bad("reset mid-body", ("chunked" if chunked else "Content-Length")
                           + (", reset at once" if delay == 0 else ", reset later"))
        except (OSError, Timeout, Closed) as error:
            self.stats.bad("reset mid-body", "server closed first: " + failure_reason(error))
        finally:
            conn.close(reset=True)

    def reset_response(self):
        """A request with a large answer; reset after part of the answer (or none) came."""
        body = os.urandom(self.rng.choice((1000, 100_000, MiB)))
        stop_after = self.rng.choice((0, 1, 1000, 64 * 1024, 300_000))
        try:
            conn = self.conn(timeout=self.args.request_timeout)
        except OSError as error:
            self.stats.bad("reset mid-response", "connect failed", False, describe(error, ""))
            return
        try:
            conn.send(post_head("/rr", len(body)) + body, stop_after=stop_after or None)
            while len(conn.buf) < stop_after:
                conn.fill()
            self.stats.bad("reset mid-response", f"reset after {min(stop_after, len(conn.buf))}"
                           " bytes of the answer" if stop_after else "reset with no answer read")
        except (Timeout, Closed, OSError) as error:
            expected = len(body) <= stop_after     # the whole answer came and the server closed
            self.stats.bad("reset mid-response", "answer stopped: " + failure_reason(error),
                           expected, describe(error, f"waiting for {stop_after} bytes of "
                                                     f"the answer to {len(body)}"))
        finally:
            conn.close(reset=True)

    def slowloris(self):
        """One byte of a head now and then: the server must cut it off (408) in time."""
        head = (f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: slowloris\r\n"
                + "X-Pad: " + "a" * 200 + "\r\n\r\n").encode()
        limit = self.args.timeout_request_head + self.slack
        started = time.monotonic()
        try:
            sock = socket.create_connection((HOST, self.port), timeout=5)
        except OSError as error:
            self.stats.bad("slowloris", "connect failed", False, describe(error, ""))
            return
        received = b""
        try:
            sock.setblocking(False)
            for byte in head[:-1]:
                if self.run.stop.wait(self.rng.uniform(0.2, 0.8)):
                    return
                try:
                    received += sock.recv(4096)
                    outcome = "408, then closed" if b" 408 " in received[:20] else \
                        f"closed ({received[:12]!r})"
                    break
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if time.monotonic() - started > limit * 1.5:
                    outcome = "still open"
                    break
                try:
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    outcome = "closed (send failed)"
                    break
            else:
                outcome = "the whole head went through"
            took = time.monotonic() - started
            self.stats.bad("slowloris", outcome, took <= limit and outcome != "still open",
                           f"{outcome} after {took:.1f} s (head timeout "
                           f"{self.args.timeout_request_head} s)")
        finally:
            rst_close(sock) if self.rng.random() < 0.5 else sock.close()

    def never_read(self):
        """POST 1 MiB bodies (pipelined) on a small receive buffer and never read: the server
        must not stay blocked on us. Afterwards the answer is drained to see what it did."""
        n = self.rng.randint(1, 3)
        data = b"".join(post_head("/nr", MiB) + os.urandom(MiB) for _ in range(n))
        hold = self.args.timeout_write + self.slack
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            sock.connect((HOST, self.port))
        except OSError as error:
            self.stats.bad("never reads", "connect failed", False, describe(error, ""))
            return
        started = time.monotonic()
        outcome = None
        try:
            sock.setblocking(False)
            view = memoryview(data)
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while time.monotonic() - started < hold and not self.run.stop.is_set():
                events = poller.poll(200)
                if events and events[0][1] & select.POLLERR:
                    outcome = "reset by the server while unread"
                    break
                if view and events and events[0][1] & select.POLLOUT:
                    try:
                        view = view[sock.send(view[:65536]):]
                    except BlockingIOError:
                        pass
                    except OSError:
                        outcome = "reset by the server while unread"
                        break
                    if not view:
                        poller.modify(sock, 0)
            sent = len(data) - len(view)
            got = 0
            if outcome is None:       # now read what is there: did the server give up?
                sock.settimeout(2.0)
                try:
                    while got < 8 * MiB:
                        piece = sock.recv(262144)
                        if not piece:
                            outcome = "server closed"
                            break
                        got += len(piece)
                    else:
                        outcome = "server still answering"
                except socket.timeout:
                    outcome = "connection left open"
                except OSError:
                    outcome = "reset by the server"
            stopped = "server stopped reading" if view else "all sent"
            self.stats.bad("never reads", f"{outcome} ({stopped})", True,
                           f"{outcome} after {time.monotonic() - started:.1f} s, {sent} of "
                           f"{len(data)} bytes sent, {got} read afterwards")
        finally:
            sock.close()

    def half_close(self):
        """A whole request, then shutdown(SHUT_WR): the answer must still come."""
        body = os.urandom(self.rng.choice((0, 100, 10_000)))
        data = post_head("/half", len(body)) + body if body or self.rng.random() < 0.5 \
            else get_request("/half")
        started = time.monotonic()
        phase = "connect"
        try:
            conn = self.conn()
        except OSError as error:
            self.stats.bad("half-close", "connect failed", False, describe(error, phase))
            return
        try:
            phase = "send"
            conn.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
            phase = "read the response"
            response = read_response(conn, "POST" if body else "GET")
            expect_echo(response, body)
            self.stats.bad("half-close", "answered", True)
        except Exception as error:
            took = time.monotonic() - started
            self.stats.bad("half-close", "no right answer: " + failure_reason(error), False,
                           describe(error, phase) + f" after {took:.1f} s")
        finally:
            conn.close()

    def incomplete_head(self):
        """Part of a head, then silence: the server must answer 408 (or close) in time."""
        limit = self.args.timeout_request_head + self.slack
        started = time.monotonic()
        try:
            conn = self.conn(timeout=limit * 2)
        except OSError as error:
            self.stats.bad("incomplete head", "connect failed", False, describe(error, ""))
            return
        try:
            conn.send(self.partial_head())
            try:
                response = read_response(conn)
                outcome = f"{response.status}"
            except Closed:
                outcome = "closed, no answer"
            except ConnectionResetError:
                outcome = "reset"
            except Timeout:
                outcome = "no answer"
            took = time.monotonic() - started
            good = outcome in ("408", "closed, no answer", "reset") and took <= limit
            self.stats.bad("incomplete head", outcome + ("" if took <= limit else ", too late"),
                           good, f"{outcome} after {took:.1f} s (head timeout "
                                 f"{self.args.timeout_request_head} s)")
        except (OSError, BadResponse) as error:
            self.stats.bad("incomplete head", failure_reason(error), False,
                           describe(error, "read"))
        finally:
            conn.close(reset=self.rng.random() < 0.5)

    def bad_bytes(self):
        """A valid request with bytes mangled: any answer or a close, soon, but not a 5xx."""
        variant, data = self.mutation()
        limit = self.args.timeout_request_head + self.args.timeout_read + 2 * self.slack
        started = time.monotonic()
        try:
            conn = self.conn(timeout=limit)
        except OSError as error:
            self.stats.bad("bad bytes", variant + ": connect failed", False, describe(error, ""))
            return
        try:
            try:
                conn.send(data)
                while b"\r\n" not in conn.buf[:200] and len(conn.buf) < 200:
                    conn.fill()
                line = bytes(conn.buf[:conn.buf.find(b"\r\n")] if b"\r\n" in conn.buf
                             else conn.buf[:40])
                match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
                outcome = match[1].decode() if match else f"garbage {line[:20]!r}"
            except Closed:
                outcome = "closed" if not conn.buf else f"closed after {bytes(conn.buf[:20])!r}"
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
            except Timeout:
                outcome = "no answer"
            took = time.monotonic() - started
            complete = b"\r\n\r\n" in data
            slow = variant.startswith("spaces") and took > self.args.slow
            # 501 (unknown method or transfer coding) and 505 (version) are right answers
            good = (outcome != "no answer" and not outcome.startswith("garbage")
                    and outcome not in ("500", "502", "504") and not slow)
            label = outcome[0] + "xx" if outcome[:1] in "1234" else outcome
            if slow:
                label += f", slow (> {self.args.slow:g} s)"
            self.stats.bad("bad bytes", f"{variant}: {label}", good,
                           f"{variant}: {outcome} after {took:.2f} s "
                           f"({'complete' if complete else 'incomplete'} head) "
                           f"{data[:120]!r}...")
        finally:
            conn.close(reset=self.rng.random() < 0.3)

    def mutation(self):
        rng = self.rng
        variant = rng.choices(("mutate", "chunked", "spaces"), (5, 3, 1))[0]
        body = os.urandom(rng.randint(0, 2000))
        if variant == "spaces":
            n = rng.choice((1000, 10_000, 30_000, 60_000))
            run, variant = " " * n, f"spaces {n}"
            ws = rng.choice(("{}", "\t{}"))
            field = "X-Pad: " + ws.format(run) + "\x01" + rng.choice(("", "a", " ")) + "\r\n"
            return variant, get_request("/spaces", field.encode("latin-1"))
        if variant == "chunked":
            bad = rng.choice((
                b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n",
                b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n",
                b"3\r\nabc0\r\n\r\n", b"3\nabc\n0\n\n", b"3;\x01=x\r\nabc\r\n0\r\n\r\n",
                b"0x3\r\nabc\r\n0\r\n\r\n", b" 3\r\nabc\r\n0\r\n\r\n", b"3 \r\nabc\r\n0\r\n\r\n",
                b"\r\n\r\n", b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n", b"3\r\nab",
                b"1" * 100 + b"\r\n", b"3\r\nabc\r\n0\r\n" + b"X: y\r\n" * 2000 + b"\r\n"))
            te = rng.choice((b"chunked", b"chunked", b"gzip, chunked", b"chunked, chunked",
                             b"identity", b" chunked", b"chunk"))
            head = post_head("/badchunk", extra=b"Transfer-Encoding: " + te + b"\r\n"
                             + (b"Content-Length: 3\r\n" if rng.random() < 0.2 else b""))
            return variant, head + bad
        data = bytearray(post_head("/m", len(body)) + body if rng.random() < 0.5 else
                         get_request("/m", b"Accept: */*\r\nX-A: b\r\n"))
        head_end = data.find(b"\r\n\r\n") + 4
        for _ in range(rng.randint(1, 4)):
            op = rng.randint(0, 7)
            pos = rng.randint(0, head_end - 1)
            if op == 0:
                data[pos] = rng.randint(0, 255)
            elif op == 1:
                data[pos:pos] = rng.choice((b"\x00", b"\x7f", b"\xff", b"\r", b"\n", b" ",
                                            b":", b"\r\n", b"\r\n ", b"%", b"\t"))
            elif op == 2:
                del data[pos:pos + rng.randint(1, 10)]
            elif op == 3:
                i = data.find(b"\r\n", pos)
                if i >= 0:
                    data[i:i + 2] = rng.choice((b"\n", b"\r", b"\r\r\n", b"\n\r"))
            elif op == 4:
                data[pos:pos] = b"\r\nContent-Length: " + str(rng.randint(-5, 99999)).encode()
            elif op == 5:
                data[pos:pos] = b"\r\nTransfer-Encoding: chunked"
            elif op == 6:
                data[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 30)))
            else:
                data[pos:pos] = b"A" * rng.choice((100, 9000, 70_000))
            head_end = min(max(data.find(b"\r\n\r\n") + 4, 4), len(data))
        return variant, bytes(data)

    def bad_ws(self):
        """Open a WebSocket, then send a frame RFC 6455 forbids: expect a Close and a close."""
        rng = self.rng
        variant = rng.choice(("unmasked", "reserved opcode", "corrupt deflate",
                              "RSV1 not negotiated", "RSV2/3", "oversized control",
                              "fragmented control", "orphan continuation", "invalid UTF-8",
                              "bad close code", "1-byte close", "63-bit length"))
        deflate = variant == "corrupt deflate"
        limit = 5.0 + self.slack
        started = time.monotonic()
        try:
            conn = self.conn(timeout=limit)
        except OSError as error:
            self.stats.bad("bad WebSocket", variant + ": connect failed", False,
                           describe(error, ""))
            return
        try:
            try:
                on = ws_handshake(conn, deflate)
                inflater = zlib.decompressobj(wbits=-15) if on else None
                if deflate:      # one good compressed message first: the context is in use
                    conn.send(ws_message_frames(0x2, b"hello" * 20, True, random.Random(1)))
                    ws_read_message(conn, inflater)
                frame = {
                    "unmasked": lambda: ws_frame(0x2, b"abc", masked=False),
                    "reserved opcode": lambda: ws_frame(rng.choice((3, 4, 5, 6, 7, 11, 12, 15)),
                                                        b"x"),
                    "corrupt deflate": lambda: ws_frame(0x2, b"\xff" + os.urandom(20), rsv=0x40),
                    "RSV1 not negotiated": lambda: ws_frame(0x1, b"abc", rsv=0x40),
                    "RSV2/3": lambda: ws_frame(0x1, b"abc", rsv=rng.choice((0x20, 0x10))),
                    "oversized control": lambda: ws_frame(0x9, b"p" * 126),
                    "fragmented control": lambda: ws_frame(0x9, b"p", fin=False),
                    "orphan continuation": lambda: ws_frame(0x0, b"abc"),
                    "invalid UTF-8": lambda: ws_frame(0x1, b"ok\xff\xfe"),
                    "bad close code": lambda: encode_close(rng.choice((999, 1005, 1006, 1015,
                                                                       2000, 5000))),
                    "1-byte close": lambda: ws_frame(0x8, b"\x03"),
                    "63-bit length": lambda: ws_frame(0x2, b"", length=1 << 63)[:10] + b"\0" * 4,
                }[variant]()
                conn.send(frame)
                while True:
                    ws_read_message(conn, inflater)
            except WSClosed as close:
                outcome = f"Close {close.code}"
                try:
                    conn.renew(3.0)
                    conn.read_to_eof()
                except Timeout:
                    outcome += " but the TCP connection stayed open"
                except OSError:
                    pass
            except Closed:
                outcome = "closed without a Close frame"
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
            except Timeout:
                outcome = "no Close: hangs"
            except (WrongAnswer, BadResponse) as error:
                outcome = f"{failure_reason(error)}: {error}"
            took = time.monotonic() - started
            good = outcome.startswith(("Close 10", "closed", "reset")) and \
                "stayed open" not in outcome and not outcome.startswith("Close 1000")
            self.stats.bad("bad WebSocket", f"{variant}: {outcome}", good,
                           f"{variant}: {outcome} after {took:.1f} s")
        finally:
            conn.close(reset=rng.random() < 0.3)

    def flood(self):
        """Open many sockets as fast as possible and close each at once (FIN or RST)."""
        n = self.rng.randint(20, 60)
        failed = 0
        for _ in range(n):
            if self.run.stop.is_set():
                break
            try:
                sock = socket.create_connection((HOST, self.port), timeout=5)
            except OSError:
                failed += 1
                continue
            if self.rng.random() < 0.3:
                try:
                    sock.send(b"GET / HTTP/1.1\r\n")
                except OSError:
                    pass
            rst_close(sock) if self.rng.random() < 0.5 else sock.close()
        self.stats.bad("connection flood", "all connected" if not failed else
                       f"{failed} connects failed", not failed, f"{failed} of {n} failed")


GOOD = {"keep-alive GET": ("keepalive_get", 3), "POST Content-Length": ("post_length", 3),
        "POST chunked": ("post_chunked", 2), "pipelined": ("pipelined", 2),
        "HTTP/1.0": ("http10", 1), "WebSocket echo": ("ws_echo", 2),
        "WebSocket echo deflate": ("ws_echo_deflate", 2)}
BAD = {"reset mid-head": ("reset_head", 3), "reset mid-body": ("reset_body", 3),
       "reset mid-response": ("reset_response", 3), "slowloris": ("slowloris", 2),
       "never reads": ("never_read", 2), "half-close": ("half_close", 3),
       "incomplete head": ("incomplete_head", 2), "bad bytes": ("bad_bytes", 5),
       "bad WebSocket": ("bad_ws", 3), "connection flood": ("flood", 1)}
WS_ONLY = {"WebSocket echo", "WebSocket echo deflate", "bad WebSocket"}


# --- the server process and its figures --------------------------------------------------

def proc_figures(pid):
    """(fds, threads, rss KiB, peak rss KiB, cpu seconds) from /proc, or None if gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                status[name] = value.split()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        return (fds, int(status["Threads"][0]), int(status["VmRSS"][0]),
                int(status["VmHWM"][0]), cpu)
    except (OSError, KeyError, IndexError, ValueError):
        return None


class Run:
    """One chaos run: the server, the clients, the sampler, the report."""

    def __init__(self, args, server_args):
        self.args, self.server_args = args, server_args
        self.stop = threading.Event()
        self.samples = []         # (t, fds, threads, rss KiB, hwm KiB, cpu s)
        self.death = None         # (t, exit status) if the server died during the load
        self.probes = []          # (t, seconds, answered) of each probe GET
        self.port = None

    # server

    def start_server(self):
        a = self.args
        app = a.app or ("echo_wsgi:application" if a.interface == "wsgi" else "chaos:asgi_app")
        self.cmd = [sys.executable, GATEWAY, f"--{a.interface}", app, "--port", "0",
                    "--workers", "1", "--timeout-request-head", str(a.timeout_request_head),
                    "--timeout-read", str(a.timeout_read), "--timeout-write",
                    str(a.timeout_write)]
        if not a.access_log:
            self.cmd.append("--no-access-log")
        self.cmd += self.server_args
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
        env.pop("WEB_CONCURRENCY", None)
        self.log = tempfile.NamedTemporaryFile(prefix="chaos-gateway-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            match = re.search(r"serving \w+ app \S+ on http://[\d.]+:(\d+)", self.log_text())
            if match:
                self.port = int(match[1])
                break
            if self.proc.poll() is not None:
                raise SystemExit(f"chaos: the server exited with {self.proc.returncode} at "
                                 f"start:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        else:
            self.kill()
            raise SystemExit("chaos: the server did not say where it listens within 20 s")
        conn = Conn(self.port, 10)        # one request, to be sure it answers
        conn.send(get_request("/", b"Connection: close\r\n"))
        read_response(conn)
        conn.close()

    def log_text(self):
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def server_dead(self, grace=0.0):
        """True once the server has exited; also stops the load at once. A refused
        connection waits `grace` s: a dying server closes its socket before it exits."""
        deadline = time.monotonic() + grace
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        if self.death is None:
            self.death = (round(time.monotonic() - self.started, 1), self.proc.returncode)
        self.stop.set()
        return True

    def sample(self):
        figures = proc_figures(self.proc.pid)
        if figures is None or self.proc.poll() is not None:
            return None
        self.samples.append((round(time.monotonic() - self.started, 2),) + figures)
        return self.samples[-1]

    def sampler(self):
        while not self.stopped_sampling.wait(1.0):
            if self.server_dead():
                return
            self.sample()

    # clients

    def client_loop(self, good, rng):
        cls = Client if good else Misbehaving
        table = {k: v for k, v in (GOOD if good else BAD).items()
                 if self.args.interface == "asgi" or k not in WS_ONLY}
        table = {k: v for k, v in table.items() if self.args.only is None
                 or k in self.args.only}
        if not table:
            return
        client = cls(self, rng)
        names = list(table)
        weights = [table[k][1] for k in names]
        while not self.stop.is_set():
            kind = rng.choices(names, weights)[0]
            try:
                getattr(client, table[kind][0])()
            except Exception as error:       # a bug in this script: say so, keep going
                self.stats.bad("chaos.py error", f"{kind}: {type(error).__name__}", False,
                               f"{kind}: {error!r}")
            if good:
                self.stop.wait(rng.uniform(0, 2 * self.args.pause))

    def probe_loop(self):
        client = Client(self, random.Random(0))
        while not self.stop.is_set():
            client.probe()

    # the run

    def go(self):
        a = self.args
        self.started = time.monotonic()
        self.stats = Stats(self.started, self.server_dead)
        self.start_server()
        time.sleep(1.0)
        self.baseline = self.sample()
        self.stopped_sampling = threading.Event()
        sampler = threading.Thread(target=self.sampler, daemon=True)
        sampler.start()
        load_start = time.monotonic()
        seed = a.seed if a.seed is not None else random.randrange(1 << 30)
        self.seed = seed
        good_n = max(1, round(a.clients * a.good_share))
        threads = [threading.Thread(target=self.probe_loop, daemon=True, name="probe")]
        for i in range(a.clients):
            threads.append(threading.Thread(target=self.client_loop, daemon=True,
                                            args=(i < good_n, random.Random(seed + i)),
                                            name=f"client-{i}"))
        for thread in threads:
            thread.start()
        next_report = load_start + a.progress
        deadline = load_start + a.seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.stop.wait(min(0.5, max(0, deadline - time.monotonic())))
            if a.progress and time.monotonic() >= next_report and self.samples:
                next_report += a.progress
                t, fds, nthreads, rss, _, _ = self.samples[-1]
                good, bad, failed, unexpected = self.stats.counts()
                print(f"  {t:6.0f} s  fds {fds:4d}  threads {nthreads:3d}  RSS "
                      f"{rss / 1024:6.1f} MiB  well-behaved {good} ({failed} failed)  "
                      f"misbehaving {bad} ({unexpected} unexpected)", file=sys.stderr)
        self.load_seconds = time.monotonic() - load_start
        self.stop.set()
        join_by = time.monotonic() + a.request_timeout + a.timeout_request_head * 3 + 15
        for thread in threads:
            thread.join(max(0.1, join_by - time.monotonic()))
        self.stuck = [t.name for t in threads if t.is_alive()]
        self.end_of_load = self.samples[-1] if self.samples else None
        self.stopped_sampling.set()
        sampler.join()
        self.server_dead()
        self.idle_wait()
        self.final_check()
        self.terminate()

    def idle_wait(self):
        """Wait (bounded) for the server's fds and threads to come back to the baseline."""
        a = self.args
        started = time.monotonic()
        self.idle_seconds, self.end = None, None
        while self.death is None and time.monotonic() - started < a.idle_wait:
            now = self.sample()
            if now is None:
                self.death = (round(time.monotonic() - self.started, 1), self.proc.poll())
                break
            self.end = now
            if now[1] <= self.baseline[1] and now[2] <= self.baseline[2]:
                self.idle_seconds = time.monotonic() - started
                break
            time.sleep(0.5)

    def final_check(self):
        """After the storm: a plain GET must still be answered."""
        if self.death is not None:
            return
        client = Client(self, random.Random(1))
        client.requests("final GET", [("GET after the run", get_request(
            "/final", b"Connection: close\r\n"), "GET", b"")])

    def terminate(self):
        self.exit_status, self.exit_seconds = None, None
        if self.death is not None:
            self.exit_status = self.proc.returncode
            return
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_status = self.proc.wait(self.args.term_wait)
            self.exit_seconds = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            self.kill()

    # the report

    def log_summary(self):
        text = self.log_text()
        lines = text.splitlines()
        benign = re.compile(r"^gateway: (serving \w+ app|stopped$|ASGI 'lifespan' protocol "
                            r"appears unsupported)|^gateway\.access: ")
        tracebacks, errors, other = [], [], []
        chained = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith(("During handling of the above exception",
                                "The above exception was the direct cause")):
                chained = bool(tracebacks)
                i += 1
                continue
            if line.startswith("Traceback (most recent call last)"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j]
                                          or lines[j].startswith("During handling")):
                    j += 1
                last = lines[j] if j < len(lines) else "?"
                where = [re.sub(r'^File ".*/', "", l.strip()) for l in lines[i + 1:j]
                         if l.strip().startswith("File ")]
                ours = [w for w in where if w.startswith("gateway.py")]
                summary = f"{last}  [{' <- '.join(where[-1:] + ours[-1:])}]"
                if chained:        # one error: "A, then while handling it, B"
                    tracebacks[-1] += " ... then " + summary
                else:
                    tracebacks.append(summary)
                chained = False
                i = j + 1
                continue
            if benign.search(line):
                pass
            elif line.startswith("gateway"):
                errors.append(line)
            elif line.strip():
                other.append(line)
            i += 1

        def distinct(items):
            normal = collections.Counter(re.sub(r"\d+", "N", item)[:240] for item in items)
            return normal.most_common()
        return {"lines": len(lines), "error_lines": len(errors), "tracebacks": len(tracebacks),
                "other_lines": len(other), "distinct_errors": distinct(errors)[:10],
                "distinct_tracebacks": distinct(tracebacks)[:10],
                "distinct_other": distinct(other)[:10], "path": self.log.name}

    def figures(self):
        a = self.args
        samples = self.samples
        warm = min(a.warmup, self.load_seconds * 0.3)
        t0 = self.baseline[0] if self.baseline else 0
        after = [s for s in samples if s[0] >= t0 + warm]
        slope = None
        if len(after) >= 5:
            xs = [s[0] / 60 for s in after]
            ys = [s[3] / 1024 for s in after]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None
        load = [s for s in samples if s is not None]
        cpu_pct = []
        for s0, s1 in zip(load, load[1:]):
            if s1[0] > s0[0]:
                cpu_pct.append(100 * (s1[5] - s0[5]) / (s1[0] - s0[0]))
        end = self.end or (samples[-1] if samples else None)
        latency = sorted(self.stats.latency)

        def pct(p):
            return round(latency[min(len(latency) - 1, int(p * len(latency)))], 3) \
                if latency else None
        base = self.baseline
        return {
            "fds": {"start": base[1], "max": max(s[1] for s in samples),
                    "end_of_load": self.end_of_load and self.end_of_load[1],
                    "end": end and end[1]},
            "threads": {"start": base[2], "max": max(s[2] for s in samples),
                        "end": end and end[2]},
            "rss_mib": {"start": round(base[3] / 1024, 1),
                        "after_warmup": round(after[0][3] / 1024, 1) if after else None,
                        "warmup_s": round(warm, 1),
                        "max": round(max(s[3] for s in samples) / 1024, 1),
                        "end": end and round(end[3] / 1024, 1),
                        "peak_vmhwm": round(max(s[4] for s in samples) / 1024, 1),
                        "slope_mib_per_min_after_warmup": None if slope is None
                        else round(slope, 3)},
            "cpu": {"seconds": round(samples[-1][5] - base[5], 1),
                    "mean_pct": round(100 * (samples[-1][5] - base[5])
                                      / max(1e-9, samples[-1][0] - base[0]), 1),
                    "max_pct_1s": round(max(cpu_pct), 1) if cpu_pct else None},
            "latency_s": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0),
                          "answered": len(latency),
                          "slower_than_slow": sum(x > a.slow for x in latency)},
            "slowest": [{"s": round(s, 2), "kind": k, "request": w} for s, k, w in
                        sorted(self.stats.slowest, reverse=True)[:5]],
        }

    def stalls(self):
        """Windows in which the probe GET took longer than --slow or got no answer."""
        windows = []
        for t, took, answered in self.probes:
            if took <= self.args.slow and answered:
                continue
            if windows and t <= windows[-1][1] + 0.6:
                windows[-1][1] = max(windows[-1][1], t + took)
                windows[-1][2] = windows[-1][2] and answered
            else:
                windows.append([t, t + took, answered])
        return [(round(a, 1), round(b - a, 1), ok) for a, b, ok in windows]

    def verdict(self, fig):
        a = self.args
        problems = []
        if self.death is not None:
            problems.append(f"the server died at {self.death[0]} s (exit status "
                            f"{self.death[1]})")
        if self.stats.failures:
            problems.append(f"{len(self.stats.failures)} well-behaved requests failed")
        if self.death is None:
            if fig["fds"]["end"] is None or fig["fds"]["end"] > fig["fds"]["start"] + \
                    a.fd_tolerance:
                problems.append(f"fds leaked: {fig['fds']['start']} at start, "
                                f"{fig['fds']['end']} at the end")
            if fig["threads"]["end"] is None or fig["threads"]["end"] > \
                    fig["threads"]["start"] + a.thread_tolerance:
                problems.append(f"threads leaked: {fig['threads']['start']} at start, "
                                f"{fig['threads']['end']} at the end")
            if self.exit_seconds is None:
                problems.append(f"no exit within {a.term_wait:g} s of SIGTERM (killed)")
            elif self.exit_status != 0:
                problems.append(f"exit status {self.exit_status} after SIGTERM")
        if self.stuck:
            problems.append(f"{len(self.stuck)} client threads never finished")
        warnings = []
        unexpected = collections.Counter(u["kind"] for u in self.stats.unexpected)
        for kind, n in unexpected.items():
            warnings.append(f"{kind}: {n} not treated as expected")
        if a.strict and unexpected:
            problems += warnings
        return problems, warnings

    def report(self):
        a = self.args
        fig = self.figures()
        problems, warnings = self.verdict(fig)
        logs = self.log_summary()
        if logs["tracebacks"] or logs["error_lines"]:
            # Nothing a client does is an error of the server's: a traceback or an
            # ERROR/WARNING line in its log under this load is a finding.
            problems.append(f"the server logged {logs['error_lines']} error/warning lines "
                            f"and {logs['tracebacks']} tracebacks")
        out = []
        p = out.append
        p("")
        p(f"chaos: gateway {a.interface.upper()} - {' '.join(self.cmd[1:])}")
        p(f"load {self.load_seconds:.0f} s (asked {a.seconds} s), {a.clients} clients "
          f"({max(1, round(a.clients * a.good_share))} well-behaved + probe), seed {self.seed}")
        p("")
        p(f"{'client kind':<26}{'attempts':>9}{'as they should':>16}   outcomes")
        for good in (True, False):
            p("well-behaved (every request must get the right answer):" if good else
              "misbehaving (the server must carry on; 'as they should' = treated as expected):")
            for kind, e in sorted(self.stats.kinds.items()):
                if e["good"] != good:
                    continue
                outcomes = ", ".join(f"{o} {n}" for o, n in e["outcomes"].most_common(8))
                more = len(e["outcomes"]) - 8
                p(f"  {kind:<24}{e['attempts']:>9}{e['ok']:>16}   {outcomes}"
                  + (f", +{more} more" if more > 0 else ""))
        p("")
        failures = self.stats.failures
        p(f"well-behaved failures: {len(failures)}" + (
            f" while the server was up, {sum(self.stats.after_death.values())} more after it "
            f"died ({', '.join(f'{k} {n}' for k, n in self.stats.after_death.most_common(4))})"
            if self.stats.after_death else ""))
        dying = self.death[0] - 1.5 if self.death else None
        for f in failures[:a.show]:
            p(f"  {f['t']:7.1f} s  {f['kind']}: {f['request']}: {f['reason']} - {f['detail']}"
              + (" (as it died)" if dying is not None and f["t"] >= dying else ""))
        if len(failures) > a.show:
            p(f"  ... {len(failures) - a.show} more (--json has them all)")
        if self.stats.unexpected:
            p(f"misbehaving clients not treated as expected: {len(self.stats.unexpected)} "
              f"(the first of each outcome, and how many)")
            seen = collections.Counter((u["kind"], u["outcome"]) for u in self.stats.unexpected)
            shown = set()
            for u in self.stats.unexpected:
                key = (u["kind"], u["outcome"])
                if key in shown:
                    continue
                shown.add(key)
                p(f"  {u['t']:7.1f} s  {seen[key]:4d} x  {u['kind']}: {u['detail']}")
                if len(shown) >= a.show:
                    break
        p("")
        f, t, r, c, l = fig["fds"], fig["threads"], fig["rss_mib"], fig["cpu"], fig["latency_s"]
        p(f"server fds      start {f['start']}, max {f['max']}, at the end of the load "
          f"{f['end_of_load']}, end {f['end']}"
          + (" (the last sample before it died)" if self.death is not None else
             f" (idle {self.idle_seconds:.1f} s after the load)" if self.idle_seconds
             is not None else f" (not back to {f['start']} within {a.idle_wait:g} s)"))
        p(f"server threads  start {t['start']}, max {t['max']}, end {t['end']}")
        p(f"server RSS MiB  start {r['start']}, after {r['warmup_s']:g} s warm-up "
          f"{r['after_warmup']}, max {r['max']}, end {r['end']} (VmHWM {r['peak_vmhwm']}); "
          f"slope after warm-up {r['slope_mib_per_min_after_warmup']} MiB/min")
        p(f"server CPU      {c['seconds']} s, {c['mean_pct']} % of one core on average, "
          f"{c['max_pct_1s']} % at most over one second")
        p(f"well-behaved latency  p50 {l['p50']} s, p99 {l['p99']} s, max {l['max']} s over "
          f"{l['answered']} answers, {l['slower_than_slow']} slower than {a.slow:g} s; "
          "slowest: " + "; ".join(
              f"{s['s']} s {s['kind']} ({s['request']})" for s in fig["slowest"][:3]))
        stalls = self.stalls()
        p(f"probe stalls    {len(stalls)} (the probe GET slower than {a.slow:g} s or unanswered)"
          + "".join(f"; at {t} s for {d} s{'' if ok else ' (no answer)'}"
                    for t, d, ok in stalls[:8]) + (" ..." if len(stalls) > 8 else ""))
        if self.death is not None:
            p(f"server          DIED at {self.death[0]} s, exit status {self.death[1]}")
        else:
            p(f"server exit     status {self.exit_status}"
              + (f", {self.exit_seconds:.2f} s after SIGTERM" if self.exit_seconds is not None
                 else f", killed: still running {a.term_wait:g} s after SIGTERM"))
        p(f"server log      {logs['lines']} lines: {logs['error_lines']} error/warning lines, "
          f"{logs['tracebacks']} tracebacks, {logs['other_lines']} other ({logs['path']})")
        for title, key in (("error lines", "distinct_errors"), ("tracebacks", "distinct_tracebacks"),
                           ("other lines", "distinct_other")):
            if logs[key]:
                p(f"  distinct {title}:")
                for text, n in logs[key][:5]:
                    p(f"    {n:5d} x {text[:320]}")
        if self.stuck:
            p(f"client threads still running: {', '.join(self.stuck[:10])}")
        p("")
        for w in warnings:
            p(f"WARNING: {w}")
        if problems:
            p("FAIL: " + "; ".join(problems))
        else:
            p("PASS: the server stayed up, answered every well-behaved request, went back to "
              "idle and exited cleanly")
        print("\n".join(out))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"interface": a.interface, "command": self.cmd, "seed": self.seed,
                           "args": vars(a), "load_seconds": round(self.load_seconds, 1),
                           "kinds": {k: {"good": e["good"], "attempts": e["attempts"],
                                         "ok": e["ok"], "outcomes": dict(e["outcomes"])}
                                     for k, e in self.stats.kinds.items()},
                           "failures": failures, "unexpected": self.stats.unexpected,
                           "failures_after_death": dict(self.stats.after_death),
                           "probe_stalls": self.stalls(), "probes": self.probes,
                           "figures": fig, "death": self.death,
                           "idle_seconds": self.idle_seconds,
                           "exit_status": self.exit_status, "exit_seconds": self.exit_seconds,
                           "log": logs, "stuck_clients": self.stuck,
                           "samples": [dict(zip(("t", "fds", "threads", "rss_kib", "hwm_kib",
                                                 "cpu_s"), s)) for s in self.samples],
                           "problems": problems, "warnings": warnings,
                           "passed": not problems}, fh, indent=1)
        return 1 if problems else 0


def parse_args(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    else:
        server_args = []
    parser = argparse.ArgumentParser(
        description="Mixed-load fault run against gateway.py (bench/README.md).",
        epilog="Options after -- go to gateway.py, e.g. -- --threads 4")
    parser.add_argument("--interface", choices=("wsgi", "asgi"), default="asgi")
    parser.add_argument("--app", help="MODULE:ATTR (default: echo_wsgi:application, or "
                        "chaos:asgi_app = echo_asgi.app plus a WebSocket echo)")
    parser.add_argument("--seconds", type=float, default=300, help="load time (default 300)")
    parser.add_argument("--clients", type=int, default=40,
                        help="concurrent clients, plus one probe (default 40)")
    parser.add_argument("--good-share", type=float, default=0.5,
                        help="share of well-behaved clients (default 0.5)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="comma list of client kinds to run (default: all)")
    parser.add_argument("--seed", type=int, help="random seed (default: a random one)")
    parser.add_argument("--warmup", type=float, default=60,
                        help="RSS warm-up (default 60 s, at most 30%% of the run)")
    parser.add_argument("--request-timeout", type=float, default=5,
                        help="a well-behaved request with no full answer by then fails "
                             "(default 5 s)")
    parser.add_argument("--slow", type=float, default=1.0,
                        help="a long-spaces header answered later than this is flagged "
                             "(default 1 s)")
    parser.add_argument("--pause", type=float, default=0.02,
                        help="mean pause of a well-behaved client between runs (default 0.02)")
    parser.add_argument("--timeout-request-head", type=float, default=2)
    parser.add_argument("--timeout-read", type=float, default=2)
    parser.add_argument("--timeout-write", type=float, default=2)
    parser.add_argument("--access-log", action="store_true",
                        help="keep the server's access log (default: --no-access-log)")
    parser.add_argument("--idle-wait", type=float, default=30,
                        help="longest wait for fds/threads to come back (default 30 s)")
    parser.add_argument("--fd-tolerance", type=int, default=2)
    parser.add_argument("--thread-tolerance", type=int, default=1)
    parser.add_argument("--term-wait", type=float, default=15,
                        help="longest wait for the exit after SIGTERM (default 15 s)")
    parser.add_argument("--strict", action="store_true",
                        help="misbehaving clients not treated as expected also fail the run")
    parser.add_argument("--show", type=int, default=40, help="failures listed (default 40)")
    parser.add_argument("--progress", type=float, default=30,
                        help="a progress line on stderr this often, 0: none (default 30 s)")
    parser.add_argument("--json", metavar="FILE", help="write every figure here")
    args = parser.parse_args(argv)
    known = set(GOOD) | set(BAD)
    if args.only and not set(args.only) <= known:
        parser.error(f"--only: unknown kinds {set(args.only) - known}; known: {sorted(known)}")
    return args, server_args


def main(argv=None):
    args, server_args = parse_args(sys.argv[1:] if argv is None else argv)
    run = Run(args, server_args)
    try:
        run.go()
    except BaseException:
        if getattr(run, "proc", None) is not None:
            run.kill()
        raise
    return run.report()


if __name__ == "__main__":
    sys.exit(main())
