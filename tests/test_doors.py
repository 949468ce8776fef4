"""Doors shut: the gateway's files are its user's alone (and `mash doctor` says when they are
not); the dashboard judges every request by its client address, Host and proxy headers, so
a passwordless one behind a reverse proxy controls nothing and a rebinding Host is refused;
`set-password` logs every session out; plain MQTT and http Firebase only on loopback."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from mash.config import ConfigError, Settings
from mash.models import Store
from tests.services import ROOT, Dashboard, stop_process, wait_for

PASSWORD, OTHER = "grower-secret-1", "grower-secret-2"


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def store_files(data):
    return [data / "mash.db", data / "mash.db-wal", data / "mash.db-shm"]


def start_reader(tmp_path, data, log):
    """reader.py with no board (a port that does not exist), under a permissive umask: what
    it makes is private only if it sees to it itself."""
    env = dict(os.environ, MASH_DATA_DIR=str(data), SERIAL_PORT=str(tmp_path / "no-such-tty"),
               PYTHONPATH=str(ROOT), CONTROL_MODE="off")
    return subprocess.Popen([sys.executable, str(ROOT / "reader.py")], env=env, cwd=str(tmp_path),
                            stdout=log, stderr=log, umask=0o022)


# -- file modes --------------------------------------------------------------------------------
def test_a_gateway_process_makes_its_store_private_whatever_the_umask(tmp_path):
    data = tmp_path / "data"
    with open(tmp_path / "reader.log", "wb") as log:
        proc = start_reader(tmp_path, data, log)
        try:
            wait_for(lambda: all(p.exists() for p in store_files(data)), timeout=30,
                     what="the store, its -wal and -shm")
            assert {p.name: oct(mode(p)) for p in store_files(data)} == {
                "mash.db": "0o600", "mash.db-wal": "0o600", "mash.db-shm": "0o600"}
            assert mode(data) == 0o700
        finally:
            proc.send_signal(signal.SIGTERM)
            stop_process(proc, timeout=20)


def test_a_store_left_readable_is_made_private_at_start(tmp_path):
    data = tmp_path / "data"
    store = Store(data / "mash.db")             # open: its -wal and -shm stay
    for p in store_files(data):
        p.chmod(0o644)
    with open(tmp_path / "reader.log", "wb") as log:
        proc = start_reader(tmp_path, data, log)
        try:
            wait_for(lambda: all(mode(p) == 0o600 for p in store_files(data)), timeout=30,
                     what="the store made 0600")
            wait_for(lambda: store.processes().get("reader"), timeout=30, what="the reader's beat")
        finally:
            proc.send_signal(signal.SIGTERM)
            stop_process(proc, timeout=20)
    store.close()
    text = (tmp_path / "reader.log").read_text()
    assert text.count("could be read by other users") == 1, text


def doctor_modes(run_cli, env) -> dict:
    result = run_cli("doctor", "--json", env=env, timeout=120)
    assert result.returncode == 1, result.stderr          # no reader, no store: not healthy
    return next(c for c in json.loads(result.stdout)["checks"] if c["check"] == "file modes")


def test_doctor_flags_a_readable_env_file_and_store_with_the_chmod(run_cli, tmp_path):
    env_file, data = tmp_path / "gateway.env", tmp_path / "data"
    env_file.write_text("LOG_LEVEL=INFO\n")
    env_file.chmod(0o644)
    store = Store(data / "mash.db")             # open: its -wal and -shm (0600) stay
    (data / "mash.db").chmod(0o640)
    env = {"MASH_ENV_FILE": str(env_file), "MASH_DATA_DIR": str(data),
           "SERIAL_PORT": str(tmp_path / "no-such-tty")}
    check = doctor_modes(run_cli, env)
    assert check["ok"] is False
    assert check["detail"].startswith(f"{env_file} is 0644, {data / 'mash.db'} is 0640: ")
    assert check["fix"] == f"chmod 600 {env_file} {data / 'mash.db'}"
    env_file.chmod(0o600)
    (data / "mash.db").chmod(0o600)
    assert doctor_modes(run_cli, env)["ok"] is True
    store.close()


# -- the dashboard -----------------------------------------------------------------------------
class ReverseProxy:
    """A few lines of reverse proxy on 127.0.0.1, as nginx would be configured in front of
    the dashboard: the Host passed on as the client sent it, X-Forwarded-For added."""

    def __init__(self, upstream: str):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "content-length")}
                headers["X-Forwarded-For"] = self.client_address[0]
                r = requests.request(self.command, upstream + self.path, headers=headers,
                                     data=self.rfile.read(length) if length else None,
                                     allow_redirects=False, timeout=10)
                self.send_response(r.status_code)
                for k, v in r.raw.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dash(tmp_path, data_dir):
    d = Dashboard(tmp_path / "dash", {**os.environ, "MASH_DATA_DIR": str(data_dir)})
    d.store = Store(data_dir / "mash.db")
    yield d
    d.stop()
    d.store.close()


@pytest.fixture
def proxy(dash):
    p = ReverseProxy(dash.url)
    yield p
    p.stop()


def page_token(s: requests.Session, url: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', s.get(url + "/", timeout=10).text).group(1)


def login(url: str, password: str) -> requests.Session:
    s = requests.Session()
    page = s.get(url + "/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = s.post(url + "/login", data={"password": password, "csrf_token": token},
               allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    return s


SWITCH = {"actuator": "MIST_MAKER", "state": "ON"}


def test_passwordless_dashboard_through_a_reverse_proxy_controls_nothing(dash, proxy):
    dash.start()
    s = requests.Session()                 # one cookie jar for both: cookies ignore the port
    token = page_token(s, dash.url)
    assert s.get(dash.url + "/api/state", timeout=10).status_code == 200      # direct loopback
    r = s.post(dash.url + "/api/actuator", json=SWITCH, headers={"X-CSRF-Token": token}, timeout=10)
    assert r.status_code == 200
    commands = dash.store.m.Command.select().count()
    assert commands == 1

    for path in ("/", "/api/state", "/chart/fruiting/temp.svg"):
        r = s.get(proxy.url + path, timeout=10)
        assert r.status_code == 403, (path, r.status_code)
        assert "mash dashboard set-password" in r.text
    r = s.post(proxy.url + "/api/actuator", json=SWITCH, headers={"X-CSRF-Token": token}, timeout=10)
    assert r.status_code == 403 and "set-password" in r.json()["error"]
    assert dash.store.m.Command.select().count() == commands          # nothing queued
    # the same through any proxy header, straight to the dashboard
    for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
        r = s.get(dash.url + "/api/state", headers={header: "for=192.0.2.7"}, timeout=10)
        assert r.status_code == 403, header


def test_behind_a_proxy_the_password_opens_the_dashboard(dash, proxy):
    assert dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n").returncode == 0
    dash.start()
    assert requests.get(proxy.url + "/api/state", timeout=10).status_code == 403
    s = login(proxy.url, PASSWORD)
    assert s.get(proxy.url + "/api/state", timeout=10).status_code == 200
    r = s.post(proxy.url + "/api/actuator", json=SWITCH,
               headers={"X-CSRF-Token": page_token(s, proxy.url)}, timeout=10)
    assert r.status_code == 200


@pytest.mark.parametrize("password", [False, True])
def test_a_rebinding_host_is_refused_even_with_a_session(dash, password):
    if password:
        assert dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n").returncode == 0
    dash.start()
    s = login(dash.url, PASSWORD) if password else requests.Session()
    token = page_token(s, dash.url)
    # the session cookie sent whatever the Host (a browser would send it only to its own
    # name; here the point is that even a valid session does not open a foreign Host)
    cookie = f"mash_session={s.cookies.get('mash_session')}"

    def get(path, host):
        return requests.get(dash.url + path, headers={"Host": host, "Cookie": cookie}, timeout=10)

    for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
        assert get("/api/state", f"{host}:{dash.port}").status_code == 200, host
    for host in (f"attacker.example:{dash.port}", "attacker.example", f"127.0.0.1.nip.example:{dash.port}",
                 "localhost:notaport"):
        assert get("/api/state", host).status_code == 403, host
        r = requests.post(dash.url + "/api/actuator", json=SWITCH, timeout=10,
                          headers={"Host": host, "Cookie": cookie, "X-CSRF-Token": token})
        assert r.status_code == 403, host
    r = get("/", f"attacker.example:{dash.port}")
    assert r.status_code == 403 and "own names" in r.text
    assert dash.store.m.Command.select().count() == 0
    assert "DNS rebinding?" in dash.logs()


def test_set_password_logs_every_session_out(dash):
    assert dash.mash("dashboard", "set-password", input=f"{PASSWORD}\n{PASSWORD}\n").returncode == 0
    dash.start()
    s = login(dash.url, PASSWORD)
    assert s.get(dash.url + "/api/state", timeout=10).status_code == 200
    done = dash.mash("dashboard", "set-password", input=f"{OTHER}\n{OTHER}\n")
    assert done.returncode == 0 and "every session is logged out" in done.stderr
    assert s.get(dash.url + "/api/state", timeout=10).status_code == 403      # the running one
    assert s.get(dash.url + "/", allow_redirects=False, timeout=10).status_code == 302
    assert login(dash.url, OTHER).get(dash.url + "/api/state", timeout=10).status_code == 200


# -- plain-text transports ---------------------------------------------------------------------
def settings(**env):
    return Settings.from_mapping({k: str(v) for k, v in env.items()})


@pytest.mark.parametrize("env, key", [
    ({"MQTT_BROKER": "broker.example.com", "MQTT_TLS": "0"}, "MQTT_TLS"),
    ({"MQTT_BROKER": "192.168.1.20", "MQTT_TLS": "0"}, "MQTT_TLS"),
    ({"FIREBASE_DATABASE_URL": "http://mash.firebaseio.com"}, "FIREBASE_DATABASE_URL"),
    ({"FIREBASE_DATABASE_URL": "http://10.0.0.5:9000/?ns=mash"}, "FIREBASE_DATABASE_URL"),
    ({"FIREBASE_DATABASE_URL": "ftp://mash.firebaseio.com"}, "FIREBASE_DATABASE_URL"),
])
def test_plain_text_to_another_host_is_refused_naming_the_key(env, key):
    with pytest.raises(ConfigError) as err:
        settings(**env)
    assert str(err.value).startswith(f"configuration error: {key}=")


def test_plain_text_on_loopback_is_accepted():
    assert settings(MQTT_BROKER="127.0.0.1", MQTT_TLS="0").mqtt_tls is False
    assert settings(MQTT_BROKER="localhost", MQTT_TLS="0").mqtt_enabled
    assert settings(MQTT_BROKER="broker.example.com").mqtt_tls is True
    for url in ("http://127.0.0.1:9000/?ns=mash-test", "http://localhost:9000",
                "https://mash.firebaseio.com"):
        assert settings(FIREBASE_DATABASE_URL=url).firebase_database_url == url


def test_mash_refuses_plain_mqtt_to_a_remote_broker_with_one_line(run_cli):
    result = run_cli("status", env={"MQTT_BROKER": "broker.example.com", "MQTT_TLS": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: MQTT_TLS=0: plain MQTT is refused except for a broker on this "
        "machine (MQTT_BROKER=broker.example.com)"]
