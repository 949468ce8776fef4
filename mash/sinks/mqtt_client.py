"""The MQTT link (CONTRACT.md section 3): TLS, a persistent session, a retained last will.

paho-mqtt's own loop thread owns the socket and reconnects, including when the network is down
at boot (``connect_async``). paho's own backoff doubles with no randomness, so a fleet behind
one broker restart would come back in lockstep: before each wait we set it to one draw of
tenacity's full jitter (``Reconnects``), which resets only after a connection held 60 s.
paho keeps unconfirmed QoS 1 messages in memory only, so callers that must not lose a message
(alerts, command acks) keep it in SQLite and pass ``on_confirm``: it runs when the broker's
PUBACK arrives, and only then do they mark it delivered.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mash.clock import iso, utcnow
from mash.sinks.errors import AUTH, kind_for_connack
from mash.config import Settings
from mash.contract import MAX_PARSE_BYTES, ROOMS
from mash.pacing import Reconnects

log = logging.getLogger("mash.mqtt")

def _nothing() -> None:
    pass


class _PahoNoise(logging.Filter):
    """paho logs "Client is not connected" at ERROR after every disconnect; our own
    on_disconnect already logs the state change once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "Client is not connected" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("mash.mqtt.paho").isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("mash.mqtt.paho").addFilter(_PahoNoise())


