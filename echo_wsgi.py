"""echo_wsgi.py - the echo server as a WSGI (PEP 3333) application.

    python gateway.py --wsgi echo_wsgi:application
    curl -d hello http://127.0.0.1:8000/          # -> hello

The response body is the request body, streamed back in pieces by a
generator, so a large upload is never held in memory at once.
"""

PIECE = 64 * 1024   # bytes read from wsgi.input at a time


def application(environ, start_response):
    content_type = environ.get("CONTENT_TYPE") or "application/octet-stream"
    start_response("200 OK", [("Content-Type", content_type)])
    return echo(environ)


def echo(environ):
    """Yield the request body piece by piece."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length.isdigit():
        remaining = int(length)          # PEP 3333: read no more than this
    elif environ.get("wsgi.input_terminated"):
        remaining = None                 # chunked upload: read until b""
    else:
        remaining = 0                    # no length, no promise: no body
    while remaining is None or remaining > 0:
        piece = stream.read(PIECE if remaining is None else min(PIECE, remaining))
        if not piece:
            return
        if remaining is not None:
            remaining -= len(piece)
        yield piece
