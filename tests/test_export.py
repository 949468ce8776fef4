"""``mash export``: every row of the window, with its sync status, streamed with flat memory
while the reader writes."""
import csv
import datetime as dt
import io
import json
import subprocess
import sys
import threading

from mash.export import export
from mash.models import Store
from mash.reader import Reader
from mash.simulator import SimulatedBoard
from tests.services import wait_for

START = dt.datetime(2026, 10, 1)


def fill(store, n_lines, start=START, step_s=5):
    """``n_lines`` reading lines (two rows each), one every ``step_s`` seconds from ``start``."""
    S = store.m.SensorData
    with store.transaction():
        for i in range(0, n_lines, 2500):
            batch = []
            for j in range(i, min(i + 2500, n_lines)):
                ts = start + dt.timedelta(seconds=j * step_s)
                for room in ("fruiting", "spawning"):
                    batch.append({"room": room, "temperature": 24.0, "humidity": 85.0, "co2": j % 5000,
                                  "timestamp": ts, "fb_key": ts.strftime("%Y-%m-%dT%H-%M-%S")})
            S.insert_many(batch).execute()


def test_export_rows_carry_sync_status_and_filters_apply(store):
    fill(store, 10)
    store.mark_synced([1, 2])
    store.mark_rejected([3], "bad")
    out = io.StringIO()
    assert export(store, out, start=START, end=START + dt.timedelta(seconds=25), room="fruiting") == 5
    got = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["sync_status"] for r in got] == ["synced", "rejected", "pending", "pending", "pending"]
    assert got[0]["reading_id"] == store.reading_id(1) and got[0]["timestamp"] == "2026-10-01T00:00:00.000Z"
    out = io.StringIO()
    assert export(store, out, fmt="jsonl") == 20
    assert json.loads(out.getvalue().splitlines()[-1])["room"] == "spawning"


def peak_rss_kb(args, env, cwd):
    """Peak RSS of ``mash export ...`` run as its own process."""
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "mash", "export", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1]), proc.stderr


def test_export_of_100000_rows_while_the_reader_writes_is_complete_and_flat(make_settings, tmp_path,
                                                                          data_dir):
    store = Store(data_dir / "mash.db")
    fill(store, 50_000)                                  # 100,000 rows over ~3 days
    window_end = START + dt.timedelta(days=10)
    board = SimulatedBoard(interval=0.02, seed=5).start(banner=False)
    reader = Reader(make_settings(SERIAL_PORT=board.port, CONTROL_MODE="off"))
    t = threading.Thread(target=reader.run, daemon=True)
    t.start()
    env = {**__import__("os").environ, "MASH_DATA_DIR": str(data_dir)}
    try:
        wait_for(lambda: store.m.SensorData.select().count() > 100_050, timeout=20,
                 what="the reader writing")
        big = tmp_path / "big.csv"
        rss_big, err = peak_rss_kb(["--to", window_end.isoformat(), "-o", str(big)], env, tmp_path)
        small = tmp_path / "small.csv"
        rss_small, _ = peak_rss_kb(["--to", (START + dt.timedelta(hours=14)).isoformat(),
                                    "-o", str(small)], env, tmp_path)
        assert store.m.SensorData.select().count() > 100_100, "the reader went on writing meanwhile"
    finally:
        reader.stop()
        t.join(10)
        board.stop()
    S = store.m.SensorData
    expected = S.select().where(S.timestamp < window_end).count()
    assert expected == 100_000
    with open(big) as f:
        assert sum(1 for _ in f) - 1 == expected
    assert "exported 100000 readings" in err
    with open(small) as f:
        assert sum(1 for _ in f) - 1 == 20_160
    # ten times the rows, the same memory (within 8 MB: allocator noise, not the rows)
    assert rss_big - rss_small < 8 * 1024, (rss_small, rss_big)
