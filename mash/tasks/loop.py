"""The worker's small threads (command intake, scheduler, live feeds) share one shape: a named
daemon thread running ``run_loop`` until ``stop()``.

The loops that watch the store do not poll it: ``HintRelay`` waits on the store's wake-up
hints (``mash.wakeup``: another process committed) and sets each subscriber's ``changed``
event, and a loop waits on that event with a long fallback timeout (``pause``)."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("mash.worker")


class BackgroundLoop:
    thread_name = "loop"

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None
        self.changed = threading.Event()     # set by a HintRelay, by wake() and by stop()
        self.hinted = False                  # a HintRelay feeds ``changed``: wait long
        self._last_look = 0.0

    def start(self):
        self._thread = threading.Thread(target=self.run_loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def wake(self) -> None:
        """Interrupt the loop's wait: it steps at once."""
        self.changed.set()

    def pause(self, poll: float, fallback: float) -> bool:
        """Between two steps: until the store changes (a hint), ``wake()`` or ``stop()``, for at
        most ``fallback`` s; ``poll`` s when no hints come. True when woken early.

        With hints, looks stay at least ``poll`` apart: a burst of commits (a drain, a flood
        of commands) costs no more looks than polling did, and an idle store costs none."""
        if not self.hinted:
            woken = self.changed.wait(poll)
            self.changed.clear()
            return woken
        rest = self._last_look + poll - time.monotonic()
        if rest > 0:
            self._stop.wait(rest)
        woken = self.changed.wait(fallback)
        self.changed.clear()
        self._last_look = time.monotonic()
        return woken

    def run_loop(self) -> None:
        raise NotImplementedError


class HintRelay(BackgroundLoop):
    """One listener on the store's hints for the whole process, relaying each to the
    subscribed loops (``subscribe`` before ``start``). Without a listener (no RAM directory
    for one) it does nothing and the loops keep their short polls."""
    thread_name = "store-hints"

    def __init__(self, store):
        super().__init__()
        self.listener = store.listen()
        self.loops: list[BackgroundLoop] = []

    def subscribe(self, loop: BackgroundLoop) -> None:
        loop.hinted = self.listener is not None
        self.loops.append(loop)

    def start(self):
        return super().start() if self.listener is not None else self

    def wake(self) -> None:
        if self.listener is not None:
            self.listener.interrupt()

    def run_loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.listener.wait(None) and not self._stop.is_set():
                    for loop in self.loops:
                        loop.changed.set()
        except Exception:
            log.exception("store hints stopped: the loops fall back to their timeouts")
        finally:
            self.listener.close()
