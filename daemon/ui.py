"""A control page on loopback: ``livediffusion daemon --ui PORT``, then open
``http://127.0.0.1:PORT/``.

One HTML file (``ui_page.html``: plain HTML, CSS and JavaScript, no build step, nothing
fetched from elsewhere) and a small JSON API, served by the standard library's HTTP server on
a thread of its own.  Like the OSC bridge and the metrics endpoint it is a client of the
daemon, so every change goes through the daemon's validation:

- ``GET /`` the page; ``GET /api/overview`` streams (parameters, statistics), workers, GPUs,
  each engine's schema, and the presets;
- ``GET /api/thumb/<stream>.png?width=W`` the stream's newest output, small;
- ``POST /api/params/<stream>`` ``{"params": {...}, "preset": name, "transition": ...}``;
- ``POST /api/cues/<stream>`` ``{"op": ..., "cues": [...], "loop": bool, "index": n}``;
- ``POST /api/presets`` ``{"op": "save"|"delete", "name": ..., "from": stream, "params"}``.

It binds to loopback only: the page has no login, so it must never be reachable from
another machine.  Against a web page in the same browser (cross-site requests, DNS
rebinding) every request must name this host and port in ``Host``, and every API request
must carry the token the page was served with (``X-Livediffusion-Token``, or ``?t=`` for
thumbnails, which load as images); a page of another origin cannot read it.
A refused request (unknown stream, bad value, bad JSON) answers with a JSON ``error`` and
one log line at most every 5 s per kind; nothing else changes.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .telemetry import keep_alive

log = logging.getLogger("livediffusion.ui")

MAX_BODY = 256 * 1024


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An RGB uint8 picture as a PNG file (no filter per row, zlib; the standard library
    only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = width * 3
    raw = b"".join(b"\x00" + rgb[y * row:(y + 1) * row] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                              2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "request") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class ControlPage:
    """The HTTP server and its daemon client (one lock: the client is not thread-safe)."""

    def __init__(self, endpoint: str, port: int, *, keys: dict | None = None) -> None:
        from livediffusion.shared import Client
        self.client = Client(endpoint, name="ui", **({"keys": keys} if keys else {}))
        self.token = secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._last_log: dict[str, float] = {}
        self.refused = 0
        page = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "livediffusion-ui"

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per refusal
                pass

            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                page._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                page._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.html = resources.files("livediffusion.daemon").joinpath(
            "ui_page.html").read_text(encoding="utf-8")

    # --- lifetime ----------------------------------------------------------------------------

    def start(self) -> ControlPage:
        self.client.connect(timeout=10)
        threading.Thread(target=self.server.serve_forever, name="ui-http",
                         daemon=True).start()
        threading.Thread(target=keep_alive, args=(self.client, self._lock, self._stopped, "ui"),
                         name="ui-keepalive", daemon=True).start()
        log.info("control page on http://127.0.0.1:%d/", self.port)
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            self.client.close()

    # --- requests ------------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        try:
            url = urlsplit(req.path)
            self._check_host(req)
            if method == "GET" and url.path in ("/", "/index.html"):
                body = self.html.replace("__LIVEDIFFUSION_TOKEN__", self.token).encode()
                self._reply(req, 200, body, "text/html; charset=utf-8")
                return
            if url.path == "/favicon.ico":
                req.send_response(204)
                req.end_headers()
                return
            query = parse_qs(url.query)
            token = req.headers.get("X-Livediffusion-Token") or \
                (query.get("t") or [""])[0]
            if not secrets.compare_digest(token, self.token):
                raise Refused(403, "the control page's token is missing or wrong (reload "
                              "the page)", "token")
            if method == "GET" and url.path == "/api/overview":
                self._json(req, 200, self._overview())
            elif method == "GET" and url.path.startswith("/api/thumb/") and \
                    url.path.endswith(".png"):
                name = unquote(url.path[len("/api/thumb/"):-4])
                width = self._int((query.get("width") or ["240"])[0], "width")
                self._thumb(req, name, width)
            elif method == "POST" and url.path.startswith("/api/params/"):
                name = unquote(url.path[len("/api/params/"):])
                self._json(req, 200, self._params(name, self._body(req)))
            elif method == "POST" and url.path.startswith("/api/cues/"):
                name = unquote(url.path[len("/api/cues/"):])
                self._json(req, 200, self._cues(name, self._body(req)))
            elif method == "POST" and url.path == "/api/presets":
                self._json(req, 200, self._presets(self._body(req)))
            else:
                raise Refused(404, f"no such page: {method} {url.path[:80]}", "path")
        except Refused as exc:
            self._refuse(req, exc.status, str(exc), exc.kind)
        except Exception as exc:  # noqa: BLE001 - the page must outlive any one error
            from livediffusion.shared.client import DaemonError
            if isinstance(exc, DaemonError):
                status = 404 if exc.code == "unknown_stream" else 400
                self._refuse(req, status, exc.message, exc.code)
            elif isinstance(exc, TimeoutError):
                self._refuse(req, 504, f"the daemon did not answer: {exc}", "timeout")
            else:
                log.exception("control page: internal error")
                self._refuse(req, 500, f"internal error: {type(exc).__name__}: {exc}",
                             "internal")

    def _check_host(self, req: BaseHTTPRequestHandler) -> None:
        host = req.headers.get("Host", "")
        if host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}",
                        f"[::1]:{self.port}"):
            raise Refused(403, f"Host {host[:60]!r} is not this control page (open "
                          f"http://127.0.0.1:{self.port}/)", "host")

    @staticmethod
    def _int(text: str, what: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise Refused(400, f"{what} must be an integer, not {text[:20]!r}",
                          "value") from None

    @staticmethod
    def _body(req: BaseHTTPRequestHandler) -> dict[str, Any]:
        try:
            length = int(req.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            raise Refused(413, f"a request body is at most {MAX_BODY} bytes", "body")
        try:
            body = json.loads(req.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise Refused(400, f"the request body is not JSON: {exc}", "json") from None
        if not isinstance(body, dict):
            raise Refused(400, "the request body must be a JSON object", "json")
        return body

    def _overview(self) -> dict[str, Any]:
        with self._lock:
            overview = self.client.overview(timeout=2.0)
            presets = self.client.presets("list", timeout=2.0)
            engines = self.client.capabilities.get("engines", {})
        return {**overview, "presets": presets,
                "schemas": {name: caps.get("schema", []) for name, caps in engines.items()},
                "now": time.time()}

    def _thumb(self, req: BaseHTTPRequestHandler, name: str, width: int) -> None:
        with self._lock:
            got = self.client.thumbnail(name, max(8, min(width, 320)), timeout=2.0)
        if "pixels" not in got:  # the first ask starts them: the next one has a picture
            req.send_response(204)
            req.send_header("Cache-Control", "no-store")
            req.end_headers()
            return
        body = png(got["width"], got["height"], got["pixels"])
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("X-Out-Seq", str(got.get("out_seq", 0)))
        req.end_headers()
        req.wfile.write(body)

    def _params(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise Refused(400, "params must be a JSON object", "json")
        with self._lock:
            effective = self.client.control(name, params, timeout=2.0,
                                            preset=body.get("preset"),
                                            transition=body.get("transition") or None)
        return {"params": effective}

    def _cues(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if not isinstance(op, str):
            raise Refused(400, "op must be a string", "json")
        index = body.get("index")
        with self._lock:
            reply = self.client.cues(name, op, body.get("cues"), loop=bool(body.get("loop")),
                                     index=index if isinstance(index, int) else None,
                                     timeout=2.0)
        return {k: reply.get(k) for k in ("cues", "transition", "params")}

    def _presets(self, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op not in ("save", "delete"):
            raise Refused(400, "op must be save or delete", "json")
        with self._lock:
            return {"presets": self.client.presets(op, body.get("name"),
                                                   params=body.get("params"),
                                                   source=body.get("from"), timeout=2.0)}

    # --- answers -------------------------------------------------------------------------------

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, body: bytes, kind: str) -> None:
        req.send_response(status)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("X-Content-Type-Options", "nosniff")
        req.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' blob:; "
                        "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
        req.end_headers()
        req.wfile.write(body)

    def _json(self, req: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        self._reply(req, status, json.dumps(body).encode(), "application/json")

    def _refuse(self, req: BaseHTTPRequestHandler, status: int, message: str,
                kind: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 5.0:
            self._last_log[kind] = now
            log.warning("control page: %s", message)
        try:
            self._json(req, status, {"error": message})
        except OSError:
            pass
