"""Logging set-up shared by every entry point: one format, one level from LOG_LEVEL."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from mash.config import ConfigError, Settings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Files the gateway makes are its user's alone: the store holds the dashboard's session key
# and password hash, and SQLite gives -wal and -shm the store's own mode.
UMASK = 0o077


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
    """An entry point's start: a private umask (``UMASK``), the settings (None, after
    printing the one-line error, when a value is bad), logging, the store's files made
    private if an older version left them open (``make_private``), and ``kill -USR1``
    printing every thread's stack."""
    os.umask(UMASK)
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    setup_logging(settings.log_level)
    make_private(settings.db_path)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return settings


def make_private(db_path: Path) -> list[Path]:
    """Make the store and its ``-wal``/``-shm`` 0600 where another user could read them and
    this user owns them (a store made before the umask, or by hand); returns what changed.
    Files of another owner are left to ``mash doctor``, which prints the fix."""
    changed = []
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        try:
            st = path.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)
                changed.append(path)
        except OSError:             # not there (yet), or gone meanwhile
            continue
    if changed:
        logging.getLogger("mash").warning(
            "%s could be read by other users (they hold the dashboard's keys): made 0600",
            ", ".join(map(str, changed)))
    return changed
