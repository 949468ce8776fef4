"""The backend's request budget: how many requests may go now, to which URL, and whose turn.

Pure logic with the clock injected; the backend client asks before every request and tells
it every ``Retry-After``. Three limits, all over a sliding window (``WINDOW``, 60 s):

- ``rpm``: requests a minute in all (``BACKEND_MAX_RPM``);
- ``per_url``: requests a minute to any one URL, query string included (the deployed MASH
  backend counts a guest per client IP and full URL: CONTRACT §9);
- a ``Retry-After`` blocks what the server said it blocks: the one URL where the limit is
  per URL, everything otherwise.

The budget is spent in priority order: ``LIVE`` (status, heartbeat, registration) may use
all of it, ``COMMANDS`` (polls, acks) all but what ``LIVE`` keeps back, ``BACKLOG`` (the
drain) all but what both keep back. So a drain after an outage never starves the heartbeat
or the command poll: they keep ``reserve`` requests of each window for themselves. With
``smooth`` the backlog's requests are also spread evenly (no two closer than the window over
its limit), so a drain is a steady trickle rather than a burst a minute.
"""
from __future__ import annotations

import collections
import threading
import time

import tenacity

WINDOW = 60.0

LIVE, COMMANDS, BACKLOG = 0, 1, 2
PRIORITIES = {"live": LIVE, "commands": COMMANDS, "backlog": BACKLOG}


def _draw(wait, attempt: int) -> float:
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempt)
    return wait(state)


def full_jitter(attempt: int, first: float, cap: float) -> float:
    """The wait before the ``attempt``-th retry (1, 2, ...): uniform in [0, min(cap, first *
    2 ** (attempt - 1))], tenacity's full jitter. A fleet failed by one outage spreads its
    retries over the whole window instead of retrying at the same seconds."""
    return _draw(tenacity.wait_random_exponential(multiplier=first, max=cap), attempt)


def equal_jitter(attempt: int, first: float, cap: float) -> float:
    """As ``full_jitter`` over half the window, after the other half: never sooner than half
    the doubled delay. For an attempt the other side counts against us (a refused login
    towards a lockout), where a draw near zero would be one attempt too many."""
    wait = (tenacity.wait_exponential(multiplier=first / 2, max=cap / 2)
            + tenacity.wait_random_exponential(multiplier=first / 2, max=cap / 2))
    return _draw(wait, attempt)


class Reconnects:
    """The wait before each reconnect: full jitter (uniform in [0, min(cap, first * 2**n)])
    over the n-th attempt since the last connection that was held ``held`` seconds; a
    connection that drops sooner does not reset it, so a flapping broker keeps us backing off.
    The clock is injectable for the tests; the draws are ``random``'s (seed it for a fixed
    sequence). The MQTT link and the Firebase command stream each keep one."""

    def __init__(self, first: float = 1.0, cap: float = 60.0, held: float = 60.0,
                 clock=time.monotonic):
        self.first, self.cap = first, cap
        self.held, self.clock = held, clock
        self.attempt = 0
        self._up_since: float | None = None

    def connected(self) -> None:
        self._up_since = self.clock()

    def next_delay(self) -> float:
        """Called once per failed connect or lost connection: the seconds to wait."""
        if self._up_since is not None and self.clock() - self._up_since >= self.held:
            self.attempt = 0
        self._up_since = None
        self.attempt += 1
        return full_jitter(self.attempt, self.first, self.cap)


class Pacer:
    """A sliding-window request budget. Thread-safe.

    ``reserve``: requests of each window kept back for ``LIVE`` and for ``COMMANDS``
    (``(live, commands)``); lower priorities may not use them. ``None`` limits are off."""

    def __init__(self, rpm: int | None = None, per_url: int | None = None,
                 reserve: tuple[int, int] = (2, 4), window: float = WINDOW,
                 smooth: bool = True, clock=time.monotonic):
        for name, value in (("rpm", rpm), ("per_url", per_url)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None)")
        self.rpm, self.per_url, self.window, self.clock = rpm, per_url, window, clock
        self.reserve, self.smooth = reserve, smooth
        self._last_backlog = float("-inf")
        self._lock = threading.Lock()
        self._all: collections.deque[float] = collections.deque()
        self._urls: dict[str, collections.deque[float]] = {}
        self._blocked_all = 0.0
        self._blocked: dict[str, float] = {}
        self.granted = 0
        self.waited = 0.0          # s of waits handed out (for the bench)

    def _limit(self, limit: int | None, priority: int) -> int | None:
        if limit is None:
            return None
        live, commands = self.reserve
        kept = {LIVE: 0, COMMANDS: live, BACKLOG: live + commands}[priority]
        # never reserve the whole budget away: a low priority always gets one a window
        return max(1, limit - kept)

    def _expire(self, q: collections.deque, now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def _wait_in(self, q: collections.deque, limit: int | None, now: float) -> float:
        if limit is None or len(q) < limit:
            return 0.0
        # the request that frees a slot for us: the (len - limit + 1)-th oldest
        return q[len(q) - limit] + self.window - now

    def wait_time(self, url: str, priority: int = BACKLOG) -> float:
        """Seconds until a request of ``priority`` to ``url`` may go (0: now). Records nothing."""
        with self._lock:
            return self._wait(url, priority, self.clock())

    def _wait(self, url: str, priority: int, now: float) -> float:
        self._expire(self._all, now)
        q = self._urls.get(url)
        if q is not None:
            self._expire(q, now)
            if not q:
                del self._urls[url]
                q = None
        waits = [self._blocked_all - now, self._blocked.get(url, 0.0) - now,
                 self._wait_in(self._all, self._limit(self.rpm, priority), now)]
        if q is not None:
            waits.append(self._wait_in(q, self._limit(self.per_url, priority), now))
        if self.smooth and priority == BACKLOG and self.rpm is not None:
            waits.append(self._last_backlog + self.window / self._limit(self.rpm, BACKLOG) - now)
        return max(0.0, *waits)

    def acquire(self, url: str, priority: int = BACKLOG) -> float:
        """Take a slot for ``url`` if one is free now and return 0; else return the wait (s)
        and take nothing: the caller sleeps or gives the turn back and asks again."""
        with self._lock:
            now = self.clock()
            wait = self._wait(url, priority, now)
            if wait > 0:
                self.waited += wait
                return wait
            self._all.append(now)
            self._urls.setdefault(url, collections.deque()).append(now)
            if priority == BACKLOG:
                self._last_backlog = now
            self.granted += 1
            return 0.0

    def retry_after(self, url: str, seconds: float) -> None:
        """The server said: nothing for ``seconds``. Per URL when the limit is per URL."""
        with self._lock:
            until = self.clock() + max(0.0, seconds)
            if self.per_url is not None:
                self._blocked[url] = max(self._blocked.get(url, 0.0), until)
            else:
                self._blocked_all = max(self._blocked_all, until)

    def blocked_for(self, url: str | None = None) -> float:
        """Seconds a ``Retry-After`` still blocks ``url`` (or everything, for None)."""
        with self._lock:
            now = self.clock()
            ends = [self._blocked_all] + ([self._blocked.get(url, 0.0)] if url else [])
            return max(0.0, *(e - now for e in ends))
