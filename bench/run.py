#!/usr/bin/env python3
"""bench/run.py - gateway beside its peers, on loopback, one process per server.

    .venv-bench/bin/python bench/run.py                  # the full run (make bench), ~11 min
    .venv-bench/bin/python bench/run.py --quick          # ~1 minute subset (make bench-quick)
    .venv-bench/bin/python bench/run.py --defaults-only  # hello + echo 1 KiB, both tables

Standard library only. Every server runs as its own single process (gunicorn: its master
plus one sync worker; CPU and memory are summed over the process tree) on a free port
of 127.0.0.1, with access logs off, serving the same apps from bench/apps.py. The load
is wrk (1 thread, keep-alive) and a few small raw-socket clients below. Servers are
interleaved A/B/C, A/B/C, ... over the repetitions so a drift of the machine hits all of
them alike. Results: one table per workload on stdout, with each server's ratio to
uvicorn-h11, and everything (every run) as JSON in bench/results/<timestamp>.json.

For hello and echo 1 KiB a second table, the defaults table, runs each server the way
its own README starts it, with whatever it logs by default (gateway and uvicorn: a line
per request), right after its run for the main table; ratios there are to
uvicorn-httptools (defaults). See bench/README.md for how to read them.
"""

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import py_compile
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GATEWAY = os.path.join(ROOT, "gateway.py")
PY = sys.executable
HOST = "127.0.0.1"                  # the only address this script ever talks to
CLK = os.sysconf("SC_CLK_TCK")
REFERENCE = "uvicorn-h11"

# name -> (interface, modules it needs besides the standard library)
SERVERS = {
    "gateway-asgi": ("asgi", ()),
    "gateway-wsgi": ("wsgi", ()),
    "uvicorn-h11": ("asgi", ("uvicorn", "h11")),
    "uvicorn-httptools": ("asgi", ("uvicorn", "httptools")),
    "uvicorn-httptools-uvloop": ("asgi", ("uvicorn", "httptools", "uvloop")),
    "hypercorn": ("asgi", ("hypercorn",)),
    "gunicorn": ("wsgi", ("gunicorn",)),
    "waitress": ("wsgi", ("waitress",)),
    "wsgiref": ("wsgi", ()),
}
GATEWAYS = ["gateway-asgi", "gateway-wsgi"]

# The defaults table: each server started the way its own README starts it, logging what
# it logs by default. name -> how that differs from its command in the main table.
# (wsgiref is left out: it is a reference, nobody deploys it.)
DEFAULTS = {
    "gateway-asgi": "access log on (stderr)",
    "gateway-wsgi": "access log on (stderr)",
    "uvicorn-h11": "access log on (stdout), log level info",
    "uvicorn-httptools": "access log on (stdout), log level info",
    "uvicorn-httptools-uvloop": "access log on (stdout), log level info",
    "hypercorn": "a spawned worker process (--workers 1, the default); still no access log",
    "gunicorn": "log level info; still no access log",
    "waitress": "nothing: the same command (waitress has no access log)",
}
DEFAULTS_REFERENCE = "uvicorn-httptools"   # the target: gateway-asgi >= 1.0x of it
DEFAULTS_WORKLOADS = ["hello", "echo-1k"]

# name -> (app, method, body size, title)
WORKLOADS = {
    "hello": ("hello", "GET", 0, "hello: GET, 13-byte response"),
    "echo-1k": ("echo", "POST", 1024, "echo: POST 1 KiB body, echoed"),
    "echo-256k": ("echo", "POST", 256 * 1024, "echo: POST 256 KiB body, echoed"),
}


# --- servers -----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(name, app, port, keep_alive=None):
    """The command line that serves bench/apps.py's app `app` as server `name`."""
    iface = SERVERS[name][0]
    target = f"apps:{iface}_{app}"
    if name.startswith("gateway-"):
        cmd = [PY, GATEWAY, f"--{iface}", target, "--host", HOST, "--port", str(port),
               "--app-dir", HERE] + gateway_flags()
        if keep_alive:
            cmd += ["--timeout-keep-alive", str(keep_alive)]
        return cmd
    if name.startswith("uvicorn-"):
        http, loop = {"uvicorn-h11": ("h11", "asyncio"),
                      "uvicorn-httptools": ("httptools", "asyncio"),
                      "uvicorn-httptools-uvloop": ("httptools", "uvloop")}[name]
        cmd = [PY, "-m", "uvicorn", target, "--host", HOST, "--port", str(port),
               "--app-dir", HERE, "--http", http, "--loop", loop,
               "--no-access-log", "--log-level", "warning"]
        if keep_alive:
            cmd += ["--timeout-keep-alive", str(keep_alive)]
        return cmd
    if name == "hypercorn":             # no access log unless --access-logfile;
        # --workers 0 serves in this process (1 would spawn a worker and a tracker)
        return [PY, "-m", "hypercorn", "--bind", f"{HOST}:{port}", "--workers", "0", target]
    if name == "gunicorn":              # no access log unless --access-logfile
        return [PY, "-m", "gunicorn", "--bind", f"{HOST}:{port}", "--workers", "1",
                "--worker-class", "sync", "--log-level", "warning", target]
    if name == "waitress":              # waitress has no access log
        return [PY, "-m", "waitress", f"--listen={HOST}:{port}", target]
    if name == "wsgiref":               # plain WSGIServer, its log line silenced
        return [PY, os.path.join(HERE, "apps.py"), "wsgiref", f"wsgi_{app}", str(port)]
    raise KeyError(name)


