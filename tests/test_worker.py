"""The worker as real processes: a bare ``huey_consumer mash.tasks.huey`` (no flags) survives
a ``kill -9`` mid-task, and the queue lives in RAM, not beside the store."""
import os
import signal
import subprocess
import sys

from huey import SqliteHuey

from mash.config import Settings
from mash.models import Store
from tests.services import ROOT, stop_process, wait_for
from tests.test_tasks import add_backlog


def test_bare_huey_consumer_recovers_from_kill_9_mid_sync(tmp_path, devserver):
    data = tmp_path / "data"
    env = dict(os.environ, **devserver.env(), MASH_DATA_DIR=str(data), SYNC_INTERVAL="1",
               BATCH_SIZE="50", PYTHONPATH=str(ROOT))
    settings = Settings.from_mapping(env)
    assert settings.queue_path.parent != data and str(settings.queue_path).startswith("/dev/shm/")
    store = Store(data / "mash.db")
    add_backlog(store, 3000)
    devserver.faults(latency=1.0)                         # each batch takes a second
    log = open(tmp_path / "worker.log", "ab")

    def consumer():
        return subprocess.Popen([sys.executable, "-m", "huey.bin.huey_consumer", "mash.tasks.huey"],
                                env=env, cwd=str(tmp_path), stdout=log, stderr=log)
    proc = consumer()
    try:
        wait_for(settings.queue_path.exists, timeout=30, what="the queue file")
        queue = SqliteHuey("mash", filename=str(settings.queue_path))
        wait_for(lambda: queue.is_locked("sync_readings"), timeout=30, what="a sync running")
        wait_for(lambda: store.pending_count() < 6000, timeout=30, what="a batch accepted")
        proc.send_signal(signal.SIGKILL)                  # the power cut, mid-task
        proc.wait(10)
        assert queue.is_locked("sync_readings")           # the lock outlived its holder
        devserver.faults(latency=0)
        proc = consumer()
        wait_for(lambda: store.pending_count() == 0, timeout=60, what="the drain after restart")
    finally:
        stop_process(proc, timeout=20)
    ids = devserver.state("rpi_gateway_001")["reading_ids"]
    assert len(ids) == 6000 == len(set(ids))
    assert "cleared task locks left by an unclean stop: sync_readings" in \
        (tmp_path / "worker.log").read_text()


def test_a_bad_setting_stops_a_bare_consumer_with_one_line(tmp_path):
    env = dict(os.environ, MASH_DATA_DIR=str(tmp_path / "data"), SYNC_INTERVAL="0")
    proc = subprocess.run([sys.executable, "-m", "huey.bin.huey_consumer", "mash.tasks.huey"],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "configuration error: SYNC_INTERVAL=0: must be between 1 and 86400" in proc.stderr
    assert "Traceback" not in proc.stderr
