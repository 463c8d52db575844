"""fastapi_app.py - a FastAPI app for the interop tests (`make interop`).

    python gateway.py --asgi fastapi_app:app --app-dir interop

Routes: a JSON body validated by a pydantic model (a bad body gets FastAPI's
422 with its `detail` list), an UploadFile (multipart, parsed by
python-multipart) answered with its sha256 and size, a background task that
runs after the response is sent and records its result where another route
can read it, and a WebSocket route with a path and a required query parameter.
"""

import asyncio
import hashlib

from fastapi import BackgroundTasks, FastAPI, Form, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

app = FastAPI()


class Item(BaseModel):
    name: str = Field(min_length=1)
    price: float = Field(gt=0)
    quantity: int = 1
    tags: list[str] = []


@app.post("/items", status_code=201)
async def create_item(item: Item):
    return {"item": item.model_dump(), "total": item.price * item.quantity}


@app.post("/upload")
async def upload(file: UploadFile, note: str = Form()):
    digest, size = hashlib.sha256(), 0
    while piece := await file.read(64 * 1024):
        digest.update(piece)
        size += len(piece)
    return {"filename": file.filename, "content_type": file.content_type, "size": size,
            "sha256": digest.hexdigest(), "note": note}


# Background jobs: POST /jobs/{id} answers 202 at once; the task then records
# sha256(text) under the id. GET /jobs/{id}?wait=S waits up to S seconds for it.
RESULTS: dict[str, str] = {}
DONE: dict[str, asyncio.Event] = {}


class Job(BaseModel):
    text: str


async def record(job_id: str, text: str) -> None:
    RESULTS[job_id] = hashlib.sha256(text.encode()).hexdigest()
    DONE.setdefault(job_id, asyncio.Event()).set()


@app.post("/jobs/{job_id}", status_code=202)
async def start_job(job_id: str, job: Job, tasks: BackgroundTasks):
    tasks.add_task(record, job_id, job.text)
    return {"queued": job_id}


@app.get("/jobs/{job_id}")
async def job_result(job_id: str, wait: float = 0.0):
    event = DONE.setdefault(job_id, asyncio.Event())
    try:
        await asyncio.wait_for(event.wait(), min(wait, 10.0))
    except asyncio.TimeoutError:
        return JSONResponse({"job": job_id, "done": False}, status_code=404)
    return {"job": job_id, "done": True, "sha256": RESULTS[job_id]}


@app.websocket("/ws/{room}")
async def room(websocket: WebSocket, room: str, name: str):
    """JSON messages: {"op": "add", "values": [...]} -> the sum; {"op": "bye"} ->
    the server closes with 4001 "bye <name>". Without ?name= FastAPI refuses the
    handshake (it closes before accepting: the server answers 403)."""
    await websocket.accept()
    await websocket.send_json({"room": room, "hello": name})
    try:
        while True:
            message = await websocket.receive_json()
            if message.get("op") == "add":
                await websocket.send_json({"sum": sum(message["values"])})
            elif message.get("op") == "bye":
                await websocket.close(code=4001, reason=f"bye {name}")
                return
            else:
                await websocket.send_json({"error": "unknown op"})
    except WebSocketDisconnect:
        return
