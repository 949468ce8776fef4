"""Commands in: the backend poll, MQTT and the MASH apps' Firebase ``command_queue`` feed one
intake, and the ledger keeps each id once.

``set_actuator`` waits in the ledger for the reader (the only writer to the serial port);
``REQUEST_STATUS``, ``force_sync`` and ``CONFIGURE`` are handled here, in the worker;
``update`` and ``RESTART`` start ``mash update`` / ``mash restart`` in a session of their own
(they restart this worker, so they must outlive it), which acknowledges the command itself
once the health window has judged the services.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import subprocess

from mash import releases
from mash.clock import from_epoch
from mash.config import home
from mash.sinks.firebase import FirebaseError, QueueItemRejected, command_from_queue
from mash.commands import (Rejected, configure, mash_mqtt_command, parse_payload, usable_id,
                           validate)
from mash.logs import OncePerKind
from mash.models import FAILED, RUNNING
from mash.tasks.loop import BackgroundLoop
from mash.tasks.sync import backend_call, ensure_registered

log = logging.getLogger("mash.commands")
_rejected_log = OncePerKind(log, "rejected a command")


def count_unusable(store, kind: str, detail: str) -> None:
    store.incr(f"bad_command.{kind}")
    _rejected_log(kind, detail)


def intake(ctx, cmd: dict, source: str, size: int | None = None) -> str:
    """Put one command in the ledger (or reject it). Returns what happened, for logs and
    tests: ``queued``, ``done``, ``failed``, ``duplicate`` or ``dropped``."""
    store = ctx.store
    if size is None:
        size = len(json.dumps(cmd, default=str))
    command_id = cmd.get("id")
    if not usable_id(command_id):
        count_unusable(store, "no_usable_id", repr(command_id)[:80])
        return "dropped"
    if store.known_command(command_id):
        store.incr("command.duplicate")
        return "duplicate"
    try:
        offset = ctx.clock_offset()
        now = None if offset is None else from_epoch(ctx.clock.wall() + offset)
        names = (ctx.settings.device_id,) + ((ctx.backend_device,) if ctx.backend_device else ())
        command, params, expires = validate(cmd, names, size, now=now)
        if expires is not None:      # in this machine's clock, which the reader compares with
            expires -= dt.timedelta(seconds=offset)
    except Rejected as exc:
        name = cmd.get("command") if isinstance(cmd.get("command"), str) else "?"
        if store.add_command(command_id, name[:64], {}, source, status=FAILED, reason=str(exc)):
            store.incr("bad_command.rejected")
            _rejected_log("rejected", f"{command_id}: {exc}")
            log.info("command %s from %s failed: %s", command_id, source, exc)
            ctx.wake("deliver")
            return "failed"
        return "duplicate"
    if command == "set_actuator":
        if not store.add_command(command_id, command, params, source, expires_at=expires):
            return "duplicate"
        log.info("command %s from %s: set %s %s (for the reader)", command_id, source,
                 params["actuator"], params["state"])
        return "queued"
    if command == "CONFIGURE":
        return configure_command(ctx, command_id, params, source)
    if command in ("update", "RESTART"):
        return maintenance_command(ctx, command_id, command, params, source)
    if not store.add_command(command_id, command, params, source, status=RUNNING):
        return "duplicate"
    response = run_worker_command(ctx, command, params)
    store.finish_command(command_id, True, response=response)
    log.info("command %s from %s (%s) completed", command_id, source, command)
    ctx.wake("deliver")
    return "done"


def run_worker_command(ctx, command: str, params: dict) -> dict:
    if command == "REQUEST_STATUS":
        return {"stats": ctx.publish_status()}
    if command == "force_sync":
        ctx.wake("sync")
        return {"sync": "enqueued"}
    raise AssertionError(command)


def configure_command(ctx, command_id: str, params: dict, source: str) -> str:
    """CONFIGURE: checked against the limits in force (``commands.configure``), then stored
    and acknowledged in one transaction, so the dashboard, a pulled configuration and this
    never merge over each other. One that cannot run with those limits is acknowledged
    ``failed`` with the reason and stored nowhere."""
    store = ctx.store
    with store.transaction():
        if not store.add_command(command_id, "CONFIGURE", params, source, status=RUNNING):
            return "duplicate"
        try:
            merged = configure(ctx.settings, store.meta_get("configuration"), params)
        except Rejected as exc:
            store.finish_command(command_id, False, reason=str(exc))
            store.incr("bad_command.rejected")
            merged, reason = None, str(exc)
        else:
            store.meta_set("configuration", merged)
            store.finish_command(command_id, True, response={"configuration": merged})
    ctx.wake("deliver")
    if merged is None:
        _rejected_log("rejected", f"{command_id}: {reason}")
        log.info("command %s from %s failed: %s", command_id, source, reason)
        return "failed"
    ctx.reload_configuration()
    log.info("command %s from %s (CONFIGURE) completed", command_id, source)
    return "done"


UPDATE_LOG = "update.log"


def maintenance_command(ctx, command_id: str, command: str, params: dict, source: str) -> str:
    """``update`` / ``RESTART``: marked running in the ledger (once per id), then handed to
    ``mash update --command ID`` / ``mash restart --command ID`` in its own session, its output
    appended to ``<data>/update.log``. That process finishes the command (completed with the
    version, or failed with the reason) when the services are judged."""
    store = ctx.store
    if not store.add_command(command_id, command, params, source,
                             status=RUNNING):
        return "duplicate"
    verb = "update" if command == "update" else "restart"
    try:
        start_maintenance(ctx, verb, "--command", command_id)
    except OSError as exc:
        store.finish_command(command_id, False, reason=f"could not start mash {verb}: {exc}")
        ctx.wake("deliver")
        return "failed"
    log.info("command %s from %s (%s): mash %s started", command_id, source, command, verb)
    return "queued"


def start_maintenance(ctx, *args: str) -> None:
    """``mash <args>`` in a session of its own (it must outlive this worker), its output
    appended to ``<data>/update.log``. Raises OSError."""
    with open(ctx.settings.data_dir / UPDATE_LOG, "ab") as out:
        subprocess.Popen([releases.python(home()), "-m", "mash", *args],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, "PYTHONSAFEPATH": "1"})


def resume_interrupted_update(ctx) -> bool:
    """At the worker's start: an update stopped between its switch and its verdict (a power
    cut) left its marker in ``releases/``; ``mash update --recover`` judges it and finishes
    its command (it does nothing while that update still runs). True when started."""
    if not (releases.releases_dir(home()) / releases.PENDING).exists():
        return False
    try:
        start_maintenance(ctx, "update", "--recover")
    except OSError as exc:
        log.warning("could not start `mash update --recover`: %s", exc)
        return False
    log.info("an interrupted update is judged again (mash update --recover)")
    return True


def poll_commands(ctx) -> int:
    """Fetch the backend's command history; put new ``pending``/``sent`` ones in the ledger."""
    if ctx.backend is None:
        return 0
    ensure_registered(ctx)
    commands = backend_call(ctx, ctx.backend.fetch_commands)
    # retention keeps every id listed open here, however old: a listed id missing from the
    # ledger would be run again
    ctx.store.note_backend_listed(cmd.get("id") for cmd in commands if isinstance(cmd, dict)
                                  and cmd.get("status") in ("pending", "sent"))
    new = 0
    for cmd in reversed(commands):              # history is newest first; act oldest first
        if not isinstance(cmd, dict) or cmd.get("status") not in ("pending", "sent"):
            continue
        if intake(ctx, cmd, "backend") in ("queued", "done", "failed"):
            new += 1
    return new


