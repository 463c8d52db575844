"""Interop: real WSGI frameworks (Flask, Django) served by `python gateway.py --wsgi`,
driven by real clients (http.client, urllib.request, curl).

The servers are subprocesses started by the fixtures in conftest.py. Every
expectation is exact: status, the headers that matter, the bytes of the body
(or its sha256), the JSON.
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookiejar
import json
import random
import urllib.error
import urllib.parse
import urllib.request

import pytest

from helpers import CLIENT_SECONDS, curl, multipart, needs_curl

BIG = random.Random(9).randbytes(3 * 1024 * 1024 + 123)    # ~3 MiB, not a round number
BIG_SHA = hashlib.sha256(BIG).hexdigest()

# What /stream yields in flask_app.py and django_app.py, one piece at a time.
FLASK_CHUNKS = [b"chunk %d\n" % n for n in range(5)]
DJANGO_CHUNKS = [b"django chunk %d\n" % n for n in range(4)]


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


def chunked_raw(chunks: list[bytes]) -> bytes:
    """The chunked transfer coding of `chunks` (RFC 9112 §7.1), no trailers."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


# --- Flask, http.client -------------------------------------------------------

JSON_PAYLOAD = {"name": "gateway", "numbers": [1, 2, 3], "nested": {"ok": True, "none": None},
                "text": "h\u00e9llo \u2713"}


def test_flask_json_echo(flask_server):
    conn = connect(flask_server)
    body = json.dumps(JSON_PAYLOAD).encode()
    response, data = fetch(conn, "POST", "/json", body,
                           {"Content-Type": "application/json"})
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Length") == str(len(data))
    assert json.loads(data) == {"echo": JSON_PAYLOAD, "content_type": "application/json"}
    conn.close()


