"""The reader's clock: wall time once it can be trusted, boot-relative time until then.

A Pi boots with a stale clock (no RTC) that jumps when NTP answers; JWT, TLS, command expiry
and every reading's timestamp depend on it. Until the clock is synchronized, a reading is
stored with ``CLOCK_BOOTTIME`` and the boot id, and held back from every sink; the moment
sync is known (systemd-timesyncd's flag or the kernel's NTP status, seen here; or the
backend's ``Date``, which the worker records in the store's ``clock`` fact), the held readings
are rebased (``mash.models.rebase``). None is ever sent with a pre-sync wall time.
"""
from __future__ import annotations

import logging

from mash.clock import ClockSource, from_epoch
from mash.models import Store
from mash.models.rebase import rebase

log = logging.getLogger("mash.reader")


class Timekeeper:
    CHECK_EVERY = 1.0      # s between looks at the system's own sync status
    RECHECK_EVERY = 60.0   # s between those looks once the backend's time is in use
    FACT_EVERY = 5.0       # s between looks at the backend's time the worker recorded

    def __init__(self, store: Store, source: ClockSource):
        self.store = store
        self.source = source
        self.boot = source.boot_id()
        self.base: float | None = None     # wall time = base + boottime, once known
        self.how: str | None = None        # what told us: trusted, timesyncd, kernel, backend
        self._next_check = self._next_fact = float("-inf")

    @property
    def synchronized(self) -> bool:
        return self.base is not None

    def sample(self) -> tuple[float, float]:
        """``(wall, boottime)`` now: what a reading keeps until it is written."""
        return self.source.wall(), self.source.boottime()

    def stamp(self, sample: tuple[float, float]):
        """``(timestamp, provisional)`` for a reading taken at ``sample``; ``provisional``
        is ``(boot id, boottime)`` while the clock is not synchronized, else None."""
        wall, boottime = sample
        if self.check():
            if self.how == "backend":
                return from_epoch(self.base + boottime), None
            return from_epoch(wall), None
        return from_epoch(wall), (self.boot, boottime)

    def check(self, force: bool = False) -> bool:
        """Look (at most once a second, unless ``force``) whether the clock is synchronized
        now; on the first yes, rebase what is held. True once synchronized."""
        if self.how is not None and self.how != "backend":
            return True
        now = self.source.boottime()
        if force:
            self._next_check = self._next_fact = float("-inf")
        if now < self._next_check:
            return self.base is not None
        self._next_check = now + (self.RECHECK_EVERY if self.base is not None else self.CHECK_EVERY)
        how = self.source.synchronized()
        if how:
            self._synced(self.source.wall() - self.source.boottime(), how)
            return True
        if self.base is None and now >= self._next_fact:
            self._next_fact = now + self.FACT_EVERY
            fact = self.store.meta_get("clock") or {}
            if fact.get("boot") == self.boot and isinstance(fact.get("base"), (int, float)):
                self._synced(float(fact["base"]), "backend")
        return self.base is not None

    def _synced(self, base: float, how: str) -> None:
        first = self.base is None
        self.base, self.how = base, how
        if not first:
            log.info("clock synchronized by the system (%s) after the backend's time", how)
            return
        done = rebase(self.store, self.boot, base)
        if done["rebased"]:
            log.info("clock synchronized (%s): %d held readings re-stamped%s and released",
                     how, done["rebased"],
                     f", {done['estimated']} of an earlier boot estimated" if done["estimated"] else "")
        elif how not in ("trusted",):
            log.info("clock synchronized (%s)", how)
