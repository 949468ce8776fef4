"""Logging set-up shared by every entry point: one format, one level from LOG_LEVEL."""
from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from mash.config import ConfigError, Settings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_mash", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._mash = True
        root.addHandler(handler)
    root.setLevel(level)
    # Per-request chatter from the HTTP stack is not a state change.
    logging.getLogger("peewee").setLevel(logging.INFO)    # SQL per poll is not a log
    # Huey logs every task execution at INFO; keep its consumer's start/stop lines only.
    logging.getLogger("huey").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("huey.consumer").setLevel(root.level)
    for noisy in ("urllib3", "huey.consumer.Scheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class OncePerKind:
    """Log the first occurrence of each kind, count the rest (bad lines, rejected payloads)."""

    def __init__(self, logger: logging.Logger, what: str):
        self.logger, self.what = logger, what
        self.seen: set[str] = set()

    def __call__(self, kind: str, detail: str) -> None:
        if kind not in self.seen:
            self.seen.add(kind)
            self.logger.warning("%s (%s): %s; further ones of this kind are counted, not logged",
                                self.what, kind, detail)


def start_process() -> Settings | None:
    """An entry point's start: the settings (None, after printing the one-line error, when a
    value is bad), logging, and ``kill -USR1`` printing every thread's stack."""
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    setup_logging(settings.log_level)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return settings
