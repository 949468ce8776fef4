"""Alert notifications from the outbox to each ``NOTIFY_URLS`` URL (part of the delivery sweep).

Each URL is its own sink, ``notify:<hash of the URL>``: ``Store.add_alerts`` owes an alert at
or above ``NOTIFY_MIN_SEVERITY`` (and its clearing) to every URL in the alert's transaction,
by the routes the worker published at start (``publish_routes``). Here, per URL and oldest
first:

- an item is marked done right after Apprise reports it sent: once per URL in a run without a
  crash; a crash between the two sends it again (at least once, counted as
  ``notify_resent`` when the send and its mark straddle a restart: see ``_count_resent``);
- a failed send leaves the item owed and the URL backs off (30 s doubling to 15 min) while
  later sweeps try again; other URLs and sinks are not held up;
- quiet hours hold an item (it stays owed) and every later item of the same alert
  (room, type) behind it: a "cleared" never goes before its "raised";
- the hour's cap drops an item, counted in the URL's state and told in one summary later.

Each URL's state (recent send times, suppressed count, failures, last delivery and error) is
one JSON value in the store (``notify.<sink>``): the cap holds across restarts.
"""
from __future__ import annotations

import datetime as dt
import logging
import socket
import time

from mash.clock import iso, utcnow
from mash.sinks import notify as rules
from mash.sinks.notify import Notifier, NotifyError
from mash.config import is_loopback
from mash.models.outbox import NOTIFY_ROUTES, NOTIFY_TEST

log = logging.getLogger("mash.worker")

PREFIX = "notify:"


def state_key(sink: str) -> str:
    return f"notify.{sink}"


def publish_routes(store, settings) -> None:
    """Tell every process's ``add_alerts`` which notification sinks an alert is owed to
    (the hashes only, never the URLs). Written only when it changed."""
    routes = ({"sinks": sorted(settings.notify_sinks), "min_severity": settings.notify_min_severity}
              if settings.notify_urls else None)
    if store.meta_get(NOTIFY_ROUTES) != routes:
        store.meta_set(NOTIFY_ROUTES, routes)
        if routes:
            log.info("notifications to %s (%s and above)",
                     ", ".join(Notifier(settings.notify_sinks).label(s) for s in routes["sinks"]),
                     routes["min_severity"])


def dashboard_link(settings) -> str | None:
    """The dashboard's address when a phone on the farm's network could open it."""
    host = settings.dashboard_host
    if not host or is_loopback(host) or not settings.dashboard_port:
        return None
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{host}:{settings.dashboard_port}/"


def _state(store, sink: str) -> dict:
    return {"sent": [], "suppressed": 0, "failures": 0, "retry_at": 0.0, "delivered": 0,
            "last_ok": None, "last_error": None, **(store.meta_get(state_key(sink)) or {})}


def deliver_notifications(ctx, now: float | None = None,
                          local: dt.datetime | None = None) -> int:
    """One pass over every URL's owed notifications; returns how many messages were sent.
    ``now`` (epoch s) and ``local`` (local wall time) are injected by tests."""
    store, settings = ctx.store, ctx.settings
    notifier: Notifier | None = getattr(ctx, "notifier", None)
    configured = notifier.sinks if notifier else {}
    for sink in store.outbox.owed_sinks(PREFIX):
        if sink not in configured:             # its URL was removed from NOTIFY_URLS
            owed = store.owed(sink, limit=1000)
            store.delivered_many([i.id for i in owed], "URL no longer in NOTIFY_URLS")
    if not configured:
        return 0
    now = time.time() if now is None else now
    local = local or dt.datetime.fromtimestamp(now)
    link = dashboard_link(settings)
    return sum(_deliver_to(ctx, notifier, sink, now, local, link) for sink in configured)


