#!/usr/bin/env python3
"""interop/autobahn.py - the Autobahn|Testsuite fuzzing client against gateway.py.

    python3 interop/autobahn.py --wstest .venv-autobahn/py27/bin/wstest     # make autobahn
    python3 interop/autobahn.py --wstest ... --cases '1.*' '2.*'            # a subset

Standard library only (Python 3). Starts `gateway.py --asgi autobahn:app` (the echo app
below: text back as text, bytes back as bytes) on a free port of 127.0.0.1, runs
`wstest -m fuzzingclient` (Python 2.7, Twisted; installed by `make autobahn`) against it,
stops the server with SIGTERM, prints one line per case group from
interop/reports/clients/index.json and the detail of every case that is not OK, and exits
1 if any case FAILED (or the server died, or did not exit cleanly), else 0.

Everything goes to interop/reports/ (git-ignored): spec.json, wstest.log, gateway.log and
the suite's own report, clients/index.html (open it in a browser) and one JSON and one
HTML file per case.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY = os.path.join(os.path.dirname(HERE), "gateway.py")
REPORTS = os.path.join(HERE, "reports")
HOST = "127.0.0.1"          # the only address this script ever talks to
AGENT = "gateway"

# Every case runs. The whole suite (517 cases) takes ~9.5 minutes on 2 cores, most of it in
# 12.* and 13.* (1000 compressed messages per case, and wstest is Python 2). The 9.*
# performance cases take ~10 s here, so excluding them would save nothing: nothing is
# excluded. Add a case here only with a comment saying why.
EXCLUDE_CASES: list[str] = []

# gateway's options: messages up to 16 MiB come in 9.1.6 / 9.2.6, so the limit is above
# that; no keep-alive pings, which the suite would see as unexpected frames.
GATEWAY_OPTIONS = ["--ws-max-size", "20000000", "--ws-ping-interval", "0", "--no-access-log"]

START_SECONDS = 30.0        # longest wait for gateway's start-up line
STOP_SECONDS = 15.0         # longest wait for gateway's exit after SIGTERM
SUITE_SECONDS = 1800.0      # longest the whole suite may take (it needs ~10 minutes)
STARTUP = re.compile(r"gateway: serving ASGI app \S+ on http://127\.0\.0\.1:(\d+) ")

# Autobahn's verdicts, worst first; "behavior" judges the messages, "behaviorClose" the
# closing handshake. FAILED in either fails the run; the others are reported.
VERDICTS = ["FAILED", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "OK"]
CLOSE_FAILURES = {"FAILED", "WRONG CODE", "UNCLEAN", "FAILED BY CLIENT"}


async def app(scope, receive, send):
    """The testee: an ASGI echo app that accepts every WebSocket, with no subprotocol."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"a WebSocket echo only\n"})
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
        elif message["type"] == "websocket.disconnect":
            return


class Server:
    """`python gateway.py --asgi autobahn:app` on a free port of 127.0.0.1."""

    def __init__(self, log_path: str) -> None:
        self.log = open(log_path, "w", encoding="utf-8")
        self.news: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, GATEWAY, "--asgi", "autobahn:app", "--app-dir", HERE,
             "--host", HOST, "--port", "0", *GATEWAY_OPTIONS],
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = self._wait_for_port()

    def _read(self) -> None:
        """Runs on: the reader thread. Drain the server's output (a full pipe blocks it)."""
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()
            self.news.put(line)
        self.news.put(None)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                line = self.news.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.stop()
                raise SystemExit(f"no start-up line from gateway in {START_SECONDS:.0f} s")
            if line is None:
                self.process.wait(timeout=STOP_SECONDS)
                raise SystemExit(f"gateway exited ({self.process.returncode}) before serving;"
                                 f" see {self.log.name}")
            match = STARTUP.search(line)
            if match:
                return int(match.group(1))

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait (then SIGKILL); the exit status, None if it was killed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        self.reader.join(timeout=STOP_SECONDS)
        self.log.close()
        return self.process.returncode


