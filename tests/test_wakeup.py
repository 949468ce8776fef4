"""Wake-up hints (mash.wakeup): a commit in one process wakes the loops of another instead of
their polling the store; a lost hint costs a fallback timeout, never data. The figures (CPU
at idle, the live latency) are in bench/ (``resources``, ``live_latency``)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from huey import SqliteHuey

from mash import wakeup
from mash.config import Settings
from mash.models import Store
from mash.tasks import queue as huey_queue
from mash.tasks.live import LiveFeed
from mash.tasks.loop import BackgroundLoop
from mash.tasks.schedule import phase
from tests.services import ROOT, stop_process, wait_for
from tests.test_tasks import add_backlog

LINE = {"fruiting": {"temp": 24.1, "humidity": 85, "co2": 801},
        "spawning": {"temp": 28.1, "humidity": 70, "co2": 901}}


def test_a_commit_in_one_store_wakes_a_listener_of_another_on_the_same_file(tmp_path):
    writer, other = Store(tmp_path / "mash.db"), Store(tmp_path / "elsewhere" / "mash.db")
    listener = Store(tmp_path / "mash.db", readonly=True).listen()
    elsewhere = other.listen()
    try:
        assert listener is not None and listener.path.parent == wakeup.directory_for(tmp_path / "mash.db")
        assert not listener.wait(0.05)                  # nothing committed yet
        writer.save_sensor_data(LINE)
        assert listener.wait(2.0)
        assert not listener.wait(0.05)                  # one wake for the commit, drained
        assert not elsewhere.wait(0.05)                 # another gateway's listeners sleep on
        for _ in range(50):                             # a burst while it was busy: one wake
            writer.incr("x")
        assert listener.wait(1.0) and not listener.wait(0.05)
    finally:
        listener.close()
        elsewhere.close()
    assert not listener.path.exists()


def test_a_dead_listeners_socket_is_removed_by_the_next_sender_and_a_full_one_counts(tmp_path):
    directory = tmp_path / "wake"
    alive = wakeup.Listener(directory)
    dead = wakeup.Listener(directory)
    dead.sock.close()                               # its process died without closing
    assert dead.path.exists()
    hints = wakeup.Hints(directory)
    assert hints.notify() == 1
    assert not dead.path.exists() and alive.wait(1.0)
    for _ in range(2000):                           # far more than a socket queues
        hints.notify()
    assert hints.notify() == 1                      # full: it has hints waiting, no error
    assert alive.wait(0) and not alive.wait(0)
    assert wakeup.Hints(tmp_path / "nobody").notify() == 0
    alive.close()
    hints.close()


def test_without_a_place_for_a_socket_the_loops_poll_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(wakeup, "directory_for", lambda db_path: tmp_path / ("x" * 120))
    store = Store(tmp_path / "mash.db")
    assert store.listen() is None                       # a path too long for a socket
    store.save_sensor_data(LINE)                        # and writes go on regardless
    loop = BackgroundLoop()
    t0 = time.monotonic()
    assert not loop.pause(0.05, 60.0)                   # not hinted: the short poll
    assert time.monotonic() - t0 < 5


def test_a_reading_committed_by_another_process_reaches_mqtt_with_the_polls_set_long(
        gateway, observer, monkeypatch):
    monkeypatch.setattr(LiveFeed, "FALLBACK", 60.0)    # its look without a hint: a minute
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    assert gateway.service.live.hinted
    time.sleep(0.5)
    code = (f"from mash.models import Store; Store({str(gateway.settings.db_path)!r})"
            f".save_sensor_data({LINE!r})")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    msg = wait_for(lambda: observer.on("/sensor_data"), timeout=10, interval=0.005,
                   what="the reading on MQTT")
    took = time.monotonic() - t0
    assert msg[0]["fruiting"]["co2"] == 801
    print(f"another process's commit -> MQTT subscriber: {took * 1000:.0f} ms (with its start-up)")
    assert took < 10       # far under the minute: the hint woke it


def test_mash_sync_is_picked_up_within_a_second_by_an_idle_worker(tmp_path, devserver):
    data = tmp_path / "data"
    env = dict(os.environ, **devserver.env(), MASH_DATA_DIR=str(data), SYNC_INTERVAL="3600",
               PYTHONPATH=str(ROOT))
    settings = Settings.from_mapping(env)
    assert phase(settings.device_id, "sync", 3600) > 300     # no scheduled sync in the way
    store = Store(data / "mash.db")
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env,
                              cwd=str(tmp_path), stdout=log, stderr=log)
    try:
        wait_for(lambda: store.processes().get("worker", {}).get("alive"), timeout=30,
                 what="the worker up")
        queue = SqliteHuey("mash", filename=str(settings.queue_path))
        pickups = []
        for n in range(4):
            time.sleep(4)                                     # idle: the consumer backed off
            add_backlog(store, 1)
            subprocess.run([sys.executable, "-m", "mash", "sync"], env=env, check=True,
                           capture_output=True, timeout=30)
            t0 = time.monotonic()
            wait_for(lambda: queue.pending_count() == 0, timeout=10, interval=0.005,
                     what="force_sync taken from the queue")
            pickups.append(time.monotonic() - t0)
            wait_for(lambda: store.pending_count() == 0, timeout=20, what="the sync done")
        print("mash sync picked up after " + ", ".join(f"{p * 1000:.0f}" for p in pickups) + " ms")
        assert max(pickups) < 1.5          # unhinted, an idle worker thread looks every 30 s
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)                    # systemd's stop, while idle
        assert worker.wait(20) == 0
        stopped = time.monotonic() - t0
        print(f"idle worker stopped {stopped:.2f} s after SIGTERM")
        assert stopped < 10                # not held by a 30 s wait on the queue
    finally:
        stop_process(worker, timeout=20)


def _waiting_dequeue(storage):
    """``storage.dequeue()`` in a thread: (thread, result list with (value, seconds))."""
    got = []

    def take():
        t0 = time.monotonic()
        got.append((storage.dequeue(), time.monotonic() - t0))
    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, got


@pytest.fixture
def short_dir():
    """A directory whose sockets fit AF_UNIX's 108 bytes wherever pytest's tmp_path is."""
    path = Path(tempfile.mkdtemp(prefix="mq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_empty_queue_waits_for_another_processs_enqueue_instead_of_polling(short_dir):
    queue_file = short_dir / "queue" / "huey.db"
    queue_file.parent.mkdir()
    worker_side = huey_queue.HintedStorage("mash", filename=str(queue_file))
    thread, got = _waiting_dequeue(worker_side)
    thread.join(1.0)
    assert thread.is_alive() and not got                  # waiting, not back every 0.9 s
    code = (f"from mash.tasks.queue import HintedStorage; "
            f"HintedStorage('mash', filename={str(queue_file)!r}).enqueue(b'job')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    thread.join(5.0)
    assert got and got[0][0] is None and got[0][1] < 10   # the hint ended the wait
    assert worker_side.dequeue() == b"job"                # and the next look takes the job
    worker_side.rest()


def test_a_stopping_consumer_ends_its_threads_waits_and_a_new_one_waits_again(short_dir):
    storage = huey_queue.HintedStorage("mash", filename=str(short_dir / "huey.db"))
    thread, got = _waiting_dequeue(storage)
    time.sleep(0.3)
    storage.wake_all()
    thread.join(5.0)
    assert got and got[0] == (None, got[0][1]) and got[0][1] < 5
    t0 = time.monotonic()
    assert storage.dequeue() is None and time.monotonic() - t0 < 0.5   # stopping: no wait
    storage.rest()                                        # the next consumer's threads
    thread, got = _waiting_dequeue(storage)
    thread.join(0.5)
    assert thread.is_alive()
    storage.wake_all()
    thread.join(5.0)
    assert got


def test_without_a_place_for_the_queues_socket_the_threads_poll_as_huey_would(tmp_path):
    deep = tmp_path / ("q" * 120)                         # too long a path for a socket
    deep.mkdir()
    storage = huey_queue.HintedStorage("mash", filename=str(deep / "huey.db"), poll=0.2)
    t0 = time.monotonic()
    assert storage.dequeue() is None
    assert 0.1 < time.monotonic() - t0 < 5                # the poll, not the 30 s look
