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


def main(argv=None) -> int:
    settings = start_process()
    if settings is None:
        return 2
    try:
        check_notify_urls(settings.notify_urls)     # Apprise's parse: only where it sends
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    tasks.huey.create_consumer(**CONSUMER_OPTIONS).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
