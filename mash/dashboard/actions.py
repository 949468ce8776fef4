"""What the grower can do from the page, each through the path the other processes use: a
relay switch goes into the command ledger (source ``local``) for the reader to write and the
worker to acknowledge to both sinks; limits and room modes are a ``CONFIGURE`` (the same
check against the limits in force and merge as the command, ``commands.configure``, recorded
in the ledger and acknowledged the same way);
"Sync now" runs ``mash sync`` itself, which enqueues the queue's forced sync. (As a child
process: importing the worker's tasks here would cost the dashboard 18 MB of cloud clients
it never uses.)"""
from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import threading

from mash import protocol
from mash.commands import Rejected, configure as checked_configuration
from mash.config import Settings
from mash.contract import ROOM_MODES, ROOMS
from mash.models import COMPLETED, Store
from mash.models.outbox import NOTIFY_ROUTES, NOTIFY_TEST


class ActionError(ValueError):
    """Bad input from the page: a 400 with this message."""


def _command_id() -> str:
    return f"local-{secrets.token_hex(6)}"


def switch(store: Store, actuator, state) -> str:
    """Queue ``set_actuator`` for the reader; returns the command id."""
    try:
        line = protocol.encode_command(actuator, state)
    except ValueError as exc:
        raise ActionError(str(exc)) from None
    command_id = _command_id()
    store.add_command(command_id, "set_actuator", json.loads(line), "local")
    return command_id


def test_notification(store: Store) -> int:
    """Owe a test message to each notification URL the worker configured (the worker sends
    it, one try, at once: the page never loads Apprise); returns how many URLs."""
    sinks = (store.meta_get(NOTIFY_ROUTES) or {}).get("sinks") or []
    if not sinks:
        raise ActionError("no notification URL configured (NOTIFY_URLS), or the worker has "
                          "not started since it was set")
    with store.transaction():
        store.outbox.add(NOTIFY_TEST, _command_id(), {
            "title": "MASH: test", "message": "Test notification from the MASH dashboard"},
            sinks=sinks)
    return len(sinks)



def configure(settings: Settings, store: Store, params) -> tuple[str, dict]:
    """Apply a CONFIGURE from the page; returns ``(command id, configuration now)``. One that
    cannot run with the limits in force is a 400 and stored nowhere."""
    if not isinstance(params, dict) or not params:
        raise ActionError("nothing to change")
    command_id = _command_id()
    with store.transaction():
        try:
            merged = checked_configuration(settings, store.meta_get("configuration"), params)
        except Rejected as exc:
            raise ActionError(str(exc).removeprefix("malformed: ")) from None
        store.meta_set("configuration", merged)
        store.add_command(command_id, "CONFIGURE", params, "local", status=COMPLETED,
                          response={"configuration": merged})
    return command_id, merged


def set_mode(settings: Settings, store: Store, room, mode) -> str:
    if room not in ROOMS or mode not in ROOM_MODES:
        raise ActionError(f"room must be one of {', '.join(ROOMS)} and mode one of "
                          f"{', '.join(ROOM_MODES)}")
    return configure(settings, store, {"mode": {room: mode}})[0]


log = logging.getLogger("mash.dashboard")


class SyncNow:
    """``mash sync`` in a child process, one at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: subprocess.Popen | None = None

    def __call__(self, store: Store) -> dict:
        pending = store.pending_count()
        with self._lock:
            if self._running is not None and self._running.poll() is None:
                return {"enqueued": False, "pending": pending, "note": "a sync is being enqueued"}
            proc = subprocess.Popen([sys.executable, "-m", "mash", "sync"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self._running = proc
        threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        return {"enqueued": True, "pending": pending}

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            log.warning("dashboard: mash sync failed (%s): %s", proc.returncode,
                        (err or "").strip().splitlines()[-1:] or "no message")
