"""The demo's private service: answers GET with a greeting and echoes POST bodies.

Run: python demo/backend.py PORT [HOST]  (HOST defaults to 127.0.0.1)

SIGTERM ends it at once with status 0. It has to say so: as a container's PID 1 a process
that leaves SIGTERM at its default is not killed by it, and `down` waited 10 s for SIGKILL.
"""

from __future__ import annotations

import http.server
import json
import signal
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    """A tiny HTTP/1.1 keep-alive backend."""

    protocol_version = "HTTP/1.1"

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """Greet, showing what the tunnel forwarded."""
        facts = {
            "hello": "from the private service behind petit",
            "path": self.path,
            "x-forwarded-for": self.headers.get("X-Forwarded-For"),
            "x-forwarded-host": self.headers.get("X-Forwarded-Host"),
        }
        self._reply(json.dumps(facts, indent=2).encode() + b"\n", "application/json")

    def do_POST(self) -> None:
        """Echo the body back."""
        length = int(self.headers.get("Content-Length", "0"))
        self._reply(self.rfile.read(length), "application/octet-stream")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Stay quiet."""


def _stop(signum: int, frame: object) -> None:
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
