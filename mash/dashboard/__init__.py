"""``mash dashboard``: the grower's page, a third process over the same store.

Flask for the routes and templates (Jinja escapes everything it renders), served by waitress
(pure Python, threads, no compiler: it runs on a Pi as it is). It reads the store through a
read-only connection (``Store(readonly=True)``) and writes only through the paths the other
processes use (``actions``, and its login secrets), on a writable one. Each request is judged
on its own: a ``Host`` that is not this machine's is refused (DNS rebinding); without a
password only a direct request from this machine to a loopback name is served
(``auth.direct_local``), so behind a reverse proxy the password is needed; listening beyond
loopback needs one too. A session cookie (HttpOnly, SameSite=Strict), signed with a key that
``set-password`` rotates, and a CSRF token guard every POST; ten wrong passwords in a minute
lock the login out for the rest of that minute.

    mash dashboard                      # http://127.0.0.1:8080
    mash dashboard set-password         # needed for DASHBOARD_HOST other than loopback
"""
from __future__ import annotations

import collections
import datetime as dt
import hmac
import http.client
import logging
import os
import signal
import sys
import sqlite3
import threading
import time

from flask import Flask, Response, abort, jsonify, redirect, render_template, request, session, url_for
from waitress.server import create_server

from mash.clock import iso, utcnow
from mash.config import ConfigError, Settings, is_loopback
from mash.contract import ACTUATORS, ROOMS
from mash import sdnotify
from mash.dashboard import actions, auth, charts, data, lan, mdns, pairing, phone
from mash.logs import OncePerKind, start_process
from mash.models import Store

log = logging.getLogger("mash.dashboard")

NAMES = {"MIST_MAKER": "Mist maker", "HUMIDIFIER_FAN": "Humidifier fan",
         "FRUITING_EXHAUST_FAN": "Fruiting exhaust fan", "FRUITING_INTAKE_FAN": "Fruiting intake fan",
         "SPAWNING_EXHAUST_FAN": "Spawning exhaust fan", "DEVICE_EXHAUST_FAN": "Device exhaust fan",
         "FRUITING_LED": "Fruiting LED"}
STATE_CACHE_S = 0.5         # /api/state is recomputed at most twice a second, and only on change
DRAIN_WINDOW_S = 10.0


class Drain:
    """The drain's progress from the backlog's recent history: readings/s and ETA."""

    def __init__(self):
        self.samples: collections.deque = collections.deque(maxlen=120)

    def add(self, pending: int) -> dict:
        now = time.monotonic()
        self.samples.append((now, pending))
        old = [(t, p) for t, p in self.samples if now - t <= DRAIN_WINDOW_S]
        t0, p0 = old[0]
        rate = (p0 - pending) / (now - t0) if now - t0 >= 1.0 and p0 > pending else 0.0
        return {"running": rate > 0 and pending > 0, "rate": round(rate, 1),
                "eta_s": round(pending / rate) if rate > 0 else None}


