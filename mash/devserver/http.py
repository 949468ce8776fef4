"""The reference backend over HTTP: routing, the envelope, admin endpoints (profile
``guide``); ``MashHandler``, the thin shell of the ``mash`` profile's replica."""
from __future__ import annotations

import json
import logging
import re
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from mash.devserver.backend import Backend, HTTPError
from mash.devserver.mash import MashBackend
from mash.devserver.schema import MAX_BODY, _iso_now

log = logging.getLogger("mash.devserver")


_ROUTES = [
    ("POST", r"/auth/login$", "login", False),
    ("POST", r"/auth/refresh$", "refresh", False),
    ("POST", r"/devices$", "register_device", True),
    ("PUT", r"/devices/(?P<serial>[^/]+)$", "update_device", True),
    ("POST", r"/sensors/data$", "ingest", True),
    ("GET", r"/devices/(?P<serial>[^/]+)/commands$", "list_commands", True),
    ("PUT", r"/devices/(?P<serial>[^/]+)/commands/(?P<command_id>[^/]+)$", "ack_command", True),
    ("POST", r"/alerts/trigger$", "trigger_alert", True),
    ("GET", r"/devices/(?P<serial>[^/]+)/configuration$", "configuration", True),
]
PREFIX = "/api/v1"


class Handler(BaseHTTPRequestHandler):
    server_version = "mash-devserver/1"
    protocol_version = "HTTP/1.1"
    backend: Backend = None      # set by serve()

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload, headers=None, path="") -> None:
        bare = self.backend.faults.bare and not path.startswith(PREFIX + "/admin/")
        if status < 400 and not bare:
            payload = {"success": True, "statusCode": status, "data": payload,
                       "timestamp": _iso_now(), "path": path}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # Headers and body in one write: as two small writes on a kept-alive connection,
        # Nagle's algorithm and the client's delayed ACK add ~40 ms to every response.
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def _error(self, err: HTTPError, path: str) -> None:
        self._send(err.status, {"success": False, "statusCode": err.status,
                                "error": {"type": err.kind, "message": err.message},
                                "timestamp": _iso_now(), "path": path}, err.headers)

    def _dispatch(self, method: str) -> None:
        b = self.backend
        arrived = time.monotonic()
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self._error(HTTPError(413, "body too large"), path)
        raw = self.rfile.read(length) if length else b""
        admin = path.startswith(PREFIX + "/admin/")     # the fault switches never hit admin
        if not admin and b.faults.drop_until > time.monotonic():
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if not admin and b.faults.latency:
            time.sleep(b.faults.latency)
        try:
            body = {}
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise HTTPError(400, "Unexpected token in JSON body") from None
                if not isinstance(body, dict):
                    raise HTTPError(400, "body must be a JSON object")
            if admin:
                status, payload = self._admin(method, path[len(PREFIX + "/admin/"):], body)
                return self._send(status, payload, path=path)
            with b.lock:
                b.requests += 1
                f = b.faults
                if f.fail_next > 0 and f.fail_path not in path:
                    pass
                elif f.fail_next > 0 and f.fail_after > 0:
                    f.fail_after -= 1
                elif f.fail_next > 0:
                    f.fail_next -= 1
                    raise HTTPError(f.fail_status, "Service temporarily unavailable")
                if f.refuses_auth(f"{method} {path[len(PREFIX):]}"):
                    raise HTTPError(401, "Unauthorized")
            if not path.startswith(PREFIX + "/"):
                raise HTTPError(404, f"Cannot {method} {path}")
            sub = path[len(PREFIX):]
            for m, pattern, name, needs_auth in _ROUTES:
                match = re.match(pattern, sub)
                if match and m == method:
                    client = self.client_address[0]
                    if needs_auth:
                        user = b.authenticate(self.headers.get("Authorization"))
                        client = f"user:{user.id}"
                    with b.lock:
                        b.check_rate(client, f"{method} {sub}", arrived)
                    args = match.groupdict()
                    with b.lock:
                        if name == "ingest":
                            status, payload = b.ingest(body, self.headers.get("Idempotency-Key"))
                        elif name in ("list_commands", "configuration"):
                            status, payload = getattr(b, name)(**args)
                        else:
                            status, payload = getattr(b, name)(*args.values(), body)
                    return self._send(status, payload, path=path)
            raise HTTPError(404, f"Cannot {method} {path}")
        except HTTPError as err:
            self._error(err, path)
        except Exception as exc:   # a bug here must be a 500, not a dropped connection
            log.exception("devserver error")
            self._error(HTTPError(500, f"Internal server error: {exc}", "INTERNAL"), path)

    def _admin(self, method: str, sub: str, body) -> tuple[int, dict]:
        b = self.backend
        with b.lock:
            m = re.match(r"devices/([^/]+)/commands$", sub)
            if method == "POST" and m:
                return b.admin_issue(m.group(1), body)
            if method == "GET" and sub.startswith("state"):
                device = urlsplit(self.path).query.partition("device=")[2] or None
                return b.admin_state(device)
            if method == "POST" and sub == "faults":
                return b.admin_faults(body)
        raise HTTPError(404, f"no admin route {method} {sub}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")




class MashHandler(BaseHTTPRequestHandler):
    """The HTTP shell of the ``mash`` profile (CONTRACT §9): reads one request, hands it to
    ``MashBackend.handle`` and writes its Reply, or closes the connection without an answer
    (the ``drop_for`` and ``lose_answer_next`` faults)."""
    server_version = "mash-replica/1"
    protocol_version = "HTTP/1.1"
    backend: MashBackend = None      # set by serve()
    MAX_READ = 16 * 1024 * 1024      # read (and discard) a body this big rather than reset

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.MAX_READ:
            return self._drop()
        raw = self.rfile.read(length) if length else b""
        reply = self.backend.handle(method, self.path, self.headers, raw, self.client_address[0])
        if reply is None or reply.lose:
            return self._drop()
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(reply.body)))
        # headers and body in one write (see Handler._send)
        self._headers_buffer.append(b"\r\n" + (b"" if method == "HEAD" else reply.body))
        self.flush_headers()

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")