def defaults_command(name, app, port):
    """The command line that serves `app` as server `name`'s README starts it: only the
    address is added (and, for uvicorn, the --http/--loop that the row's name says).

    What each logs by default (checked against the pinned versions' --help and source):
    gateway and uvicorn write a line per request (gateway to stderr, uvicorn to stdout);
    gunicorn and hypercorn have no access log unless --access-logfile is given; waitress
    has none at all. Every one writes its start-up lines at log level info."""
    iface = SERVERS[name][0]
    target = f"apps:{iface}_{app}"
    if name.startswith("gateway-"):     # `python gateway.py --asgi app`: 1 process, log on
        return [PY, GATEWAY, f"--{iface}", target, "--host", HOST, "--port", str(port)]
    if name.startswith("uvicorn-"):
        # `uvicorn app` means --http auto --loop auto: httptools and uvloop when they are
        # installed, so uvicorn-httptools-uvloop is its out-of-the-box choice here. The
        # flags are given anyway so that each row is what its name says.
        http, loop = {"uvicorn-h11": ("h11", "asyncio"),
                      "uvicorn-httptools": ("httptools", "asyncio"),
                      "uvicorn-httptools-uvloop": ("httptools", "uvloop")}[name]
        return [PY, "-m", "uvicorn", target, "--host", HOST, "--port", str(port),
                "--http", http, "--loop", loop]
    if name == "hypercorn":             # workers=1: a supervisor plus one spawned worker
        return [PY, "-m", "hypercorn", "--bind", f"{HOST}:{port}", target]
    if name == "gunicorn":              # 1 sync worker ($WEB_CONCURRENCY is removed)
        return [PY, "-m", "gunicorn", "--bind", f"{HOST}:{port}", target]
    if name == "waitress":              # 4 threads
        return [PY, "-m", "waitress", f"--listen={HOST}:{port}", target]
    raise KeyError(name)


_GATEWAY_FLAGS = None


def gateway_flags():
    """Access log off and one process, with whichever of those flags this gateway.py has
    (an older one has neither: it logs nothing and never forks)."""
    global _GATEWAY_FLAGS
    if _GATEWAY_FLAGS is None:
        text = subprocess.run([PY, GATEWAY, "--help"], capture_output=True, text=True,
                              timeout=30).stdout
        _GATEWAY_FLAGS = ((["--no-access-log"] if "--no-access-log" in text else [])
                          + (["--workers", "1"] if "--workers" in text else []))
    return _GATEWAY_FLAGS


def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()   # fields from 3 (state) on


def descendants(pid):
    """pid and every process below it (gunicorn's worker, hypercorn's, ...)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(proc_stat(entry)[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Server:
    """One server process on a free port; a context manager that always kills it."""

    def __init__(self, name, app, pin=None, keep_alive=None, defaults=False):
        self.name, self.app = name, app
        self.port = free_port()
        if defaults:                    # as its README starts it (the defaults table)
            self.cmd = defaults_command(name, app, self.port)
        else:
            self.cmd = server_command(name, app, self.port, keep_alive)
        if pin is not None:
            self.cmd = ["taskset", "-c", str(pin)] + self.cmd
        self.proc = None
        # The server's stdout and stderr (its access log too, when it has one on) go to
        # a file, as under a service manager or a container's log driver.
        self.log = tempfile.TemporaryFile()

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=HERE, PYTHONUNBUFFERED="1")
        # uvicorn, gunicorn and gateway take their number of processes from it: remove it
        # so that each server runs as one process (gunicorn: master + 1 worker).
        env.pop("WEB_CONCURRENCY", None)
        # Python writes bytecode by default (pip wrote the peers' when it installed them);
        # a sandbox that turns it off would make `python gateway.py` compile at every start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.proc = subprocess.Popen(self.cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready(20.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _wait_ready(self, limit):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.output()[-2000:])
            try:
                status, _ = request(self.port, "GET", b"", close=True, timeout=2.0)
                if status:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not answer within {limit:.0f} s:\n"
                           + self.output()[-2000:])

    def output(self):
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def output_bytes(self):
        return os.fstat(self.log.fileno()).st_size

    def pids(self):
        return descendants(self.proc.pid)

    def cpu_ticks(self):
        total = 0
        for pid in self.pids():
            try:
                fields = proc_stat(pid)
                total += int(fields[11]) + int(fields[12])      # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def kib(self, field):
        return sum(status_kib(pid, field) for pid in self.pids())

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid            # its own session: the group is ours alone
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:                            # a worker left behind by its master
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- small raw-socket clients -----------------------------------------------

def read_response(sock, buf=b""):
    """Read one response with a Content-Length (or to EOF); return (status, body, rest)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return 0, b"", b""
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        need = int(m.group(1))
        while len(buf) < need:
            data = sock.recv(max(65536, need - len(buf)))
            if not data:
                raise OSError("connection closed inside a body")
            buf += data
        return status, buf[:need], buf[need:]
    while True:                         # close-delimited
        data = sock.recv(65536)
        if not data:
            return status, buf, b""
        buf += data


