"""Interop: real ASGI frameworks (Starlette, FastAPI, Django) served by
`python gateway.py --asgi`, driven by real clients: http.client,
urllib.request, curl and the `websockets` package's sync client.

The servers are subprocesses started by the fixtures in conftest.py (and, for
the lifespan shutdown tests, by the tests themselves). Every expectation is
exact: status, the headers that matter, the bytes of the body (or its
sha256), the JSON, the WebSocket messages and close codes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import Gateway
from helpers import CLIENT_SECONDS, curl, multipart, needs_curl

BIG = random.Random(9).randbytes(3 * 1024 * 1024 + 123)    # ~3 MiB, not a round number
BIG_SHA = hashlib.sha256(BIG).hexdigest()

# What starlette_app.py serves at /stream and /file (same recipes as there).
STARLETTE_CHUNKS = [b"starlette chunk %d\n" % n for n in range(6)]
FILE_BYTES = random.Random(6).randbytes(1024 * 1024 + 77)
DJANGO_CHUNKS = [b"django chunk %d\n" % n for n in range(4)]

WS_SECONDS = 10          # longest wait for one WebSocket message or close


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pieces(data: bytes, size: int):
    """An iterable body for http.client: sent with Transfer-Encoding: chunked."""
    return (data[at:at + size] for at in range(0, len(data), size))


def connect(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_SECONDS)


def fetch(conn, method, path, body=None, headers=None, **options):
    """One request on `conn`; the response (fully read) and its body."""
    conn.request(method, path, body=body, headers=headers or {}, **options)
    response = conn.getresponse()
    return response, response.read()


def urlopen(request):
    return urllib.request.urlopen(request, timeout=CLIENT_SECONDS)


def websocket(server, path: str, compression: str | None = "deflate"):
    """A websockets sync client connection; no proxy, no client pings."""
    return ws_connect(f"ws://{server.host}{path}", compression=compression, proxy=None,
                      open_timeout=WS_SECONDS, close_timeout=WS_SECONDS,
                      ping_interval=None, max_size=8 * 1024 * 1024)


def negotiated(ws) -> str | None:
    """The server's answer to the permessage-deflate offer (None: not compressed)."""
    return ws.response.headers.get("Sec-WebSocket-Extensions")


COMPRESSION = pytest.mark.parametrize("compression", ["deflate", None])

# websockets offers "permessage-deflate; client_max_window_bits"; gateway accepts it.
DEFLATE_ANSWER = {"deflate": "permessage-deflate", None: None}


# --- Starlette: routes ----------------------------------------------------------

def test_starlette_plain_text(starlette_server):
    conn = connect(starlette_server)
    response, data = fetch(conn, "GET", "/")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Content-Length") == "21"
    assert data == b"hello from starlette\n"
    conn.close()


def test_starlette_json(starlette_server):
    with urlopen(starlette_server.url("/json")) as response:
        data = response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Content-Length"] == str(len(data))
    assert json.loads(data) == {"framework": "starlette", "numbers": [1, 2, 3],
                                "text": "h\u00e9llo \u2713",
                                "nested": {"ok": True, "none": None}}


def test_starlette_path_params(starlette_server):
    conn = connect(starlette_server)
    response, data = fetch(conn, "GET", "/items/42/caf%C3%A9?q=a&q=b%20c")
    assert response.status == 200
    assert json.loads(data) == {"item_id": 42, "name": "caf\u00e9", "q": ["a", "b c"],
                                "path": "/items/42/caf\u00e9"}
    response, data = fetch(conn, "GET", "/items/forty-two/x")     # not an int: no route
    assert (response.status, data) == (404, b"Not Found")
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    conn.close()


