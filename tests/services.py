"""Real peers for the tests, each on 127.0.0.1 and a free port, stopped by whoever started it.

- ``Broker``: Debian's mosquitto with TLS (a CA and server certificate made here) and a
  password file.
- ``DevServer``: the project's reference backend (``mash devserver``) as a subprocess.
- ``RTDBStandIn``: an HTTP server speaking the Realtime Database REST protocol that
  firebase-admin uses, because the official emulator cannot run here (it needs Java 21 and
  downloads a jar); firebase-admin itself talks to it through FIREBASE_DATABASE_EMULATOR_HOST.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def stop_process(proc, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- TLS material ------------------------------------------------------------------------------
def make_ca(directory: Path, name: str = "MASH test CA") -> dict:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k, path):
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    srv_key = key()
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                          critical=False)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                          critical=False)
           .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    pem_key(srv_key, paths["key"])
    return paths


def make_service_account(path: Path) -> Path:
    """A syntactically real service-account key (a fresh RSA key) for firebase-admin."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "mash-test", "private_key_id": "k1",
        "private_key": pem, "client_email": "gateway@mash-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}))
    path.chmod(0o600)                # as a real key must be: `mash doctor` checks it
    return path


# -- mosquitto -------------------------------------------------------------------------------
class Broker:
    USER, PASSWORD = "mash_device", "broker-secret-pw"

    def __init__(self, directory: Path):
        if not shutil.which("mosquitto"):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = make_ca(directory / "tls")
        self.port = free_port()
        pwfile = directory / "passwd"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), self.USER, self.PASSWORD],
                       check=True, capture_output=True)
        subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "observer", "observer-pw"],
                       check=True, capture_output=True)
        os.chmod(pwfile, 0o600)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"per_listener_settings false\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"   # no privilege drop: files are ours

            f"allow_anonymous false\npassword_file {pwfile}\n"
            f"persistence true\npersistence_location {directory}/\nautosave_interval 1\n"
            f"log_dest file {directory}/mosquitto.log\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.tls['ca']}\ncertfile {self.tls['cert']}\nkeyfile {self.tls['key']}\n"
            f"tls_version tlsv1.2\n"
            # the fuzz test publishes 10,000 commands in a burst; mosquitto's default queue of
            # 1,000 per client would drop some at the broker, which is not what it tests
            f"max_queued_messages 100000\n")
        self.proc = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        stop_process(self.proc)

    def env(self) -> dict:
        return {"MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(self.port),
                "MQTT_USERNAME": self.USER, "MQTT_PASSWORD": self.PASSWORD,
                "MQTT_CA_CERTS": str(self.tls["ca"])}

    def observer(self, topics=("devices/#",)):
        """A second, independent client that records what it sees."""
        return Observer(self, topics)