def _deliver_to(ctx, notifier: Notifier, sink: str, now: float, local, link) -> int:
    store, s = ctx.store, ctx.settings
    state = _state(store, sink)
    tests = _send_tests(store, notifier, sink, state, link)
    if state["retry_at"] > now:
        if tests:
            store.meta_set(state_key(sink), state)
        return tests
    state["sent"] = rules.recent(state["sent"], now)
    _count_resent(store, sink)
    sent, held, suppressed = tests, set(), []
    try:
        if rules.summary_due(state["suppressed"], state["sent"], now, s.notify_max_per_hour):
            notifier.send(sink, *rules.summary_text(state["suppressed"], link))
            state["suppressed"] = 0
            _sent(state, now)
            sent += 1
        for item in store.owed(sink):
            if item.kind == NOTIFY_TEST:
                continue
            m = item.message
            key = (m.get("room"), m.get("event_type"))
            if key in held:
                continue
            verdict = rules.decide(m.get("level", m["severity"]), local, state["sent"], now,
                                   max_per_hour=s.notify_max_per_hour,
                                   quiet_hours=s.notify_quiet_hours,
                                   quiet_critical=s.notify_quiet_critical)
            if verdict == rules.HOLD:
                held.add(key)
                continue
            if verdict == rules.SUPPRESS:
                suppressed.append(item.id)
                continue
            store.meta_set(inflight_key(sink), item.id)     # see _count_resent
            notifier.send(sink, *rules.alert_text(m, link))
            store.delivered(item.id)              # right after the send: once per URL
            _sent(state, now)
            sent += 1
    except NotifyError as exc:
        store.meta_set(inflight_key(sink), None)    # not sent: its retry is no resend
        state["failures"] += 1
        state["retry_at"] = now + rules.backoff(state["failures"])
        if state["last_error"] is None:           # one line per state change
            log.warning("notification to %s failed, kept owed: %s", notifier.label(sink), exc)
        state["last_error"] = str(exc)[:300]
        state["last_error_at"] = iso(utcnow())
    else:
        if state["last_error"] is not None:
            log.info("notifications to %s delivered again", notifier.label(sink))
        state.update(failures=0, retry_at=0.0, last_error=None)
    if suppressed:
        store.delivered_many(suppressed, "suppressed: NOTIFY_MAX_PER_HOUR")
        store.incr("notify_suppressed", len(suppressed))
        state["suppressed"] += len(suppressed)
    if sent:
        store.incr("notify_sent", sent)
    store.meta_set(state_key(sink), state)
    return sent


def _send_tests(store, notifier: Notifier, sink: str, state: dict, link) -> int:
    """The dashboard's test messages: one try each, past quiet hours, cap and backoff; the
    outcome is the URL's last delivery or error (``mash status``)."""
    sent = 0
    for item in store.owed(sink):
        if item.kind != NOTIFY_TEST:
            continue
        m = item.message
        try:
            notifier.send(sink, m["title"], m["message"] + (f"\n{link}" if link else ""))
        except NotifyError as exc:
            store.delivered(item.id, str(exc)[:300])
            state["last_error"], state["last_error_at"] = str(exc)[:300], iso(utcnow())
            continue
        store.delivered(item.id)
        state["delivered"] += 1
        state["last_ok"] = iso(utcnow())
        sent += 1
    return sent


def inflight_key(sink: str) -> str:
    return f"notify.inflight.{sink}"


def _count_resent(store, sink: str) -> None:
    """An item marked in flight and still owed was sent by a process killed before it
    recorded the delivery: it goes again now (at least once) and is counted
    (``notify_resent``)."""
    item_id = store.meta_get(inflight_key(sink))
    if item_id is None:
        return
    if any(i.id == item_id for i in store.owed(sink)):
        store.incr("notify_resent")
        log.warning("a notification to a URL may arrive twice: the last delivery was "
                    "interrupted before it was recorded")
    store.meta_set(inflight_key(sink), None)


def _sent(state: dict, now: float) -> None:
    state["sent"].append(now)
    state["delivered"] += 1
    state["last_ok"] = iso(utcnow())


def url_states(store, settings) -> dict[str, dict]:
    """``{sink: {url (redacted), last_ok, last_error, failures, delivered, suppressed,
    owed}}`` for ``mash status`` and the dashboard."""
    notifier = Notifier(settings.notify_sinks)
    found = {}
    for sink in settings.notify_sinks:
        st = _state(store, sink)
        found[sink] = {"url": notifier.label(sink),
            "last_ok": st["last_ok"], "last_error": st["last_error"],
            "failures": st["failures"], "delivered": st["delivered"],
            "suppressed": st["suppressed"], "owed": len(store.owed(sink, limit=1000))}
    return found


def send_test(settings, text: str = "Test notification from the MASH gateway") -> dict:
    """Send one test message to every URL now (``mash notify --test``, the dashboard's
    button, ``mash doctor --send``): ``{sink: (redacted URL, None or the error)}``."""
    notifier = Notifier(settings.notify_sinks)
    link = dashboard_link(settings)
    results = {}
    for sink in notifier.sinks:
        try:
            notifier.send(sink, "MASH: test", text + (f"\n{link}" if link else ""))
            results[sink] = (notifier.label(sink), None)
        except NotifyError as exc:
            results[sink] = (notifier.label(sink), str(exc))
    return results