def run_suite(wstest: str, port: int, cases: list[str]) -> int:
    """wstest -m fuzzingclient; its output goes to wstest.log, a line per case group here."""
    spec = {"outdir": os.path.join(REPORTS, "clients"),
            "servers": [{"agent": AGENT, "url": f"ws://{HOST}:{port}"}],
            "cases": cases, "exclude-cases": EXCLUDE_CASES, "exclude-agent-cases": {}}
    spec_path = os.path.join(REPORTS, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as file:
        json.dump(spec, file, indent=2)
    started, group = time.monotonic(), None
    with open(os.path.join(REPORTS, "wstest.log"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [wstest, "-m", "fuzzingclient", "-s", spec_path], cwd=REPORTS,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace")
        timer = threading.Timer(SUITE_SECONDS, process.kill)   # the bound on the whole run
        timer.start()
        try:
            for line in process.stdout:
                log.write(line)
                match = re.match(r"Running test case ID (\d+)\.", line)
                if match and match.group(1) != group:
                    group = match.group(1)
                    print(f"  {time.monotonic() - started:6.0f} s  cases {group}.*", flush=True)
            status = process.wait()
        finally:
            timer.cancel()
    if status != 0:
        print(f"wstest exited with status {status}"
              f"{' (killed after %.0f s)' % SUITE_SECONDS if status == -9 else ''};"
              f" see {log.name}")
    return status


def case_key(case_id: str) -> list[int]:
    return [int(part) for part in case_id.split(".")]


def plain(text: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def summarize() -> bool:
    """Print the per-group table and the non-OK cases; True if none FAILED."""
    with open(os.path.join(REPORTS, "clients", "index.json"), encoding="utf-8") as file:
        results = json.load(file)[AGENT]
    groups: dict[str, dict[str, int]] = {}
    for case_id, result in results.items():
        row = groups.setdefault(case_id.split(".")[0], dict.fromkeys(VERDICTS + ["close"], 0))
        row[result["behavior"]] = row.get(result["behavior"], 0) + 1
        if result["behaviorClose"] in CLOSE_FAILURES:
            row["close"] += 1
    print(f"\n{'group':>5} {'cases':>5} " + " ".join(f"{v:>13}" for v in VERDICTS)
          + f" {'close failed':>12}")
    totals = dict.fromkeys(VERDICTS + ["close"], 0)
    for group in sorted(groups, key=int):
        row = groups[group]
        for verdict in totals:
            totals[verdict] += row.get(verdict, 0)
        print(f"{group:>5} {sum(row[v] for v in VERDICTS):>5} "
              + " ".join(f"{row[v]:>13}" for v in VERDICTS) + f" {row['close']:>12}")
    print(f"{'all':>5} {len(results):>5} " + " ".join(f"{totals[v]:>13}" for v in VERDICTS)
          + f" {totals['close']:>12}")

    notable = [(case_id, result) for case_id, result in results.items()
               if result["behavior"] in ("FAILED", "NON-STRICT")
               or result["behaviorClose"] not in ("OK", "INFORMATIONAL")]
    for case_id, result in sorted(notable, key=lambda item: case_key(item[0])):
        with open(os.path.join(REPORTS, "clients", result["reportfile"]),
                  encoding="utf-8") as file:
            case = json.load(file)
        print(f"\n{case_id}: {result['behavior']} (close: {result['behaviorClose']})")
        print(f"  case:     {plain(case['description'])}")
        print(f"  expected: {plain(case['expectation'])}")
        print(f"  OK needs: events {case['expected'].get('OK')}")
        print(f"  got:      events {case['received']}; close {case['remoteCloseCode']}"
              f" {case['remoteCloseReason']!r} ({case['resultClose']})")
    unimplemented = sorted((c for c, r in results.items() if r["behavior"] == "UNIMPLEMENTED"),
                           key=case_key)
    if unimplemented:
        print(f"\nUNIMPLEMENTED ({len(unimplemented)}): {unimplemented[0]} .. "
              f"{unimplemented[-1]} (an extension offer the server declined; not a failure)")
    print(f"\nreport: {os.path.join(REPORTS, 'clients', 'index.html')}")
    return totals["FAILED"] == 0 and totals["close"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wstest", default=os.path.join(
        os.path.dirname(HERE), ".venv-autobahn", "py27", "bin", "wstest"),
        help="the wstest program (default: .venv-autobahn/py27/bin/wstest)")
    parser.add_argument("--cases", nargs="+", default=["*"],
                        help="case patterns, e.g. '1.*' '12.1.*' (default: all)")
    args = parser.parse_args()
    wstest = os.path.abspath(args.wstest)     # it runs with interop/reports as its cwd
    if not os.access(wstest, os.X_OK):
        parser.error(f"no wstest at {wstest}: `make autobahn` installs it")
    os.makedirs(REPORTS, exist_ok=True)
    index = os.path.join(REPORTS, "clients", "index.json")
    if os.path.exists(index):
        os.remove(index)          # never summarize a previous run's report
    started = time.monotonic()
    server = Server(os.path.join(REPORTS, "gateway.log"))
    print(f"gateway on ws://{HOST}:{server.port}, wstest cases {' '.join(args.cases)}",
          flush=True)
    try:
        suite_status = run_suite(wstest, server.port, args.cases)
        alive = server.process.poll() is None
    finally:
        exit_status = server.stop()
    print(f"\nran in {time.monotonic() - started:.0f} s")
    ok = os.path.exists(index) and summarize()
    if not alive:
        print("gateway died during the run; see interop/reports/gateway.log")
    elif exit_status != 0:
        print(f"gateway did not exit cleanly after SIGTERM (status {exit_status})")
    return 0 if ok and suite_status == 0 and alive and exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
