"""A tiny interactive app with no dependencies: a counter served under spinyard's prefix.

spinyard starts it with SPINYARD_PORT and SPINYARD_PREFIX set; the gateway
proxies the prefix to it unchanged.
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("SPINYARD_PORT", "8000"))
PREFIX = os.environ.get("SPINYARD_PREFIX", "/")
INSTANCE = os.environ.get("SPINYARD_INSTANCE", "local")
clicks = 0
lock = threading.Lock()

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>hello</title>
<style>body{font:16px system-ui;margin:2rem}button{font-size:1.2rem;padding:.4rem 1rem}</style>
</head><body><h1>Hello from spinyard</h1><p>instance <code>%(instance)s</code></p>
<button id="b">clicked <span id="n">%(clicks)d</span> times</button>
<script>document.getElementById('b').onclick=async()=>{
const r=await fetch('%(prefix)sclick',{method:'POST'});
document.getElementById('n').textContent=(await r.json()).clicks};</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in (PREFIX, PREFIX.rstrip("/")):
            body = PAGE % {"instance": INSTANCE, "clicks": clicks, "prefix": PREFIX}
            self._send(200, body.encode(), "text/html; charset=utf-8")
        elif path == PREFIX + "healthz":
            self._send(200, b'{"ok": true}', "application/json")
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        global clicks
        if self.path.split("?", 1)[0] != PREFIX + "click":
            self._send(404, b"not found", "text/plain")
            return
        with lock:
            clicks += 1
            body = json.dumps({"clicks": clicks, "instance": INSTANCE}).encode()
        self._send(200, body, "application/json")

    def log_message(self, *args) -> None:  # keep the app's log quiet
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
