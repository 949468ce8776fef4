"""Notifications to the grower's phone or mailbox through Apprise (ntfy, Telegram, e-mail,
webhooks, ...): the words of a message, the rules for when it may go, and the sender.

Plain data in and out: the worker's delivery (``mash.tasks.notify``) reads the outbox and
keeps each URL's state in the store. Apprise is an optional extra, imported only when
``NOTIFY_URLS`` is set (``mash.config.parse_notify_url``); a URL is a secret and is shown as
``redact_url`` gives it, never in full.

Rules (``decide``), applied at delivery, per URL:
- quiet hours (``NOTIFY_QUIET_HOURS``, local time): anything below CRITICAL is held, owed,
  and sent when they end (CRITICAL too with ``NOTIFY_QUIET_CRITICAL=0``);
- at most ``NOTIFY_MAX_PER_HOUR`` messages in any 60 minutes: the rest are dropped, counted,
  and told in one "n more suppressed" summary once the hour has room again.
"""
from __future__ import annotations

import datetime as dt
import logging

from mash.config import SEVERITY_RANK, parse_notify_url, redact_url

log = logging.getLogger("mash.notify")

HOUR = 3600.0
SEND, HOLD, SUPPRESS = "send", "hold", "suppress"

QUANTITIES = {"co2": ("CO2", "ppm"), "temp": ("temperature", "°C"),
              "humidity": ("humidity", "%")}


class NotifyError(Exception):
    """A notification was not delivered; worth retrying later (Apprise gives no reason a
    caller could act on, and its own log lines may carry the URL's secret)."""


# -- the words ------------------------------------------------------------------------------
def _number(quantity: str, value) -> str:
    return f"{value:,.0f}" if quantity == "co2" else f"{value:g}"


def _clock(iso_utc: str, tz=None) -> str:
    """``HH:MM`` in local time (``tz``: for tests) of an ISO UTC timestamp."""
    at = dt.datetime.fromisoformat(iso_utc.rstrip("Z")).replace(tzinfo=dt.timezone.utc)
    return at.astimezone(tz).strftime("%H:%M")


def alert_text(m: dict, dashboard: str | None = None, tz=None) -> tuple[str, str]:
    """(title, body) for a lock screen from a ``notify_payload``: "Fruiting CO2 1,850 ppm
    (limit 1,500) since 02:14", "Fruiting CO2 back to 1,400 ppm at 02:40"."""
    event = m.get("event_type") or m["type"].removesuffix("_cleared")
    cleared = m.get("state") == "cleared"
    room = (m.get("room") or "gateway").capitalize()
    at = _clock(m["timestamp"], tz)
    quantity = next((q for q in QUANTITIES if event.endswith("_" + q)), None)
    if quantity and m.get("value") is not None:
        name, unit = QUANTITIES[quantity]
        value = _number(quantity, m["value"])
        if cleared:
            body = f"{room} {name} back to {value} {unit} at {at}"
        else:
            limit = (f" (limit {_number(quantity, m['threshold'])})"
                     if m.get("threshold") is not None else "")
            body = f"{room} {name} {value} {unit}{limit} since {at}"
    else:
        body = f"{m.get('message') or event} ({at})"
        if m.get("room"):
            body = f"{room}: {body}"
    level = m.get("level") or m.get("severity")
    title = (f"MASH OK: {event.replace('_', ' ')} cleared" if cleared
             else f"MASH {level}: {event.replace('_', ' ')}")
    if dashboard:
        body += f"\n{dashboard}"
    return title, body


def summary_text(suppressed: int, dashboard: str | None = None) -> tuple[str, str]:
    body = (f"{suppressed} more alert message{'s' if suppressed != 1 else ''} suppressed in "
            "the last hour (NOTIFY_MAX_PER_HOUR)")
    return "MASH: alerts suppressed", body + (f"\n{dashboard}" if dashboard else "")


# -- the rules ------------------------------------------------------------------------------
def in_quiet_hours(window: tuple[int, int] | None, local: dt.datetime) -> bool:
    """Is ``local`` (the gateway's local time) inside ``window`` (minutes after midnight,
    start inclusive, end exclusive; a window may span midnight)?"""
    if not window:
        return False
    start, end = window
    minute = local.hour * 60 + local.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


def recent(sent: list[float], now: float) -> list[float]:
    """The send times (epoch s) still inside the last hour."""
    return [t for t in sent if now - t < HOUR]


def decide(level: str, local: dt.datetime, sent: list[float], now: float, *,
           max_per_hour: int, quiet_hours=None, quiet_critical: bool = True) -> str:
    """SEND, HOLD (quiet hours: stays owed) or SUPPRESS (the hour's cap is reached) for one
    message of severity ``level``, given this URL's recent send times. Pure: the caller
    gives both the local wall time and the epoch time."""
    critical = SEVERITY_RANK.get(level, 0) >= SEVERITY_RANK["CRITICAL"]
    if in_quiet_hours(quiet_hours, local) and not (critical and quiet_critical):
        return HOLD
    if len(recent(sent, now)) >= max_per_hour:
        return SUPPRESS
    return SEND


def summary_due(suppressed: int, sent: list[float], now: float, max_per_hour: int) -> bool:
    """The "n more suppressed" summary goes once the hour has room for it again."""
    return suppressed > 0 and len(recent(sent, now)) < max_per_hour


def backoff(failures: int, base: float = 30.0, cap: float = 900.0) -> float:
    """Seconds before the next attempt at a URL that failed ``failures`` times in a row."""
    return min(cap, base * 2 ** max(0, failures - 1))


# -- the sender -----------------------------------------------------------------------------
class Notifier:
    """Sends to the configured URLs, one at a time, by their sink name."""

    def __init__(self, sinks: dict[str, str]):
        self.sinks = dict(sinks)          # sink name -> URL (secret)
        self._apprise = {}

    def label(self, sink: str) -> str:
        """The URL as logs and ``mash status`` may show it."""
        return redact_url(self.sinks[sink]) if sink in self.sinks else sink

    def send(self, sink: str, title: str, body: str) -> None:
        """Deliver one message to ``sink``'s URL; raises NotifyError if Apprise could not."""
        url = self.sinks.get(sink)
        if url is None:
            raise KeyError(sink)
        obj = self._apprise.get(sink)
        if obj is None:
            obj = self._apprise[sink] = parse_notify_url(url)
            if obj is None:
                raise NotifyError(f"{self.label(sink)}: not a URL Apprise can send to")
        try:
            ok = obj.notify(body=body, title=title)
        except Exception as exc:       # a plugin's bug must not take the worker down
            raise NotifyError(f"{self.label(sink)}: {type(exc).__name__}") from None
        if not ok:
            raise NotifyError(f"{self.label(sink)}: not delivered")
