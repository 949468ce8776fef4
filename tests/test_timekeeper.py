"""The honest clock: readings taken before the clock is synchronized are held from every sink
and rebased to wall time when sync arrives. The tests fake the clock *source* (what the
system says about itself: wall clock, boot-relative clock, boot id, sync status), never time
itself."""
import datetime as dt
import threading
import time


from mash import tasks
from mash.clock import BOOTTIME, ClockSource, to_epoch
from mash.reader import Reader
from mash.simulator import SimulatedBoard
from mash.tasks.context import WorkerContext
from mash.timekeeper import Timekeeper
from tests.services import wait_for

DAY = 86400.0


class FakeClockSource(ClockSource):
    """A Pi after boot: its wall clock ``wall_error`` seconds off (fake-hwclock's stale time),
    unsynchronized until a test says otherwise. The boot-relative clock is the real one, as
    the backend's time is paired with it."""

    def __init__(self, wall_error=-3 * DAY, boot="boot-A", boottime_shift=0.0):
        super().__init__()
        self.wall_error = wall_error
        self.boot = boot
        self.shift = boottime_shift
        self.how = None

    def wall(self):
        return time.time() + self.wall_error

    def boottime(self):
        return time.clock_gettime(BOOTTIME) + self.shift

    def boot_id(self):
        return self.boot

    def synchronized(self):
        return self.how

    def sync(self, how="timesyncd"):
        """NTP answers: the wall clock jumps to the truth."""
        self.wall_error = 0.0
        self.how = how


def line(n):
    return {"fruiting": {"temp": 24.0, "humidity": 85.0, "co2": 400 + n},
            "spawning": {"temp": 28.0, "humidity": 70.0, "co2": 4000 + n}}


def store_line(store, keeper, n):
    sample = keeper.sample()
    ts, provisional = keeper.stamp(sample)
    with store.transaction():
        store.save_sensor_data(line(n), timestamp=ts, provisional=provisional)
    return time.time()       # the true time it was taken, for the checks


