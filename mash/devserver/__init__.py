"""The reference backend: a stand-in for the MASH NestJS backend, on loopback only.

Every endpoint of CONTRACT.md section 2 under ``/api/v1``, with the validation, envelope, JWT
lifetimes and 429s of the real one, persisted to SQLite through peewee. It is what local runs
and the tests talk to over real HTTP. Faithful, not convenient: it rejects what the real
backend would reject. Admin endpoints (``/api/v1/admin/...``, no auth, loopback only) issue
commands, inspect what arrived and switch faults on (503s, latency, dropped connections, 401s
to everything for a while, readings refused with a 400, a lower per-request limit).

``--profile mash`` serves instead a replica of the backend the MASH team deployed (CONTRACT
§9, ``mash.devserver.mash``), bugs included, with its test hooks under ``/__replica/``.
"""
from __future__ import annotations

import os
from http.server import ThreadingHTTPServer

import requests

from mash.config import Settings
from mash.devserver.backend import Backend
from mash.devserver.http import PREFIX, Handler, MashHandler
from mash.devserver.mash import MashBackend
from mash.logs import setup_logging


# per profile: access ttl, refresh ttl, rate limit, rate window, a populated database
PROFILE_DEFAULTS = {"guide": (900.0, 7 * 86400.0, 0, 60.0, False),
                    "mash": (86400.0, 30 * 86400.0, 20, 60.0, True)}


def serve(backend: Backend | MashBackend, host: str = "127.0.0.1",
          port: int = 0) -> ThreadingHTTPServer:
    base = MashHandler if isinstance(backend, MashBackend) else Handler
    handler = type("BoundHandler", (base,), {"backend": backend})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(args) -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("the reference backend listens on loopback only", flush=True)
        return 2
    users = [tuple(u.split(":", 1)) for u in args.user if ":" in u]
    if not users:
        s = Settings.load()
        if s.device_email and s.device_password:
            users = [(s.device_email, s.device_password)]
    profile = getattr(args, "profile", None) or "guide"
    given = (args.access_ttl, args.refresh_ttl, args.rate_limit, args.rate_window,
             getattr(args, "populated", None))
    access_ttl, refresh_ttl, rate_limit, rate_window, populated = (
        default if value is None else value
        for value, default in zip(given, PROFILE_DEFAULTS[profile]))
    if profile == "mash":
        os.makedirs(os.path.dirname(os.path.abspath(args.db)), exist_ok=True)
        backend = MashBackend(args.db, secret=args.secret, access_ttl=access_ttl,
                              refresh_ttl=refresh_ttl, rate_limit=rate_limit,
                              rate_window=rate_window, users=users, populated=populated)
    else:
        backend = Backend(args.db, secret=args.secret, access_ttl=access_ttl,
                          refresh_ttl=refresh_ttl, rate_limit=rate_limit,
                          rate_window=rate_window, users=users)
    server = serve(backend, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"mash devserver listening on http://{host}:{port}{PREFIX} (profile {profile}, "
          f"accounts: {', '.join(u for u, _ in users) or 'none'})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def issue_command(url: str, device: str, command: str, parameters: dict,
                  expires_in: float | None = None) -> dict:
    """Queue a command for ``device`` on a running reference backend (the admin endpoint)."""
    base = url.rstrip("/")
    base = base if base.endswith(PREFIX) else base + PREFIX
    body = {"command": command, "parameters": parameters}
    if expires_in is not None:
        body["expiresIn"] = expires_in
    r = requests.post(f"{base}/admin/devices/{device}/commands", json=body, timeout=10)
    r.raise_for_status()
    data = r.json()
    return data.get("data", data)