def create_app(settings: Settings, store: Store | None = None,
               reads: Store | None = None) -> Flask:
    """The app over ``store`` (writable: the grower's actions, the login secrets) and
    ``reads`` (the same file read-only: every page and chart)."""
    store = store or Store(settings.db_path)
    reads = reads or Store(store.path, readonly=True)
    app = Flask(__name__)
    app.session_interface = auth.StoreKeyedSessions(store)
    names = auth.own_names(settings.dashboard_host)
    foreign = OncePerKind(log, "dashboard: refused a request for a Host that is not this "
                               "machine's name (DNS rebinding?)")
    app.config.update(SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_NAME="mash_session",
                      PERMANENT_SESSION_LIFETIME=dt.timedelta(days=7), JSON_SORT_KEYS=False)
    limiter = auth.LoginLimiter()
    drain = Drain()
    chart_series = data.SeriesCache()
    sync_now = actions.SyncNow()
    cache = {"at": 0.0, "version": None, "body": None}
    cache_lock = threading.Lock()
    # SQLite's data_version only compares within one connection (and never counts that
    # connection's own commits): one read-only connection, used under the lock, for it alone
    watch = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, check_same_thread=False)

    def client() -> str:
        return request.remote_addr or "?"

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = auth.new_csrf_token()
        return session["csrf"]

    def logged_in() -> bool:
        """With a password: a session that logged in with it (under the current signing
        key). Without one: this request came straight from this machine (never a session:
        a cookie made on loopback must not open the page through a proxy)."""
        if auth.has_password(store):
            return bool(session.get("auth"))
        return direct_local()

    def direct_local() -> bool:
        return auth.direct_local(request.remote_addr, request.headers.get("Host"), request.headers)

    def refused(message: str, status: int = 403):
        if request.path.startswith("/api/") or request.method == "POST":
            return jsonify(error=message), status
        return Response(message + "\n", status, mimetype="text/plain")

    @app.before_request
    def door():
        """Before any route (static files too): the Host, then the passwordless rule."""
        if not auth.known_host(auth.host_name(request.headers.get("Host")), names):
            if len(foreign.seen) < 100:               # one line per name, a bounded few
                foreign(repr((request.headers.get("Host") or "")[:100]), f"from {client()}")
            return refused("this dashboard answers to this machine's own names and addresses only")
        if not auth.has_password(store) and not direct_local():
            return refused("no dashboard password is set, so only a direct request from this "
                           "machine (http://127.0.0.1 or http://localhost) is served; run "
                           "`mash dashboard set-password` to reach it any other way "
                           "(a reverse proxy, another address)")
        return None

    def csrf_ok() -> bool:
        sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
        expected = session.get("csrf") or ""
        return bool(expected) and hmac.compare_digest(sent, expected)

    def guarded_post():
        """403 without a session or without the CSRF token; the JSON body otherwise."""
        if not logged_in():
            abort(Response('{"error":"log in first"}', 403, mimetype="application/json"))
        if not csrf_ok():
            abort(Response('{"error":"missing or wrong CSRF token: reload the page"}', 403,
                           mimetype="application/json"))
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(Response('{"error":"send a JSON object"}', 400, mimetype="application/json"))
        return body

    @app.after_request
    def headers(resp):
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self'; "
                                                   "style-src 'self'; script-src 'self'; "
                                                   "frame-ancestors 'none'; form-action 'self'")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(actions.ActionError)
    def bad_input(exc):
        return jsonify(error=str(exc)), 400

    # -- pages -------------------------------------------------------------------------------
    @app.get("/login")
    def login_page():
        if logged_in():
            return redirect(url_for("index"))
        return render_template("login.html", csrf=csrf_token(), error=None)

    @app.post("/login")
    def login():
        wait = limiter.wait_for(client())
        if wait > 0:
            time.sleep(auth.LoginLimiter.DELAY)
            return render_template("login.html", csrf=csrf_token(),
                                   error=f"Too many wrong passwords: try again in {wait:.0f} s."), 429
        if not csrf_ok():
            return render_template("login.html", csrf=csrf_token(),
                                   error="The form expired: try again."), 403
        if not auth.check_password(store, request.form.get("password", "")):
            limiter.failed(client())
            log.warning("dashboard: wrong password from %s", client())
            return render_template("login.html", csrf=csrf_token(), error="Wrong password."), 401
        limiter.succeeded(client())
        session.clear()
        session.permanent = True
        session["auth"] = True
        session["csrf"] = auth.new_csrf_token()
        log.info("dashboard: logged in from %s", client())
        return redirect(url_for("index"))

    @app.post("/logout")
    def logout():
        if csrf_ok():
            session.clear()
        return redirect(url_for("login_page"))

    @app.get("/")
    def index():
        if not logged_in():
            return redirect(url_for("login_page"))
        return render_template("index.html", csrf=csrf_token(), device=settings.device_id,
                               rooms=ROOMS, actuators=[(a, NAMES.get(a, a)) for a in ACTUATORS],
                               metrics=data.METRICS, password=auth.has_password(store))

    # -- pairing a phone (CONTRACT §10) ----------------------------------------------------------
    def advertising() -> bool:
        """Our own advertiser (this process) answers for the .local name now."""
        state = mdns.live(reads) or {}
        return bool(state.get("pid") == os.getpid() and state.get("addresses"))

    def pairing_view() -> dict:
        addresses = lan.lan_ipv4()
        port = app.config.get("DASHBOARD_PORT") or settings.dashboard_port
        links = pairing.links(settings, advertising(), addresses, dashboard_port=port,
                              phone_port=app.config.get("PHONE_PORT"))
        if settings.phone_api != "off" and app.config.get("PHONE_PORT") is None:
            links["app"] = {"url": None, "by_name": None, "by_address": None,
                            "note": "not running: its port could not be had (see the log)"}
        payload = None
        if links["app"]["url"]:                 # the app's QR carries the address, always
            payload = pairing.app_payload(settings, lan.url_host(
                settings.device_id, False, settings.phone_api_host, addresses),
                app.config.get("PHONE_PORT"))
        return {"addresses": addresses, "advertised": advertising(), "links": links,
                "payload": payload, "host": lan.host_name(settings.device_id)}

    @app.get("/pair")
    def pair_page():
        if not logged_in():
            return redirect(url_for("login_page"))
        return render_template("pair.html", csrf=csrf_token(), device=settings.device_id,
                               phone_api=settings.phone_api, **pairing_view())

    @app.get("/qr/<which>.svg")
    def qr_image(which):
        if not logged_in():
            return Response("log in first", 403)
        view = pairing_view()
        text = view["payload"] if which == "app" else \
            view["links"]["dashboard"]["url"] if which == "dashboard" else None
        if not text:
            return Response("nothing to pair with", 404)
        return Response(pairing.svg(text), mimetype="image/svg+xml")

    # -- data --------------------------------------------------------------------------------
    @app.get("/api/state")
    def state():
        if not logged_in():
            return jsonify(error="log in first"), 403
        with cache_lock:
            version = watch.execute("PRAGMA data_version").fetchone()[0]
            now = time.monotonic()
            if cache["body"] is None or (version != cache["version"] and
                                         now - cache["at"] >= STATE_CACHE_S) or now - cache["at"] >= 5:
                snap = data.snapshot(settings, reads)
                snap["cloud"]["drain"] = drain.add(snap["cloud"]["pending"])
                cache.update(at=now, version=version, body=snap)
            return jsonify({**cache["body"], "served": iso(utcnow())})

    @app.get("/chart/<room>/<metric>.svg")
    def chart(room, metric):
        if not logged_in():
            return Response("log in first", 403)
        if room not in ROOMS or metric not in data.METRICS:
            return Response("no such chart", 404)
        days = 7 if request.args.get("days") == "7" else 1
        end, points = chart_series.get(reads, room, days * 24.0)
        label, unit, low_key, high_key = data.METRICS[metric]
        limits = data.thresholds(settings, reads).get(room, {})
        body = charts.svg(points, metric, label, unit, limits.get(low_key) if low_key else None,
                          limits.get(high_key) if high_key else None,
                          end - dt.timedelta(days=days), end,
                          f"{room} {label.lower()}, last {'7 days' if days == 7 else '24 h'}")
        return Response(body, mimetype="image/svg+xml")

    # -- controls ----------------------------------------------------------------------------
    @app.post("/api/sync")
    def sync():
        guarded_post()
        result = sync_now(store)
        log.info("dashboard: sync now (%d pending)", result["pending"])
        return jsonify(result)

    @app.post("/api/notify-test")
    def notify_test():
        guarded_post()
        urls = actions.test_notification(store)
        log.info("dashboard: test notification to %d URL(s)", urls)
        return jsonify(urls=urls, status="queued")

    @app.post("/api/actuator")
    def actuator():
        body = guarded_post()
        command_id = actions.switch(store, body.get("actuator"), body.get("state"))
        log.info("dashboard: %s %s (%s)", body.get("actuator"), body.get("state"), command_id)
        return jsonify(id=command_id, status="queued")

    @app.post("/api/thresholds")
    def thresholds():
        body = guarded_post()
        command_id, merged = actions.configure(settings, store, {"thresholds": body.get("thresholds")})
        log.info("dashboard: alert limits changed (%s)", command_id)
        return jsonify(id=command_id, thresholds=data.thresholds(settings, reads))

    @app.post("/api/mode")
    def mode():
        body = guarded_post()
        command_id = actions.set_mode(settings, store, body.get("room"), body.get("mode"))
        log.info("dashboard: %s set to %s (%s)", body.get("room"), body.get("mode"), command_id)
        return jsonify(id=command_id)

    return app