def tls_context(s: Settings) -> ssl.SSLContext:
    """TLS 1.2+, the broker's certificate and host name verified against MQTT_CA_CERTS (or
    the system's CAs)."""
    ctx = ssl.create_default_context(cafile=s.mqtt_ca_certs)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def paho_client(s: Settings, client_id: str, clean_session: bool) -> mqtt.Client:
    """A paho client with the configured credentials and TLS (the link's and the probe's)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean_session, protocol=mqtt.MQTTv311)
    if s.mqtt_username:
        c.username_pw_set(s.mqtt_username, s.mqtt_password)
    if s.mqtt_tls:
        c.tls_set_context(tls_context(s))
    return c


def probe(s: Settings, timeout: float = 5.0) -> list[tuple[str, bool | None, str]]:
    """``mash doctor``'s MQTT steps, each ``(step, ok, detail)``, stopping at the first that
    fails (later steps ``None``: not tried): ``tls`` (reach the broker and the TLS handshake
    with the configured CA), ``auth`` (CONNACK), ``subscribe`` (SUBACK on the command topic).
    Uses its own client id, so the worker's session is left alone."""
    host, port = s.mqtt_broker, s.mqtt_port
    steps: list[tuple[str, bool | None, str]] = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if s.mqtt_tls:
                with tls_context(s).wrap_socket(raw, server_hostname=host) as tls:
                    steps.append(("tls", True, f"{host}:{port}, {tls.version()}, certificate verified"))
            else:
                steps.append(("tls", True, f"{host}:{port} reached (MQTT_TLS=0: no TLS)"))
    except ssl.SSLError as exc:
        return [("tls", False, f"TLS handshake with {host}:{port} failed: {exc.reason or exc}"),
                ("auth", None, "not tried"), ("subscribe", None, "not tried")]
    except OSError as exc:
        return [("tls", False, f"cannot reach the broker at {host}:{port}: {exc.strerror or exc}"),
                ("auth", None, "not tried"), ("subscribe", None, "not tried")]
    done = threading.Event()
    result: dict = {}
    c = paho_client(s, f"mash-{s.device_id}-doctor", clean_session=True)

    def on_connect(client, userdata, flags, reason_code, properties):
        result["connack"] = reason_code
        if reason_code.is_failure:
            done.set()
        else:
            client.subscribe(f"devices/{s.device_id}/commands", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        result["suback"] = reason_codes
        done.set()

    c.on_connect, c.on_subscribe = on_connect, on_subscribe
    try:
        c.connect(host, port, keepalive=10)
        c.loop_start()
        done.wait(timeout)
    except (OSError, ssl.SSLError) as exc:
        result["error"] = str(exc)
    finally:
        c.loop_stop()
        c.disconnect()
    connack = result.get("connack")
    if connack is None:
        steps += [("auth", False, f"no answer to the login within {timeout:.0f} s "
                                  f"{result.get('error', '')}".strip()),
                  ("subscribe", None, "not tried")]
    elif connack.is_failure:
        steps += [("auth", False, f"the broker refused the login: {connack}"),
                  ("subscribe", None, "not tried")]
    else:
        steps.append(("auth", True, f"logged in as {s.mqtt_username or '(no user name)'}"))
        codes = result.get("suback")
        if codes is None:
            steps.append(("subscribe", False, "no answer to the subscription"))
        elif any(rc.is_failure for rc in codes):
            steps.append(("subscribe", False, f"the broker refused devices/{s.device_id}/commands: "
                                              f"{codes[0]}"))
        else:
            steps.append(("subscribe", True, f"devices/{s.device_id}/commands granted QoS {codes[0].value}"))
    return steps


class MQTTClient:
    def __init__(self, settings: Settings | None = None):
        self.settings = s = settings or Settings.load()
        self.device_id = s.device_id
        self.qos = s.mqtt_qos
        self.topic = lambda name: f"devices/{self.device_id}/{name}"
        self._callback = None
        self._raw_callback = False
        # the deployed MASH backend's topics for this device (CONTRACT §9): topic -> kind
        self.backend_topics: dict[str, str] = {}
        self._backend_callback = None
        self._session_up = False           # a connection is up (its subscriptions made)
        self._connected = threading.Event()
        self._lock = threading.RLock()
        self._pending: dict[int, callable] = {}    # mid -> on_confirm
        self._confirmed_early: set[int] = set()
        self.last_error: str | None = None
        self.last_error_kind: str | None = None     # mash.sinks.errors: auth or offline
        self._started = False
        self._closing = False
        self.status_extra = lambda: {}
        self.on_state_change = None       # fn(connected: bool), from paho's thread
        self.rejected = 0
        self.client = None
        if s.mqtt_enabled:
            self._build()

    # -- set-up ---------------------------------------------------------------------------
    def _build(self) -> None:
        s = self.settings
        c = paho_client(s, f"mash-{self.device_id}", clean_session=False)
        c.will_set(self.topic("status"), json.dumps({"deviceId": self.device_id,
                                                     "status": "offline"}), qos=1, retain=True)
        self.reconnects = Reconnects(cap=s.mqtt_reconnect_max)
        c.reconnect_delay_set(min_delay=1, max_delay=s.mqtt_reconnect_max)
        c.enable_logger(logging.getLogger("mash.mqtt.paho"))   # packet log at DEBUG only
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self.client = c

    @property
    def enabled(self) -> bool:
        return self.client is not None

    # -- callbacks (paho's loop thread) ----------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            reason = str(reason_code)
            kind = kind_for_connack(reason_code.value)
            if reason != self.last_error:
                log.error("MQTT broker refused %s: %s", "our credentials" if kind == AUTH
                          else "the connection", reason)
            self.last_error, self.last_error_kind = reason, kind
            return
        self.last_error = self.last_error_kind = None
        self.reconnects.connected()
        client.subscribe(self.topic("commands"), qos=1)
        with self._lock:               # against watch_backend_device: one of us subscribes
            self._session_up = True
            topics = list(self.backend_topics)
        for topic in topics:
            client.subscribe(topic, qos=1)
        log.info("MQTT connected to %s:%s", self.settings.mqtt_broker, self.settings.mqtt_port)
        self.publish_status("online")
        self._connected.set()       # after "online": a later "offline" must not overtake it
        self._notify(True)

    def _jitter_next_wait(self, client) -> None:
        # paho waits min(its delay * 2, max) next; both set to one draw makes that the draw
        delay = self.reconnects.next_delay()
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)

    def _on_connect_fail(self, client, userdata):
        self._jitter_next_wait(client)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._jitter_next_wait(client)
        if self._connected.is_set() and not self._closing:
            log.warning("MQTT offline (%s); reconnecting by itself", reason_code)
        was = self._connected.is_set()
        with self._lock:
            self._session_up = False
        self._connected.clear()
        if was:
            self._notify(False)

    def _notify(self, connected: bool) -> None:
        if self.on_state_change is not None:
            try:
                self.on_state_change(connected)
            except Exception:
                log.exception("MQTT state callback failed")

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            confirm = self._pending.pop(mid, None)
            if confirm is None:
                self._confirmed_early.add(mid)
                return
        try:
            confirm()
        except Exception:
            log.exception("MQTT on_confirm failed")

    def _on_message(self, client, userdata, msg):
        kind = self.backend_topics.get(msg.topic)
        if kind is not None:
            if self._backend_callback is not None:
                try:
                    self._backend_callback(kind, msg.topic, msg.payload)
                except Exception:
                    log.exception("backend topic callback failed")
            return
        if msg.topic != self.topic("commands"):
            self.rejected += 1
            log.warning("ignoring a message on %s: not this device's command topic", msg.topic)
            return
        callback = self._callback
        if callback is None:
            return
        try:
            if self._raw_callback:
                callback(msg.payload)
                return
            if len(msg.payload) > MAX_PARSE_BYTES:
                raise ValueError("payload too large")
            cmd = json.loads(msg.payload)
            if not isinstance(cmd, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self.rejected += 1
            log.warning("rejected a command payload: %s", exc)
            return
        try:
            callback(cmd)
        except Exception:
            log.exception("command callback failed")

    # -- the guide's API ---------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> bool:
        """Start the network loop (it reconnects by itself) and wait up to ``timeout``."""
        if not self.enabled:
            log.info("MQTT not configured")
            return False
        if not self._started:
            self.client.connect_async(self.settings.mqtt_broker, self.settings.mqtt_port,
                                      keepalive=30)
            self.client.loop_start()
            self._started = True
        return self._connected.wait(timeout)

    def is_alive(self) -> bool:
        return self._connected.is_set()

    def set_command_callback(self, fn, raw: bool = False) -> None:
        """``fn(command_dict)``; with ``raw=True``, ``fn(payload_bytes)`` for callers that
        validate (and count) malformed payloads themselves."""
        self._callback, self._raw_callback = fn, raw

    def watch_backend_device(self, device: str, callback) -> None:
        """Also listen on the deployed MASH backend's topics for its id of this device
        (``devices/{id}/command``, ``/config``, ``/request/status``): ``callback(kind, topic,
        payload_bytes)`` with kind ``command``, ``config`` or ``request_status``, from
        paho's thread. Subscribed now when connected, and on every connection."""
        topics = {f"devices/{device}/command": "command", f"devices/{device}/config": "config",
                  f"devices/{device}/request/status": "request_status"}
        self._backend_callback = callback
        with self._lock:
            if topics == self.backend_topics:
                return
            old = [t for t in self.backend_topics if t not in topics]
            self.backend_topics = topics
            up = self._session_up
        if self.enabled and up:
            if old:
                self.client.unsubscribe(old)
            for topic in topics:
                self.client.subscribe(topic, qos=1)

    def publish(self, name: str, payload: dict, retain: bool = False, on_confirm=None,
                qos: int | None = None) -> bool:
        """Publish on ``devices/<id>/<name>``; ``on_confirm`` runs on the broker's ack."""
        return self.publish_to(self.topic(name), payload, retain, on_confirm, qos)

    def publish_to(self, topic: str, payload: dict, retain: bool = False, on_confirm=None,
                   qos: int | None = None) -> bool:
        """Publish on any topic (the deployed backend's ``devices/{its id}/...`` too)."""
        if not self.enabled:
            return False
        body = json.dumps(payload, separators=(",", ":"))
        # Never call into paho while holding our lock: paho runs on_publish under its own
        # lock, and the two orders would deadlock. A PUBACK that beats the registration below
        # is parked in _confirmed_early.
        info = self.client.publish(topic, body, qos=self.qos if qos is None else qos,
                                   retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.debug("MQTT publish on %s failed: %s", topic, mqtt.error_string(info.rc))
            return False
        confirm = on_confirm or _nothing
        with self._lock:
            early = info.mid in self._confirmed_early
            if early:
                self._confirmed_early.discard(info.mid)
            else:
                self._pending[info.mid] = confirm
        if early:
            confirm()
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_sensor_data(self, data: dict, reading_id: str | None = None, on_confirm=None) -> bool:
        payload = {"deviceId": self.device_id, "readingId": reading_id,
                   "timestamp": data.get("timestamp", time.time())}
        payload.update({room: data[room] for room in ROOMS if isinstance(data.get(room), dict)})
        return self.publish("sensor_data", payload, on_confirm=on_confirm)

    def publish_status(self, status: str = "online", on_confirm=None, **stats) -> bool:
        """Retained status; with no ``stats`` given, ``status_extra()`` supplies them."""
        payload = {"deviceId": self.device_id, "status": status, "timestamp": time.time()}
        if not stats:
            try:
                stats = self.status_extra() or {}
            except Exception:
                log.debug("status stats unavailable", exc_info=True)
        payload.update(stats)
        return self.publish("status", payload, retain=True, qos=1, on_confirm=on_confirm)

    def publish_alert(self, alert_type: str, message: str, severity: str = "WARNING",
                      room: str | None = None, alert_id: str | None = None,
                      timestamp: str | None = None, on_confirm=None) -> bool:
        return self.publish("alerts", {"id": alert_id or f"{self.device_id}-{time.time_ns()}",
                                       "type": alert_type, "message": message,
                                       "severity": severity, "room": room,
                                       "timestamp": timestamp or iso(utcnow())},
                            on_confirm=on_confirm)

    def publish_actuator_states(self, states: dict, modes: dict, on_confirm=None) -> bool:
        """Retained ``actuator_states`` (CONTRACT §7): each relay's state, who set it and
        since when, and each room's mode."""
        return self.publish("actuator_states", {"timestamp": iso(utcnow()), "mode": modes,
                                                "actuators": states},
                            retain=True, qos=1, on_confirm=on_confirm)

    def publish_ack(self, command_id: str, status: str, response: dict | None = None,
                    on_confirm=None) -> bool:
        return self.publish("command_ack", {"id": command_id, "status": status,
                                            "response": response or {},
                                            "timestamp": iso(utcnow())}, on_confirm=on_confirm)

    def disconnect(self) -> None:
        """Say offline (retained) and close; a clean close sends no last will."""
        with self._lock:
            if not self.enabled or not self._started or self._closing:
                return
            self._closing = True
        if self.is_alive():
            info = self.client.publish(self.topic("status"),
                                       json.dumps({"deviceId": self.device_id, "status": "offline",
                                                   "timestamp": time.time()}), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._started = self._closing = False
        self._connected.clear()
        log.info("MQTT disconnected")


def create_mqtt_client(settings: Settings | None = None) -> MQTTClient:
    return MQTTClient(settings)