class MQTTIntake(BackgroundLoop):
    """paho's thread only queues payloads; this thread parses and writes them, so a burst of
    commands never stalls the MQTT loop (PUBACKs, keepalives)."""
    thread_name = "command-intake"

    def __init__(self, ctx, maxsize: int = 10000):
        super().__init__()
        self.ctx = ctx
        self.payloads: queue.Queue = queue.Queue(maxsize=maxsize)

    def offer(self, raw: bytes) -> None:
        try:
            self.payloads.put_nowait(raw)
        except queue.Full:
            self.ctx.store.incr("bad_command.overload")
            log.warning("command intake full (%d waiting): dropping a command payload",
                        self.payloads.qsize())

    def offer_backend(self, kind: str, topic: str, raw: bytes) -> None:
        """A message on one of the deployed MASH backend's topics for this device."""
        self.offer((kind, topic, raw))

    def wake(self) -> None:
        try:
            self.payloads.put_nowait(None)   # stop(): the blocked get returns
        except queue.Full:                   # busy: it sees the stop after this payload
            pass

    def run_loop(self) -> None:
        while not self._stop.is_set():
            raw = self.payloads.get()    # nothing to do until paho hands us a payload
            if raw is None:
                continue
            try:
                if isinstance(raw, tuple):
                    kind, topic, raw = raw
                    cmd, bad, detail = mash_mqtt_command(kind, topic, raw)
                else:
                    cmd, bad, detail = parse_payload(raw)
                if cmd is None:
                    count_unusable(self.ctx.store, bad, detail)
                else:
                    intake(self.ctx, cmd, "mqtt", len(raw))
            except Exception:
                log.exception("command intake failed")