class Observer:
    def __init__(self, broker: Broker, topics):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        import ssl
        self.messages: list[tuple[str, dict | bytes, bool]] = []
        self.lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{time.time_ns()}")
        c.username_pw_set("observer", "observer-pw")
        ctx = ssl.create_default_context(cafile=str(broker.tls["ca"]))
        c.tls_set_context(ctx)
        subscribed = threading.Event()
        def on_connect(client, userdata, flags, rc, props):
            for t in topics:
                client.subscribe(t, qos=1)
        def on_subscribe(client, userdata, mid, rcs, props):
            subscribed.set()
        def on_message(client, userdata, msg):
            try:
                body = json.loads(msg.payload)
            except ValueError:
                body = msg.payload
            with self.lock:
                self.messages.append((msg.topic, body, msg.retain))
        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("observer could not subscribe")
        self.client = c

    def on(self, topic_suffix: str) -> list:
        with self.lock:
            return [body for topic, body, _ in self.messages if topic.endswith(topic_suffix)]

    def publish(self, topic: str, payload, qos: int = 1) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(topic, data, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the reference backend ---------------------------------------------------------------------
class DevServer:
    """``mash devserver`` as a subprocess. ``profile="guide"`` (CONTRACT §2, admin endpoints
    under /api/v1/admin) or ``"mash"`` (the replica of the deployed backend, CONTRACT §9, its
    test hooks under /__replica/). TTLs and the rate limit default to the profile's own
    (guide: 900 s / 1 day / none; mash: 1 day / 30 days / 20 per 60 s)."""
    EMAIL, PASSWORD = "device@mashmarket.app", "device-secret-pw"

    def __init__(self, directory: Path, access_ttl: float | None = None,
                 refresh_ttl: float | None = None, rate_limit: int | None = None,
                 rate_window: float = 60.0, profile: str = "guide", populated: bool = True):
        self.dir = directory
        self.profile = profile
        directory.mkdir(parents=True, exist_ok=True)
        if profile == "guide":
            access_ttl = 900 if access_ttl is None else access_ttl
            refresh_ttl = 86400 if refresh_ttl is None else refresh_ttl
            rate_limit = 0 if rate_limit is None else rate_limit
        self.args = ["--profile", profile, "--port", "0", "--db", str(directory / "devserver.db"),
                     "--user", f"{self.EMAIL}:{self.PASSWORD}", "--rate-window", str(rate_window),
                     "--secret", "test-signing-secret-of-at-least-32-bytes"]
        for flag, value in (("--access-ttl", access_ttl), ("--refresh-ttl", refresh_ttl),
                            ("--rate-limit", rate_limit)):
            if value is not None:
                self.args += [flag, str(value)]
        if profile == "mash":
            self.args.append("--populated" if populated else "--no-populated")
        self.proc = None
        self.url = None

    def start(self) -> "DevServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICE_", "BACKEND_"))}
        self.proc = subprocess.Popen([sys.executable, "-m", "mash.cli", "devserver", *self.args],
                                     stdout=subprocess.PIPE, stderr=open(self.dir / "devserver.log", "ab"),
                                     env=env, cwd=str(self.dir), text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"devserver did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1].split()[0]          # .../api/v1
        self.root = self.url[: -len("/api/v1")]
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def env(self) -> dict:
        env = {"BACKEND_URL": self.url, "DEVICE_EMAIL": self.EMAIL, "DEVICE_PASSWORD": self.PASSWORD}
        if self.profile == "mash":
            env["BACKEND_PROFILE"] = "mash"
        return env

    def _hook(self, method: str, name: str, **kw) -> dict:
        r = requests.request(method, f"{self.root}/__replica/{name}", timeout=30, **kw)
        if not r.ok:
            raise RuntimeError(f"replica hook {name}: {r.status_code} {r.text}")
        return r.json()

    def state(self, device: str | None = None, serial: str | None = None) -> dict:
        """guide: the admin state (``device`` = its serial). mash: devices, sensors (with a
        ``readings`` count each), ``readings`` {sensor id: [[value, timestamp], ...]},
        commands, accounts, requests, throttled (429s), lost (answers not sent), per_path
        {"METHOD path": n}, history [{t, answered, client, method, url, status}] (monotonic
        seconds; client "app" for the calls made here), faults; ``serial`` narrows to a device."""
        if self.profile == "mash":
            serial = serial or device
            return self._hook("GET", "state", params={"serial": serial} if serial else None)
        r = requests.get(f"{self.url}/admin/state" + (f"?device={device}" if device else ""), timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def faults(self, **switches) -> dict:
        """mash switches: latency, fail_next (+ fail_status, fail_path), drop_for (s),
        lose_answer_next (+ lose_path), broker (none|up|down), rate_limit (+ rate_window),
        reset_rate."""
        if self.profile == "mash":
            return self._hook("POST", "faults", json=switches)
        r = requests.post(f"{self.url}/admin/faults", json=switches, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def issue(self, device: str, command: str, parameters: dict | None = None, **extra) -> dict:
        """guide: the admin endpoint (``device`` = serial). mash: the app's real route
        ``POST /devices/:cuid/command`` as the seeded account, counted as the apps' client
        (``X-Replica-Client: app``), not the gateway's (``device`` = the cuid); returns
        ``{"message","commandId","status"}``; raises on a refusal (e.g. an OFFLINE device)."""
        if self.profile == "mash":
            r = requests.post(f"{self.url}/devices/{device}/command",
                              json={"command": command, "parameters": parameters or {}},
                              headers=self._app_headers(), timeout=30)
            if r.status_code != 201:
                raise RuntimeError(f"command refused: {r.status_code} {r.text}")
            return r.json()["data"]
        r = requests.post(f"{self.url}/admin/devices/{device}/commands",
                          json={"command": command, "parameters": parameters or {}, **extra}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    # -- mash profile only --------------------------------------------------------------
    APP = {"X-Replica-Client": "app", "X-API-Key": "tests"}   # the apps' calls: not the gateway's budget

    def login(self) -> dict:
        """The seeded account's login answer (``data``: accessToken, refreshToken, user), as
        the apps (``X-Replica-Client: app``: not counted in the gateway's budget)."""
        r = requests.post(f"{self.url}/auth/login", headers={"X-Replica-Client": "app"},
                          json={"email": self.EMAIL, "password": self.PASSWORD}, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"login refused: {r.status_code} {r.text}")
        return r.json()["data"]

    def _app_headers(self) -> dict:
        """The seeded account's bearer token, logged in once (tokens last a day)."""
        if getattr(self, "_token", None) is None:
            self._token = self.login()["accessToken"]
        return {"Authorization": f"Bearer {self._token}", **self.APP}

    def create_device(self, serial: str, name: str | None = None, **extra) -> dict:
        """As the operator would in the admin dashboard: a device owned by the seeded account
        (status OFFLINE until the gateway registers); returns it, its cuid in ``id``."""
        return self._hook("POST", "devices", json={"serialNumber": serial, "name": name or serial,
                                                   **extra})

    def create_sensor(self, cuid: str, type: str, name: str, unit: str) -> dict:
        """Through the real route ``POST /devices/:cuid/sensors`` as the seeded account, counted
        as the apps' client; raises on a refusal (a role that may not: 403)."""
        r = requests.post(f"{self.url}/devices/{cuid}/sensors",
                          json={"type": type, "name": name, "unit": unit},
                          headers=self._app_headers(), timeout=30)
        if r.status_code != 201:
            raise RuntimeError(f"sensor refused: {r.status_code} {r.text}")
        return r.json()["data"]

    def set_role(self, role: str) -> dict:
        """The seeded account's role (GROWER at start; USER may not create sensors)."""
        return self._hook("POST", "role", json={"role": role})


# -- RTDB REST stand-in ------------------------------------------------------------------------
class RTDBStandIn:
    """The Realtime Database REST surface firebase-admin uses: ``/<path>.json?ns=...``, and
    its streaming (``Accept: text/event-stream``): a ``put`` of the path's value at connect
    and after every change under it, ``keep-alive`` every ``keepalive`` s, until the client
    goes, ``drop_streams()`` or ``stop()``."""

    def __init__(self, keepalive: float = 30.0):
        self.tree: dict = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.keepalive = keepalive
        self.streams: list[tuple[list, "queue.Queue"]] = []   # (path, its events)
        self._stopping = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status, body=None):
                # the database answers ``null`` for a path that holds nothing
                data = b"" if status == 204 else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self._headers_buffer.append(b"\r\n" + data)     # one write: no Nagle stall
                self.flush_headers()

            def _handle(self, method):
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if not parts.path.endswith(".json") or "ns" not in query:
                    return self._reply(400, {"error": "path must end in .json and carry ?ns="})
                if self.headers.get("Authorization") != "Bearer owner":
                    return self._reply(401, {"error": "Permission denied"})
                segs = [s for s in parts.path[:-5].split("/") if s]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                silent = query.get("print") == ["silent"]
                if method == "GET" and self.headers.get("Accept") == "text/event-stream":
                    return self._stream(segs)
                with outer.lock:
                    outer.requests.append((method, "/" + "/".join(segs), body))
                    if method == "GET":
                        return self._reply(200, outer._get(segs))
                    if method == "PUT":
                        outer._set(segs, body)
                        result = body
                    elif method == "PATCH":
                        for key, value in body.items():
                            outer._set(segs + [s for s in key.split("/") if s], value)
                        result = body
                    elif method == "POST":
                        name = f"-N{time.time_ns()}"
                        outer._set(segs + [name], body)
                        result = {"name": name}
                    elif method == "DELETE":
                        outer._set(segs, None)
                        result = None
                    else:
                        return self._reply(405, {"error": "method"})
                return self._reply(204) if silent else self._reply(200, result)

            def _stream(self, segs):
                events: queue.Queue = queue.Queue()
                with outer.lock:
                    outer.requests.append(("STREAM", "/" + "/".join(segs), None))
                    outer.streams.append((segs, events))
                    events.put(("put", outer._get(segs)))
                self.close_connection = True             # the stream ends with the connection
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                last = time.monotonic()
                try:
                    while not outer._stopping.is_set():
                        try:
                            kind, value = events.get(timeout=min(0.2, outer.keepalive))
                        except queue.Empty:
                            kind, value = "keep-alive", None
                            if time.monotonic() - last < outer.keepalive:
                                continue
                        if kind == "drop":
                            return
                        data = "null" if kind == "keep-alive" else json.dumps({"path": "/", "data": value})
                        self.wfile.write(f"event: {kind}\ndata: {data}\n\n".encode())
                        self.wfile.flush()
                        last = time.monotonic()
                except OSError:
                    pass                                 # the client went
                finally:
                    with outer.lock:
                        outer.streams = [w for w in outer.streams if w[1] is not events]

            def do_GET(self):
                self._handle("GET")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _get(self, segs):
        node = self.tree
        for s in segs:
            if not isinstance(node, dict) or s not in node:
                return None
            node = node[s]
        return node

    def _set(self, segs, value):
        if not segs:
            self.tree = value if isinstance(value, dict) else {}
            return self._changed(segs)
        node = self.tree
        for s in segs[:-1]:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ValueError("path through a leaf")
        if value is None or value == {}:
            node.pop(segs[-1], None)
        else:
            node[segs[-1]] = value
        # the database holds no empty node: a parent left empty by a delete goes too
        for depth in range(len(segs) - 1, 0, -1):
            parent = self._get(segs[:depth - 1]) if depth > 1 else self.tree
            if isinstance(parent, dict) and parent.get(segs[depth - 1]) == {}:
                parent.pop(segs[depth - 1])
        self._changed(segs)

    def _changed(self, segs):
        """Every stream on a path above or below ``segs`` gets the path's value again."""
        for path, events in list(self.streams):
            if path[:len(segs)] == segs[:len(path)]:
                events.put(("put", self._get(path)))

    def drop_streams(self) -> int:
        """Close every open stream, as the database does on a network blip; how many."""
        with self.lock:
            for _, events in self.streams:
                events.put(("drop", None))
            return len(self.streams)

    def start(self) -> "RTDBStandIn":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def writes(self) -> list:
        with self.lock:
            return [r for r in self.requests if r[0] != "GET"]


# -- the whole gateway, as real processes ------------------------------------------------------
class Gateway:
    """Simulated board + reader.py + worker.py against a devserver, a broker and the RTDB
    stand-in; each part can be killed and restarted by the fault tests."""

    def __init__(self, directory: Path, devserver: DevServer, broker: Broker, rtdb: RTDBStandIn,
                 interval: float = 0.1, **env):
        from mash.simulator import SimulatedBoard
        self.dir, self.devserver, self.broker, self.rtdb = directory, devserver, broker, rtdb
        directory.mkdir(parents=True, exist_ok=True)
        self.data = directory / "data"
        self.board = SimulatedBoard(interval=interval, link=directory / "ttyMASH", seed=11).start(banner=False)
        self.env = {**os.environ, **devserver.env(), **broker.env(), "MASH_DATA_DIR": str(self.data),
                    "SERIAL_PORT": self.board.port,
                    "FIREBASE_DATABASE_URL": "https://mash-test.firebaseio.com",
                    "FIREBASE_CREDENTIALS": str(rtdb.credentials),
                    "FIREBASE_DATABASE_EMULATOR_HOST": rtdb.host, "PYTHONPATH": str(ROOT),
                    "SYNC_INTERVAL": "2", "COMMAND_POLL_INTERVAL": "1", "HEARTBEAT_INTERVAL": "2",
                    "BACKEND_TIMEOUT": "2",
                    # these scenarios drive the relays themselves; climate control is tested
                    # on its own (tests/test_control_loop.py)
                    "CONTROL_MODE": "off", **env}
        self.log = open(directory / "gateway.log", "ab")
        self.reader = self.worker = None

    def start_reader(self):
        self.reader = subprocess.Popen([sys.executable, str(ROOT / "reader.py")], env=self.env,
                                       cwd=str(self.dir), stdout=self.log, stderr=self.log)

    def start_worker(self):
        self.worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=self.env,
                                       cwd=str(self.dir), stdout=self.log, stderr=self.log)

    def start(self) -> "Gateway":
        self.start_reader()
        self.start_worker()
        return self

    @staticmethod
    def kill(proc):
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def mash(self, *args, timeout=120):
        return subprocess.run([sys.executable, "-m", "mash", *args], env=self.env, cwd=str(self.dir),
                              capture_output=True, text=True, timeout=timeout)

    def stop(self):
        for p in (self.reader, self.worker):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.reader, self.worker):
            stop_process(p, timeout=20)
        self.board.stop()

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "gateway.log").read_text(errors="replace")


