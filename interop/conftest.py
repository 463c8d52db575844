"""Fixtures for the interop tests: gateway.py serving real framework apps.

Each app in APPS runs in its own `python gateway.py` subprocess (this venv's
interpreter, so the frameworks are importable), started on first use with
`--port 0` and stopped with SIGTERM when the session ends. The port comes
from the start-up line, read by a thread that keeps draining the server's
output (an undrained pipe would block the server) into a log, which is
attached to the report of any failing test.

To add an app: put its module in interop/, add a line to APPS, and a fixture
like `flask_server` below. A test that needs a server of its own (to stop it
and look at how it ended) makes a `Gateway(...)` itself and stops it.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GATEWAY = HERE.parent / "gateway.py"

# name -> (interface, MODULE:ATTR importable from interop/)
APPS = {
    "flask": ("wsgi", "flask_app:app"),
    "django": ("wsgi", "django_app:application"),
    "starlette": ("asgi", "starlette_app:app"),
    "fastapi": ("asgi", "fastapi_app:app"),
    "django_asgi": ("asgi", "django_app:asgi_application"),
}

START_SECONDS = 30.0     # longest wait for the start-up line
STOP_SECONDS = 15.0      # longest wait for the exit after SIGTERM
STARTUP = re.compile(
    r"gateway: serving (WSGI|ASGI) app (\S+) on http://127\.0\.0\.1:(\d+) \(Ctrl\+C to quit\)")


class Gateway:
    """One `python gateway.py` subprocess serving one app on 127.0.0.1."""

    def __init__(self, interface: str, target: str, *options: str,
                 env: dict[str, str] | None = None) -> None:
        self.interface, self.target = interface, target
        self.lines: list[str] = []          # everything the server printed
        self.port: int | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        env.pop("DJANGO_SETTINGS_MODULE", None)
        self.process = subprocess.Popen(
            [sys.executable, str(GATEWAY), f"--{interface}", target,
             "--host", "127.0.0.1", "--port", "0", "--app-dir", str(HERE), *options],
            cwd=GATEWAY.parent, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace")
        self.news: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True,
                                       name=f"gateway output: {target}")
        self.reader.start()
        self._wait_for_startup()

    def _read(self) -> None:
        """Runs on: the reader thread. Drain the output until the process ends."""
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.news.put(line)
        self.news.put(None)    # EOF: the process has exited (or closed its output)

    def _wait_for_startup(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.news.get(timeout=max(remaining, 0))
            except queue.Empty:
                self.stop(check=False)
                raise RuntimeError(f"no start-up line from gateway within {START_SECONDS}s:\n"
                                   + self.log()) from None
            if line is None:
                self.process.wait(timeout=STOP_SECONDS)
                raise RuntimeError(f"gateway exited with status {self.process.returncode} "
                                   "before serving:\n" + self.log())
            match = STARTUP.search(line)
            if match:
                assert match.group(1) == self.interface.upper(), line
                assert match.group(2) == self.target, line
                self.port = int(match.group(3))
                return

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}{path}"

    def log(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    def stop(self, check: bool = True) -> None:
        """SIGTERM, then wait for a clean exit (status 0, as for Ctrl+C)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                if check:
                    raise AssertionError(f"gateway ({self.target}) ignored SIGTERM for "
                                         f"{STOP_SECONDS}s:\n" + self.log())
        self.reader.join(timeout=STOP_SECONDS)
        if check and self.process.returncode != 0:
            raise AssertionError(f"gateway ({self.target}) exited with status "
                                 f"{self.process.returncode} after SIGTERM:\n" + self.log())


_running: dict[str, Gateway] = {}


@pytest.fixture(scope="session")
def gateway():
    """gateway(name) -> the running Gateway for APPS[name], started on first use."""
    def get(name: str) -> Gateway:
        if name not in _running:
            interface, target = APPS[name]
            _running[name] = Gateway(interface, target)
        server = _running[name]
        assert server.process.poll() is None, f"gateway for {name} died:\n" + server.log()
        return server
    yield get
    failures = []
    while _running:
        name, server = _running.popitem()
        try:
            server.stop()
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n\n".join(failures)


@pytest.fixture(scope="session")
def flask_server(gateway) -> Gateway:
    return gateway("flask")


@pytest.fixture(scope="session")
def django_server(gateway) -> Gateway:
    return gateway("django")


@pytest.fixture(scope="session")
def starlette_server(gateway) -> Gateway:
    return gateway("starlette")


@pytest.fixture(scope="session")
def fastapi_server(gateway) -> Gateway:
    return gateway("fastapi")


@pytest.fixture(scope="session")
def django_asgi_server(gateway) -> Gateway:
    return gateway("django_asgi")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Show the servers' recent output under a failing test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, server in _running.items():
            report.sections.append((f"gateway output ({name})", server.log()))