@pytest.mark.parametrize("size", [0, 1, 70_000, len(BIG)])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_starlette_request_body_stream(starlette_server, size, chunked):
    data = BIG[:size]
    conn = connect(starlette_server)
    if chunked:
        response, body = fetch(conn, "POST", "/body", pieces(data, 65_536),
                               encode_chunked=True)
    else:
        response, body = fetch(conn, "POST", "/body", data)
    assert response.status == 200
    assert json.loads(body) == {
        "length": size, "sha256": sha(data),
        "content_length": None if chunked else str(size),
        "transfer_encoding": "chunked" if chunked else None}
    conn.close()


def test_starlette_streaming_response(starlette_server):
    conn = connect(starlette_server)
    response, data = fetch(conn, "GET", "/stream")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert data == b"".join(STARLETTE_CHUNKS)
    conn.close()


def test_starlette_file_response(starlette_server):
    conn = connect(starlette_server)
    response, data = fetch(conn, "GET", "/file")
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert response.getheader("Content-Length") == str(len(FILE_BYTES))
    assert response.getheader("Content-Disposition") == 'attachment; filename="data.bin"'
    assert response.getheader("Transfer-Encoding") is None
    assert data == FILE_BYTES
    # HEAD: the same head, no body; and the connection is still in step
    response, data = fetch(conn, "HEAD", "/file")
    assert response.status == 200
    assert response.getheader("Content-Length") == str(len(FILE_BYTES))
    assert data == b""
    response, data = fetch(conn, "GET", "/file", headers={"Range": "bytes=1000-1999"})
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes 1000-1999/{len(FILE_BYTES)}"
    assert response.getheader("Content-Length") == "1000"
    assert data == FILE_BYTES[1000:2000]
    conn.close()


def test_starlette_lifespan_state(starlette_server):
    """request.state comes from the lifespan's yield: startup ran before serving."""
    with urlopen(starlette_server.url("/state")) as response:
        assert json.loads(response.read()) == {"phase": "started",
                                               "file_size": len(FILE_BYTES), "startups": 1}


def test_starlette_500_is_complete(starlette_server):
    """Starlette answers 500 itself, then re-raises: the response is whole anyway."""
    conn = connect(starlette_server)
    response, data = fetch(conn, "GET", "/boom")
    assert response.status == 500
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert data == b"Internal Server Error"
    conn.close()
    with urlopen(starlette_server.url("/")) as response:       # the server still serves
        assert response.read() == b"hello from starlette\n"


def test_starlette_keep_alive_many_requests_one_connection(starlette_server):
    conn = connect(starlette_server)
    conn.connect()
    sock = conn.sock
    for round in range(3):
        response, data = fetch(conn, "GET", f"/items/{round}/r?q={round}")
        assert json.loads(data)["item_id"] == round
        response, data = fetch(conn, "GET", "/stream")
        assert data == b"".join(STARLETTE_CHUNKS)
        payload = bytes([round]) * 5000
        response, data = fetch(conn, "POST", "/body", pieces(payload, 999),
                               encode_chunked=True)
        assert json.loads(data)["sha256"] == sha(payload)
        response, data = fetch(conn, "GET", "/file", headers={"Range": "bytes=0-9"})
        assert (response.status, data) == (206, FILE_BYTES[:10])
        response, data = fetch(conn, "GET", "/nope")
        assert response.status == 404
        assert conn.sock is sock, f"the connection was reopened in round {round}"
    conn.close()


# --- Starlette: WebSocket -------------------------------------------------------

