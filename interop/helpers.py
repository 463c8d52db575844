"""Client-side helpers for the interop tests: multipart bodies and curl."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (shutil.which)")

CLIENT_SECONDS = 60      # longest any one client call may take


def multipart(fields: dict[str, str],
              files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) and its Content-Type.

    `files` maps a field name to (filename, content, content type).
    """
    boundary = "interop-" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                     f"\r\n\r\n{value}\r\n".encode())
    for name, (filename, content, ctype) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
                     + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class CurlResult:
    status: int
    headers: list[tuple[str, str]]     # of the last response, names lower-cased
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


def curl(*args: str) -> CurlResult:
    """Run curl with `args`; the status, headers and body of the final response.

    A 100 Continue or a followed redirect leaves several header blocks in the
    dump: the last one belongs to the body.
    """
    with tempfile.TemporaryDirectory(prefix="interop-curl-") as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        done = subprocess.run(
            [CURL, "--silent", "--show-error", "--max-time", str(CLIENT_SECONDS),
             "--dump-header", str(head), "--output", str(body), *args],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=CLIENT_SECONDS + 10)
        if done.returncode != 0:
            raise AssertionError(f"curl {' '.join(args)} failed ({done.returncode}): "
                                 + done.stderr.decode(errors="replace"))
        blocks = [block for block in head.read_bytes().decode("latin-1").split("\r\n\r\n")
                  if block.startswith("HTTP/")]
        lines = blocks[-1].split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return CurlResult(int(lines[0].split()[1]), headers, body.read_bytes())
