"""``python worker.py`` / ``mash worker``: the Huey consumer with the gateway's settings.

Consumer settings: Huey's default polling backs off to 10 s between polls (9.7 s worst-case
pickup); ``-d 0.01 -m 0.5`` picks a task up at once after activity and within 0.5 s when
idle. What must be fast does not go through the queue (the live MQTT feed watches SQLite;
commands reach the reader through the ledger), so the idle poll is set by CPU: at
``-m 0.1`` the consumer alone took ~0.5 % of a core, too much of the 1 % budget. Two worker
threads, so a long backlog drain never holds up an ack or an alert. Stale task locks left by a ``kill -9`` are flushed at start. SIGTERM
(systemd's stop) and Ctrl-C let running tasks finish (at most 15 s), then the MQTT link
closes with a retained ``offline`` status.

The same as: ``huey_consumer mash.tasks.huey -w 2 -k thread -d 0.01 -m 0.5 -f``
"""
from __future__ import annotations

import sys

CONSUMER_OPTIONS = dict(workers=2, worker_type="thread", initial_delay=0.01, backoff=1.15,
                        max_delay=0.5, scheduler_interval=1, periodic=False, flush_locks=True,
                        check_worker_health=True, shutdown_timeout=15, graceful_signal="TERM")


def main() -> int:
    from mash.config import Settings
    from mash.logs import setup_logging
    settings = Settings.load()
    setup_logging(settings.log_level)
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: every thread's stack
    from mash.tasks import huey
    consumer = huey.create_consumer(**CONSUMER_OPTIONS)
    consumer.run()
    return 0


if __name__ == "__main__":
    from mash.cli import main as cli_main
    sys.exit(cli_main(["worker"]))