def test_flask_form_urlencoded(flask_server):
    conn = connect(flask_server)
    form = urllib.parse.urlencode([("a", "1"), ("a", "2"), ("text", "h\u00e9llo world"),
                                   ("symbols", "&=+%")])
    response, data = fetch(conn, "POST", "/form", form,
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 200
    assert json.loads(data) == {"form": {"a": ["1", "2"], "text": ["h\u00e9llo world"],
                                         "symbols": ["&=+%"]}}
    conn.close()


def test_flask_multipart_small(flask_server):
    content = b"line one\r\nline two\n\x00\xff binary too"
    body, ctype = multipart({"note": "a note"},
                            {"file": ("notes.bin", content, "application/octet-stream")})
    conn = connect(flask_server)
    response, data = fetch(conn, "POST", "/upload", body, {"Content-Type": ctype})
    assert response.status == 200
    assert json.loads(data) == {"filename": "notes.bin", "size": len(content),
                                "sha256": sha(content), "fields": {"note": "a note"}}
    conn.close()


def test_flask_streaming_generator(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/stream")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert data == b"".join(FLASK_CHUNKS)
    conn.close()


def test_flask_cookie_set_and_read_back(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/cookie/set")
    assert response.status == 200
    assert response.headers.get_all("Set-Cookie") == [
        'flavour="oatmeal raisin"; HttpOnly; Path=/']
    assert json.loads(data) == {"set": True}
    response, data = fetch(conn, "GET", "/cookie/get",
                           headers={"Cookie": 'flavour="oatmeal raisin"'})
    assert response.status == 200
    assert json.loads(data) == {"flavour": "oatmeal raisin"}
    conn.close()


def test_flask_redirect_302(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/redirect")
    assert response.status == 302
    assert response.getheader("Location") == "/landing"
    assert b'href="/landing"' in data
    conn.close()


def test_flask_404(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/no/such/page")
    assert response.status == 404
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b"<h1>Not Found</h1>" in data
    conn.close()


def test_flask_500_keeps_the_connection(flask_server):
    """Flask answers the exception itself: a complete 500, so keep-alive goes on."""
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/boom")
    assert response.status == 500
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b"<h1>Internal Server Error</h1>" in data
    assert b"deliberate failure" not in data          # no traceback for the client
    sock = conn.sock
    response, data = fetch(conn, "GET", "/landing")
    assert (response.status, data) == (200, b"landed\n")
    assert conn.sock is sock
    conn.close()


def test_flask_stream_failing_midway_is_cut_short(flask_server):
    """The head is out when the generator raises: the client must see an incomplete body."""
    conn = connect(flask_server)
    conn.request("GET", "/stream-broken")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    assert caught.value.partial == FLASK_CHUNKS[0]
    conn.close()
    conn = connect(flask_server)                          # the server is still fine
    response, data = fetch(conn, "GET", "/landing")
    assert (response.status, data) == (200, b"landed\n")
    conn.close()


def test_flask_non_ascii_path_and_query(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "GET", "/hello/%C3%A9t%C3%A9?q=caf%C3%A9+au+lait")
    assert response.status == 200
    assert json.loads(data) == {"name": "\u00e9t\u00e9", "q": "caf\u00e9 au lait",
                                "path": "/hello/\u00e9t\u00e9"}
    conn.close()


def test_flask_head_has_no_body(flask_server):
    conn = connect(flask_server)
    response, data = fetch(conn, "HEAD", "/landing")
    assert response.status == 200
    assert response.getheader("Content-Length") == "7"
    assert data == b""
    response, data = fetch(conn, "GET", "/landing")       # framing still in step
    assert (response.status, data) == (200, b"landed\n")
    conn.close()


def test_flask_chunked_upload(flask_server):
    """http.client sends an iterable body chunked; the server gives Flask a CONTENT_LENGTH."""
    data = random.Random(1).randbytes(300_000)
    conn = connect(flask_server)
    response, body = fetch(conn, "POST", "/body", pieces(data, 7000),
                           {"Content-Type": "application/octet-stream"},
                           encode_chunked=True)
    assert response.status == 200
    assert json.loads(body) == {"length": len(data), "sha256": sha(data),
                                "content_length": str(len(data))}
    conn.close()


def test_flask_keep_alive_many_requests_one_connection(flask_server):
    conn = connect(flask_server)
    conn.connect()
    sock = conn.sock
    small = b"x" * 1000
    for round in range(3):
        response, data = fetch(conn, "GET", f"/hello/r{round}?q={round}")
        assert (response.status, json.loads(data)) == (
            200, {"name": f"r{round}", "q": str(round), "path": f"/hello/r{round}"})
        response, data = fetch(conn, "POST", "/json", json.dumps([round]),
                               {"Content-Type": "application/json"})
        assert json.loads(data) == {"echo": [round], "content_type": "application/json"}
        response, data = fetch(conn, "GET", "/stream")
        assert data == b"".join(FLASK_CHUNKS)
        response, data = fetch(conn, "POST", "/body", pieces(small, 300),
                               encode_chunked=True)
        assert json.loads(data)["sha256"] == sha(small)
        response, data = fetch(conn, "GET", "/missing")
        assert response.status == 404
        response, data = fetch(conn, "GET", "/redirect")
        assert response.status == 302
        assert conn.sock is sock, f"the connection was reopened in round {round}"
    conn.close()


# --- Flask, urllib.request ----------------------------------------------------

def test_flask_urllib_json_post(flask_server):
    request = urllib.request.Request(flask_server.url("/json"),
                                      data=json.dumps(JSON_PAYLOAD).encode(),
                                      headers={"Content-Type": "application/json"})
    with urlopen(request) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.read()) == {"echo": JSON_PAYLOAD,
                                               "content_type": "application/json"}


def test_flask_urllib_form_post(flask_server):
    data = urllib.parse.urlencode({"city": "Z\u00fcrich", "n": "42"}).encode()
    with urlopen(urllib.request.Request(flask_server.url("/form"), data=data)) as response:
        assert json.loads(response.read()) == {"form": {"city": ["Z\u00fcrich"], "n": ["42"]}}


def test_flask_urllib_follows_redirect(flask_server):
    with urlopen(flask_server.url("/redirect")) as response:
        assert response.status == 200
        assert response.url == flask_server.url("/landing")
        assert response.read() == b"landed\n"


def test_flask_urllib_cookie_jar(flask_server):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(flask_server.url("/cookie/set"), timeout=CLIENT_SECONDS) as response:
        assert response.status == 200
    assert [(c.name, c.value, c.path) for c in jar] == [
        ("flavour", '"oatmeal raisin"', "/")]
    with opener.open(flask_server.url("/cookie/get"), timeout=CLIENT_SECONDS) as response:
        assert json.loads(response.read()) == {"flavour": "oatmeal raisin"}


@pytest.mark.parametrize("path, status", [("/nowhere", 404), ("/boom", 500)])
def test_flask_urllib_errors(flask_server, path, status):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urlopen(flask_server.url(path))
    assert caught.value.code == status
    assert caught.value.headers["Content-Type"] == "text/html; charset=utf-8"
    caught.value.close()


# --- Django, http.client and urllib.request -------------------------------------

def test_django_get(django_server):
    with urlopen(django_server.url("/hello?q=caf%C3%A9")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.read()) == {"hello": "django", "q": "caf\u00e9",
                                               "path": "/hello"}


def test_django_post_body_content_length(django_server):
    data = random.Random(2).randbytes(100_000)
    request = urllib.request.Request(django_server.url("/body"), data=data,
                                     headers={"Content-Type": "application/octet-stream"})
    with urlopen(request) as response:
        assert json.loads(response.read()) == {"length": len(data), "sha256": sha(data),
                                               "content_length": str(len(data))}


@pytest.mark.parametrize("size, piece", [(0, 1), (1, 1), (65_537, 4096), (len(BIG), 65_536)])
def test_django_chunked_upload(django_server, size, piece):
    """Django reads exactly CONTENT_LENGTH bytes: the server must set it for a chunked body."""
    data = BIG[:size]
    conn = connect(django_server)
    response, body = fetch(conn, "POST", "/body", pieces(data, piece),
                           {"Content-Type": "application/octet-stream"},
                           encode_chunked=True)
    assert response.status == 200
    assert json.loads(body) == {"length": size, "sha256": sha(data),
                                "content_length": str(size)}
    conn.close()


# The same Django project behind both interfaces: gateway must answer alike.
DJANGO_SERVERS = ["django_server", "django_asgi_server"]


@pytest.mark.parametrize("django", DJANGO_SERVERS)
def test_django_streaming_response(request, django):
    conn = connect(request.getfixturevalue(django))
    response, data = fetch(conn, "GET", "/stream")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain"
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert data == b"".join(DJANGO_CHUNKS)
    conn.close()


@pytest.mark.parametrize("django", DJANGO_SERVERS)
@pytest.mark.parametrize("path", ["/nope", "/missing", "/hello/"])
def test_django_404(request, django, path):
    conn = connect(request.getfixturevalue(django))
    response, data = fetch(conn, "GET", path)
    assert response.status == 404
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b"<h1>Not Found</h1>" in data
    conn.close()


@pytest.mark.parametrize("django", DJANGO_SERVERS)
def test_django_method_not_allowed(request, django):
    conn = connect(request.getfixturevalue(django))
    response, data = fetch(conn, "GET", "/body")
    assert response.status == 405
    assert response.getheader("Allow") == "POST"
    conn.close()


def test_django_multipart_small(django_server):
    content = "na\u00efve caf\u00e9\n".encode()
    body, ctype = multipart({"note": "hi"}, {"file": ("caf\u00e9.txt", content, "text/plain")})
    conn = connect(django_server)
    response, data = fetch(conn, "POST", "/upload", body, {"Content-Type": ctype})
    assert response.status == 200
    assert json.loads(data) == {"filename": "caf\u00e9.txt", "size": len(content),
                                "sha256": sha(content), "fields": {"note": "hi"}}
    conn.close()


def test_django_keep_alive_many_requests_one_connection(django_server):
    conn = connect(django_server)
    conn.connect()
    sock = conn.sock
    for round in range(3):
        response, data = fetch(conn, "GET", f"/hello?q={round}")
        assert json.loads(data)["q"] == str(round)
        payload = bytes([round]) * 5000
        response, data = fetch(conn, "POST", "/body", payload)
        assert json.loads(data)["sha256"] == sha(payload)
        response, data = fetch(conn, "POST", "/body", pieces(payload, 999),
                               encode_chunked=True)
        assert json.loads(data)["sha256"] == sha(payload)
        response, data = fetch(conn, "GET", "/stream")
        assert data == b"".join(DJANGO_CHUNKS)
        response, data = fetch(conn, "GET", "/nope")
        assert response.status == 404
        assert conn.sock is sock, f"the connection was reopened in round {round}"
    conn.close()


# --- the ~3 MiB multipart upload, every app, two clients ---------------------------

@pytest.mark.parametrize("app", ["flask_server", "django_server"])
def test_big_multipart_upload_http_client(request, app):
    server = request.getfixturevalue(app)
    body, ctype = multipart({"kind": "big"}, {"file": ("big.bin", BIG, "application/octet-stream")})
    conn = connect(server)
    response, data = fetch(conn, "POST", "/upload", body, {"Content-Type": ctype})
    assert response.status == 200
    assert json.loads(data) == {"filename": "big.bin", "size": len(BIG), "sha256": BIG_SHA,
                                "fields": {"kind": "big"}}
    conn.close()


@needs_curl
@pytest.mark.parametrize("app", ["flask_server", "django_server"])
def test_big_multipart_upload_curl(request, app, tmp_path):
    """curl sends `Expect: 100-continue` for a body this big."""
    server = request.getfixturevalue(app)
    path = tmp_path / "big.bin"
    path.write_bytes(BIG)
    result = curl("-F", "kind=big", "-F", f"file=@{path};type=application/octet-stream",
                  server.url("/upload"))
    assert result.status == 200
    assert json.loads(result.body) == {"filename": "big.bin", "size": len(BIG),
                                       "sha256": BIG_SHA, "fields": {"kind": "big"}}


# --- a body the app never reads -----------------------------------------------------

@pytest.mark.parametrize("app", ["flask_server", "django_server"])
def test_unread_big_body_then_next_request(request, app):
    """A 404 for a 3 MiB POST the app never reads; the connection must stay usable,
    or the 404 must say `Connection: close` (http.client then reconnects by itself)."""
    server = request.getfixturevalue(app)
    conn = connect(server)
    response, data = fetch(conn, "POST", "/nope", BIG,
                           {"Content-Type": "application/octet-stream"})
    assert response.status == 404
    # gateway.can_drain(): more than 1 MiB unread is not skipped; the answer says so
    assert response.getheader("Connection") == "close"
    response, data = fetch(conn, "GET", "/stream")
    assert response.status == 200
    conn.close()


@needs_curl
@pytest.mark.parametrize("app", ["flask_server", "django_server"])
def test_curl_expect_continue_unread_body(request, app, tmp_path):
    """curl asks `Expect: 100-continue`; the app answers without reading, so no 100
    is sent and the response says it closes (README, "What works today")."""
    server = request.getfixturevalue(app)
    path = tmp_path / "big.bin"
    path.write_bytes(BIG)
    result = curl("-F", f"file=@{path}", server.url("/nope"))
    assert result.status == 404
    assert result.header("Connection") == "close"


# --- curl ---------------------------------------------------------------------

@needs_curl
def test_curl_flask_json(flask_server):
    result = curl("-H", "Content-Type: application/json", "--data-binary",
                  json.dumps(JSON_PAYLOAD), flask_server.url("/json"))
    assert result.status == 200
    assert result.header("Content-Type") == "application/json"
    assert json.loads(result.body) == {"echo": JSON_PAYLOAD, "content_type": "application/json"}


@needs_curl
def test_curl_flask_form(flask_server):
    result = curl("--data-urlencode", "text=h\u00e9llo & bye", "--data-urlencode", "n=1",
                  flask_server.url("/form"))
    assert result.status == 200
    assert json.loads(result.body) == {"form": {"text": ["h\u00e9llo & bye"], "n": ["1"]}}


@needs_curl
def test_curl_flask_cookie_jar(flask_server, tmp_path):
    jar = str(tmp_path / "jar.txt")
    result = curl("--cookie-jar", jar, flask_server.url("/cookie/set"))
    assert result.headers_named("Set-Cookie") == ['flavour="oatmeal raisin"; HttpOnly; Path=/']
    result = curl("--cookie", jar, flask_server.url("/cookie/get"))
    assert json.loads(result.body) == {"flavour": "oatmeal raisin"}


@needs_curl
def test_curl_flask_redirect(flask_server):
    result = curl(flask_server.url("/redirect"))
    assert (result.status, result.header("Location")) == (302, "/landing")
    result = curl("--location", flask_server.url("/redirect"))
    assert (result.status, result.body) == (200, b"landed\n")


@needs_curl
@pytest.mark.parametrize("app, chunks", [("flask_server", FLASK_CHUNKS),
                                         ("django_server", DJANGO_CHUNKS)])
def test_curl_stream_raw_chunks(request, app, chunks):
    """Each piece the app yields goes out as one chunk (`curl --raw` keeps the framing)."""
    server = request.getfixturevalue(app)
    result = curl("--raw", server.url("/stream"))
    assert result.status == 200
    assert result.header("Transfer-Encoding") == "chunked"
    assert result.body == chunked_raw(chunks)


@needs_curl
def test_curl_http10_stream_is_close_delimited(flask_server):
    result = curl("--http1.0", flask_server.url("/stream"))
    assert result.status == 200
    assert result.header("Transfer-Encoding") is None
    assert result.body == b"".join(FLASK_CHUNKS)


@needs_curl
@pytest.mark.parametrize("app", ["flask_server", "django_server"])
def test_curl_chunked_upload(request, app, tmp_path):
    server = request.getfixturevalue(app)
    path = tmp_path / "upload.bin"
    data = BIG[:500_000]
    path.write_bytes(data)
    result = curl("-H", "Transfer-Encoding: chunked", "-H",
                  "Content-Type: application/octet-stream", "--data-binary", f"@{path}",
                  server.url("/body"))
    assert result.status == 200
    assert json.loads(result.body) == {"length": len(data), "sha256": sha(data),
                                       "content_length": str(len(data))}


@needs_curl
def test_curl_django_404(django_server):
    result = curl(django_server.url("/nope"))
    assert result.status == 404
    assert result.header("Content-Type") == "text/html; charset=utf-8"