@COMPRESSION
def test_starlette_websocket_echo(starlette_server, compression):
    text = "h\u00e9llo \u2713 " * 20_000                  # ~ 200 KB, compressible
    binary = random.Random(3).randbytes(300_000)            # incompressible
    with websocket(starlette_server, "/ws", compression) as ws:
        assert negotiated(ws) == DEFLATE_ANSWER[compression]
        for message in ["hi", "", text, b"\x00\x01\xff", b"", binary, "after binary"]:
            ws.send(message)
            assert ws.recv(timeout=WS_SECONDS) == message
        ws.send(["frag", "mented ", "\u2713"])                # one message, three frames
        assert ws.recv(timeout=WS_SECONDS) == "fragmented \u2713"
        ws.send([b"\x01" * 70_000, b"\x02" * 10])
        assert ws.recv(timeout=WS_SECONDS) == b"\x01" * 70_000 + b"\x02" * 10
        assert ws.ping(b"are you there").wait(WS_SECONDS)   # the server's pong
        # several in flight at once come back in order
        for n in range(20):
            ws.send(f"m{n}" if n % 2 else b"b%d" % n)
        assert [ws.recv(timeout=WS_SECONDS) for _ in range(20)] == [
            f"m{n}" if n % 2 else b"b%d" % n for n in range(20)]
        ws.close()
    assert (ws.close_code, ws.close_reason) == (1000, "")


@COMPRESSION
def test_starlette_websocket_server_closes_with_code(starlette_server, compression):
    with websocket(starlette_server, "/ws", compression) as ws:
        ws.send("echo me")
        assert ws.recv(timeout=WS_SECONDS) == "echo me"
        ws.send("close 4000 see you later")
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=WS_SECONDS)
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4000, "see you later")
    assert (ws.close_code, ws.close_reason) == (4000, "see you later")


def test_starlette_websocket_unknown_path_is_refused(starlette_server):
    """No WebSocket route: Starlette closes before accepting; the server answers 403."""
    with pytest.raises(InvalidStatus) as caught:
        websocket(starlette_server, "/no-such-socket")
    assert caught.value.response.status_code == 403


# --- Starlette: its own server, stopped with SIGTERM ----------------------------------

SHUTDOWN_SECONDS = 5     # a graceful stop with nothing in progress is quicker than this


def test_starlette_sigterm_runs_lifespan_shutdown(tmp_path):
    """SIGTERM: an open WebSocket gets 1001, the lifespan's shutdown half runs
    (it writes the marker file), and the process exits with status 0."""
    marker = tmp_path / "shutdown-marker"
    server = Gateway("asgi", "starlette_app:app", env={"INTEROP_SHUTDOWN_MARKER": str(marker)})
    try:
        with urlopen(server.url("/state")) as response:
            assert json.loads(response.read())["phase"] == "started"
        with websocket(server, "/ws") as ws:
            ws.send("still here")
            assert ws.recv(timeout=WS_SECONDS) == "still here"
            assert not marker.exists()
            server.process.terminate()
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(timeout=SHUTDOWN_SECONDS)
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (
            1001, "server shutting down")
        assert server.process.wait(timeout=SHUTDOWN_SECONDS) == 0
    finally:
        server.stop()          # waits; raises unless the exit status is 0
    assert marker.read_text() == "shutdown complete\n"


def test_starlette_sigterm_with_idle_keep_alive_connection(tmp_path):
    """An idle keep-alive connection must not hold up a graceful stop (RFC 9112 §9.5:
    an idle connection may be closed at any time); the lifespan shutdown still runs."""
    marker = tmp_path / "shutdown-marker"
    server = Gateway("asgi", "starlette_app:app", "--timeout-keep-alive", "60",
                     env={"INTEROP_SHUTDOWN_MARKER": str(marker)})
    conn = connect(server)
    try:
        response, data = fetch(conn, "GET", "/")
        assert (response.status, data) == (200, b"hello from starlette\n")
        server.process.terminate()
        try:
            status = server.process.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
        assert status == 0, f"no exit within {SHUTDOWN_SECONDS}s of SIGTERM"
    finally:
        conn.close()
        server.stop()
    assert marker.read_text() == "shutdown complete\n"


# --- FastAPI --------------------------------------------------------------------

