"""mDNS on the farm's network (CONTRACT §10), owned by the dashboard process: the grower app
finds the gateway by ``_mash-iot._tcp`` and a browser by ``_http._tcp``.

python-zeroconf (pure Python, no daemon needed; an Avahi beside it does not conflict, both
share port 5353). What is advertised:

- ``<sid>._mash-iot._tcp.local.`` on ``PHONE_API_PORT``, TXT ``name``, ``type=rpi-gateway``,
  ``api_version=v1``, ``device_id=<sid>``, ``manufacturer=MASH``, ``port``, ``protocol=http``,
  when ``PHONE_API`` is not ``off`` and listens beyond loopback;
- ``<DEVICE_NAME> (<sid>)._http._tcp.local.`` on the dashboard's port, TXT ``path=/``, when
  the dashboard listens beyond loopback;
- both on host ``mash-<sid>.local.`` (``lan.host_label``), with an A record for each private
  IPv4 address of this machine.

The addresses are read every ``POLL_S`` seconds (getifaddrs: cheap); when they change (Wi-Fi
joins, a DHCP renewal, an interface comes up) the old records are withdrawn and the new ones
registered on a fresh responder, since zeroconf binds its sockets to the addresses it started
with. ``stop`` sends the goodbyes (TTL 0), so browsers drop the service at once. What is
advertised is written to the store (``meta`` ``mdns.advertised``) for ``mash doctor`` and the
dashboard's pairing page.
"""
from __future__ import annotations

import errno
import logging
import os
import threading

from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mash.clock import iso, utcnow
from mash.config import Settings
from mash.dashboard import lan
from mash.logs import OncePerKind
from mash.models import Store

log = logging.getLogger("mash.mdns")
STATE_KEY = "mdns.advertised"
GONE = (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ENODEV)


class _AddressGone(logging.Filter):
    """zeroconf logs a traceback for each packet that cannot leave from an address that was
    just taken away (its goodbyes at an address change): expected, and not ours to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and exc.errno in GONE)


logging.getLogger("zeroconf").addFilter(_AddressGone())


def planned_services(settings: Settings, phone_port: int | None,
                     dashboard_port: int) -> list[dict]:
    """What this configuration advertises (before any address is known); ``phone_port``
    None: the app's API is not running (off, or its port was taken), so it is not offered."""
    s = lan.sid(settings.device_id)
    services = []
    if (phone_port is not None and settings.phone_api != "off"
            and lan.reachable_host(settings.phone_api_host)):
        services.append({"type": lan.SERVICE, "name": f"{s}.{lan.SERVICE}", "port": phone_port,
                         "properties": {"name": settings.device_name, "type": "rpi-gateway",
                                        "api_version": "v1", "device_id": s,
                                        "manufacturer": "MASH", "port": str(phone_port),
                                        "protocol": "http"}})
    if lan.reachable_host(settings.dashboard_host):
        label = f"{settings.device_name[:40]} ({s[:20]})"
        services.append({"type": lan.HTTP_SERVICE, "name": f"{label}.{lan.HTTP_SERVICE}",
                         "port": dashboard_port, "properties": {"path": "/"}})
    return services


class Advertiser:
    """Keeps the services of ``planned_services`` registered on this machine's current
    private IPv4 addresses until ``stop``."""
    POLL_S = 2.0

    def __init__(self, settings: Settings, store: Store, phone_port: int | None, dashboard_port: int,
                 poll_s: float | None = None, addresses=lan.lan_ipv4):
        self.settings, self.store = settings, store
        self.services = planned_services(settings, None if phone_port is None else int(phone_port),
                                         int(dashboard_port))
        self.host = lan.host_label(settings.device_id) + ".local."
        self.poll_s = poll_s or self.POLL_S
        self.addresses = addresses
        self.current: list[str] | None = None
        self.zc: Zeroconf | None = None
        self.infos: list[ServiceInfo] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._trouble = OncePerKind(log, "mDNS: could not advertise")

    def start(self) -> "Advertiser":
        if not self.services:
            log.info("mDNS: nothing to advertise (the phone API is off or on loopback, and so "
                     "is the dashboard)")
            self._record(None)
            return self
        self._thread = threading.Thread(target=self._run, name="mdns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(15)

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        wait = 0.0
        while not self._stopped.wait(wait):
            wait = self.poll_s
            try:
                found = self.addresses()
            except OSError as exc:
                self._trouble("interfaces", str(exc))
                continue
            if found == self.current:
                continue
            if self.current:
                log.info("mDNS: addresses changed from %s to %s: registering again",
                         ", ".join(self.current), ", ".join(found) or "none")
            self._withdraw()
            self.current = found
            if not found:
                log.info("mDNS: no private IPv4 address on any interface: nothing advertised "
                         "until one comes up")
                self._record(None)
                continue
            try:
                self._register(found)
            except Exception as exc:        # zeroconf's own errors, a socket that went away
                self._trouble(type(exc).__name__, str(exc))
                self._withdraw()
                self.current = None         # try again at the next poll
        self._withdraw()
        self._record(None, stopped=True)

    def _register(self, addresses: list[str]) -> None:
        self.zc = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        for service in self.services:
            info = ServiceInfo(service["type"], service["name"], port=service["port"],
                               properties=service["properties"], server=self.host,
                               parsed_addresses=addresses)
            # another responder may hold the name (a second gateway with the same serial):
            # take "name (2)" rather than fail; the app reads device_id from the TXT anyway
            self.zc.register_service(info, allow_name_change=True)
            self.infos.append(info)
        log.info("mDNS: advertising %s on %s (%s)", ", ".join(
            f"{i.name} port {i.port}" for i in self.infos), self.host, ", ".join(addresses))
        self._record(addresses)

    def _withdraw(self) -> None:
        zc, self.zc, infos, self.infos = self.zc, None, self.infos, []
        if zc is None:
            return
        try:
            for info in infos:
                zc.unregister_service(info)          # goodbye packets: TTL 0
        except Exception as exc:                      # the address they would leave from is gone
            log.debug("mDNS: goodbye not sent: %s", exc)
        finally:
            zc.close()

    def _record(self, addresses: list[str] | None, stopped: bool = False) -> None:
        state = {"pid": os.getpid(), "at": iso(utcnow()), "host": self.host.rstrip("."),
                 "addresses": addresses or [], "stopped": stopped,
                 "services": [{"type": i.type, "name": i.name, "port": i.port}
                              for i in self.infos] if addresses else []}
        try:
            self.store.meta_set(STATE_KEY, state)
        except Exception as exc:                      # the store busy or gone: mDNS goes on
            self._trouble("store", str(exc))

    @property
    def advertising(self) -> bool:
        return bool(self.infos)


def advertised(store: Store) -> dict | None:
    """What the dashboard last said it advertises (``None``: it never did)."""
    return store.meta_get(STATE_KEY)


def live(store: Store) -> dict | None:
    """What is advertised now: the dashboard's last word, if its process still runs and has
    not withdrawn it; else None."""
    state = advertised(store)
    if not state or state.get("stopped") or not state.get("pid"):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return None                     # killed without its goodbyes: the records expire
    except PermissionError:
        pass                            # alive, another user's
    return state
