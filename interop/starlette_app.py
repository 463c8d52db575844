"""starlette_app.py - a Starlette app for the interop tests (`make interop`).

    python gateway.py --asgi starlette_app:app --app-dir interop

Routes: plain text, JSON, path parameters, a request body read as a stream,
a StreamingResponse, a FileResponse (a file written to a temporary directory at
import time), a route that raises, a WebSocket echo, and lifespan state.

Lifespan: the startup half of the context manager yields state that every
request sees as request.state (ASGI scope["state"]) and sets app.state; /state
returns both, so a 200 there proves startup ran before the request was served.
The shutdown half writes "shutdown complete" to the file named by
$INTEROP_SHUTDOWN_MARKER (when set) and removes the temporary directory.
"""

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

STREAM_CHUNKS = [b"starlette chunk %d\n" % n for n in range(6)]

# The file /file serves: 1 MiB + 77 bytes, the same as FILE_BYTES in
# test_interop_asgi.py (not imported from here, to keep the test independent).
FILE_BYTES = random.Random(6).randbytes(1024 * 1024 + 77)
FILE_DIR = Path(tempfile.mkdtemp(prefix="interop-starlette-"))
FILE_PATH = FILE_DIR / "data.bin"
FILE_PATH.write_bytes(FILE_BYTES)


@contextlib.asynccontextmanager
async def lifespan(app):
    app.state.startups = getattr(app.state, "startups", 0) + 1
    try:
        yield {"phase": "started", "file_size": len(FILE_BYTES)}   # -> request.state
    finally:
        marker = os.environ.get("INTEROP_SHUTDOWN_MARKER")
        if marker:
            Path(marker).write_text("shutdown complete\n")
        shutil.rmtree(FILE_DIR, ignore_errors=True)


async def hello(request: Request):
    return PlainTextResponse("hello from starlette\n")


async def json_route(request: Request):
    return JSONResponse({"framework": "starlette", "numbers": [1, 2, 3],
                         "text": "h\u00e9llo \u2713", "nested": {"ok": True, "none": None}})


async def item(request: Request):
    """Path parameters (an int convertor and a str), and the query string."""
    return JSONResponse({"item_id": request.path_params["item_id"],
                         "name": request.path_params["name"],
                         "q": request.query_params.getlist("q"),
                         "path": request.url.path})


async def body(request: Request):
    """The request body read as a stream: its size and sha256, and the framing headers."""
    digest, size = hashlib.sha256(), 0
    async for piece in request.stream():
        digest.update(piece)
        size += len(piece)
    return JSONResponse({"length": size, "sha256": digest.hexdigest(),
                         "content_length": request.headers.get("content-length"),
                         "transfer_encoding": request.headers.get("transfer-encoding")})


async def stream(request: Request):
    async def chunks():
        for chunk in STREAM_CHUNKS:
            yield chunk
    return StreamingResponse(chunks(), media_type="text/plain")


async def file(request: Request):
    return FileResponse(FILE_PATH, media_type="application/octet-stream",
                        filename="data.bin")


async def state(request: Request):
    return JSONResponse({"phase": request.state.phase, "file_size": request.state.file_size,
                         "startups": request.app.state.startups})


async def boom(request: Request):
    raise RuntimeError("deliberate failure in starlette_app")


async def echo(websocket: WebSocket):
    """Echo text and bytes; the text "close <code> <reason>" makes the server close."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                text = message["text"]
                if text.startswith("close "):
                    _, code, reason = text.split(" ", 2)
                    await websocket.close(code=int(code), reason=reason)
                    return
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/json", json_route),
        Route("/items/{item_id:int}/{name}", item),
        Route("/body", body, methods=["POST"]),
        Route("/stream", stream),
        Route("/file", file),
        Route("/state", state),
        Route("/boom", boom),
        WebSocketRoute("/ws", echo),
    ],
    lifespan=lifespan,
)
