"""Alert notifications through Apprise: real deliveries to receivers on 127.0.0.1 (an HTTP
server for ``json://`` and ``ntfy://``, aiosmtpd for ``mailto://``); nothing leaves the
machine. The worker's delivery pass is called with the time injected (``now``, ``local``):
the cap's hour and the quiet hours are tested without waiting or mocking the clock."""
import datetime as dt
import email
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from aiosmtpd.controller import Controller

from mash.alerts import AlertEvent
from mash.sinks import notify as rules
from mash.config import ConfigError, check_notify_urls, notify_sink
from mash.tasks import delivery, notify, status
from mash.tasks.context import WorkerContext
from tests.services import Dashboard, free_port, wait_for

NIGHT = dt.datetime(2026, 12, 2, 2, 0)       # local wall time, inside 22:00-06:00
MORNING = dt.datetime(2026, 12, 2, 6, 30)


class Receiver:
    """An HTTP endpoint on 127.0.0.1 recording each POST; ``down`` answers 503."""

    def __init__(self):
        self.posts, self.attempts, self.down = [], 0, False
        self.stall = None               # a threading.Event: record, then answer only once set
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.attempts += 1
                if outer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.posts.append((self.path, json.loads(body), time.time()))
                if outer.stall is not None:
                    outer.stall.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        # a client killed mid-request (the kill -9 test) is expected, not a server error
        self.server.handle_error = lambda request, address: None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, path):
        return [body for p, body, _ in self.posts if p == path]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """An SMTP server (aiosmtpd) on 127.0.0.1 keeping every message."""

    def __init__(self):
        self.messages = []
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(email.message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def texts(self):
        out = []
        for msg in self.messages:
            part = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
            out.append((msg["Subject"], part.get_payload(decode=True).decode()))
        return out

    def stop(self):
        self.controller.stop()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def mailbox():
    m = Mailbox()
    yield m
    m.stop()


@pytest.fixture
def worker_for(make_settings):
    made = []

    def make(**env):
        ctx = WorkerContext(make_settings(**env))
        made.append(ctx)
        return ctx
    yield make
    for ctx in made:
        ctx.store.close()


def co2(state, value, severity="CRITICAL", room="fruiting"):
    return AlertEvent("high_co2", severity, room, value, 1500, state, f"{room} co2 {value}")


def warning(state, value=28.0):
    return AlertEvent("high_temp", "WARNING", "fruiting", value, 26.0, state, "fruiting temp")


# -- settings -------------------------------------------------------------------------------
def test_a_bad_notify_url_is_refused_at_start_naming_the_key_not_the_secret(make_settings, run_cli,
                                                                            tmp_path):
    with pytest.raises(ConfigError) as err:
        make_settings(NOTIFY_URLS="json://127.0.0.1/ok s3cret-token-no-scheme")
    assert str(err.value) == "configuration error: NOTIFY_URLS: not a URL (scheme://...): ?://?"
    settings = make_settings(NOTIFY_URLS="json://127.0.0.1/ok nosuchscheme://user:s3cret@example.com/x")
    with pytest.raises(ConfigError) as err:
        check_notify_urls(settings.notify_urls)
    assert str(err.value) == ("configuration error: NOTIFY_URLS: not a URL Apprise can send to: "
                              "nosuchscheme://example.com (see https://github.com/caronc/apprise/wiki)")
    result = run_cli("worker", env={"MASH_DATA_DIR": str(tmp_path / "d"),
                                    "NOTIFY_URLS": "nosuchscheme://user:s3cret@example.com/x"})
    assert (result.returncode, result.stderr.strip()) == (2, str(err.value))


@pytest.mark.parametrize("key, value", [("NOTIFY_MIN_SEVERITY", "LOUD"),
                                        ("NOTIFY_QUIET_HOURS", "22-6"),
                                        ("NOTIFY_QUIET_HOURS", "22:00-22:00"),
                                        ("NOTIFY_MAX_PER_HOUR", "0")])
def test_bad_notify_settings_are_refused_naming_the_key(make_settings, key, value):
    with pytest.raises(ConfigError, match=f"^configuration error: {key}"):
        make_settings(**{key: value})


def test_notify_settings_are_read(make_settings):
    s = make_settings(NOTIFY_URLS="json://127.0.0.1:1/a  ntfy://127.0.0.1:1/t",
                      NOTIFY_QUIET_HOURS="22:00-06:30", NOTIFY_MIN_SEVERITY="warning")
    assert s.notify_quiet_hours == (22 * 60, 6 * 60 + 30) and s.notify_min_severity == "WARNING"
    assert list(s.notify_sinks.values()) == ["json://127.0.0.1:1/a", "ntfy://127.0.0.1:1/t"]
    assert "127.0.0.1:1/a" not in repr(s)


# -- the pure rules -------------------------------------------------------------------------
def test_quiet_hours_span_midnight_and_hold_below_critical():
    window = (22 * 60, 6 * 60)
    decide = lambda level, local, critical=True: rules.decide(
        level, local, [], 0.0, max_per_hour=6, quiet_hours=window, quiet_critical=critical)
    assert decide("WARNING", NIGHT) == rules.HOLD
    assert decide("WARNING", dt.datetime(2026, 12, 1, 22, 0)) == rules.HOLD
    assert decide("WARNING", MORNING) == rules.SEND
    assert decide("WARNING", dt.datetime(2026, 12, 1, 21, 59)) == rules.SEND
    assert decide("CRITICAL", NIGHT) == rules.SEND
    assert decide("CRITICAL", NIGHT, critical=False) == rules.HOLD


def test_the_cap_counts_the_last_hour_only():
    sent = [1000.0 + i for i in range(6)]
    assert rules.decide("CRITICAL", MORNING, sent, 1010.0, max_per_hour=6) == rules.SUPPRESS
    assert rules.decide("CRITICAL", MORNING, sent, 1000.0 + rules.HOUR, max_per_hour=6) == rules.SEND


def test_texts_fit_a_lock_screen():
    m = {"type": "high_co2", "event_type": "high_co2", "state": "raised", "level": "CRITICAL",
         "severity": "CRITICAL", "room": "fruiting", "value": 1850.0, "threshold": 1500.0,
         "message": "x", "timestamp": "2026-12-02T02:14:05Z"}
    utc = dt.timezone.utc
    assert rules.alert_text(m, tz=utc) == ("MASH CRITICAL: high co2",
                                           "Fruiting CO2 1,850 ppm (limit 1,500) since 02:14")
    cleared = {**m, "type": "high_co2_cleared", "state": "cleared", "severity": "INFO",
               "value": 1400.0, "timestamp": "2026-12-02T02:40:00Z"}
    assert rules.alert_text(cleared, "http://mash-pi:8080/", tz=utc) == (
        "MASH OK: high co2 cleared", "Fruiting CO2 back to 1,400 ppm at 02:40\nhttp://mash-pi:8080/")
    full = {**m, "type": "storage_full", "event_type": "storage_full", "room": None,
            "message": "store at 1,030 MB of 1,024 MB", "value": 1030.0}
    assert rules.alert_text(full, tz=utc)[1] == "store at 1,030 MB of 1,024 MB (02:14)"


# -- through the outbox, to real receivers --------------------------------------------------
def test_a_co2_episode_gives_one_raised_and_one_cleared_message_on_each_url(
        worker_for, receiver, mailbox):
    urls = [f"json://127.0.0.1:{receiver.port}/hook", f"ntfy://127.0.0.1:{receiver.port}/mash",
            f"mailto://127.0.0.1:{mailbox.port}?from=mash@farm.local&to=grower@farm.local"]
    ctx = worker_for(NOTIFY_URLS=" ".join(urls), DASHBOARD_HOST="192.168.1.20")
    ctx.store.add_alerts([warning("raised")])            # below NOTIFY_MIN_SEVERITY: no message
    O = ctx.store.m.Outbox
    assert O.select().where(O.sink.startswith("notify:")).count() == 0

    made = time.time()
    ctx.store.add_alerts([co2("raised", 1850)])
    # the 3 URLs; both alerts' backend and MQTT items stay owed (neither is configured)
    assert delivery.deliver_owed(ctx) == 3
    assert len(ctx.store.owed("backend")) == 2 and len(ctx.store.owed("mqtt")) == 2
    latency = max(t for _, _, t in receiver.posts) - made
    ctx.store.add_alerts([co2("cleared", 1400)])
    delivery.deliver_owed(ctx)
    assert delivery.deliver_owed(ctx) == 0              # nothing twice

    A = ctx.store.m.Alert
    at, at_cleared = (a.created_at.replace(tzinfo=dt.timezone.utc).astimezone().strftime("%H:%M")
                      for a in A.select().where(A.event_type == "high_co2").order_by(A.id))
    raised = ("MASH CRITICAL: high co2", f"Fruiting CO2 1,850 ppm (limit 1,500) since {at}\n"
                                         "http://192.168.1.20:8080/")
    cleared = ("MASH OK: high co2 cleared", f"Fruiting CO2 back to 1,400 ppm at {at_cleared}\n"
                                            "http://192.168.1.20:8080/")
    assert [(b["title"], b["message"]) for b in receiver.on("/hook")] == [raised, cleared]
    assert [(b["topic"], b["title"], b["message"]) for b in receiver.on("/")] == \
        [("mash", *raised), ("mash", *cleared)]
    wait_for(lambda: len(mailbox.messages) == 2, what="two mails")
    words = lambda text: " ".join(text.split())         # the mail's plain part reflows lines
    assert [(s, words(t)) for s, t in mailbox.texts()] == \
        [(title, words(body)) for title, body in (raised, cleared)]
    assert ctx.store.counters()["notify_sent"] == 6
    print(f"alert row -> receiver: {latency * 1000:.0f} ms")


def test_a_receiver_down_keeps_the_message_owed_and_delivers_it_once_after(worker_for, receiver):
    ctx = worker_for(NOTIFY_URLS=f"json://127.0.0.1:{receiver.port}/hook")
    sink = notify_sink(f"json://127.0.0.1:{receiver.port}/hook")
    receiver.down = True
    ctx.store.add_alerts([co2("raised", 1850)])
    t0 = time.time()
    assert notify.deliver_notifications(ctx, now=t0, local=MORNING) == 0
    assert notify.deliver_notifications(ctx, now=t0 + 10, local=MORNING) == 0   # backing off
    assert receiver.attempts == 1
    state = notify.url_states(ctx.store, ctx.settings)[sink]
    assert (state["owed"], state["failures"], state["url"]) == (1, 1, "json://127.0.0.1")
    assert state["last_error"] == "json://127.0.0.1: not delivered"
    assert notify.deliver_notifications(ctx, now=t0 + 31, local=MORNING) == 0   # still down
    assert receiver.attempts == 2
    receiver.down = False
    assert notify.deliver_notifications(ctx, now=t0 + 60, local=MORNING) == 0   # 60 s backoff
    assert notify.deliver_notifications(ctx, now=t0 + 92, local=MORNING) == 1
    assert notify.deliver_notifications(ctx, now=t0 + 200, local=MORNING) == 0
    assert [b["message"].split(" since")[0] for b in receiver.on("/hook")] == \
        ["Fruiting CO2 1,850 ppm (limit 1,500)"]
    state = notify.url_states(ctx.store, ctx.settings)[sink]
    assert (state["owed"], state["failures"], state["last_error"]) == (0, 0, None)


def test_twenty_alerts_in_an_hour_give_six_messages_and_one_summary_per_url(worker_for, receiver):
    urls = [f"json://127.0.0.1:{receiver.port}/a", f"json://127.0.0.1:{receiver.port}/b"]
    ctx = worker_for(NOTIFY_URLS=" ".join(urls))
    t0 = time.time()
    rooms = ["fruiting", "spawning"]
    for i in range(20):        # ten episodes: raised and cleared, alternating rooms
        ctx.store.add_alerts([co2("raised" if i % 4 < 2 else "cleared", 1600 + i, room=rooms[i % 2])])
        notify.deliver_notifications(ctx, now=t0 + i * 120, local=MORNING)
    for path in ("/a", "/b"):
        assert len(receiver.on(path)) == 6
    assert notify.deliver_notifications(ctx, now=t0 + 2400, local=MORNING) == 0
    assert notify.deliver_notifications(ctx, now=t0 + 3600 + 600, local=MORNING) == 2
    assert notify.deliver_notifications(ctx, now=t0 + 3600 + 700, local=MORNING) == 0
    for path in ("/a", "/b"):
        bodies = receiver.on(path)
        assert len(bodies) == 7
        assert bodies[-1]["message"] == ("14 more alert messages suppressed in the last hour "
                                         "(NOTIFY_MAX_PER_HOUR)")
    assert ctx.store.counters()["notify_suppressed"] == 28
    assert not any(ctx.store.owed(s) for s in ctx.settings.notify_sinks)


def test_quiet_hours_hold_a_warning_and_let_a_critical_through(worker_for, receiver):
    ctx = worker_for(NOTIFY_URLS=f"json://127.0.0.1:{receiver.port}/hook",
                     NOTIFY_MIN_SEVERITY="WARNING", NOTIFY_QUIET_HOURS="22:00-06:00")
    ctx.store.add_alerts([warning("raised")])
    ctx.store.add_alerts([co2("raised", 1850)])
    ctx.store.add_alerts([warning("cleared", 25.0)])
    t0 = time.time()
    assert notify.deliver_notifications(ctx, now=t0, local=NIGHT) == 1
    assert [b["title"] for b in receiver.on("/hook")] == ["MASH CRITICAL: high co2"]
    assert notify.deliver_notifications(ctx, now=t0 + 60, local=NIGHT) == 0      # still held
    assert notify.deliver_notifications(ctx, now=t0 + 4 * 3600, local=MORNING) == 2
    assert [b["title"] for b in receiver.on("/hook")] == [
        "MASH CRITICAL: high co2", "MASH WARNING: high temp", "MASH OK: high temp cleared"]


def test_a_removed_url_lets_its_owed_items_go(worker_for, make_settings, receiver):
    ctx = worker_for(NOTIFY_URLS=f"json://127.0.0.1:{receiver.port}/old")
    receiver.down = True
    ctx.store.add_alerts([co2("raised", 1850)])
    notify.deliver_notifications(ctx)
    later = worker_for()                          # the worker restarted without NOTIFY_URLS
    assert later.store.meta_get("notify_routes") is None
    delivery.deliver_owed(later)
    assert later.store.outbox.owed_sinks("notify:") == []     # its items let go; the others stay owed
    later.store.add_alerts([co2("raised", 1900)])
    O = later.store.m.Outbox
    assert O.select().where(O.sink.startswith("notify:") & O.done_at.is_null()).count() == 0


# -- trying it ------------------------------------------------------------------------------
def test_mash_notify_test_sends_to_each_url_and_reports_a_failure_redacted(run_cli, tmp_path, receiver):
    env = {"MASH_DATA_DIR": str(tmp_path / "d"),
           "NOTIFY_URLS": f"json://u:s3cret@127.0.0.1:{receiver.port}/hook "
                          f"json://127.0.0.1:{free_port()}/nobody"}
    result = run_cli("notify", "--test", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == ["✓ json://127.0.0.1: delivered",
                                          "✗ json://127.0.0.1: not delivered"]
    assert [b["message"] for b in receiver.on("/hook")] == ["Test notification from the MASH gateway"]
    assert "s3cret" not in result.stdout + result.stderr


def test_doctor_checks_each_url_and_sends_with_send(run_cli, tmp_path, receiver):
    env = {"MASH_DATA_DIR": str(tmp_path / "d"), "SERIAL_PORT": "sim",
           "NOTIFY_URLS": f"ntfy://127.0.0.1:{receiver.port}/mash"}
    lines = run_cli("doctor", env=env).stdout.splitlines()
    assert "✓ notify ntfy://127.0.0.1: Apprise accepts the URL" in lines
    assert "– notify delivery: not tried (mash doctor --send sends a test message)" in lines
    assert receiver.posts == []
    lines = run_cli("doctor", "--send", env=env).stdout.splitlines()
    assert "✓ notify send ntfy://127.0.0.1: delivered" in lines
    assert [b["message"] for b in receiver.on("/")] == ["Test notification from mash doctor"]


def test_mash_status_shows_each_urls_deliveries_and_failures(worker_for, run_cli, data_dir, receiver):
    url = f"json://127.0.0.1:{receiver.port}/hook"
    ctx = worker_for(NOTIFY_URLS=url)
    ctx.store.add_alerts([co2("raised", 1850)])
    receiver.down = True
    notify.deliver_notifications(ctx)
    env = {"MASH_DATA_DIR": str(data_dir), "NOTIFY_URLS": url}
    lines = [l for l in run_cli("status", env=env).stdout.splitlines() if l.startswith("notify:")]
    assert lines == ["notify:   json://127.0.0.1: last sent never, 0 sent, 1 owed, 0 suppressed, "
                     "1 failures (json://127.0.0.1: not delivered)"]


def test_the_dashboards_test_button_is_guarded_and_sent_by_the_worker(tmp_path, data_dir, worker_for,
                                                                     receiver):
    dash = Dashboard(tmp_path / "dash", {**os.environ, "MASH_DATA_DIR": str(data_dir)})
    try:
        dash.start()
        s = requests.Session()
        s.get(dash.url + "/", timeout=10)
        assert s.post(dash.url + "/api/notify-test", json={}, timeout=10).status_code == 403
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', s.get(dash.url + "/", timeout=10).text).group(1)
        h = {"X-CSRF-Token": csrf}
        r = s.post(dash.url + "/api/notify-test", json={}, headers=h, timeout=10)
        assert r.status_code == 400 and "NOTIFY_URLS" in r.json()["error"]
        ctx = worker_for(NOTIFY_URLS=f"json://127.0.0.1:{receiver.port}/hook",
                         NOTIFY_QUIET_HOURS="00:00-23:59")      # a test message is never held
        r = s.post(dash.url + "/api/notify-test", json={}, headers=h, timeout=10)
        assert (r.status_code, r.json()) == (200, {"urls": 1, "status": "queued"})
        assert ctx.store.has_undelivered(urgent_only=True)      # the worker wakes for it
        assert notify.deliver_notifications(ctx, local=NIGHT) == 1
        assert [b["message"] for b in receiver.on("/hook")] == ["Test notification from the MASH dashboard"]
        assert not ctx.store.has_undelivered()
    finally:
        dash.stop()


def test_the_board_lost_for_five_minutes_reaches_the_phone_once_and_its_return_too(worker_for,
                                                                                  receiver):
    ctx = worker_for(NOTIFY_URLS=f"ntfy://127.0.0.1:{receiver.port}/mash")
    lost = "2026-01-01T00:00:00.000Z"
    ctx.store.beat("reader", 60, board={"connected": False, "since": lost, "port": None,
                                        "problem": "no board found"})
    status.heartbeat(ctx)
    status.heartbeat(ctx)                     # still lost: not raised again
    notify.deliver_notifications(ctx, local=MORNING)
    ctx.store.beat("reader", 60, board={"connected": True, "since": lost, "port": "/dev/ttyACM0",
                                        "problem": None})
    status.heartbeat(ctx)
    status.heartbeat(ctx)
    notify.deliver_notifications(ctx, local=MORNING)
    got = [(b["title"], b["message"].rsplit(" ", 1)[0]) for b in receiver.on("/")]
    assert got == [("MASH CRITICAL: board lost", f"board lost since {lost}: no board found"),
                   ("MASH OK: board lost cleared", "board connected again")]


KILLED_WORKER = """
from mash.config import Settings
from mash.tasks.context import WorkerContext
from mash.tasks.notify import deliver_notifications
deliver_notifications(WorkerContext(Settings.load()))
"""


def test_a_worker_killed_mid_delivery_sends_again_and_counts_it(worker_for, data_dir, receiver):
    """kill -9 between the receiver taking the message and the worker recording it: the
    message goes again (at least once) and ``notify_resent`` says so."""
    url = f"json://127.0.0.1:{receiver.port}/hook"
    ctx = worker_for(NOTIFY_URLS=url)
    ctx.store.add_alerts([co2("raised", 1850)])
    receiver.stall = threading.Event()
    env = {**os.environ, "MASH_DATA_DIR": str(data_dir), "NOTIFY_URLS": url, "CLOCK_SYNC": "trust"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER], env=env)
    try:
        wait_for(lambda: len(receiver.posts) == 1, timeout=30, what="the message at the receiver")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        receiver.stall.set()
        if proc.poll() is None:
            proc.kill()
    receiver.stall = None
    assert len(ctx.store.owed(notify_sink(url))) == 1            # not recorded: still owed
    assert notify.deliver_notifications(ctx, local=MORNING) == 1
    assert notify.deliver_notifications(ctx, local=MORNING) == 0
    assert len(receiver.on("/hook")) == 2
    assert ctx.store.counters()["notify_resent"] == 1


def test_a_critical_alert_reaches_the_phone_from_a_real_worker_with_the_cloud_down(
        tmp_path, data_dir, store, receiver):
    """The issue's bar: the worker process (``mash worker``), the backend unreachable, an
    alert committed by another process (the reader's side): one message, within seconds."""
    url = f"json://127.0.0.1:{receiver.port}/hook"
    env = {**os.environ, "MASH_DATA_DIR": str(data_dir), "NOTIFY_URLS": url,
           "CLOCK_SYNC": "trust", "BACKEND_URL": f"http://127.0.0.1:{free_port()}",
           "DEVICE_EMAIL": "gw@farm.local", "DEVICE_PASSWORD": "not-used-here"}
    proc = subprocess.Popen([sys.executable, "-m", "mash", "worker"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.meta_get("notify_routes") and
                 store.processes().get("worker", {}).get("alive"), timeout=30, what="the worker")
        made = time.time()
        store.add_alerts([co2("raised", 1850)])
        wait_for(lambda: receiver.on("/hook"), timeout=30, what="the message")
        latency = receiver.posts[0][2] - made
        sink = notify_sink(url)
        wait_for(lambda: not store.owed(sink), timeout=10, what="the delivery recorded")
        assert len(receiver.on("/hook")) == 1     # recorded done: no later sweep sends it
        assert store.owed("backend"), "the backend's copy stays owed through the outage"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"worker: alert row -> receiver {latency * 1000:.0f} ms")
