"""The dashboard over real HTTP (``mash dashboard`` served by waitress on loopback): the door
(password hash, login, rate limit, session cookie flags), the guards on every control (403
without a session or CSRF token, 400 with a clear message), and what it reads and writes."""
import datetime as dt
import json
import re

import pytest
import requests

from mash.alerts import AlertEvent
from mash.clock import utcnow
from mash.dashboard import data
from mash.models import Store
from tests.services import Dashboard

PASSWORD = "grower-secret-1"


@pytest.fixture
def dash(tmp_path, data_dir):
    store = Store(data_dir / "mash.db")
    d = Dashboard(tmp_path / "dash", {**__import__("os").environ, "MASH_DATA_DIR": str(data_dir)})
    d.store = store
    yield d
    d.stop()


def login(d, password=PASSWORD) -> requests.Session:
    s = requests.Session()
    page = s.get(d.url + "/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = s.post(d.url + "/login", data={"password": password, "csrf_token": token},
               allow_redirects=False, timeout=10)
    s.last = r
    if r.status_code == 302:
        s.csrf = re.search(r'name="csrf-token" content="([^"]+)"', s.get(d.url + "/", timeout=10).text).group(1)
    return s


def test_set_password_stores_a_salted_hash_and_needs_it_twice(dash):
    assert dash.mash("dashboard", "set-password", input="one-password\nanother-one\n").returncode == 2
    assert dash.mash("dashboard", "set-password", input="short\nshort\n").returncode == 2
    done = dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    stored = dash.store.meta_get("dashboard.password")
    assert stored.startswith("scrypt:") and PASSWORD not in stored


def test_refuses_to_listen_beyond_loopback_without_a_password(dash):
    dash.env["DASHBOARD_HOST"] = "0.0.0.0"
    result = dash.mash("dashboard", timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: DASHBOARD_HOST=0.0.0.0: listening beyond this machine needs a "
        "password: run `mash dashboard set-password` first"]


def test_login_wrong_password_rate_limit_and_cookie_flags(dash):
    dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n")
    dash.start()
    assert requests.get(dash.url + "/", allow_redirects=False, timeout=10).status_code == 302
    assert requests.get(dash.url + "/api/state", timeout=10).status_code == 403
    s = login(dash)
    assert s.last.status_code == 302
    cookie = s.last.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert s.get(dash.url + "/api/state", timeout=10).status_code == 200
    for _ in range(10):
        assert login(dash, "wrong").last.status_code == 401
    slowed = login(dash, PASSWORD)                 # the right one, but too soon after ten wrong
    assert slowed.last.status_code == 429 and "Too many wrong passwords" in slowed.last.text
    log = dash.logs()
    assert PASSWORD not in log and "wrong password from 127.0.0.1" in log