@contextlib.contextmanager
def whole_stack(base: Path, interval: float = 0.2, **env):
    """A devserver, a broker, the RTDB stand-in and a started Gateway on them, stopped in
    reverse order on the way out."""
    devserver = DevServer(base / "devserver").start()
    broker = Broker(base / "broker").start()
    rtdb = RTDBStandIn().start()
    rtdb.credentials = make_service_account(base / "firebase_config.json")
    gw = Gateway(base / "gw", devserver, broker, rtdb, interval=interval, **env).start()
    try:
        yield gw
    finally:
        gw.stop()
        rtdb.stop()
        broker.stop()
        devserver.stop()


# -- the dashboard and a browser ---------------------------------------------------------------
class Dashboard:
    """``mash dashboard`` as a subprocess on a free loopback port."""

    def __init__(self, directory: Path, env: dict):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {**env, "DASHBOARD_HOST": "127.0.0.1", "DASHBOARD_PORT": str(self.port),
                    "PYTHONPATH": str(ROOT)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def mash(self, *args, input=None, timeout=60):
        return subprocess.run([sys.executable, "-m", "mash", *args], env=self.env, cwd=str(self.dir),
                              capture_output=True, text=True, input=input, timeout=timeout)

    def start(self) -> "Dashboard":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "dashboard.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mash.dashboard"], env=self.env,
                                     cwd=str(self.dir), stdout=self.log, stderr=self.log)
        wait_port(self.port, timeout=20)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        if self.proc is not None:
            self.log.close()

    def logs(self) -> str:
        return (self.dir / "dashboard.log").read_text(errors="replace")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser(profile: Path):
    """Debian's Chromium, headless, driven by selenium through Debian's chromedriver (nothing
    is downloaded), with the flags that keep it off the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1280,2400"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# -- the farm's network, in network namespaces --------------------------------------------------
class LanPair:
    """Two network namespaces of this run, ``gw`` (the gateway) and ``ph`` (a phone), joined
    by a veth pair: on it, ``10.77.0.1/24`` and ``10.77.0.2/24`` (a private subnet), and
    ``100.64.77.1/24`` and ``100.64.77.2/24`` (carrier-grade NAT space: on the link, but not
    private). Multicast stays inside them. Needs root (``ip netns``); ``start`` raises
    ``OSError`` with ip's own words when namespaces cannot be made here."""
    GW, PHONE = "10.77.0.1", "10.77.0.2"
    GW_SHARED, PHONE_SHARED = "100.64.77.1", "100.64.77.2"

    def __init__(self):
        tag = os.urandom(4).hex()
        self.gw, self.ph = f"mash-gw-{tag}", f"mash-ph-{tag}"
        self.veth_gw, self.veth_ph = f"vg{tag}", f"vp{tag}"
        self.made: list[str] = []

    @staticmethod
    def ip(*args, ns: str | None = None) -> None:
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")

    def start(self) -> "LanPair":
        if shutil.which("ip") is None:
            raise OSError("the ip command (iproute2) is not installed")
        try:
            for ns in (self.gw, self.ph):
                self.ip("netns", "add", ns)
                self.made.append(ns)
                self.ip("link", "set", "lo", "up", ns=ns)
            self.ip("link", "add", self.veth_gw, "type", "veth", "peer", "name", self.veth_ph)
            self.ip("link", "set", self.veth_gw, "netns", self.gw)
            self.ip("link", "set", self.veth_ph, "netns", self.ph)
            for ns, dev, addrs in ((self.gw, self.veth_gw, (self.GW, self.GW_SHARED)),
                                   (self.ph, self.veth_ph, (self.PHONE, self.PHONE_SHARED))):
                for a in addrs:
                    self.ip("addr", "add", f"{a}/24", "dev", dev, ns=ns)
                self.ip("link", "set", dev, "up", ns=ns)
        except OSError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for ns in self.made:                  # deleting a namespace deletes its veth end too
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=20)
        self.made = []

    def popen(self, ns: str, args: list[str], env: dict, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args],
                                env={**env, "PYTHONPATH": str(ROOT)}, **kw)

    def run(self, ns: str, args: list[str], env: dict | None = None, timeout: float = 30):
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, *args],
                              env={**(env or os.environ), "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=timeout)

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 20) -> None:
        code = ("import socket,sys,time\n"
                f"end=time.monotonic()+{timeout}\n"
                "while time.monotonic()<end:\n"
                f"    try: socket.create_connection(({host!r},{port}),0.3).close(); sys.exit(0)\n"
                "    except OSError: time.sleep(0.1)\n"
                "sys.exit(1)\n")
        if self.run(ns, ["-c", code], timeout=timeout + 10).returncode != 0:
            raise TimeoutError(f"nothing listening on {host}:{port} in {ns}")


def lan_pair_or_skip():
    """A started LanPair, or pytest.skip with ip's reason when namespaces cannot be made."""
    import pytest
    try:
        return LanPair().start()
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot create network namespaces here (needs root and iproute2): {exc}")
