"""Settings: one object built from the environment and ``config/.env``.

Every key of CONTRACT.md section 5 is read here and nowhere else, and checked at start so a
bad value stops the gateway with one line naming the key (``ConfigError``), not a traceback
an hour later in a task.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from mash.contract import CONTROL_MODES, MAX_READINGS_PER_REQUEST
from mash.rules import (DEFAULT_CONTROL, DEFAULT_THRESHOLDS, ConfigError, merge_control,
                        merge_thresholds)


STANDARD_BAUDS = (300, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# CONTRACT §8: the MASH apps' serial format (the pattern only: the team's own serials fail
# the check digit). Another DEVICE_ID still works; the log and ``mash doctor`` warn.
MASH_SERIAL_RE = re.compile(r"^MASH-[ABR]\d+-[A-Z]{3}\d{2}-[0-9A-F]{6}$")
FIREBASE_LAYOUTS = ("apps", "guide", "both")      # FIREBASE_LAYOUT: CONTRACT §8, §4, both
BACKEND_PROFILES = ("guide", "mash")              # BACKEND_PROFILE: CONTRACT §2, §9
# BACKEND_API_KEY's default: the deployed MASH backend lets any non-empty X-API-Key past its
# CSRF check and validates none (CONTRACT §9), so a fixed value works until it does.
DEFAULT_API_KEY = "mash-gateway"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


RAM_DIR = Path("/dev/shm")
RUN_DIR = Path("/run/mash")       # systemd's RuntimeDirectory=mash (mash service install)


def resolve_queue_dir(data_dir: Path, configured: Path | None = None,
                      runtime: Path | None = None) -> Path:
    """Where the queue file of the gateway whose data is in ``data_dir`` lives.

    The reader, the worker and the shell must agree on it without talking, so it is derived
    from the data directory's absolute path under the first RAM location that exists:
    ``runtime`` (systemd's ``RUNTIME_DIRECTORY``), ``/run/mash`` (the units made it, so a
    shell finds it too), ``/dev/shm/mash-<uid>``; else the data directory itself.
    ``configured`` (``MASH_QUEUE_DIR``) is used as it is."""
    if configured is not None:
        return configured
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    for root in (runtime, RUN_DIR):
        if root is not None and root.is_dir() and os.access(root, os.W_OK):
            return root / digest
    if RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK):
        return RAM_DIR / f"mash-{os.getuid()}" / digest
    return Path(data_dir)


def checkout() -> Path | None:
    """The project checkout this package runs from (an editable install, or the source tree
    itself), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def home() -> Path:
    """``MASH_HOME``: the one place ``config/.env`` and ``data/`` are found, whatever the
    current directory. From the environment only (it says where ``config/.env`` is); default
    the checkout the package runs from, else ``~/.local/share/mash`` for an installed copy."""
    value = os.environ.get("MASH_HOME", "").strip()
    if value:
        return Path(value).expanduser().resolve()
    return release_home() or checkout() or Path.home() / ".local" / "share" / "mash"


def release_home() -> Path | None:
    """The gateway's home when this Python is one of its releases
    (``<home>/releases/<version>``, beside ``<home>/current``, see ``mash.releases``): a
    release installed from a wheel is no checkout, yet it serves the same home."""
    prefix = Path(sys.prefix).resolve()
    if prefix.parent.name == "releases" and (prefix.parent.parent / "current").is_symlink():
        return prefix.parent.parent.resolve()
    return None


