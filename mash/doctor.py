"""``mash doctor``: what is wrong, in order, each with its fix.

One line per check, ✓ or ✗ (– for a part that is off or was not tried because the one before
it failed, so each broken part shows exactly one ✗); exit code 0 only when nothing failed.
The checks read; the only things they write are a login to the backend and a subscription
under a client id of their own, so they are safe to run beside the live gateway.

    mash doctor
    mash doctor --json
    mash doctor --send      # also send a test notification to each NOTIFY_URLS URL
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sqlite3
import ssl
import stat
import sys
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests
import serial
from peewee import DatabaseError

from mash import protocol
from mash.clock import ClockSource, parse_iso, utcnow
from mash.sinks import mqtt_client
from mash.sinks.backend_api import BackendAPIClient
from mash.sinks.errors import BackendError
from mash.sinks.firebase import FirebaseError, FirebaseSync, serial_warning
from mash.config import ConfigError, Settings, parse_notify_url, redact_url
from mash.models import Store
from mash.models.migrations import COMPAT_KEY, SCHEMA_VERSION
from mash.reader import find_board
from mash.dashboard import mdns as mdns_state
from mash.tasks.notify import send_test

LINE_WITHIN = 10.0          # s: a reading line must arrive within this
CLOCK_TOLERANCE = 60.0      # s: our clock against the backend's Date
MIN_FREE_MB = 200
READING_FRESH = 60.0        # s: the newest stored reading may be this old
ENV_FILE = "config/.env"


@dataclass
class Check:
    check: str
    ok: bool | None          # None: off, or not tried
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "–"}[self.ok]
        return f"{mark} {self.check}: {self.detail}" + (f" — fix: {self.fix}" if self.fix else "")


class Doctor:
    def __init__(self, env: dict | None = None, send: bool = False):
        self.env = env
        self.send = send                  # --send: a test notification to each URL
        self.settings: Settings | None = None

    def run(self):
        """Yield the checks in order, as each completes."""
        try:
            self.settings = Settings.load(self.env) if self.env is not None else Settings.load()
        except ConfigError as exc:
            yield Check("configuration", False, str(exc),
                        f"correct that key in {ENV_FILE} or the environment")
            return
        yield Check("configuration", True, "parses")
        yield from self.serial()
        yield from self.clock()
        yield from self.store()
        yield from self.file_modes()
        yield from self.backend()
        yield from self.mqtt()
        yield from self.firebase()
        yield from self.notifications()
        yield from self.processes()
        yield self.device_serial()
        yield self.mdns()

    # -- serial ------------------------------------------------------------------------------
    def serial(self):
        s = self.settings
        if s.serial_port == "sim":
            yield Check("serial port", True, "the simulated board (SERIAL_PORT=sim), inside the reader")
            yield from self._line_through_reader()
            return
        reader_board = (self._processes().get("reader") or {}).get("board") or {}
        port = s.serial_port or find_board() or (reader_board.get("port") if
                                                 reader_board.get("connected") else None)
        if not port:
            yield Check("serial port", False, "no board found (no Arduino, CH340 or FTDI USB serial device)",
                        "plug the Arduino in, or set SERIAL_PORT to its device (any other USB serial "
                        "chip must be named; SERIAL_PORT=sim: the simulated board)")
            yield from self._not_tried("serial access", "serial holder", "serial reading")
            return
        if not os.path.exists(port):
            yield Check("serial port", False, f"{port} does not exist",
                        "check the USB cable, then `ls /dev/ttyACM* /dev/ttyUSB*` and SERIAL_PORT")
            yield from self._not_tried("serial access", "serial holder", "serial reading")
            return
        yield Check("serial port", True, f"{port} exists")
        if not os.access(port, os.R_OK | os.W_OK):
            user = os.environ.get("USER") or str(os.getuid())
            yield Check("serial access", False, f"this user may not open {port}",
                        f"`sudo usermod -aG dialout {user}`, then log out and in again")
            yield from self._not_tried("serial holder", "serial reading")
            return
        yield Check("serial access", True, f"this user may open {port}")
        holders = port_holders(port)
        reader_pid = (self._processes().get("reader") or {}).get("pid")
        others = [(pid, cmd) for pid, cmd in holders if pid != reader_pid]
        if others:
            pid, cmd = others[0]
            yield Check("serial holder", False, f"{port} is held by {cmd} (pid {pid})",
                        "stop it: the gateway's reader must be the only program on the port")
            yield from self._not_tried("serial reading")
            return
        if holders:
            yield Check("serial holder", True, f"held by the reader (pid {reader_pid}), as it should be")
            yield from self._line_through_reader()
            return
        yield Check("serial holder", True, f"nobody else holds {port}")
        yield self._line_from_port(port)

    def _line_from_port(self, port: str) -> Check:
        started = time.monotonic()
        try:
            link = serial.Serial(port, self.settings.serial_baud, timeout=0.2, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            return Check("serial reading", False, f"cannot open {port}: {exc}",
                         "is another program using it? (`fuser -v " + port + "`)")
        buf = bytearray()
        seen = 0
        try:
            while time.monotonic() - started < LINE_WITHIN:
                buf += link.read(link.in_waiting or 1)
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    seen += 1
                    if isinstance(protocol.parse_line(line), protocol.Reading):
                        return Check("serial reading", True, f"a reading line arrived after "
                                     f"{time.monotonic() - started:.1f} s")
        finally:
            link.close()
        what = f"{seen} other lines" if seen else "nothing at all"
        return Check("serial reading", False, f"no reading line within {LINE_WITHIN:.0f} s ({what})",
                     f"check SERIAL_BAUD ({self.settings.serial_baud}) and that the MASH firmware is "
                     "flashed; the board prints a reading every few seconds")

    def _line_through_reader(self):
        """The reader holds the port: a reading must reach the store within the window."""
        db = self.settings.db_path
        if not db.exists():
            yield Check("serial reading", False, "the reader holds the port but no store exists",
                        "see the reader's log (`journalctl -u mash-reader`)")
            return
        try:
            store = Store(db, readonly=True)
        except (DatabaseError, RuntimeError) as exc:
            yield Check("serial reading", False, f"the reader holds the port but the store "
                        f"cannot be read ({exc})", "see the store checks below")
            return
        try:
            first = store.last_reading_id()
            started = time.monotonic()
            while time.monotonic() - started < LINE_WITHIN:
                if store.last_reading_id() > first:
                    yield Check("serial reading", True, f"the reader stored a reading "
                                f"{time.monotonic() - started:.1f} s after asking")
                    return
                time.sleep(0.2)
        finally:
            store.close()
        yield Check("serial reading", False, f"the reader stored no reading within {LINE_WITHIN:.0f} s",
                    "see the reader's log (`journalctl -u mash-reader`): bad lines, or a silent board")

    # -- clock -------------------------------------------------------------------------------
    def clock(self):
        how = ClockSource(trust=self.settings.clock_sync == "trust").synchronized()
        if how:
            yield Check("clock", True, f"synchronized ({how})")
            return
        offset = self._backend_offset()
        if offset is not None and abs(offset) <= CLOCK_TOLERANCE:
            yield Check("clock", True, f"not NTP-synchronized, but within {abs(offset):.0f} s of the "
                        "backend's time")
            return
        why = (f"not synchronized, and {abs(offset):.0f} s off the backend's time"
               if offset is not None else "not synchronized (no NTP sync, no backend to compare with)")
        yield Check("clock", False, why, "`sudo timedatectl set-ntp true` and check the network; "
                    "readings are held until the clock is right (JWT, TLS and command expiry need it)")

    def _backend_offset(self) -> float | None:
        """The backend's Date minus our clock, from one unauthenticated request."""
        s = self.settings
        if not s.backend_url:
            return None
        try:
            resp = requests.get(s.api_base, timeout=5)      # any answer carries a Date
            server = email_date(resp.headers.get("Date"))
        except requests.RequestException:
            return None
        return None if server is None else server + 0.5 - time.time()

    # -- store -------------------------------------------------------------------------------
    def store(self):
        s = self.settings
        data_dir = s.data_dir
        probe_dir = data_dir if data_dir.exists() else data_dir.resolve().parent
        free_mb = shutil.disk_usage(probe_dir).free / 2**20
        if free_mb < MIN_FREE_MB:
            yield Check("store disk", False, f"{free_mb:.0f} MB free on {probe_dir}",
                        "free space (`mash export` the old readings, lower MAX_DB_MB) or use a bigger card")
        else:
            yield Check("store disk", True, f"{free_mb:,.0f} MB free on {probe_dir}")
        db = s.db_path
        if not db.exists():
            yield Check("store integrity", False, f"no store at {db}",
                        "start the reader (it creates it): `mash run`, or `mash service install`")
            yield from self._not_tried("store size", "store schema")
            return
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
                version = con.execute("PRAGMA user_version").fetchone()[0]
                try:
                    row = con.execute("SELECT value FROM meta WHERE key = ?",
                                      (COMPAT_KEY,)).fetchone()
                    compat = json.loads(row[0]) if row else {}
                except (sqlite3.Error, ValueError):
                    compat = {}
            finally:
                con.close()
        except sqlite3.Error as exc:
            result, version, compat = f"cannot read: {exc}", None, {}
        # a newer release's file this one can run on (docs/DESIGN.md, the store across versions)
        runs_newer = (isinstance(compat, dict) and compat.get("schema") == version
                      and isinstance(compat.get("compatible_from"), int)
                      and compat["compatible_from"] <= SCHEMA_VERSION)
        if result == "ok":
            yield Check("store integrity", True, f"{db}: quick_check ok")
        else:
            yield Check("store integrity", False, f"{db}: {result}",
                        "restart the reader (`sudo systemctl restart mash-reader`): it sets a "
                        "corrupt store aside as mash.db.corrupt-<time> (kept) and starts a fresh "
                        "one; `sqlite3 mash.db.corrupt-<time> .recover` saves what can be saved")
        size_mb = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file()) / 2**20
        if size_mb > s.max_db_mb:
            yield Check("store size", False, f"{size_mb:.1f} MB, over MAX_DB_MB={s.max_db_mb}",
                        "unsynced readings are never deleted: get the backend reachable, or raise MAX_DB_MB")
        else:
            yield Check("store size", True, f"{size_mb:.1f} MB of MAX_DB_MB={s.max_db_mb}")
        if version is None:
            yield Check("store schema", None, "not read")
        elif version > SCHEMA_VERSION and runs_newer:
            yield Check("store schema", True, f"v{version}, a newer release's, compatible with "
                                              f"this one's v{SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            yield Check("store schema", False, f"v{version}, newer than this gateway's v{SCHEMA_VERSION}",
                        "upgrade the gateway (git pull, then the README's install command)")
        elif version < SCHEMA_VERSION:
            yield Check("store schema", True, f"v{version}: the reader upgrades it to v{SCHEMA_VERSION} at start")
        else:
            yield Check("store schema", True, f"v{version}")

    def file_modes(self):
        """Secrets readable by this user only: the .env (passwords), the Firebase key, and
        the store with its -wal/-shm (the dashboard's session key and password hash)."""
        s = self.settings
        env = self.env if self.env is not None else os.environ
        db = s.db_path
        paths = [Path(env.get("MASH_ENV_FILE") or ENV_FILE), Path(s.firebase_credentials),
                 db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        loose = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue                                  # absent: nothing to expose
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                loose.append((path, stat.S_IMODE(st.st_mode)))
        if loose:
            yield Check("file modes", False,
                        ", ".join(f"{p} is {mode:04o}" for p, mode in loose) +
                        ": other users of this machine can read the secrets in it",
                        "chmod 600 " + " ".join(shlex.quote(str(p)) for p, _ in loose))
        else:
            yield Check("file modes", True, "the .env, the Firebase key and the store are "
                                            "readable by their owner only")

    # -- sinks -------------------------------------------------------------------------------
    def backend(self):
        s = self.settings
        names = ("backend dns", "backend tls", "backend login", "backend device")
        if not s.backend_enabled:
            yield Check("backend", None, "off (not configured: BACKEND_URL, DEVICE_EMAIL, DEVICE_PASSWORD)")
            return
        url = urlsplit(s.api_base)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            yield Check(names[0], True, f"{host} resolves")
        except socket.gaierror as exc:
            yield Check(names[0], False, f"cannot resolve {host}: {exc.strerror}",
                        "check BACKEND_URL and the network's DNS (`getent hosts " + host + "`)")
            yield from self._not_tried(*names[1:])
            return
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                if url.scheme == "https":
                    with ssl.create_default_context().wrap_socket(raw, server_hostname=host) as tls:
                        yield Check(names[1], True, f"{host}:{port}, {tls.version()}, certificate verified")
                else:
                    yield Check(names[1], True, f"{host}:{port} reached (plain HTTP: loopback only)")
        except ssl.SSLError as exc:
            yield Check(names[1], False, f"TLS with {host}:{port} failed: {exc.reason or exc}",
                        "check the clock (a stale clock fails every certificate) and the system's CA bundle")
            yield from self._not_tried(*names[2:])
            return
        except OSError as exc:
            yield Check(names[1], False, f"cannot reach {host}:{port}: {exc.strerror or exc}",
                        "check the network and BACKEND_URL")
            yield from self._not_tried(*names[2:])
            return
        client = BackendAPIClient(s)
        try:
            client.login()
            yield Check(names[2], True, f"logged in as {s.device_email}")
            if client.device_registered():
                yield Check(names[3], True, f"device {s.device_id} is registered")
            elif client.profile.name == "mash":
                # the deployed backend creates no device for a serial it does not know
                yield Check(names[3], False, f"the MASH backend has no device {s.device_id}",
                            f"ask the MASH admin to create device {s.device_id} (admin "
                            "dashboard, serial number exactly as DEVICE_ID); readings stay owed "
                            "and go up once it exists")
            else:
                yield Check(names[3], False, f"the backend does not know device {s.device_id}",
                            "start the worker once (it registers the device), or add it in the MASH app")
        except BackendError as exc:
            step = names[2] if client.access_token is None else names[3]
            yield Check(step, False, str(exc)[:200],
                        "check DEVICE_EMAIL and DEVICE_PASSWORD" if step == names[2] else
                        "see the backend's answer above")
            if step == names[2]:
                yield from self._not_tried(names[3])
        finally:
            client.close()

    def mqtt(self):
        s = self.settings
        if not s.mqtt_enabled:
            yield Check("mqtt", None, "off (not configured: MQTT_BROKER)")
            return
        fixes = {"tls": "MQTT_CA_CERTS must name the CA that signed the broker's certificate "
                        "(and the clock must be right)",
                 "auth": "check MQTT_USERNAME and MQTT_PASSWORD",
                 "subscribe": f"the broker's ACL must allow devices/{s.device_id}/#"}
        for step, ok, detail in mqtt_client.probe(s):
            fix = ""
            if ok is False:
                fix = fixes[step]
                if step == "tls" and detail.startswith("cannot reach"):
                    fix = "is the broker running? check MQTT_BROKER, MQTT_PORT and the network"
            yield Check(f"mqtt {step}", ok, detail, fix)

    def device_serial(self) -> Check:
        """DEVICE_ID against the MASH serial pattern (CONTRACT §8): a warning, never a
        failure (``rpi_gateway_001`` keeps working; the MASH apps would not find it)."""
        why = serial_warning(self.settings.device_id)
        if why is None:
            return Check("device serial", True, f"{self.settings.device_id} is a MASH serial")
        return Check("device serial", None, f"warning: {why}",
                     "set DEVICE_ID to the serial on the device's label if the MASH apps should see it")

    def firebase(self):
        s = self.settings
        if not s.firebase_enabled:
            yield Check("firebase", None, "off (not configured: FIREBASE_DATABASE_URL)")
            return
        path = Path(s.firebase_credentials)
        try:
            key = json.loads(path.read_text())
            if key.get("type") != "service_account":
                raise ValueError("not a service-account key")
        except (OSError, ValueError) as exc:
            yield Check("firebase credentials", False, f"{path}: {exc}",
                        "download the service-account key from the Firebase console to "
                        "config/firebase_config.json (or set FIREBASE_CREDENTIALS)")
            yield from self._not_tried("firebase read")
            return
        yield Check("firebase credentials", True, f"{path} ({key.get('client_email', '?')})")
        fb = FirebaseSync(s)
        try:
            if not fb.is_initialized:
                yield Check("firebase read", False, "firebase-admin could not start with that key",
                            "install the extra (`.venv/bin/pip install -e '.[firebase]'`) and check the key")
                return
            fb.get_config()
            yield Check("firebase read", True, f"read /devices/{s.device_id}/config")
        except FirebaseError as exc:
            yield Check("firebase read", False, str(exc)[:200],
                        "check FIREBASE_DATABASE_URL, the network and the database rules")
        finally:
            fb.close()

    # -- processes ---------------------------------------------------------------------------
    def notifications(self):
        s = self.settings
        if not s.notify_urls:         # an optional extra, not a sink of the contract: no line
            return
        for url in s.notify_urls:          # each URL as Apprise reads it, shown redacted
            try:
                ok = parse_notify_url(url) is not None
            except ConfigError as exc:     # apprise not installed
                yield Check("notify", False, str(exc), "pip install 'mash-gateway[notify]'")
                return
            yield Check(f"notify {redact_url(url)}", ok, "Apprise accepts the URL" if ok else
                        "Apprise cannot read the URL", "" if ok else "see the Apprise wiki for its syntax")
        if not all(parse_notify_url(url) for url in s.notify_urls):
            return
        if not self.send:
            yield Check("notify delivery", None, "not tried (mash doctor --send sends a test message)")
            return
        for label, error in send_test(s, "Test notification from mash doctor").values():
            yield Check(f"notify send {label}", error is None, "delivered" if error is None else error,
                        "" if error is None else "check the service's address and credentials in the URL")

    def _processes(self) -> dict:
        if self.settings is None or not self.settings.db_path.exists():
            return {}
        try:
            store = Store(self.settings.db_path, readonly=True)
            try:
                return store.processes()
            finally:
                store.close()
        except (DatabaseError, RuntimeError):   # corrupt, not migrated: the store checks say so
            return {}

    def mdns(self) -> Check:
        """What the dashboard advertises on the farm's network (CONTRACT §10), as it says
        in the store; never a failure: the dashboard is not essential."""
        s = self.settings
        if not s.mdns:
            return Check("mDNS", None, "off (MDNS=0)")
        state = None
        if s.db_path.exists():
            try:
                store = Store(s.db_path, readonly=True)
                try:
                    state = mdns_state.live(store)
                finally:
                    store.close()
            except (DatabaseError, RuntimeError):
                return Check("mDNS", None, "not read (see the store checks above)")
        if not state:
            return Check("mDNS", None, "not advertised now: the dashboard advertises while it "
                                       "runs (`mash run`, or `sudo systemctl start mash-dashboard`)")
        if not state.get("addresses"):
            return Check("mDNS", None, "nothing advertised: no private IPv4 address, or the "
                                       "phone API and the dashboard both on loopback")
        services = ", ".join(f"{x['name']} port {x['port']}" for x in state["services"])
        return Check("mDNS", True, f"{services} on {state['host']} ({', '.join(state['addresses'])})")

    def processes(self):
        s = self.settings
        if not s.db_path.exists():
            yield from self._not_tried("reader", "worker", "last reading", "backlog")
            return
        procs = self._processes()
        for name, unit in (("reader", "mash-reader"), ("worker", "mash-worker")):
            beat = procs.get(name)
            if beat and beat["alive"]:
                yield Check(name, True, f"running (pid {beat['pid']}, heartbeat {beat['age_s']:.0f} s ago)")
            else:
                when = f"last heartbeat {beat['age_s']:.0f} s ago" if beat else "never started"
                yield Check(name, False, f"not running ({when})",
                            f"`sudo systemctl restart {unit}` (or `mash run`); its log: "
                            f"`journalctl -u {unit}`")
        try:
            store = Store(s.db_path, readonly=True)
            try:
                stats = store.get_stats()
            finally:
                store.close()
        except (DatabaseError, RuntimeError) as exc:
            yield Check("last reading", False, f"the store cannot be read ({exc})",
                        "see the store integrity check above")
            yield from self._not_tried("backlog")
            return
        last = stats["last_reading"]
        age = stats_age(last)
        if last is None:
            yield Check("last reading", False, "none stored yet", "see the serial checks above")
        elif age > READING_FRESH:
            yield Check("last reading", False, f"{last}, {age:.0f} s ago", "see the serial checks above")
        else:
            yield Check("last reading", True, f"{age:.0f} s ago")
        pending, oldest = stats["pending_records"], stats["oldest_pending_age_s"]
        limit = max(600.0, 3 * s.sync_interval)
        detail = f"{pending} readings pending" + (f", oldest {oldest:.0f} s" if pending else "")
        if stats["clock_held_readings"]:
            detail += f", {stats['clock_held_readings']} held for the clock"
        if s.backend_enabled and pending and oldest > limit:
            yield Check("backlog", False, detail, "see the backend checks above; `mash sync --wait` "
                        "shows the drain")
        else:
            yield Check("backlog", True, detail)

    @staticmethod
    def _not_tried(*names):
        for name in names:
            yield Check(name, None, "not tried (see above)")


# -- helpers -----------------------------------------------------------------------------------
def port_holders(port: str) -> list[tuple[int, str]]:
    """Processes with ``port`` open, as ``(pid, command)``. For a pseudo-terminal, the process
    holding its other end (a simulated board) is the board itself, not a holder."""
    target = os.path.realpath(port)
    board_side: set[int] = set()
    index = target.rsplit("/", 1)[-1] if target.startswith("/dev/pts/") else None
    found = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                link = os.readlink(fd)
                if link == target:
                    found[int(pid_dir.name)] = _command(pid_dir)
                elif index is not None and link == "/dev/ptmx":
                    info = (pid_dir / "fdinfo" / fd.name).read_text()
                    if f"tty-index:\t{index}\n" in info:
                        board_side.add(int(pid_dir.name))
        except OSError:
            continue
    return [(pid, cmd) for pid, cmd in sorted(found.items()) if pid not in board_side]


def _command(pid_dir: Path) -> str:
    try:
        return (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def email_date(value: str | None) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def stats_age(iso_ts: str | None) -> float:
    if not iso_ts:
        return float("inf")
    return (utcnow() - parse_iso(iso_ts)).total_seconds()


def main(as_json: bool = False, out=sys.stdout, send: bool = False) -> int:
    started = time.monotonic()
    checks = []
    for check in Doctor(send=send).run():
        checks.append(check)
        if not as_json:
            print(check.line(), file=out, flush=True)
    failed = [c for c in checks if c.ok is False]
    took = time.monotonic() - started
    if as_json:
        print(json.dumps({"ok": not failed, "seconds": round(took, 2),
                          "checks": [asdict(c) for c in checks]}, indent=2), file=out)
    else:
        print(f"{len(checks) - len(failed)} of {len(checks)} checks passed or off, "
              f"{len(failed)} failed ({took:.1f} s)" if failed else
              f"all {len(checks)} checks passed ({took:.1f} s)", file=out)
    return 1 if failed else 0
