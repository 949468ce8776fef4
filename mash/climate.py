"""The climate controller in the reader: decisions in, relay commands out.

``mash.control`` decides; this hands its decisions to the board-command driver as ``auto``
commands, tells it what the board confirmed, says which relays a board reset must not bring
back, and logs the controller's state changes (a line each, the switches at DEBUG).
"""
from __future__ import annotations

import logging

from mash import ids
from mash.control import ROOM_OF, ClimateController

log = logging.getLogger("mash.reader")


class ClimateLoop:
    TICK = 1.0          # s of the controller's clock between decisions

    def __init__(self, controller: ClimateController, store, board=None):
        self.controller, self.store, self.board = controller, store, board
        self._last_decision = float("-inf")
        self._control_state = None          # (cycling, rooms in safe state), for the log

    def tick(self, write, now: bool = False) -> None:
        """Ask the controller what to switch (every CONTROL_TICK, or ``now``) and hand each
        change to the board driver as an ``auto`` command (recorded in the ledger, with its
        acks, once the board answers)."""
        tick = self.controller.clock()
        if not now and tick - self._last_decision < self.TICK:
            return
        self._last_decision = tick
        changes = self.controller.decide()
        self._log_control_state()
        for actuator, state in changes.items():
            self.board.submit(ids.auto_command_id(), actuator, state)
            self.controller.switched(actuator, state)
            log.debug("control: %s %s", actuator, state)
        if changes:
            self.board.drive(write)

    def _log_control_state(self) -> None:
        """One line when the humidifier cycle starts or stops, or a room enters or leaves
        its safe state (the relays' every switch is at DEBUG)."""
        ctl = self.controller
        state = (ctl.cycle is not None,
                 frozenset(r for r in ctl.rooms if ctl.room_mode(r) == "auto" and ctl.stale(r)
                           and ctl.rooms[r].at is not None))     # not before the first reading
        if state == self._control_state:
            return
        cycling, safe = state
        was_cycling, was_safe = self._control_state or (False, frozenset())
        humidity = (ctl.rooms["fruiting"].values or {}).get("humidity")
        if cycling != was_cycling:
            log.info("control: humidifier cycle %s (fruiting %s %%)",
                     "started" if cycling else "stopped", humidity)
        for room in safe - was_safe:
            log.warning("control: %s readings stale or out of range: safe state", room)
        for room in was_safe - safe:
            log.info("control: %s readings fresh again: control resumes", room)
        self._control_state = state

    def settled(self, actuator: str, state: str, source: str, ok: bool) -> None:
        if ok:
            self.controller.known_state(actuator, state, source)
        elif source == "auto":
            self.controller.refused(actuator)

    def restorable(self) -> dict[str, str]:
        """After a reset: every desired state but those the controller set in a room it
        drives (it decides those afresh, so no relay comes back ON that it no longer wants)."""
        states = self.store.actuator_states()          # one read for every relay
        return {a: s["state"] for a, s in states.items()
                if not (a in ROOM_OF and self.controller.room_mode(ROOM_OF[a]) == "auto"
                        and s["source"] == "auto")}