def request(port, method, body, close=False, timeout=5.0):
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        head = f"{method} / HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        if close:
            head += "Connection: close\r\n"
        sock.sendall(head.encode() + b"\r\n" + body)
        status, data, _ = read_response(sock)
        return status, data


def warm_up(server, method, body, count=100, limit=5.0):
    deadline = time.monotonic() + limit
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        request(server.port, method, body, close=True)


def stream_echo(server, total, piece=64 * 1024, limit=180.0):
    """Upload `total` bytes on one connection while a thread reads the echo.

    The upload has a Content-Length: every server streams such a body to the
    app (a chunked one is collected first by gateway's WSGI path, as waitress
    does, so it would not measure streaming). Returns MB/s, seconds to the
    first echoed byte, and the server's RSS growth."""
    payload = os.urandom(piece)
    total = total // piece * piece
    before = server.kib("VmRSS")
    peak = [before]
    stop = threading.Event()

    def sample():                       # VmRSS every 20 ms: the peak during the upload
        while not stop.wait(0.02):
            peak[0] = max(peak[0], server.kib("VmRSS"))

    got = {"body": 0, "done": False, "first": None, "error": None}
    sock = socket.create_connection((HOST, server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def reader():
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise OSError("closed before the response head")
                buf += data
            got["first"] = time.monotonic()
            head, _, data = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                raise OSError("unexpected head: " + head[:200].decode("latin-1"))
            pending, skip = b"", 0      # skip: bytes of the current chunk (+CRLF) left
            while True:
                if pending:
                    data, pending = pending + data, b""
                pos, n = 0, len(data)
                while pos < n:
                    if skip:
                        take = min(skip, n - pos)
                        skip -= take
                        pos += take
                        continue
                    nl = data.find(b"\r\n", pos)
                    if nl < 0:
                        pending = data[pos:]
                        break
                    size = int(data[pos:nl].split(b";")[0], 16)
                    pos = nl + 2
                    if size == 0:
                        got["done"] = True
                        return
                    got["body"] += size
                    skip = size + 2
                data = sock.recv(1 << 20)
                if not data:
                    raise OSError("closed before the last chunk")
        except Exception as exc:        # reported below
            got["error"] = repr(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    thread = threading.Thread(target=reader, daemon=True)
    sampler.start()
    thread.start()
    t0 = time.monotonic()
    deadline = t0 + limit
    try:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n"
                     "Content-Type: application/octet-stream\r\n"
                     f"Content-Length: {total}\r\n\r\n".encode())
        for _ in range(total // piece):
            if time.monotonic() > deadline or got["error"]:
                break
            sock.sendall(payload)
        thread.join(max(0.0, deadline - time.monotonic()))
    except OSError as exc:
        got["error"] = got["error"] or repr(exc)
    finally:
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join(1)
        sock.close()                    # ends the reader too if it is still waiting
        thread.join(2)
    ok = got["done"] and got["body"] == total
    return {"ok": ok, "error": got["error"] if not ok else None,
            "bytes_echoed": got["body"], "seconds": round(elapsed, 3),
            "mb_per_s": round(got["body"] / elapsed / 1e6, 1),
            "first_byte_ms": round((got["first"] - t0) * 1000, 1) if got["first"] else None,
            "rss_before_kib": before, "rss_peak_growth_kib": peak[0] - before,
            "vmhwm_kib": server.kib("VmHWM")}


def idle_connections(server, count, limit=30.0):
    """Open `count` keep-alive connections, one GET each, leave them idle; RSS per one."""
    warm_up(server, "GET", b"", count=20)
    time.sleep(0.3)
    before = server.kib("VmRSS")
    req = f"GET / HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    socks, answered = [], 0
    deadline = time.monotonic() + limit
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST, server.port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, [b""])
        pending = count
        while pending and time.monotonic() < deadline:
            for key, events in sel.select(timeout=1.0):
                s, buf = key.fileobj, key.data
                if events & selectors.EVENT_WRITE:
                    try:
                        s.send(req)             # 40-odd bytes: one send is enough
                    except OSError:
                        sel.unregister(s)
                        pending -= 1
                        continue
                    sel.modify(s, selectors.EVENT_READ, buf)
                    continue
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                buf[0] += data
                if not data or buf[0].endswith(b"Hello, world!"):
                    answered += data != b""
                    sel.unregister(s)
                    pending -= 1
        time.sleep(0.5)                 # let the server settle
        after = server.kib("VmRSS")
        still_open = 0                  # a closed one reads EOF at once
        for s in socks:
            try:
                still_open += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
    finally:
        sel.close()
        for s in socks:
            s.close()
    return {"connections": count, "answered": answered, "still_open": still_open,
            "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": round((after - before) / count, 2)}


def syscalls_per_request(server, count):
    """strace -c -f on every thread of the server during `count` keep-alive GETs."""
    tids = os.listdir(f"/proc/{server.proc.pid}/task")
    out = tempfile.TemporaryFile()
    cmd = ["strace", "-c", "-f"] + [a for t in tids for a in ("-p", t)]
    tracer = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    try:
        time.sleep(1.0)                 # attach
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            req = f"GET / HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n\r\n".encode()
            rest = b""
            t0 = time.monotonic()
            for _ in range(count):
                sock.sendall(req)
                status, _, rest = read_response(sock, rest)
                if status != 200:
                    raise RuntimeError(f"status {status}")
            seconds = time.monotonic() - t0
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    calls, total = {}, None
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) in (5, 6) and re.fullmatch(r"[\d.]+", tokens[0]):
            n = int(tokens[3])
            if tokens[-1] == "total":
                total = n
            else:
                calls[tokens[-1]] = n
    if total is None:
        raise RuntimeError("no strace summary:\n" + text[-1000:])
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
    return {"requests": count, "syscalls": total,
            "per_request": round(total / count, 2), "traced_seconds": round(seconds, 2),
            "top": {name: round(n / count, 2) for name, n in top}}


# --- wrk ---------------------------------------------------------------------

def ensure_wrk():
    if shutil.which("wrk"):
        return
    print("wrk not found: installing it with `apt-get install -y wrk`", flush=True)
    if os.geteuid() != 0:
        sys.exit("run `sudo apt-get install -y wrk` first")
    if subprocess.run(["apt-get", "install", "-y", "wrk"]).returncode != 0:
        subprocess.run(["apt-get", "update"], check=False)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True)
    print("installed wrk", flush=True)