def test_controls_refuse_without_session_or_csrf_and_explain_bad_input(dash):
    dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n")
    dash.start()
    body = {"actuator": "MIST_MAKER", "state": "ON"}
    for path in ("/api/sync", "/api/actuator", "/api/thresholds", "/api/mode"):
        assert requests.post(dash.url + path, json=body, timeout=10).status_code == 403
    s = login(dash)
    r = s.post(dash.url + "/api/actuator", json=body, timeout=10)          # no CSRF token
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = s.post(dash.url + "/api/actuator", json=body, headers={"X-CSRF-Token": "forged"}, timeout=10)
    assert r.status_code == 403
    h = {"X-CSRF-Token": s.csrf}
    cases = [("/api/actuator", {"actuator": "KETTLE", "state": "ON"}, "unknown actuator"),
             ("/api/actuator", {"actuator": "MIST_MAKER", "state": "HALF"}, "state"),
             ("/api/thresholds", {"thresholds": {"fruiting": {"temp_max": "hot"}}}, "temp_max"),
             ("/api/thresholds", {"thresholds": {"cellar": {"temp_max": 20}}}, "cellar"),
             ("/api/mode", {"room": "fruiting", "mode": "turbo"}, "mode")]
    for path, payload, word in cases:
        r = s.post(dash.url + path, json=payload, headers=h, timeout=10)
        assert r.status_code == 400 and word in r.json()["error"], (path, r.text)
    r = s.post(dash.url + "/api/actuator", data="not json", headers=h, timeout=10)
    assert r.status_code == 400

    # and what a valid control does: the ledger (source local), the same merge as CONFIGURE
    r = s.post(dash.url + "/api/actuator", json=body, headers=h, timeout=10)
    assert r.status_code == 200
    cmd = dash.store.m.Command.get(command_id=r.json()["id"])
    assert (cmd.source, cmd.status, json.loads(cmd.parameters)) == ("local", "queued", body)
    r = s.post(dash.url + "/api/thresholds", json={"thresholds": {"fruiting": {"temp_max": 27}}},
               headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["thresholds"]["fruiting"]["temp_max"] == 27
    assert dash.store.meta_get("configuration")["thresholds"] == {"fruiting": {"temp_max": 27}}
    ack = dash.store.m.Command.get(command_id=r.json()["id"])
    assert (ack.command, ack.source, ack.status) == ("CONFIGURE", "local", "completed")
    r = s.post(dash.url + "/api/mode", json={"room": "spawning", "mode": "manual"}, headers=h, timeout=10)
    assert r.status_code == 200
    assert s.get(dash.url + "/api/state", timeout=10).json()["mode"]["spawning"] == "manual"


def test_state_and_page_never_carry_a_secret_and_alerts_are_data(dash, tmp_path):
    dash.env.update(DEVICE_PASSWORD="backend-pass-xyz", MQTT_PASSWORD="mqtt-pass-xyz",
                    BACKEND_URL="http://127.0.0.1:9", DEVICE_EMAIL="d@example.com",
                    MQTT_BROKER="127.0.0.1")
    dash.store.add_alerts([AlertEvent("high_co2", "CRITICAL", "fruiting", 1600.0, 1500.0, "raised",
                                      "<script>alert(1)</script> CO2 high")])
    dash.start()
    s = requests.Session()
    page = s.get(dash.url + "/", timeout=10).text          # no password set: loopback, open
    state = s.get(dash.url + "/api/state", timeout=10)
    assert state.headers["Content-Type"].startswith("application/json")
    assert state.json()["alerts"]["active"][0]["message"] == "<script>alert(1)</script> CO2 high"
    for text in (page, state.text):
        for secret in ("backend-pass-xyz", "mqtt-pass-xyz", "scrypt:"):
            assert secret not in text
    assert "script-src 'self'" in s.get(dash.url + "/", timeout=10).headers["Content-Security-Policy"]


def test_chart_is_downsampled_to_1000_points_with_the_limits_drawn(store):
    S = store.m.SensorData
    now = utcnow()
    rows = []
    for i in range(0, 7 * 86400, 30):                           # a week, two rooms, every 30 s
        ts = now - dt.timedelta(seconds=7 * 86400 - i)
        for room in ("fruiting", "spawning"):
            rows.append({"room": room, "temperature": 24.0, "humidity": 80 + (i % 600) / 60,
                         "co2": 900, "timestamp": ts, "fb_key": "k"})
    with store.transaction():
        for k in range(0, len(rows), 2000):
            S.insert_many(rows[k:k + 2000]).execute()
    week = data.series(store, "fruiting", 7 * 24, now)
    day = data.series(store, "fruiting", 24, now)
    assert 900 < len(week) <= data.MAX_POINTS and 900 < len(day) <= data.MAX_POINTS
    assert all(w["t"] >= now - dt.timedelta(days=7) for w in week)
    assert day[0]["t"] >= now - dt.timedelta(hours=24, seconds=1)
    from mash.dashboard import charts
    svg = charts.svg(day, "humidity", "Humidity", "%", 80.0, None, now - dt.timedelta(hours=24), now,
                     "fruiting humidity")
    assert svg.count("<polyline") == 1 and 'class="band"' in svg
    assert len(re.search(r'points="([^"]+)"', svg).group(1).split()) == len(day)