class FirebaseCommandQueue(BackgroundLoop):
    """The MASH apps' ``devices/{serial}/command_queue`` (CONTRACT §8): each item goes into
    the ledger as ``fb-{pushKey}`` (source ``firebase``), then is deleted. The ledger keeps
    each id once, so an item whose delete failed, or that a restarted worker sees again, is a
    duplicate, never a second run. A malformed item is counted, logged once and deleted.

    It reads the queue when the database's stream on it says items are there
    (``FirebaseSync.stream_queue``), and every ``FALLBACK`` s anyway; while the stream is
    down it polls every ``POLL`` s, as the apps' own gateway does."""
    POLL = 2.0
    FALLBACK = 60.0
    thread_name = "firebase-commands"

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self._counted: set[str] = set()     # malformed keys already counted (delete failed)
        self._failing = False
        self.stream = None                   # the database's stream on the queue, when open

    def step(self) -> dict:
        """One poll; returns {pushKey: what intake did} (raises FirebaseError)."""
        fb, done = self.ctx.firebase, {}
        items = fb.queue_items()
        for key in sorted(items):               # push keys sort in the order they were made
            try:
                cmd = command_from_queue(key, items[key])
            except QueueItemRejected as exc:
                if key not in self._counted:
                    self._counted.add(key)
                    count_unusable(self.ctx.store, "firebase_item", f"{key}: {exc}")
                done[key] = "dropped"
            else:
                done[key] = intake(self.ctx, cmd, "firebase")
            fb.delete_queue_item(key)
        return done

    def run_loop(self) -> None:
        store = self.ctx.store
        self.stream = stream = self.ctx.firebase.stream_queue(self.wake)
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                    if self._failing:
                        self._failing = False
                        store.sink_ok("firebase")
                except FirebaseError as exc:
                    if not self._failing and store.sink_failed("firebase", str(exc)):
                        log.warning("Firebase command queue unreachable: %s", exc)
                    self._failing = True
                except Exception:
                    log.exception("Firebase command queue step failed")
                # items added meanwhile set ``changed`` again: the next wait returns at once
                self.changed.wait(self.FALLBACK if stream is not None and stream.connected
                                  else self.POLL)
                self.changed.clear()
        finally:
            if stream is not None:
                stream.close()