def test_fastapi_json_model(fastapi_server):
    conn = connect(fastapi_server)
    item = {"name": "widget", "price": 2.5, "quantity": 4, "tags": ["a", "\u2713"]}
    response, data = fetch(conn, "POST", "/items", json.dumps(item),
                           {"Content-Type": "application/json"})
    assert response.status == 201
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") == str(len(data))
    assert json.loads(data) == {"item": item, "total": 10.0}
    # defaults filled in by the model
    response, data = fetch(conn, "POST", "/items", b'{"name": "x", "price": 1}',
                           {"Content-Type": "application/json"})
    assert (response.status, json.loads(data)) == (
        201, {"item": {"name": "x", "price": 1.0, "quantity": 1, "tags": []}, "total": 1.0})
    conn.close()


@pytest.mark.parametrize("body, loc, kind", [
    (b'{"name": "x", "price": -1}', ["body", "price"], "greater_than"),
    (b'{"price": 3}', ["body", "name"], "missing"),
    (b'{"name": "", "price": 3}', ["body", "name"], "string_too_short"),
    (b'{"name": "x", "price": 3, "quantity": "many"}', ["body", "quantity"], "int_parsing"),
    (b'{"name": "x", "price": 3, "tags": "no"}', ["body", "tags"], "list_type"),
    (b'{"name": "x", ', ["body", 14], "json_invalid"),
])
def test_fastapi_validation_422(fastapi_server, body, loc, kind):
    conn = connect(fastapi_server)
    response, data = fetch(conn, "POST", "/items", body, {"Content-Type": "application/json"})
    assert response.status == 422
    assert response.getheader("Content-Type") == "application/json"
    error = json.loads(data)
    assert len(error["detail"]) == 1
    assert error["detail"][0]["loc"] == loc
    assert error["detail"][0]["type"] == kind
    conn.close()


def test_fastapi_validation_422_urllib(fastapi_server):
    request = urllib.request.Request(fastapi_server.url("/items"), data=b'{"price": "cheap"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urlopen(request)
    assert caught.value.code == 422
    detail = json.loads(caught.value.read())["detail"]
    caught.value.close()
    assert [(d["loc"], d["type"]) for d in detail] == [
        (["body", "name"], "missing"), (["body", "price"], "float_parsing")]


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_fastapi_upload_file_big(fastapi_server, chunked):
    body, ctype = multipart({"note": "caf\u00e9"},
                            {"file": ("big.bin", BIG, "application/octet-stream")})
    conn = connect(fastapi_server)
    response, data = fetch(conn, "POST", "/upload",
                           pieces(body, 100_000) if chunked else body,
                           {"Content-Type": ctype}, encode_chunked=chunked)
    assert response.status == 200
    assert json.loads(data) == {"filename": "big.bin", "content_type": "application/octet-stream",
                                "size": len(BIG), "sha256": BIG_SHA, "note": "caf\u00e9"}
    conn.close()


def test_fastapi_upload_missing_file_422(fastapi_server):
    body, ctype = multipart({"note": "no file"}, {})
    conn = connect(fastapi_server)
    response, data = fetch(conn, "POST", "/upload", body, {"Content-Type": ctype})
    assert response.status == 422
    assert [(d["loc"], d["type"]) for d in json.loads(data)["detail"]] == [
        (["body", "file"], "missing")]
    conn.close()


def test_fastapi_background_task(fastapi_server):
    """The task runs after the 202 went out; its result shows up at GET /jobs/ID."""
    job, text = f"job-{random.Random().getrandbits(64):x}", "background \u2713 work"
    conn = connect(fastapi_server)
    response, data = fetch(conn, "POST", f"/jobs/{job}", json.dumps({"text": text}),
                           {"Content-Type": "application/json"})
    assert (response.status, json.loads(data)) == (202, {"queued": job})
    conn.close()
    # Poll, each GET waiting (server side, up to 2 s) for the task; bounded overall.
    deadline = time.monotonic() + 20
    while True:
        try:
            with urlopen(fastapi_server.url(f"/jobs/{job}?wait=2")) as response:
                result = json.loads(response.read())
                break
        except urllib.error.HTTPError as error:
            assert error.code == 404, error
            error.close()
            assert time.monotonic() < deadline, "the background task never ran"
    assert result == {"job": job, "done": True, "sha256": sha(text.encode())}


@COMPRESSION
def test_fastapi_websocket(fastapi_server, compression):
    with websocket(fastapi_server, "/ws/lobby?name=ann", compression) as ws:
        assert negotiated(ws) == DEFLATE_ANSWER[compression]
        assert json.loads(ws.recv(timeout=WS_SECONDS)) == {"room": "lobby", "hello": "ann"}
        for values in ([1, 2, 3], [], list(range(10_000))):
            ws.send(json.dumps({"op": "add", "values": values}))
            assert json.loads(ws.recv(timeout=WS_SECONDS)) == {"sum": sum(values)}
        ws.send(json.dumps({"op": "bye"}))
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=WS_SECONDS)
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4001, "bye ann")