def check_exposure(settings: Settings, store: Store) -> None:
    """Refuse any address but loopback until a password is set."""
    if not is_loopback(settings.dashboard_host) and not auth.has_password(store):
        raise ConfigError("DASHBOARD_HOST", "listening beyond this machine needs a password: "
                                            "run `mash dashboard set-password` first",
                          settings.dashboard_host)


def main() -> int:
    """``python -m mash.dashboard`` (what its unit and ``mash run`` start): the dashboard
    with only its own imports, not the whole ``mash`` command's."""
    settings = start_process()
    if settings is None:
        return 2
    try:
        return serve(settings)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or Ctrl-C."""
    store = Store(settings.db_path)
    check_exposure(settings, store)
    reads = Store(store.path, readonly=True)
    app = create_app(settings, store, reads)
    # proxy headers reach the app untouched: their presence is what says "through a proxy"
    # (auth.direct_local); the app never takes an address or scheme from them
    server = create_server(app, host=settings.dashboard_host, port=settings.dashboard_port,
                           threads=4, ident="mash", clear_untrusted_proxy_headers=False)
    phone_server = start_phone_api(settings, store, reads)
    # waitress gives its port as text
    app.config["PHONE_PORT"] = int(phone_server.effective_port) if phone_server else None
    app.config["DASHBOARD_PORT"] = int(server.effective_port)
    advertiser = None
    if settings.mdns:
        advertiser = mdns.Advertiser(settings, store, dashboard_port=app.config["DASHBOARD_PORT"],
                                     phone_port=app.config["PHONE_PORT"]).start()
    else:
        log.info("mDNS: off (MDNS=0)")
    stopped = threading.Event()

    def stop(*_):
        stopped.set()
        sdnotify.stopping()
        server.close()
        if phone_server is not None:
            phone_server.close()
    signal.signal(signal.SIGTERM, stop)
    log.info("dashboard on http://%s:%s", settings.dashboard_host, server.effective_port)
    watchdog = sdnotify.Watchdog()
    if watchdog.enabled:
        host = "127.0.0.1" if settings.dashboard_host in ("0.0.0.0", "") else \
            "::1" if settings.dashboard_host == "::" else settings.dashboard_host
        threading.Thread(target=_watch_serving, args=(watchdog, host, server.effective_port,
                                                      stopped), name="watchdog", daemon=True).start()
    sdnotify.ready()
    try:
        server.run()
    except (KeyboardInterrupt, OSError, ValueError):
        pass                                         # closed by the signal handler
    if phone_server is not None:
        phone_server.close()
    if advertiser is not None:
        advertiser.stop()                            # goodbyes: browsers drop us at once
    log.info("dashboard stopped")
    return 0


def start_phone_api(settings: Settings, store: Store, reads: Store):
    """The grower app's API (``phone``) on its own waitress server in a thread of this
    process, or None when ``PHONE_API=off`` or its port cannot be had (the dashboard goes on
    without it, and says why)."""
    if settings.phone_api == "off":
        log.info("phone API: off (PHONE_API=off)")
        return None
    try:
        server = create_server(phone.create_app(settings, store, reads),
                               host=settings.phone_api_host, port=settings.phone_api_port,
                               threads=2, ident="mash", clear_untrusted_proxy_headers=False)
    except OSError as exc:
        log.error("phone API: cannot listen on %s:%s (%s): the grower app will not find "
                  "this gateway", settings.phone_api_host, settings.phone_api_port, exc.strerror)
        return None
    threading.Thread(target=_run_quietly, args=(server,), name="phone-api", daemon=True).start()
    log.info("phone API (%s) on http://%s:%s/api", settings.phone_api, settings.phone_api_host,
             server.effective_port)
    return server


def _run_quietly(server) -> None:
    try:
        server.run()
    except (OSError, ValueError):
        pass                                         # closed at stop


def _watch_serving(watchdog: sdnotify.Watchdog, host: str, port: int, stopped) -> None:
    """systemd's watchdog, pinged only when the dashboard answers a request of its own (the
    login page): a hung server stops the pings and is restarted."""
    while not stopped.wait(min(watchdog.every, 10.0)):
        try:
            conn = http.client.HTTPConnection(host, port, timeout=watchdog.every)
            conn.request("GET", "/login")
            ok = conn.getresponse().status < 500
            conn.close()
        except OSError:
            ok = False
        if ok:
            watchdog.ping()
