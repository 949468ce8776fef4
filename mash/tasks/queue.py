"""The Huey queue: how it is built, how the consumer runs, how failures become retries.

The queue holds no durable state: every job is a sweep over ``mash.db`` (readings to sync,
outbox items to deliver), so losing the queue loses nothing. That is why it can live on
RAM-backed storage (``Settings.queue_path``) and cost the SD card nothing.
"""
from __future__ import annotations

import logging

import tenacity
from huey import SqliteHuey
from huey.exceptions import CancelExecution, RetryTask

from mash.sinks.errors import DeviceUnknown, RetryableError

log = logging.getLogger("mash.worker")

# Consumer settings (``python worker.py``, the sync manager's in-process consumer).
# Huey's default polling backs off to 10 s between polls; ``-d 0.01 -b 1.5 -m 0.9`` picks a
# task up at once after activity and within 0.9 s when idle (``mash sync`` within a second; at
# ``-m 0.1`` the consumer alone took ~0.5 % of a core), and backs off to that in eleven polls.
# Two worker threads, so a long backlog drain never holds up an ack or an alert.
# SIGTERM (systemd's stop) and Ctrl-C let running tasks finish (at most 15 s).
CONSUMER_OPTIONS = dict(workers=2, worker_type="thread", initial_delay=0.01, backoff=1.5,
                        max_delay=0.9, scheduler_interval=1, periodic=False, flush_locks=True,
                        check_worker_health=True, shutdown_timeout=15, graceful_signal="TERM")
CONSUMER_FLAGS = "-w 2 -k thread -d 0.01 -b 1.5 -m 0.9 -f"


def make_huey(path) -> SqliteHuey:
    """A SqliteHuey on ``path``. results=False: nothing reads task results, and each stored
    result would be another write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("mash", filename=str(path), results=False, utc=True)


def retry_wait(task) -> float | None:
    """The wait before ``task``'s next retry: full jitter (tenacity) over its own
    ``retry_delay`` doubling per attempt, so a fleet that failed together does not retry
    together. None when it has no retry left or no delay (Huey's own rule then)."""
    base = task.default_retry_delay
    if not task.retries or not base:
        return None
    attempt = max(1, task.default_retries - task.retries + 1)
    wait = tenacity.wait_random_exponential(multiplier=base, max=base * 2 ** task.default_retries)
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return wait(state)


def run_job(job, ctx, task=None):
    """Run ``job(ctx)``, turning an expected cloud failure into a Huey retry.

    An error that says when to try again (``retry_after``: a 429's Retry-After, the backend
    client's login backoff after our credentials were refused) retries exactly then, for as
    long as it takes: the work stays owed, and the backoff, not a retry count, keeps it from
    hammering. Any other RetryableError uses the task's own ``retries``, each retry after a
    full-jitter draw over its ``retry_delay`` doubled per attempt (``retry_wait``). Neither
    prints a traceback: the clients and jobs log one line per state change (offline, online, credentials refused), and the traceback is there at
    DEBUG."""
    try:
        return job(ctx)
    except DeviceUnknown as exc:
        # the backend lacks our device: recorded and logged once (``sync.ensure_registered``),
        # asked again when due by the job's own next run, never a queued retry that would
        # outlive a restart and hold the job back after the device exists
        log.debug("%s skipped: %s", job.__name__, exc)
        return None
    except RetryableError as exc:
        log.debug("%s will be retried: %s", job.__name__, exc, exc_info=True)
        if exc.retry_after:
            raise RetryTask(delay=exc.retry_after) from exc
        wait = retry_wait(task) if task is not None else None
        if wait is not None:
            task.retry_delay = wait          # Huey schedules the retry after this
        raise CancelExecution(retry=None) from exc