def test_fastapi_websocket_missing_query_is_refused(fastapi_server):
    """FastAPI closes (1008) before accepting; before the handshake that is a 403."""
    with pytest.raises(InvalidStatus) as caught:
        websocket(fastapi_server, "/ws/lobby")
    assert caught.value.response.status_code == 403


def test_fastapi_openapi_and_404(fastapi_server):
    conn = connect(fastapi_server)
    response, data = fetch(conn, "GET", "/openapi.json")
    assert response.status == 200
    assert sorted(json.loads(data)["paths"]) == ["/items", "/jobs/{job_id}", "/upload"]
    response, data = fetch(conn, "GET", "/nowhere")
    assert (response.status, json.loads(data)) == (404, {"detail": "Not Found"})
    response, data = fetch(conn, "GET", "/items")
    assert (response.status, json.loads(data)) == (405, {"detail": "Method Not Allowed"})
    assert response.getheader("Allow") == "POST"
    conn.close()


# --- Django over ASGI -------------------------------------------------------------

def test_django_asgi_get(django_asgi_server):
    with urlopen(django_asgi_server.url("/hello?q=caf%C3%A9")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.read()) == {"hello": "django", "q": "caf\u00e9",
                                               "path": "/hello"}


@pytest.mark.parametrize("size, piece", [(0, 1), (1, 1), (65_537, 4096), (len(BIG), 65_536)])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_django_asgi_post_body(django_asgi_server, size, piece, chunked):
    """Over ASGI Django reads the body to its end (no CONTENT_LENGTH needed):
    META has CONTENT_LENGTH only when the client sent one."""
    data = BIG[:size]
    conn = connect(django_asgi_server)
    response, body = fetch(conn, "POST", "/body", pieces(data, piece) if chunked else data,
                           {"Content-Type": "application/octet-stream"},
                           encode_chunked=chunked)
    assert response.status == 200
    assert json.loads(body) == {"length": size, "sha256": sha(data),
                                "content_length": None if chunked else str(size)}
    conn.close()


def test_django_asgi_multipart_big(django_asgi_server):
    body, ctype = multipart({"kind": "big"}, {"file": ("big.bin", BIG, "application/octet-stream")})
    conn = connect(django_asgi_server)
    response, data = fetch(conn, "POST", "/upload", body, {"Content-Type": ctype})
    assert response.status == 200
    assert json.loads(data) == {"filename": "big.bin", "size": len(BIG), "sha256": BIG_SHA,
                                "fields": {"kind": "big"}}
    conn.close()


# Streaming, 404 and 405 run on both interfaces in test_interop_wsgi.py.