def lua_script(tmpdir, size):
    path = os.path.join(tmpdir, f"post-{size}.lua")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write('wrk.method = "POST"\n'
                    f'wrk.body = string.rep("a", {size})\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def run_wrk(port, connections, duration, script=None, pin=None):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin)] + cmd
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://{HOST}:{port}/")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    text = proc.stdout
    m = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m or not rps:
        raise RuntimeError("wrk failed:\n" + text + proc.stderr)
    result = {"requests": int(m.group(1)), "rps": float(rps.group(1)), "errors": 0}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        result[f"p{pct}_ms"] = round(float(value) * UNIT[unit], 3)
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if se:
        result["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                           map(int, se.groups())))
        result["errors"] += sum(map(int, se.groups()))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        result["non_2xx"] = int(non2xx.group(1))
        result["errors"] += int(non2xx.group(1))
    return result


def measured_wrk(server, connections, duration, method, size, tmpdir, wrk_pin=None):
    body = b"a" * size
    warm_up(server, method, body)
    script = lua_script(tmpdir, size) if method == "POST" else None
    cpu0 = server.cpu_ticks()
    result = run_wrk(server.port, connections, duration, script, wrk_pin)
    cpu1 = server.cpu_ticks()
    result["cpu_us_per_req"] = round((cpu1 - cpu0) / CLK * 1e6 / max(1, result["requests"]), 1)
    result["cpu_percent"] = round((cpu1 - cpu0) / CLK / duration * 100, 1)
    result["peak_rss_kib"] = server.kib("VmHWM")
    return result


# --- reporting ---------------------------------------------------------------

def fmt(value, spec="{:,.0f}"):
    return "-" if value is None else spec.format(value)


def ratio(value, ref):
    return "-" if value is None or not ref else f"{value / ref:.2f}x"


def table(title, columns, rows, note=()):
    """columns: header strings; rows: lists of cells (strings); note: lines below it."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = [f"\n## {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(
            (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths)))
            + " |")
    if note:
        lines += [""] + list(note)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def summarize(runs):
    rps = [r["rps"] for r in runs]

    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"reps": len(runs), "rps_median": statistics.median(rps), "rps_min": min(rps),
            "rps_max": max(rps), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "cpu_us_per_req": med("cpu_us_per_req"), "cpu_percent": med("cpu_percent"),
            "log_bytes_per_req": med("log_bytes_per_req"),
            "peak_rss_kib": max(r["peak_rss_kib"] for r in runs),
            "errors": sum(r["errors"] for r in runs)}


def rate_columns(name, s, ref):
    """The first columns of both throughput tables: server, req/s, min–max, the ratio
    to `ref`'s req/s, p99 and CPU per request."""
    return [name, fmt(s["rps_median"]), f"{s['rps_min']:,.0f}–{s['rps_max']:,.0f}",
            ratio(s["rps_median"], ref.get("rps_median")),
            fmt(s["p99_ms"], "{:.2f}"), fmt(s["cpu_us_per_req"], "{:.0f}")]


def rows_of(summary, names, columns):
    """One row, columns(name, its summary), per server in `names` that has a summary."""
    return [columns(name, summary[name]) for name in names if summary.get(name)]


def throughput_table(title, summary, names):
    ref = summary.get(REFERENCE, {})
    rows = rows_of(summary, names, lambda name, s: rate_columns(name, s, ref) + [
        ratio(s["cpu_us_per_req"], ref.get("cpu_us_per_req")),
        fmt(s["cpu_percent"], "{:.0f}"),
        fmt(s["peak_rss_kib"] / 1024, "{:.1f}"), fmt(s["errors"])])
    return table(title, ["server", "req/s (median)", "min–max", "vs h11", "p99 ms",
                         "CPU µs/req", "vs h11", "CPU %", "peak RSS MiB", "errors"], rows)


def defaults_table(title, summary, main_summary, names):
    """The defaults table: ratios to uvicorn-httptools (defaults), and each server's rate
    against its own rate in the main table of this run (for gateway and uvicorn that is
    what the access log costs)."""
    ref = summary.get(DEFAULTS_REFERENCE, {})
    rows = rows_of(summary, names, lambda name, s: rate_columns(name, s, ref) + [
        fmt(s["cpu_percent"], "{:.0f}"),
        fmt(s["peak_rss_kib"] / 1024, "{:.1f}"), fmt(s["errors"]),
        fmt(s["log_bytes_per_req"], "{:.0f}"),
        ratio(s["rps_median"], main_summary.get(name, {}).get("rps_median"))])
    note = ["vs httptools: to uvicorn-httptools (defaults). vs main: req/s here / req/s in "
            "the main table above (same run);", "what differs from the main table:"]
    note += [f"  {name}: {DEFAULTS[name]}" for name in names]
    return table(title, ["server (defaults)", "req/s (median)", "min–max", "vs httptools",
                         "p99 ms", "CPU µs/req", "CPU %", "peak RSS MiB", "errors",
                         "log B/req", "vs main"], rows, note)


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("uvicorn", "h11", "httptools", "uvloop", "hypercorn", "gunicorn", "waitress"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    git = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %cs"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "gateway.py"],
                           capture_output=True, text=True).stdout.strip()
    with open(GATEWAY, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "gateway": f"{git or '?'}{' (gateway.py modified)' if dirty else ''}, "
                       f"gateway.py sha256 {digest}",
            "python": platform.python_version(), "peers": versions,
            "wrk": (wrk.stdout + wrk.stderr).split("\n")[0].strip()}


# --- main --------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="hello + echo 1 KiB; gateway, uvicorn-h11, uvicorn-httptools, "
                         "gunicorn, waitress; 1 rep; the defaults table for gateway and "
                         "uvicorn-httptools only (~1 minute)")
    ap.add_argument("--defaults-only", action="store_true",
                    help="hello + echo 1 KiB only: each server with access logs off (the "
                         "main table) and as its README starts it (the defaults table)")
    ap.add_argument("--no-defaults", action="store_true",
                    help="leave out the defaults table (access logs off everywhere)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 3)")
    ap.add_argument("--reps", type=int, help="repetitions, interleaved (default 3; quick 1)")
    ap.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--stream-mib", type=int, default=1024, help="streaming echo size")
    ap.add_argument("--idle", type=int, default=1000, help="idle keep-alive connections")
    ap.add_argument("--strace-requests", type=int, default=2000)
    args = ap.parse_args()
    if args.defaults_only and args.no_defaults:
        ap.error("--defaults-only and --no-defaults exclude each other")

    quick = args.quick
    duration = args.duration or 3
    reps = args.reps or (1 if quick else 3)
    wanted = (["gateway-asgi", "gateway-wsgi", "uvicorn-h11", "uvicorn-httptools", "gunicorn",
               "waitress"] if quick else list(SERVERS))
    if args.servers:
        wanted = [s.strip() for s in args.servers.split(",")]
        unknown = [s for s in wanted if s not in SERVERS]
        if unknown:
            ap.error(f"unknown server(s): {', '.join(unknown)}")
    # The defaults table: every server of the run that has a README way of starting it;
    # --quick keeps it to gateway and the reference, to stay near a minute.
    if args.no_defaults:
        wanted_defaults = []
    elif quick and not args.servers:
        wanted_defaults = ["gateway-asgi", "gateway-wsgi", DEFAULTS_REFERENCE]
    else:
        wanted_defaults = [n for n in wanted if n in DEFAULTS]
    names, default_names = [], []
    for name in dict.fromkeys(wanted + wanted_defaults):    # each once, in order
        missing = [m for m in SERVERS[name][1] if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipping {name}: {', '.join(missing)} not installed for {PY} "
                  "(`make bench` installs the peers into .venv-bench)", flush=True)
            continue
        if name in wanted:
            names.append(name)
        if name in wanted_defaults:
            default_names.append(name)
    short = quick or args.defaults_only         # hello and echo 1 KiB only, no extras
    workloads = ["hello", "echo-1k"] if short else list(WORKLOADS)

    ensure_wrk()
    # `python gateway.py` loads gateway from the bytecode its first start wrote (README,
    # "Command line"), as the peers load what pip compiled when it installed them: write
    # it here, so that no table measures a first start (which compiles it: a higher peak).
    py_compile.compile(GATEWAY, doraise=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)     # 1,000 sockets + wrk's
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = machine()
    print(f"gateway bench {'(quick) ' if quick else ''}{stamp}: {info['nproc']} CPUs, "
          f"{info['cpu']}, Python {info['python']}, {info['wrk']}", flush=True)
    print(f"gateway: {info['gateway']}", flush=True)
    print(f"gateway flags: {' '.join(gateway_flags()) or '(none)'}", flush=True)
    print(f"{len(names)} servers, {reps} rep(s) of {duration} s, wrk -t1 "
          f"-c{args.connections}, interleaved", flush=True)
    if default_names:
        print(f"defaults table ({', '.join(DEFAULTS_WORKLOADS)}): {', '.join(default_names)}",
              flush=True)
    results = {"date": stamp, "machine": info, "quick": quick,
               "defaults_only": args.defaults_only, "duration_s": duration,
               "reps": reps, "connections": args.connections, "runs": {}, "summary": {},
               "extras": {}, "problems": []}
    if default_names:
        results["extras"]["defaults"] = {
            "reference": DEFAULTS_REFERENCE, "differs": DEFAULTS, "runs": {}, "summary": {},
            "commands": {n: defaults_command(n, "hello", 0) for n in default_names}}
    tables = []

    def note(problem):
        print("  !! " + problem, flush=True)
        results["problems"].append(problem)

    def attempt(label, fn):
        try:
            return fn()
        except Exception as exc:        # one failed run must not sink the others
            note(f"{label}: {exc!r}"[:1500])
            return None

    with tempfile.TemporaryDirectory() as tmpdir:
        # 1. throughput at -c50, servers interleaved within each repetition
        for wl in workloads:
            app, method, size, title = WORKLOADS[wl]
            # One repetition: each server as in the main table (access logs off), then
            # at once the same server as its README starts it (the defaults table), so
            # that the two runs whose ratio is the log cost are close in time.
            plan = []                   # (name, defaults?)
            with_defaults = default_names if wl in DEFAULTS_WORKLOADS else []
            for name in names:
                plan.append((name, False))
                if name in with_defaults:
                    plan.append((name, True))
            plan += [(name, True) for name in with_defaults if name not in names]
            runs = {run: [] for run in plan}
            for rep in range(reps):
                for name, defaults in plan:
                    label = name + (" (defaults)" if defaults else "")
                    def one():
                        with Server(name, app, defaults=defaults) as srv:
                            r = measured_wrk(srv, args.connections, duration, method, size, tmpdir)
                            r["log_bytes_per_req"] = round(
                                srv.output_bytes() / max(1, r["requests"]), 1)
                            log = srv.output()
                            if "Traceback" in log or "rror" in log:
                                note(f"{wl} {label}: server said: {log[-600:]}")
                            return r
                    r = attempt(f"{wl} {label} rep {rep + 1}", one)
                    if r:
                        runs[(name, defaults)].append(r)
                        print(f"  [{wl} {rep + 1}/{reps}] {label:37} {r['rps']:>10,.0f} req/s  "
                              f"p99 {r.get('p99_ms', 0):7.2f} ms  {r['cpu_us_per_req']:6.0f} µs/req"
                              f"  errors {r['errors']}", flush=True)
            main_runs = {n: runs[(n, False)] for n in names}
            results["runs"][wl] = main_runs
            summary = {n: summarize(rs) for n, rs in main_runs.items() if rs}
            results["summary"][wl] = summary
            tables.append(throughput_table(f"{title} (wrk -t1 -c{args.connections}, "
                                           f"{reps}x{duration} s)", summary, names))
            if with_defaults:
                default_runs = {n: runs[(n, True)] for n in with_defaults}
                dsummary = {n: summarize(rs) for n, rs in default_runs.items() if rs}
                results["extras"]["defaults"]["runs"][wl] = default_runs
                results["extras"]["defaults"]["summary"][wl] = dsummary
                tables.append(defaults_table(
                    f"{title}, each server as its README starts it (wrk -t1 "
                    f"-c{args.connections}, {reps}x{duration} s)", dsummary, summary,
                    with_defaults))

        # 2. pinned to one CPU: the GIL hand-off between threads costs more there
        if shutil.which("taskset") and not short:
            # Pinned, the server and wrk no longer share CPUs: the steadiest ratios on a
            # noisy 2-CPU machine. Same reps, interleaved, as the free runs.
            pinned_names = [n for n in ("gateway-asgi", "gateway-wsgi", REFERENCE,
                                        "uvicorn-httptools", "waitress") if n in names]
            pinned_loads = [w for w in ("hello", "echo-1k") if w in workloads]
            pinned_runs = {(w, n): [] for w in pinned_loads for n in pinned_names}
            for rep_no in range(reps):
                for workload in pinned_loads:
                    app, method, size, _ = WORKLOADS[workload]
                    for name in pinned_names:
                        def one():
                            with Server(name, app, pin=0) as srv:
                                return measured_wrk(
                                    srv, args.connections, duration, method, size, tmpdir,
                                    wrk_pin=1 if (os.cpu_count() or 1) > 1 else None)
                        r = attempt(f"pinned {workload} {name}", one)
                        if r:
                            pinned_runs[(workload, name)].append(r)
                            print(f"  [pinned {workload} {rep_no + 1}/{reps}] {name:26} "
                                  f"{r['rps']:>10,.0f} req/s", flush=True)
            pinned = {w: {n: summarize(pinned_runs[(w, n)]) for n in pinned_names
                          if pinned_runs[(w, n)]} for w in pinned_loads}
            results["extras"]["pinned"] = pinned
            rows = []
            for workload in pinned_loads:
                free = results["summary"].get(workload, {})
                ref = pinned[workload].get(REFERENCE, {}).get("rps_median")
                for n, s in pinned[workload].items():
                    rows.append([workload, n, fmt(free.get(n, {}).get("rps_median")),
                                 fmt(s["rps_median"]),
                                 ratio(s["rps_median"], free.get(n, {}).get("rps_median")),
                                 ratio(s["rps_median"], ref),
                                 fmt(s["cpu_us_per_req"], "{:.0f}")])
            tables.append(table("server pinned with `taskset -c 0`, wrk with `taskset -c 1` "
                                f"(median of {reps})",
                                ["workload", "server", "req/s free", "req/s pinned",
                                 "pinned/free", "vs h11 pinned", "CPU µs/req pinned"], rows))

        if not short:
            # 3. one connection: latency
            lat = {}
            for name in names:
                def one():
                    with Server(name, "hello") as srv:
                        return measured_wrk(srv, 1, duration, "GET", 0, tmpdir)
                r = attempt(f"c1 {name}", one)
                if r:
                    lat[name] = r
                    print(f"  [c1] {name:26} p50 {r.get('p50_ms')} ms p99 {r.get('p99_ms')} ms",
                          flush=True)
            results["extras"]["latency_c1"] = lat
            ref = lat.get(REFERENCE, {})
            tables.append(table(f"hello, one connection (wrk -t1 -c1, {duration} s)",
                                ["server", "p50 ms", "vs h11", "p99 ms", "vs h11", "req/s",
                                 "CPU µs/req"],
                                [[n, fmt(r.get("p50_ms"), "{:.3f}"),
                                  ratio(r.get("p50_ms"), ref.get("p50_ms")),
                                  fmt(r.get("p99_ms"), "{:.3f}"),
                                  ratio(r.get("p99_ms"), ref.get("p99_ms")), fmt(r["rps"]),
                                  fmt(r["cpu_us_per_req"], "{:.0f}")] for n, r in lat.items()]))

            # 4. 500 concurrent connections
            many = {}
            for name in names:
                def one():
                    with Server(name, "hello") as srv:
                        return measured_wrk(srv, 500, duration, "GET", 0, tmpdir)
                r = attempt(f"c500 {name}", one)
                if r:
                    many[name] = r
                    print(f"  [c500] {name:26} {r['rps']:>10,.0f} req/s errors {r['errors']} "
                          f"p99 {r.get('p99_ms')} ms", flush=True)
            results["extras"]["c500"] = many
            ref = many.get(REFERENCE, {})
            tables.append(table(f"hello, 500 connections (wrk -t1 -c500, {duration} s)",
                                ["server", "req/s", "vs h11", "p99 ms", "errors",
                                 "error kinds", "peak RSS MiB"],
                                [[n, fmt(r["rps"]), ratio(r["rps"], ref.get("rps")),
                                  fmt(r.get("p99_ms"), "{:.1f}"), fmt(r["errors"]),
                                  " ".join(f"{k}={v}" for k, v in
                                           {**r.get("socket_errors", {}),
                                            "non2xx": r.get("non_2xx", 0)}.items() if v) or "-",
                                  fmt(r["peak_rss_kib"] / 1024, "{:.1f}")]
                                 for n, r in many.items()]))

            trio = [n for n in GATEWAYS + [REFERENCE] if n in names]

            # 5. streaming echo of 1 GiB on one connection
            stream = {}
            for name in trio:
                def one():
                    with Server(name, "stream") as srv:
                        return stream_echo(srv, args.stream_mib << 20)
                r = attempt(f"stream {name}", one)
                if r:
                    stream[name] = r
                    print(f"  [stream] {name:26} {r['mb_per_s']} MB/s ok={r['ok']} "
                          f"rss +{r['rss_peak_growth_kib']} KiB", flush=True)
                    if not r["ok"]:
                        note(f"stream {name}: {r['error']} after {r['bytes_echoed']} bytes")
            results["extras"]["stream"] = stream
            ref = stream.get(REFERENCE, {})
            tables.append(table(f"streaming echo, {args.stream_mib} MiB up (Content-Length) and back (chunked) "
                                "on one connection",
                                ["server", "MB/s", "vs h11", "first byte ms", "complete",
                                 "RSS before MiB", "peak RSS growth MiB"],
                                [[n, fmt(r["mb_per_s"], "{:.1f}"),
                                  ratio(r["mb_per_s"], ref.get("mb_per_s")),
                                  fmt(r["first_byte_ms"], "{:.1f}"), "yes" if r["ok"] else "NO",
                                  fmt(r["rss_before_kib"] / 1024, "{:.1f}"),
                                  fmt(r["rss_peak_growth_kib"] / 1024, "{:.1f}")]
                                 for n, r in stream.items()]))

            # 6. idle keep-alive connections
            idle = {}
            for name in trio:
                def one():
                    with Server(name, "hello", keep_alive=120) as srv:
                        return idle_connections(srv, args.idle)
                r = attempt(f"idle {name}", one)
                if r:
                    idle[name] = r
                    print(f"  [idle] {name:26} {r['kib_per_connection']} KiB/conn "
                          f"answered {r['answered']} open {r['still_open']}", flush=True)
            results["extras"]["idle"] = idle
            ref = idle.get(REFERENCE, {})
            tables.append(table(f"{args.idle} idle keep-alive connections (one GET each)",
                                ["server", "KiB/conn", "vs h11", "answered", "still open",
                                 "RSS before MiB", "RSS after MiB"],
                                [[n, fmt(r["kib_per_connection"], "{:.1f}"),
                                  ratio(r["kib_per_connection"], ref.get("kib_per_connection")),
                                  fmt(r["answered"]), fmt(r["still_open"]),
                                  fmt(r["rss_before_kib"] / 1024, "{:.1f}"),
                                  fmt(r["rss_after_kib"] / 1024, "{:.1f}")]
                                 for n, r in idle.items()]))

            # 7. syscalls per request (optional: needs strace and ptrace)
            if shutil.which("strace"):
                sysc = {}
                for name in trio:
                    def one():
                        with Server(name, "hello") as srv:
                            warm_up(srv, "GET", b"")
                            return syscalls_per_request(srv, args.strace_requests)
                    r = attempt(f"strace {name}", one)
                    if r:
                        sysc[name] = r
                        print(f"  [strace] {name:26} {r['per_request']} syscalls/req", flush=True)
                results["extras"]["syscalls"] = sysc
                ref = sysc.get(REFERENCE, {})
                tables.append(table(f"syscalls per request (strace -c -f, "
                                    f"{args.strace_requests} keep-alive GETs on one connection)",
                                    ["server", "syscalls/req", "vs h11", "most frequent (per request)"],
                                    [[n, fmt(r["per_request"], "{:.1f}"),
                                      ratio(r["per_request"], ref.get("per_request")),
                                      ", ".join(f"{k} {v}" for k, v in r["top"].items())]
                                     for n, r in sysc.items()]))

    elapsed = time.monotonic() - started
    results["elapsed_s"] = round(elapsed, 1)
    results["tables"] = tables
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    suffix = "-quick" if quick else "-defaults" if args.defaults_only else ""
    path = os.path.join(HERE, "results", f"{stamp}{suffix}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{len(results['problems'])} problem(s); {elapsed:.0f} s; wrote "
          f"{os.path.relpath(path, ROOT)}", flush=True)


if __name__ == "__main__":
    main()
