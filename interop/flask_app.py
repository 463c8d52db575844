"""flask_app.py - a Flask app for the interop tests (`make interop`).

    python gateway.py --wsgi flask_app:app --app-dir interop

Each route exercises one part of the WSGI contract through a real framework:
request bodies (JSON, form, multipart), a streamed response, cookies,
redirects, a 404, and errors before and after the response has started.
"""

import hashlib

from flask import Flask, Response, jsonify, redirect, request

app = Flask(__name__)

STREAM_CHUNKS = [b"chunk %d\n" % n for n in range(5)]


@app.post("/json")
def json_echo():
    """JSON in, JSON out: the body parsed by Flask, sent back under "echo"."""
    return jsonify(echo=request.get_json(), content_type=request.content_type)


@app.post("/form")
def form():
    """application/x-www-form-urlencoded: every field, with all its values."""
    return jsonify(form=request.form.to_dict(flat=False))


@app.post("/upload")
def upload():
    """multipart/form-data: the file's name, size and sha256, and the other fields."""
    upload = request.files["file"]
    data = upload.read()
    return jsonify(filename=upload.filename, size=len(data),
                   sha256=hashlib.sha256(data).hexdigest(),
                   fields=request.form.to_dict())


@app.post("/body")
def body():
    """The raw body (any framing): its length and sha256."""
    data = request.get_data()
    return jsonify(length=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   content_length=request.headers.get("Content-Length"))


@app.get("/hello/<name>")
def hello(name):
    """A non-ASCII path segment and query string, decoded by Werkzeug."""
    return jsonify(name=name, q=request.args.get("q"), path=request.path)


@app.get("/stream")
def stream():
    """A generator: the server sends it chunked, piece by piece."""
    def generate():
        yield from STREAM_CHUNKS
    return Response(generate(), mimetype="text/plain")


@app.get("/stream-broken")
def stream_broken():
    """Fails after the first chunk: the response cannot be finished."""
    def generate():
        yield STREAM_CHUNKS[0]
        raise RuntimeError("interop: failure in the middle of a stream")
    return Response(generate(), mimetype="text/plain")


@app.get("/cookie/set")
def cookie_set():
    response = jsonify(set=True)
    response.set_cookie("flavour", "oatmeal raisin", path="/", httponly=True)
    return response


@app.get("/cookie/get")
def cookie_get():
    return jsonify(flavour=request.cookies.get("flavour"))


@app.get("/redirect")
def go_elsewhere():
    return redirect("/landing", code=302)


@app.get("/landing")
def landing():
    return "landed\n", 200, {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/boom")
def boom():
    """Raises: Flask (not the server) turns it into its own 500 page."""
    raise RuntimeError("interop: deliberate failure")