def test_readings_before_sync_are_held_then_rebased_to_true_time(store):
    source = FakeClockSource(wall_error=-3 * DAY)
    keeper = Timekeeper(store, source)
    truth = []
    for n in range(3):
        truth.append(store_line(store, keeper, n))
        time.sleep(0.05)
    assert store.clock_hold() is not None
    assert store.unsynced(100) == [] and store.readings_after(0, 100) == []   # no sink sees them
    assert store.pending_count() == 6                                          # yet none is lost
    stale = store.m.SensorData.get_by_id(1).timestamp
    assert abs(to_epoch(stale) - (truth[0] - 3 * DAY)) < 1

    source.sync()
    assert keeper.check(force=True) is True
    assert store.clock_hold() is None
    rows = list(store.m.SensorData.select().order_by(store.m.SensorData.id))
    assert [r.mono for r in rows] == [None] * 6
    for r in rows:
        true_ts = truth[(r.id - 1) // 2]
        assert abs(to_epoch(r.timestamp) - true_ts) < 0.05, "rebased to the time it was taken"
        assert r.fb_key == r.timestamp.strftime("%Y-%m-%dT%H-%M-%S") or \
            r.fb_key.startswith(r.timestamp.strftime("%Y-%m-%dT%H-%M-%S") + "-")
    assert len(store.unsynced(100)) == 6
    # after sync a reading is stamped with the wall clock and nothing is held
    store_line(store, keeper, 9)
    assert store.clock_hold() is None and len(store.unsynced(100)) == 8


def test_readings_of_an_earlier_boot_end_before_this_boot_began(store):
    old = FakeClockSource(wall_error=-30 * DAY, boot="boot-A", boottime_shift=-500.0)
    keeper = Timekeeper(store, old)
    for n in range(3):
        store_line(store, keeper, n)
    # power cut; the new boot syncs at once
    new = FakeClockSource(boot="boot-B")
    new.sync("kernel")
    keeper2 = Timekeeper(store, new)
    assert keeper2.check(force=True)
    rows = list(store.m.SensorData.select().order_by(store.m.SensorData.id))
    boot_start = time.time() - time.clock_gettime(BOOTTIME)
    assert all(to_epoch(r.timestamp) < boot_start for r in rows)
    assert rows[0].timestamp <= rows[2].timestamp          # order and spacing kept
    assert store.counters()["clock_estimated"] == 6
    assert store.clock_hold() is None


def test_a_backwards_jump_never_reuses_an_older_firebase_key(store):
    t = dt.datetime(2026, 11, 27, 10, 0, 0)
    store.save_sensor_data(line(1), timestamp=t)
    store.save_sensor_data(line(2), timestamp=t + dt.timedelta(seconds=1))
    store.save_sensor_data(line(3), timestamp=t + dt.timedelta(seconds=2))
    store.save_sensor_data(line(4), timestamp=t)          # the clock stepped back 2 s
    keys = [r.fb_key for r in store.m.SensorData.select().where(store.m.SensorData.room == "fruiting")]
    assert len(set(keys)) == 4
    assert keys[3] == "2026-11-27T10-00-00-1"


def test_command_expiry_is_judged_by_the_backends_time_while_ours_is_stale(make_settings, devserver):
    settings = make_settings(**devserver.env(), CLOCK_SYNC="auto")
    source = FakeClockSource(wall_error=-2 * DAY)       # a stale clock sees nothing as expired
    ctx = WorkerContext(settings, mqtt=None, firebase=None, clock_source=source)
    try:
        from mash.tasks.intake import intake
        past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).isoformat()
        future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
        cmd = {"command": "set_actuator", "parameters": {"actuator": "FRUITING_LED", "state": "ON"}}
        # before the backend has been heard from, expiry cannot be judged: refused, not run
        assert intake(ctx, {**cmd, "id": "c0", "expiresAt": future}, "mqtt") == "failed"
        assert "not synchronized" in ctx.store.m.Command.get(command_id="c0").reason
        ctx.backend.check_connection()
        assert abs(ctx.clock_offset() - 2 * DAY) < 5
        assert intake(ctx, {**cmd, "id": "c1", "expiresAt": past}, "mqtt") == "failed"
        assert intake(ctx, {**cmd, "id": "c2", "expiresAt": future}, "mqtt") == "queued"
        # stored in this machine's (stale) clock, which is what the reader compares with
        expires = ctx.store.m.Command.get(command_id="c2").expires_at
        assert abs(to_epoch(expires) - (time.time() - 2 * DAY + 3600)) < 5
    finally:
        ctx.close()


def test_reader_holds_readings_until_the_backends_time_arrives(make_settings, gateway, tmp_path):
    """The real reader on a pty, an unsynchronized clock two days behind, and the worker
    learning the time from the devserver's Date header: nothing reaches the backend with a
    stale time, and every reading arrives with its true one."""
    board = SimulatedBoard(interval=0.2, seed=3).start(banner=False)
    source = FakeClockSource(wall_error=-2 * DAY)
    settings = make_settings(**gateway.devserver.env(), SERIAL_PORT=board.port,
                             CONTROL_MODE="off", CLOCK_SYNC="auto")
    reader = Reader(settings, clock_source=source)
    t = threading.Thread(target=reader.run, daemon=True)
    t.start()
    gateway.clock = source
    gateway.backend_base = lambda: None          # the backend's time unknown until asked below
    try:
        wait_for(lambda: reader.store.pending_count() >= 10, timeout=20, what="held readings")
        assert reader.store.clock_hold() is not None
        tasks.sync_readings()
        assert gateway.devserver.state()["readings"] == {}, "nothing sent with a stale time"
        del gateway.backend_base
        gateway.backend.check_connection()       # any answer carries the backend's Date
        gateway.note_backend_time()
        wait_for(lambda: reader.store.clock_hold() is None, timeout=10, what="the rebase")
        taken = time.time()
        tasks.sync_readings()
        times = gateway.devserver.state("rpi_gateway_001")["reading_times"]
        assert len(times) >= 10
        for stamp in times:
            ts = to_epoch(dt.datetime.fromisoformat(stamp.replace("Z", "")))
            assert taken - 60 < ts <= taken + 1, f"{stamp} is not the time it was taken"
    finally:
        reader.stop()
        t.join(10)
        board.stop()