def test_django_asgi_keep_alive(django_asgi_server):
    conn = connect(django_asgi_server)
    conn.connect()
    sock = conn.sock
    for round in range(3):
        response, data = fetch(conn, "GET", f"/hello?q={round}")
        assert json.loads(data)["q"] == str(round)
        payload = bytes([round]) * 5000
        response, data = fetch(conn, "POST", "/body", pieces(payload, 999),
                               encode_chunked=True)
        assert json.loads(data)["sha256"] == sha(payload)
        response, data = fetch(conn, "GET", "/stream")
        assert data == b"".join(DJANGO_CHUNKS)
        response, data = fetch(conn, "GET", "/nope")
        assert response.status == 404
        assert conn.sock is sock, f"the connection was reopened in round {round}"
    conn.close()


def test_django_asgi_websocket_is_refused(django_asgi_server):
    """Django's ASGI handler serves only http: it raises on a websocket scope
    before accepting, and the server refuses the handshake with a 500."""
    with pytest.raises(InvalidStatus) as caught:
        websocket(django_asgi_server, "/hello")
    assert caught.value.response.status_code == 500


# --- curl ---------------------------------------------------------------------------

@needs_curl
def test_curl_starlette_file_and_range(starlette_server):
    result = curl(starlette_server.url("/file"))
    assert result.status == 200
    assert result.header("content-length") == str(len(FILE_BYTES))
    assert result.body == FILE_BYTES
    result = curl("--range", "5-14", starlette_server.url("/file"))
    assert (result.status, result.body) == (206, FILE_BYTES[5:15])


@needs_curl
def test_curl_starlette_stream_and_json(starlette_server):
    result = curl(starlette_server.url("/stream"))
    assert result.status == 200
    assert result.header("transfer-encoding") == "chunked"
    assert result.body == b"".join(STARLETTE_CHUNKS)
    result = curl(starlette_server.url("/items/7/seven?q=x"))
    assert json.loads(result.body) == {"item_id": 7, "name": "seven", "q": ["x"],
                                       "path": "/items/7/seven"}


@needs_curl
def test_curl_fastapi_upload_big(fastapi_server, tmp_path):
    """curl sends `Expect: 100-continue` for a body this big."""
    path = tmp_path / "big.bin"
    path.write_bytes(BIG)
    result = curl("-F", "note=from curl", "-F", f"file=@{path};type=application/x-test",
                  fastapi_server.url("/upload"))
    assert result.status == 200
    assert json.loads(result.body) == {"filename": "big.bin", "content_type": "application/x-test",
                                       "size": len(BIG), "sha256": BIG_SHA,
                                       "note": "from curl"}


@needs_curl
def test_curl_fastapi_json_and_422(fastapi_server):
    result = curl("-H", "Content-Type: application/json", "--data-binary",
                  '{"name": "c", "price": 0.5, "quantity": 3}', fastapi_server.url("/items"))
    assert result.status == 201
    assert json.loads(result.body)["total"] == 1.5
    result = curl("-H", "Content-Type: application/json", "--data-binary", '{"name": "c"}',
                  fastapi_server.url("/items"))
    assert result.status == 422
    assert [d["loc"] for d in json.loads(result.body)["detail"]] == [["body", "price"]]


@needs_curl
def test_curl_django_asgi(django_asgi_server, tmp_path):
    result = curl(django_asgi_server.url("/hello?q=curl"))
    assert (result.status, json.loads(result.body)) == (
        200, {"hello": "django", "q": "curl", "path": "/hello"})
    path = tmp_path / "big.bin"
    path.write_bytes(BIG)
    result = curl("-H", "Content-Type: application/octet-stream", "--data-binary", f"@{path}",
                  django_asgi_server.url("/body"))
    assert json.loads(result.body) == {"length": len(BIG), "sha256": BIG_SHA,
                                       "content_length": str(len(BIG))}


@needs_curl
def test_curl_http10_starlette_stream_is_close_delimited(starlette_server):
    """HTTP/1.0 has no chunked coding: the streamed body ends with the connection."""
    result = curl("--http1.0", starlette_server.url("/stream"))
    assert result.status == 200
    assert result.header("transfer-encoding") is None
    assert result.header("content-length") is None
    assert result.body == b"".join(STARLETTE_CHUNKS)