def in_home(value: str | os.PathLike) -> Path:
    """A configured path; a relative one is relative to ``home()``, never to the current
    directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else home() / path


def env_file_path() -> Path:
    """``MASH_ENV_FILE``, else ``<MASH_HOME>/config/.env``."""
    return in_home(os.environ.get("MASH_ENV_FILE", "").strip() or "config/.env")


def data_dir_from(env: dict) -> Path:
    """``MASH_DATA_DIR``, else ``<MASH_HOME>/data``: what every process and command opens."""
    value = env.get("MASH_DATA_DIR")
    value = value.strip() if isinstance(value, str) else value
    return in_home(value or "data")


def environment(env_file: str | os.PathLike | None = None) -> dict:
    """``os.environ`` over ``config/.env`` (``env_file``, else ``env_file_path()``)."""
    path = in_home(env_file) if env_file else env_file_path()
    return {**(dotenv_values(path) if path.is_file() else {}), **os.environ}


def runtime_dir_from(env) -> Path | None:
    """systemd's ``RUNTIME_DIRECTORY`` (the units' ``/run/mash``), when there is one."""
    value = (env.get("RUNTIME_DIRECTORY") or "").strip()
    return Path(value) if value else None


def queue_path_from(env: dict) -> Path:
    """The queue file from the environment alone, without validating anything else: the
    Huey instance must exist at import, before a bad setting can be reported."""
    configured = (env.get("MASH_QUEUE_DIR") or "").strip()
    return resolve_queue_dir(data_dir_from(env), Path(configured) if configured else None,
                             runtime_dir_from(env)) / "queue.db"


@dataclass(frozen=True)
class Settings:
    device_id: str = "rpi_gateway_001"
    device_name: str = "MASH IoT Gateway"
    device_email: str | None = None
    device_password: str | None = field(default=None, repr=False)
    backend_url: str | None = None
    backend_allow_insecure: bool = False
    backend_timeout: float = 10.0
    backend_max_rpm: int = 60          # BACKEND_MAX_RPM: requests a minute in all (mash.pacing)
    backend_profile: str = "guide"     # BACKEND_PROFILE: guide (CONTRACT §2) | mash (§9)
    backend_api_key: str = field(default=DEFAULT_API_KEY, repr=False)    # BACKEND_API_KEY
    mqtt_broker: str | None = None
    mqtt_port: int = 8883
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_ca_certs: str | None = None
    mqtt_tls: bool = True
    mqtt_qos: int = 1
    mqtt_reconnect_max: int = 60      # MQTT_RECONNECT_MAX: s, the cap of the reconnect jitter
    firebase_database_url: str | None = None
    firebase_credentials: str = "config/firebase_config.json"
    firebase_layout: str = "both"
    sync_interval: int = 60
    batch_size: int = 50
    command_poll_interval: int = 10
    heartbeat_interval: int = 60
    serial_port: str | None = None
    serial_baud: int = 9600
    data_dir: Path = field(default_factory=lambda: home() / "data")
    queue_dir: Path | None = None
    runtime_dir: Path | None = None
    thresholds: dict = field(default_factory=lambda: merge_thresholds(DEFAULT_THRESHOLDS, {}))
    stale_after: int = 120
    max_db_mb: int = 1024
    control_mode: str = "auto"
    override_minutes: float = 30.0
    control_rules: dict = field(default_factory=dict)
    log_level: str = "INFO"
    clock_sync: str = "auto"
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8080
    config_pull_interval: int = 600
    sim_sync: bool = False          # SIM_SYNC: a simulated board's readings go to the sinks too
    simulated_board: bool = False   # MASH_SIMULATED_BOARD: SERIAL_PORT is a simulated board's pty
    notify_urls: tuple = field(default=(), repr=False)    # Apprise URLs: secrets, never logged
    notify_min_severity: str = "CRITICAL"
    notify_max_per_hour: int = 6
    notify_quiet_hours: tuple | None = None               # (start, end) minutes after midnight
    notify_quiet_critical: bool = True                     # CRITICAL still goes in quiet hours
    update_health_window: float = 120.0   # s an update's services must stay up to be kept
    # -- on the farm's network (CONTRACT §10): mDNS and the grower app's local API -----------
    mdns: bool = True                   # MDNS: advertise _mash-iot._tcp (and _http._tcp)
    phone_api: str = "read"             # PHONE_API: off | read | control
    phone_api_host: str = "0.0.0.0"     # PHONE_API_HOST
    phone_api_port: int = 5000          # PHONE_API_PORT

    # -- derived -------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data_dir / "mash.db"

    @property
    def queue_path(self) -> Path:
        """The Huey queue's file. It holds no durable state (every job is a sweep over
        ``mash.db``), so it lives on RAM-backed storage where there is some: the SD card is
        spared every enqueue and dequeue (``resolve_queue_dir``)."""
        return resolve_queue_dir(self.data_dir, self.queue_dir, self.runtime_dir) / "queue.db"

    @property
    def backend_enabled(self) -> bool:
        return bool(self.backend_url and self.device_email and self.device_password)

    @property
    def mqtt_enabled(self) -> bool:
        return bool(self.mqtt_broker)

    @property
    def firebase_enabled(self) -> bool:
        return bool(self.firebase_database_url)

    @property
    def api_base(self) -> str | None:
        """BACKEND_URL with ``/api/v1`` appended when it has no path (CONTRACT §2)."""
        if not self.backend_url:
            return None
        url = self.backend_url.rstrip("/")
        return url if urlsplit(url).path not in ("", "/") else url + "/api/v1"

    @property
    def notify_sinks(self) -> dict[str, str]:
        """``{"notify:<hash>": url}``: the outbox knows a URL by its hash, not its secret."""
        return {notify_sink(url): url for url in self.notify_urls}

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, env: dict | None = None, env_file: str | os.PathLike | None = None) -> "Settings":
        """Read settings from ``env`` (default: ``os.environ`` over ``config/.env``);
        raises ConfigError on a bad value."""
        return cls.from_mapping(env if env is not None else environment(env_file))

    @classmethod
    def from_mapping(cls, env: dict) -> "Settings":
        def text(key, default=None):
            value = env.get(key)
            value = value.strip() if isinstance(value, str) else value
            return value if value else default

        def integer(key, default, lo, hi):
            raw = text(key)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(key, "must be a whole number", raw) from None
            if not lo <= value <= hi:
                raise ConfigError(key, f"must be between {lo} and {hi}", raw)
            return value

        def flag(key, default):
            raw = text(key)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(key, "must be 1 or 0", raw)

        device_id = text("DEVICE_ID", cls.device_id)
        if not DEVICE_ID_RE.match(device_id):
            raise ConfigError("DEVICE_ID", "letters, digits, '_', '-' and '.' only (it is part of "
                                           "MQTT topics), at most 64", device_id)

        insecure = flag("BACKEND_ALLOW_INSECURE", False)
        backend_url = text("BACKEND_URL")
        if backend_url:
            parts = urlsplit(backend_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("BACKEND_URL", "must be an https:// URL", backend_url)
            if parts.scheme == "http" and not (is_loopback(parts.hostname) or insecure):
                raise ConfigError("BACKEND_URL", "plain http is refused except on a loopback host "
                                                 "or with BACKEND_ALLOW_INSECURE=1", backend_url)
        timeout = text("BACKEND_TIMEOUT")
        try:
            backend_timeout = float(timeout) if timeout else cls.backend_timeout
        except ValueError:
            raise ConfigError("BACKEND_TIMEOUT", "must be a number of seconds", timeout) from None
        if not 0 < backend_timeout <= 300:
            raise ConfigError("BACKEND_TIMEOUT", "must be between 0 and 300 seconds", timeout)

        backend_max_rpm = integer("BACKEND_MAX_RPM", cls.backend_max_rpm, 1, 6000)
        backend_profile = text("BACKEND_PROFILE", cls.backend_profile).lower()
        if backend_profile not in BACKEND_PROFILES:
            raise ConfigError("BACKEND_PROFILE", "must be guide (the integration guide's API) or "
                              "mash (the deployed MASH backend)", backend_profile)
        backend_api_key = text("BACKEND_API_KEY", DEFAULT_API_KEY)
        if not backend_api_key or len(backend_api_key) > 256 or any(
                not 0x21 <= ord(c) <= 0x7e for c in backend_api_key):
            raise ConfigError("BACKEND_API_KEY", "must be 1 to 256 printable ASCII characters "
                              "without spaces (it is an HTTP header)", "<hidden>")

        qos = integer("MQTT_QOS", 1, 0, 2)
        if qos == 2:
            raise ConfigError("MQTT_QOS", "QoS 2 is refused (the guide advises against it); use 0 or 1",
                              qos)
        ca = text("MQTT_CA_CERTS")
        if ca and not Path(ca).is_file():
            raise ConfigError("MQTT_CA_CERTS", "no such file", ca)

        serial_port = text("SERIAL_PORT")
        baud = integer("SERIAL_BAUD", 9600, 300, 115200)
        if baud not in STANDARD_BAUDS:
            raise ConfigError("SERIAL_BAUD", "not a standard baud rate "
                                             f"({', '.join(map(str, STANDARD_BAUDS))})", baud)

        raw_thresholds = text("ALERT_THRESHOLDS")
        override = {}
        if raw_thresholds:
            try:
                override = json.loads(raw_thresholds)
            except ValueError:
                raise ConfigError("ALERT_THRESHOLDS", "must be JSON like "
                                  '{"fruiting":{"temp_max":27}}') from None
        thresholds = merge_thresholds(DEFAULT_THRESHOLDS, override)

        level = text("LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR", level)

        control_mode = text("CONTROL_MODE", "auto").lower()
        if control_mode not in CONTROL_MODES:
            raise ConfigError("CONTROL_MODE", f"must be one of {', '.join(CONTROL_MODES)}",
                              control_mode)
        raw_rules = text("CONTROL_RULES")
        control_rules = {}
        if raw_rules:
            try:
                control_rules = json.loads(raw_rules)
            except ValueError:
                raise ConfigError("CONTROL_RULES", 'must be JSON like {"fruiting":{"humidity_low":86}}') from None
        merge_control(DEFAULT_CONTROL, control_rules)         # raises ConfigError naming the key

        clock_sync = text("CLOCK_SYNC", "auto").lower()
        if clock_sync not in ("auto", "trust"):
            raise ConfigError("CLOCK_SYNC", "must be auto (wait for NTP or the backend's time) or "
                                            "trust (the clock is right from boot)", clock_sync)

        mqtt_broker, mqtt_tls = text("MQTT_BROKER"), flag("MQTT_TLS", True)
        if mqtt_broker and not mqtt_tls and not is_loopback(mqtt_broker):
            # the broker password (and every command) would cross the network in clear
            raise ConfigError("MQTT_TLS", "plain MQTT is refused except for a broker on this "
                                          f"machine (MQTT_BROKER={mqtt_broker})", "0")

        fb_url = text("FIREBASE_DATABASE_URL")
        if fb_url:
            parts = urlsplit(fb_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("FIREBASE_DATABASE_URL", "must be an https:// URL", fb_url)
            if parts.scheme == "http" and not is_loopback(parts.hostname):
                raise ConfigError("FIREBASE_DATABASE_URL", "plain http is refused except on a "
                                  "loopback host (an emulator)", fb_url)

        firebase_layout = text("FIREBASE_LAYOUT", "both").lower()
        if firebase_layout not in FIREBASE_LAYOUTS:
            raise ConfigError("FIREBASE_LAYOUT", "must be apps (the MASH apps' paths), guide "
                              "(the guide's sensor_data) or both", firebase_layout)

        notify = _notify_settings(text("NOTIFY_URLS"), text("NOTIFY_MIN_SEVERITY", "CRITICAL"),
                                  text("NOTIFY_QUIET_HOURS"))

        return cls(
            device_id=device_id,
            device_name=text("DEVICE_NAME", cls.device_name),
            device_email=text("DEVICE_EMAIL"),
            device_password=text("DEVICE_PASSWORD"),
            backend_url=backend_url,
            backend_allow_insecure=insecure,
            backend_timeout=backend_timeout,
            backend_max_rpm=backend_max_rpm,
            backend_profile=backend_profile,
            backend_api_key=backend_api_key,
            mqtt_broker=mqtt_broker,
            mqtt_port=integer("MQTT_PORT", 8883, 1, 65535),
            mqtt_username=text("MQTT_USERNAME"),
            mqtt_password=text("MQTT_PASSWORD"),
            mqtt_ca_certs=ca,
            mqtt_tls=mqtt_tls,
            mqtt_qos=qos,
            mqtt_reconnect_max=integer("MQTT_RECONNECT_MAX", 60, 1, 3600),
            firebase_database_url=fb_url,
            firebase_credentials=str(in_home(text("FIREBASE_CREDENTIALS", cls.firebase_credentials))),
            firebase_layout=firebase_layout,
            sync_interval=integer("SYNC_INTERVAL", 60, 1, 86400),
            batch_size=integer("BATCH_SIZE", 50, 1, MAX_READINGS_PER_REQUEST),
            command_poll_interval=integer("COMMAND_POLL_INTERVAL", 10, 1, 3600),
            heartbeat_interval=integer("HEARTBEAT_INTERVAL", 60, 1, 86400),
            serial_port=serial_port,
            serial_baud=baud,
            data_dir=data_dir_from(env),
            queue_dir=Path(text("MASH_QUEUE_DIR")) if text("MASH_QUEUE_DIR") else None,
            runtime_dir=runtime_dir_from(env),
            thresholds=thresholds,
            stale_after=integer("STALE_AFTER", 120, 10, 86400),
            max_db_mb=integer("MAX_DB_MB", 1024, 1, 1_000_000),
            control_mode=control_mode,
            override_minutes=integer("OVERRIDE_MINUTES", 30, 1, 7 * 24 * 60),
            control_rules=control_rules,
            log_level=level,
            clock_sync=clock_sync,
            dashboard_host=text("DASHBOARD_HOST", "127.0.0.1"),
            dashboard_port=integer("DASHBOARD_PORT", 8080, 0, 65535),
            config_pull_interval=integer("CONFIG_PULL_INTERVAL", 600, 10, 86400),
            sim_sync=flag("SIM_SYNC", False),
            simulated_board=flag("MASH_SIMULATED_BOARD", False),
            notify_max_per_hour=integer("NOTIFY_MAX_PER_HOUR", 6, 1, 3600),
            notify_quiet_critical=flag("NOTIFY_QUIET_CRITICAL", True),
            update_health_window=float(integer("UPDATE_HEALTH_WINDOW", 120, 1, 3600)),
            **notify,
            **_lan_settings(text, integer, flag),
        )


# -- on the farm's network (MDNS, PHONE_API_*) ----------------------------------------------
PHONE_API_LEVELS = ("off", "read", "control")


def _lan_settings(text, integer, flag) -> dict:
    level = text("PHONE_API", "read").lower()
    if level not in PHONE_API_LEVELS:
        raise ConfigError("PHONE_API", "must be off, read (readings and relay states) or "
                                       "control (also relays, mode and automation)", level)
    host = text("PHONE_API_HOST", "0.0.0.0")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError("PHONE_API_HOST", "must be an address to listen on, like 0.0.0.0 "
                                                "or 127.0.0.1", host) from None
    return dict(mdns=flag("MDNS", True), phone_api=level, phone_api_host=host,
                phone_api_port=integer("PHONE_API_PORT", 5000, 0, 65535))


# -- notifications (NOTIFY_*) ---------------------------------------------------------------
SEVERITY_RANK = {"INFO": 0, "WARNING": 1, "CRITICAL": 2}
NOTIFY_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://\S+$")
QUIET_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)$")


def notify_sink(url: str) -> str:
    """The outbox sink of one notification URL: stable for the URL, without its secret."""
    return "notify:" + hashlib.sha256(url.encode()).hexdigest()[:10]


def redact_url(url: str) -> str:
    """What logs and ``mash status`` show of a notification URL: its scheme and host only
    (user, password, tokens, path and query are secrets in most Apprise URLs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
    except ValueError:
        return "?://?"
    return f"{parts.scheme or '?'}://{host}"


def parse_notify_url(url: str):
    """Apprise's own parse of ``url`` (its plugin object), or None when Apprise refuses it.
    Apprise is an optional extra, imported here only when NOTIFY_URLS is set; its own log
    lines are kept out of ours (they carry parts of the URL)."""
    try:
        import apprise
    except ImportError:
        raise ConfigError("NOTIFY_URLS", "is set but apprise is not installed: "
                                         "pip install 'mash-gateway[notify]'") from None
    logging.getLogger("apprise").propagate = False
    return apprise.Apprise.instantiate(url)


def check_notify_urls(urls) -> None:
    """Apprise's own parse of every URL; ConfigError naming the key (and the URL redacted:
    the value is a secret) for the first it refuses, or when apprise is not installed.
    Made by the processes that send (the worker at start, ``mash notify``, ``mash doctor``),
    not by every settings load: loading Apprise's plugins costs about 40 MB and over a second
    on a Pi, which the reader and the dashboard should not pay."""
    for url in urls:
        if parse_notify_url(url) is None:
            raise ConfigError("NOTIFY_URLS", f"not a URL Apprise can send to: {redact_url(url)} "
                                             "(see https://github.com/caronc/apprise/wiki)")


def _notify_settings(urls: str | None, severity: str, quiet: str | None) -> dict:
    found = tuple(u for u in (urls or "").split() if u)
    for url in found:       # the cheap shape check every process makes; Apprise's in the worker
        if not NOTIFY_URL_RE.match(url):
            raise ConfigError("NOTIFY_URLS", f"not a URL (scheme://...): {redact_url(url)}")
    severity = severity.upper()
    if severity not in SEVERITY_RANK:
        raise ConfigError("NOTIFY_MIN_SEVERITY", "must be INFO, WARNING or CRITICAL", severity)
    window = None
    if quiet:
        m = QUIET_RE.match(quiet)
        if not m:
            raise ConfigError("NOTIFY_QUIET_HOURS", "must be like 22:00-06:00 (local time)", quiet)
        h1, m1, h2, m2 = map(int, m.groups())
        window = (h1 * 60 + m1, h2 * 60 + m2)
        if window[0] == window[1]:
            raise ConfigError("NOTIFY_QUIET_HOURS", "start and end must differ", quiet)
    return dict(notify_urls=found, notify_min_severity=severity, notify_quiet_hours=window)
