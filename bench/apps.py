"""bench/apps.py - the apps every server in the benchmark runs, so they all do the same work.

ASGI 3:  asgi_hello   13-byte "Hello, world!" with a Content-Length
         asgi_echo    reads the whole body, returns it with a Content-Length
         asgi_stream  streams the body back chunk by chunk as it arrives (no length)
WSGI:    wsgi_hello, wsgi_echo (reads CONTENT_LENGTH bytes, returns [body]), wsgi_stream

`python apps.py wsgiref APP PORT` serves a WSGI app here with the standard library's
plain wsgiref.simple_server.WSGIServer (one request at a time, HTTP/1.0, no keep-alive),
with its per-request log line turned off.
"""

HELLO = b"Hello, world!"
PIECE = 64 * 1024


# --- ASGI ------------------------------------------------------------------

async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def asgi_hello(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": HELLO})


async def asgi_echo(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        return
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return                                  # http.disconnect
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def asgi_stream(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
        await send({"type": "http.response.body", "body": message.get("body", b""),
                    "more_body": more})
        if not more:
            return


# --- WSGI ------------------------------------------------------------------

def wsgi_hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [HELLO]


def wsgi_echo(environ, start_response):
    length = environ.get("CONTENT_LENGTH") or "0"
    body = environ["wsgi.input"].read(int(length)) if length.isdigit() else b""
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]


def wsgi_stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return _pieces(environ)


def _pieces(environ):
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    remaining = int(length) if length.isdigit() else None   # None: chunked, read to b""
    while remaining is None or remaining > 0:
        piece = stream.read(PIECE if remaining is None else min(PIECE, remaining))
        if not piece:
            return
        if remaining is not None:
            remaining -= len(piece)
        yield piece


# --- the stdlib peer -------------------------------------------------------

def _serve_wsgiref(app_name, port):
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):       # no access log, like the others
            pass

    server = make_server("127.0.0.1", port, globals()[app_name],
                         server_class=WSGIServer, handler_class=QuietHandler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "wsgiref":
        sys.exit("usage: python apps.py wsgiref APP PORT")
    _serve_wsgiref(sys.argv[2], int(sys.argv[3]))
