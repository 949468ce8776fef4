"""Commands in: the backend poll and MQTT feed one intake, and the ledger keeps each id once.

``set_actuator`` waits in the ledger for the reader (the only writer to the serial port);
``REQUEST_STATUS``, ``force_sync`` and ``CONFIGURE`` are handled here, in the worker.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import queue

from mash.clock import from_epoch
from mash.commands import Rejected, merge_configuration, parse_payload, usable_id, validate
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
        command, params, expires = validate(cmd, ctx.settings.device_id, size, now=now)
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
    if command == "CONFIGURE":
        merged = merge_configuration(ctx.store.meta_get("configuration", {}), params)
        ctx.store.meta_set("configuration", merged)
        ctx.reload_configuration()
        return {"configuration": merged}
    raise AssertionError(command)


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

    def run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.payloads.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                cmd, bad, detail = parse_payload(raw)
                if cmd is None:
                    count_unusable(self.ctx.store, bad, detail)
                else:
                    intake(self.ctx, cmd, "mqtt", len(raw))
            except Exception:
                log.exception("command intake failed")
