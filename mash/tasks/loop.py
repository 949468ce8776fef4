"""The worker's small threads (command intake, scheduler, live feed) share one shape: a named
daemon thread running ``run_loop`` until ``stop()``."""
from __future__ import annotations

import threading


class BackgroundLoop:
    thread_name = "loop"

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None

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
        """Interrupt a wait the loop does on something other than its stop event."""

    def run_loop(self) -> None:
        raise NotImplementedError
