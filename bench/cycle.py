"""The ASGI path without sockets: parse one request and run its HTTPCycle, in process.

    python3 bench/cycle.py [GATEWAY.py ...]     (default: the gateway.py beside bench/)

Prints microseconds per request (the least of 5 rounds of 10,000) for a hello GET and a
1 KiB echo POST, for each gateway.py given: give two (e.g. an older copy and yours) to
compare a change to the request path with less noise than wrk on a shared machine.
Socket I/O and the event loop's polling are left out: a fake writer takes the bytes.
Two copies of the same file differ by up to about 5% here: trust larger differences only.
"""
import asyncio
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


async def echo(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class Transport:
    """All written bytes leave at once: no drain, no backpressure."""
    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return 0

    def get_write_buffer_limits(self):
        return 0, 65536


class Writer:
    transport = Transport()

    def write(self, data):
        pass


class Server:
    address = ("127.0.0.1", 8000)
    lifespan = type("Lifespan", (), {"state": {}})()


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def connection(gateway, app):
    """An ASGIConnection with its attributes set by hand: no socket behind it."""
    conn = gateway.ASGIConnection.__new__(gateway.ASGIConnection)
    conn.app, conn.config, conn.writer, conn.server = app, gateway.Config(), Writer(), Server()
    conn.config.access_log = False
    conn.stopping, conn.trace, conn.tls = asyncio.Event(), None, None
    conn.client, conn.scheme, conn.error, conn.eof = ("127.0.0.1", 5000), "http", None, False
    conn.parser, conn.pending_read = gateway.RequestParser(conn.config), None
    conn.loop = asyncio.get_running_loop()
    return conn


async def per_request(gateway, app, raw, count=10000):
    conn = connection(gateway, app)
    started = time.perf_counter()
    for _ in range(count):
        conn.parser.feed(raw)
        request = conn.parser.next_event()
        gateway.is_websocket_request(request)
        cycle = gateway.HTTPCycle(conn, request)
        await cycle.run()
        assert cycle.keep_alive
    return (time.perf_counter() - started) / count * 1e6


async def main(paths):
    modules = [load(path, f"gateway_{i}") for i, path in enumerate(paths)]
    best = {}
    for _ in range(5):                  # rounds interleave the copies: noise hits all
        for path, gateway in zip(paths, modules):
            for name, app, raw in (("hello", hello, GET), ("echo 1 KiB", echo, POST)):
                took = await per_request(gateway, app, raw)
                best[path, name] = min(best.get((path, name), took), took)
    for path in paths:
        print(f"{path}: hello {best[path, 'hello']:.2f} us, "
              f"echo 1 KiB {best[path, 'echo 1 KiB']:.2f} us per request")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or [os.path.join(HERE, "..", "gateway.py")]))
