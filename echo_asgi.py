"""echo_asgi.py - the streaming echo server as an ASGI 3 app.

    python gateway.py --asgi echo_asgi:app
    curl -d hello http://127.0.0.1:8000/          # -> hello

The response body is the request body, sent back piece by piece as it
arrives, so a long upload starts coming back before it has finished.
"""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return      # e.g. "websocket": not accepted, so the server refuses it
    content_type = dict(scope["headers"]).get(b"content-type", b"application/octet-stream")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type)]})
    more_body = True
    while more_body:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more_body = message.get("more_body", False)
        await send({"type": "http.response.body", "body": message.get("body", b""),
                    "more_body": more_body})


async def lifespan(receive, send):
    """ASGI lifespan spec: nothing to set up or tear down, so just agree."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
