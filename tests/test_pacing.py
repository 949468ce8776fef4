"""The backend's request budget (mash.pacing): limits, priority order, Retry-After, and a
real client kept under the reference backend's rate limit."""
import time

import pytest

from mash.pacing import BACKLOG, COMMANDS, LIVE, Pacer, equal_jitter, full_jitter
from mash.sinks.errors import RateLimited
from tests.test_backend_api import reading


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def drain(pacer, clock, url="/sensors/data", priority=BACKLOG, until=60.0, step=0.01):
    """Times (from the start) at which requests of ``priority`` were granted, asking as
    often as the pacer lets them."""
    start, granted = clock.t, []
    while clock.t - start < until:
        wait = pacer.acquire(url, priority)
        if wait == 0:
            granted.append(clock.t - start)
        elif clock.t + wait - start >= until:
            break                         # the clock stays where the last grant left it
        else:
            clock.t += max(wait, step)
    return granted


def test_pacing_never_grants_more_than_rpm_in_any_window():
    clock = Clock()
    pacer = Pacer(rpm=30, reserve=(0, 0), smooth=False, clock=clock)
    granted = drain(pacer, clock, until=300)
    for t in granted:
        assert sum(1 for u in granted if t <= u < t + 60) <= 30
    assert len(granted) == 150           # and uses all of it: 30 a minute for five minutes


def test_pacing_keeps_back_slots_for_status_and_commands():
    clock = Clock()
    pacer = Pacer(rpm=20, reserve=(2, 3), smooth=False, clock=clock)
    backlog = drain(pacer, clock, until=1)
    assert len(backlog) == 15                           # 20 less what status and commands keep
    assert pacer.acquire("/devices/x/commands", COMMANDS) == 0
    assert pacer.acquire("/devices/x/commands", COMMANDS) == 0
    assert pacer.acquire("/devices/x/commands", COMMANDS) == 0
    assert pacer.acquire("/devices/x/commands", COMMANDS) > 0   # the commands' three are used
    assert pacer.acquire("/devices/x", LIVE) == 0
    assert pacer.acquire("/devices/x", LIVE) == 0
    assert pacer.acquire("/devices/x", LIVE) > 0                # and now all twenty


def test_pacing_spreads_the_backlog_evenly_over_the_minute():
    clock = Clock()
    pacer = Pacer(rpm=60, reserve=(2, 4), clock=clock)
    granted = drain(pacer, clock, until=120)
    gaps = [b - a for a, b in zip(granted, granted[1:])]
    assert min(gaps) >= 60 / 54 - 1e-9                  # no burst: one per 1.11 s
    assert len(granted) == pytest.approx(108, abs=1)


def test_pacing_per_url_limit_leaves_other_urls_free():
    clock = Clock()
    pacer = Pacer(per_url=18, reserve=(0, 0), smooth=False, clock=clock)
    assert len(drain(pacer, clock, url="/sensors/a/data/batch", until=1)) == 18
    assert pacer.acquire("/sensors/a/data/batch") > 0
    assert pacer.acquire("/sensors/b/data/batch") == 0


def test_pacing_retry_after_blocks_the_url_or_everything():
    clock = Clock()
    per_url = Pacer(per_url=20, clock=clock)
    per_url.retry_after("/a", 60)
    assert per_url.acquire("/a", LIVE) == pytest.approx(60)
    assert per_url.acquire("/b", LIVE) == 0
    overall = Pacer(rpm=60, clock=clock)
    overall.retry_after("/a", 30)
    assert overall.acquire("/b", LIVE) == pytest.approx(30)
    clock.t += 30
    assert overall.acquire("/b", LIVE) == 0


def test_jitter_draws_spread_over_a_window_that_doubles_per_attempt_up_to_the_cap():
    import random
    random.seed(20)
    for attempt, window in ((1, 30.0), (2, 60.0), (3, 120.0), (6, 900.0), (12, 900.0)):
        full = [full_jitter(attempt, 30.0, 900.0) for _ in range(2000)]
        half = [equal_jitter(attempt, 30.0, 900.0) for _ in range(2000)]
        assert 0 <= min(full) < 0.05 * window and 0.95 * window < max(full) <= window
        assert window / 2 <= min(half) < 0.55 * window and 0.95 * window < max(half) <= window
        # uniform: a quarter of the draws in each quarter of the window, give or take
        assert 0.2 < sum(d < window / 4 for d in full) / 2000 < 0.3
        assert 0.4 < sum(d < window * 3 / 4 for d in half) / 2000 < 0.6


def test_pacing_refuses_a_limit_below_one():
    with pytest.raises(ValueError):
        Pacer(rpm=0)


def test_pacing_keeps_a_real_client_under_the_reference_backends_rate_limit(
        devserver_factory, client_for):
    """A client paced at the backend's own limit (20 requests a window, the window cut to 3 s)
    sends 45 uploads without one 429, and takes the windows the limit says it must."""
    server = devserver_factory(rate_limit=20, rate_window=3)
    backend = client_for(server, BACKEND_MAX_RPM="20")
    backend.register_device()
    backend.pacer = Pacer(rpm=20, reserve=(1, 1), window=3.0)
    t0, sent = time.monotonic(), 0
    while sent < 45:
        try:
            backend.upload_readings([reading(f"r{sent}")], key=f"k{sent}")
            sent += 1
        except RateLimited as exc:
            assert exc.status is None, f"the backend refused a request: {exc}"
            time.sleep(exc.retry_after)
    took = time.monotonic() - t0
    refused = [h for h in server.state()["history"] if h[2] == 429]
    assert not refused, refused[:3]
    assert took >= 2 * 3.0 - 0.5          # 45 at 18 a window: at least two windows waited
    print(f"45 uploads paced in {took:.1f} s, no 429")
