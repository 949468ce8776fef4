"""Pairing a phone (CONTRACT §10): MASH-IoT's pairing QR for the grower app, and the URLs of
this gateway's API and dashboard, by name and by address.

The QR is drawn by ``segno`` (pure Python): as SVG for the dashboard (an image the server
makes, no script) and as text for ``mash pair`` in a terminal. Which host a link carries is
``lan.url_host``'s rule: the ``.local`` name while our advertiser answers for it, the current
address otherwise. The app's own QR always carries the address: its JSON field is
``ipAddress`` and the app connects to it as it is.
"""
from __future__ import annotations

import io
import json

import segno

from mash.config import Settings
from mash.dashboard import lan


def app_payload(settings: Settings, address: str, port: int | None = None) -> str:
    """The JSON MASH-IoT's pairing QR carries, key for key."""
    return json.dumps({"type": "mash_device", "deviceId": settings.device_id,
                       "deviceName": settings.device_name, "ipAddress": address,
                       "port": port or settings.phone_api_port}, separators=(",", ":"))


def qr(text: str) -> segno.QRCode:
    return segno.make(text, error="m", micro=False)


def svg(text: str) -> str:
    """A QR of ``text`` as a standalone SVG document (dark on white, a quiet zone of 4)."""
    out = io.BytesIO()
    qr(text).save(out, kind="svg", scale=6, border=4, dark="#000", light="#fff",
                  xmldecl=True, svgns=True, title=None)
    return out.getvalue().decode()


def terminal(text: str) -> str:
    """A QR of ``text`` in Unicode half blocks, for ``mash pair``."""
    out = io.StringIO()
    qr(text).terminal(out=out, compact=True, border=2)
    return out.getvalue()


def links(settings: Settings, advertised: bool, addresses: list[str],
          dashboard_port: int | None = None, phone_port: int | None = None) -> dict:
    """``{"app": {...}, "dashboard": {...}}``: for each, ``url`` (the rule's choice), the URL
    ``by_name`` and ``by_address`` (None where it cannot be reached from the LAN), and why."""
    sid_host = lan.host_name(settings.device_id)
    out = {}
    for key, bind, port, path, on in (
            ("app", settings.phone_api_host, phone_port or settings.phone_api_port, "/api",
             settings.phone_api != "off"),
            ("dashboard", settings.dashboard_host, dashboard_port or settings.dashboard_port, "/",
             True)):
        entry = {"url": None, "by_name": None, "by_address": None, "note": None}
        if not on:
            entry["note"] = "off (PHONE_API=off)"
        elif not lan.reachable_host(bind):
            entry["note"] = (f"listens on {bind} only: not reachable from a phone"
                             + (" (set a password, then DASHBOARD_HOST=0.0.0.0)"
                                if key == "dashboard" else " (PHONE_API_HOST)"))
        else:
            address = lan.url_host(settings.device_id, False, bind, addresses)
            entry["by_address"] = f"http://{address}:{port}{path}" if address else None
            entry["by_name"] = f"http://{sid_host}:{port}{path}" if advertised else None
            entry["url"] = entry["by_name"] or entry["by_address"]
            if entry["url"] is None:
                entry["note"] = "no private IPv4 address on any interface yet"
        out[key] = entry
    return out
