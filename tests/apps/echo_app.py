"""A tiny HTTP + WebSocket app for tests: it shows what spinyard started it with.

Only the standard library, so it starts in a few tens of milliseconds. It
binds 127.0.0.1 only and serves everything under its prefix (the gateway
proxies `/apps/<owner>/<title>/<instance>/` to it unchanged):

    GET  {prefix}              HTML page naming the instance and prefix
    GET  {prefix}api/info      JSON: instance, app, prefix, port, pid, cwd, tag,
                               request method/path/query/headers, SPINYARD_* and APP_* env
    POST {prefix}api/echo      the request body back, with its Content-Type
    GET  {prefix}status/<n>    an empty answer with HTTP status n (for probe tests)
    GET  {prefix}ws            WebSocket echo (text and binary; answers ping, close)
    GET  {prefix-without-/}    308 redirect to {prefix}
    anything else              404

Options (each defaults to the SPINYARD_* variable spinyard sets):

    --port N       SPINYARD_PORT
    --prefix P     SPINYARD_PREFIX, default "/"
    --instance I   SPINYARD_INSTANCE
    --delay S      sleep S seconds before listening (slow starts)
    --crash CODE   print a message to stderr and exit with CODE instead of serving
    --tag TEXT     echoed in api/info (to check argument substitution)

SIGTERM and SIGINT make it stop serving and exit 0.
"""

import argparse
import base64
import hashlib
import json
import os
import signal
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOST = "127.0.0.1"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_WS_FRAME = 1 << 20

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>echo {instance}</title></head>
<body><h1>echo app</h1><p>instance <code id="instance">{instance}</code></p>
<p>prefix <code id="prefix">{prefix}</code></p></body></html>
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(env.get("SPINYARD_PORT", "8000")))
    parser.add_argument("--prefix", default=env.get("SPINYARD_PREFIX", "/"))
    parser.add_argument("--instance", default=env.get("SPINYARD_INSTANCE", "local"))
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--crash", type=int, default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    args.prefix = "/" + args.prefix.strip("/") + "/" if args.prefix.strip("/") else "/"
    return args


class Handler(BaseHTTPRequestHandler):
    server: "EchoServer"
    protocol_version = "HTTP/1.1"

    # -- plumbing --

    def _send(
        self, code: int, body: bytes = b"", ctype: str = "text/plain", **headers: str
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self) -> str | None:
        """The path below the prefix, or None if the request is outside it."""
        path = urlsplit(self.path).path
        prefix = self.server.args.prefix
        if path.startswith(prefix):
            return path[len(prefix) :]
        return None

    # -- HTTP --

    def do_GET(self) -> None:
        args = self.server.args
        path = urlsplit(self.path).path
        if prefix_less := args.prefix.rstrip("/"):
            if path == prefix_less:
                query = urlsplit(self.path).query
                self._send(308, Location=args.prefix + (f"?{query}" if query else ""))
                return
        route = self._route()
        if route is None:
            self._send(404, b"not found\n")
        elif route == "":
            page = PAGE.format(instance=args.instance, prefix=args.prefix).encode()
            self._send(200, page, "text/html; charset=utf-8")
        elif route == "api/info":
            self._send(200, json.dumps(self._info()).encode(), "application/json")
        elif route.startswith("status/") and route[7:].isdigit() and 200 <= int(route[7:]) < 600:
            self._send(int(route[7:]))
        elif route == "ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
        else:
            self._send(404, b"not found\n")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if self._route() != "api/echo":
            self._send(404, b"not found\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))

    def _info(self) -> dict:
        args = self.server.args
        url = urlsplit(self.path)
        return {
            "instance": args.instance,
            "app": os.environ.get("SPINYARD_APP"),
            "prefix": args.prefix,
            "port": args.port,
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "tag": args.tag,
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": dict(self.headers.items()),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("SPINYARD_", "APP_"))},
        }

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"echo_app: {self.address_string()} {format % args}\n")

    # -- WebSocket (RFC 6455, enough for echo tests) --

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        message_opcode, parts = 0, []
        try:
            while True:
                fin, opcode, payload = self._ws_read()
                if opcode == 0x8:  # close: answer with the same code, then hang up
                    self._ws_write(0x8, payload[:2])
                    return
                if opcode == 0x9:  # ping
                    self._ws_write(0xA, payload)
                    continue
                if opcode in (0x1, 0x2):
                    message_opcode, parts = opcode, []
                elif opcode != 0x0:  # pong or reserved: ignore
                    continue
                parts.append(payload)
                if fin and message_opcode:
                    self._ws_write(message_opcode, b"".join(parts))
                    message_opcode, parts = 0, []
        except (EOFError, OSError):
            return

    def _ws_read(self) -> tuple[bool, int, bytes]:
        head = self._read_exact(2)
        fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        masked, length = head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        if length > _MAX_WS_FRAME:
            raise EOFError("frame too large")
        mask = self._read_exact(4) if masked else b""
        data = self._read_exact(length)
        if masked:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return fin, opcode, data

    def _ws_write(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise EOFError("connection closed")
        return data


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True  # open keep-alive and WebSocket connections must not delay exit

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        super().__init__((HOST, args.port), Handler)


def _stop(signum: int, _frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.crash is not None:
        print(f"echo_app: crashing on purpose with code {args.crash}", file=sys.stderr, flush=True)
        return args.crash
    if args.delay:
        time.sleep(args.delay)
    try:
        server = EchoServer(args)
    except OSError as exc:
        print(f"echo_app: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 2
    with server:
        print(f"echo_app: listening on http://{HOST}:{args.port}{args.prefix}", flush=True)
        try:
            server.serve_forever(poll_interval=0.1)
        except SystemExit:
            print("echo_app: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
