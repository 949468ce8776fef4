"""``python worker.py`` / ``mash worker``: the Huey consumer with the gateway's settings.

The same as ``huey_consumer mash.tasks.huey -w 2 -k thread -d 0.01 -b 1.5 -m 0.9 -f`` (see
``mash.tasks.queue`` for why those flags); a bare ``huey_consumer mash.tasks.huey`` works
too: the start-up hook flushes stale locks and starts the worker's service either way.
"""
from __future__ import annotations

import sys

from mash import tasks
from mash.config import ConfigError, check_notify_urls
from mash.logs import start_process
from mash.tasks.queue import CONSUMER_OPTIONS

STOP_LOOK = 1.0      # s between the consumer's looks for SIGTERM (Huey's own: 0.1)


def main(argv=None) -> int:
    settings = start_process()
    if settings is None:
        return 2
    try:
        check_notify_urls(settings.notify_urls)     # Apprise's parse: only where it sends
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    consumer = tasks.huey.create_consumer(**CONSUMER_OPTIONS)
    # Its main thread wakes ten times a second only to look for a stop signal: at idle that
    # was the worker's largest cost (py-spy: ~0.35 % of a core of 0.8). Once a second stops
    # it soon enough for systemd; the worker threads' polls and health checks are their own.
    if hasattr(consumer, "_stop_flag_timeout"):
        consumer._stop_flag_timeout = STOP_LOOK
    consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
