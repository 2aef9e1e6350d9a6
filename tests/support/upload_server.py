"""Test helper: a local HTTP server playing central's ``PUT /v1/originals/{id}`` for the edge's uploader."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List


class UploadServer:
    """A local HTTP server playing central's PUT /v1/originals/{id}; ``script`` gives statuses in order."""

    def __init__(self, script: List[int]) -> None:
        self.script = list(script)
        self.requests: List[Dict[str, object]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = outer.script.pop(0) if outer.script else 201
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
