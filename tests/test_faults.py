"""Fault injection with real processes: crashes, outages, auth churn, broker restarts, serial
faults and bad input. Each scenario is bounded in time; the counts are the issue's, the
intervals are short."""
import json
import random
import time

import pytest

from mash import protocol
from mash.models import Store
from tests.services import Broker, Gateway, wait_for

DEVICE = "rpi_gateway_001"


@pytest.fixture
def gateway_factory(tmp_path, devserver_factory, rtdb):
    made = []

    def make(broker, server=None, interval=0.1, **env):
        server = server or devserver_factory()
        g = Gateway(tmp_path / f"gw{len(made)}", server, broker, rtdb, interval=interval, **env)
        made.append(g)
        g.start()
        g.store = Store(g.data / "mash.db")
        wait_for(lambda: g.board.boots >= 1, timeout=30, what="the reader opened the board")
        if interval:
            wait_for(lambda: g.store.m.SensorData.select().count() >= 4, timeout=30, what="gateway up")
        return g
    yield make
    for g in made:
        g.stop()


def drain_and_check_exactly_once(g):
    """Stop the board, drain everything, and compare the store with the backend and Firebase."""
    g.board.interval = 0
    time.sleep(0.5)
    out = g.mash("sync", "--wait", "--timeout", "90", timeout=150)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = {g.store.reading_id(r.id) for r in g.store.m.SensorData.select(g.store.m.SensorData.id)}
    theirs = g.devserver.state(DEVICE)["reading_ids"]
    assert len(theirs) == len(set(theirs)), "a reading stored twice at the backend"
    assert set(theirs) == ours, f"{len(ours - set(theirs))} readings missing at the backend"
    wait_for(lambda: g.store.get_stats()["firebase_lag_records"] == 0, timeout=60, what="Firebase")
    tree = g.rtdb.tree.get("sensor_data", {})
    assert sum(len(v) for v in tree.values()) == len(ours)
    return len(ours)


def test_kill_9_of_reader_and_worker_20_times_loses_and_repeats_nothing(broker, gateway_factory):
    g = gateway_factory(broker, interval=0.05)
    rng = random.Random(20)
    issued = []
    for cycle in range(20):
        if cycle % 4 == 0:
            cid = f"crash-{cycle}"
            g.devserver.issue(DEVICE, "set_actuator", {"actuator": "FRUITING_LED",
                                                       "state": "ON" if cycle % 8 else "OFF"}, id=cid)
            issued.append(cid)
        time.sleep(rng.uniform(0.2, 1.0))
        victim = rng.choice(["reader", "worker", "both"])
        if victim in ("reader", "both"):
            g.kill(g.reader)
            g.start_reader()
        if victim in ("worker", "both"):
            g.kill(g.worker)
            g.start_worker()
    n = drain_and_check_exactly_once(g)
    wait_for(lambda: all(g.store.m.Command.get_or_none(g.store.m.Command.command_id == c) and
                         g.store.m.Command.get(g.store.m.Command.command_id == c).status in ("completed", "failed")
                         for c in issued), timeout=60, what="every command final")
    for cid in issued:
        assert g.store.m.Command.select().where(g.store.m.Command.command_id == cid).count() == 1
        assert g.store.m.Command.get(g.store.m.Command.command_id == cid).status == "completed"
    backend = {c["id"]: c for c in g.devserver.state()["commands"]}
    assert all(backend[c]["status"] == "completed" for c in issued)
    print(f"20 kill -9 cycles: {n} readings, each at the backend and in Firebase exactly once; "
          f"{len(issued)} commands, each final once")


def test_backend_outages_lose_nothing_and_429_waits_are_honoured(broker, gateway_factory, devserver_factory):
    server = devserver_factory()
    g = gateway_factory(broker, server=server, interval=0.05)
    for fault, hold in [({"drop_for": 4}, 4), ({"fail_next": 30}, 4), ({"latency": 3}, 4),
                        ({"rate_limit": 1, "rate_window": 2}, 6)]:   # the 1 s poll meets it
        server.faults(**fault)
        time.sleep(hold)
        server.faults(drop_for=0, fail_next=0, latency=0)
    server.faults(rate_limit=0)
    history = server.state()["history"]
    n = drain_and_check_exactly_once(g)
    # After a 429 with Retry-After R at t, the client sends nothing until t + R. Requests that
    # arrive within IN_FLIGHT of the 429 were already on their way (another of the worker's
    # threads) when it was answered, so they do not count.
    IN_FLIGHT = 0.25
    by_client = {}
    for t, client, status, retry, path, arrived in sorted(history):
        if status == 429 and t - arrived > 1.0:
            continue        # answered after the client's timeout (the slow phase): never seen
        by_client.setdefault(client, []).append((t, status, retry, path))
    waits = []
    for events in by_client.values():
        for i, (t, status, retry, path) in enumerate(events):
            if status != 429:
                continue
            later = [(e[0] - t, e[3]) for e in events[i + 1:] if e[0] - t > IN_FLIGHT]
            if later:
                waits.append((later[0][0], retry))
                near = [(round(e[0] - t, 3), e[1], e[2], e[3]) for e in events if -1 < e[0] - t < 3]
                assert later[0][0] >= retry - 0.05, \
                    f"{later[0][1]} {later[0][0]:.2f} s after a 429 on {path} asking {retry} s: {near}"
    assert waits, "the 429 storm produced no 429"
    print(f"outages: {n} readings exactly once; {len(waits)} 429s, shortest wait "
          f"{min(g for g, _ in waits):.2f} s for {min(r for _, r in waits)} s asked")


def test_auth_churn_costs_no_batch(broker, gateway_factory, devserver_factory):
    # a rate limit nothing reaches: only so the server keeps its request history
    server = devserver_factory(access_ttl=2, refresh_ttl=10, rate_limit=1_000_000)
    quiet = json.dumps({room: {"temp_min": -10, "temp_max": 60, "humidity_min": 0, "co2_max": 5000,
                               "co2_critical": 5000} for room in ("fruiting", "spawning")})
    g = gateway_factory(broker, server=server, interval=0.02, SYNC_INTERVAL="1",
                        COMMAND_POLL_INTERVAL="30", HEARTBEAT_INTERVAL="30",
                        ALERT_THRESHOLDS=quiet)           # no alerts: nothing else keeps the session warm
    server.faults(latency=0.1)
    # several access tokens die mid-stream (2 s each) and are refreshed while it syncs
    wait_for(lambda: len([h for h in server.state()["history"] if h[4].endswith("/auth/refresh")]) >= 3,
             timeout=30, interval=0.5, what="three access-token refreshes mid-stream")
    g.env["SYNC_INTERVAL"] = "15"                   # idle > 10 s: the refresh token dies too
    # and nothing else between two syncs (the phased heartbeat and poll could keep it alive)
    g.env.update(HEARTBEAT_INTERVAL="3600", COMMAND_POLL_INTERVAL="3600")
    g.kill(g.worker)
    g.start_worker()
    try:
        wait_for(lambda: "logging in again" in g.logs(), timeout=40, interval=0.5,
                 what="a fresh login after the refresh token died")
    except AssertionError:
        import signal as _s
        g.worker.send_signal(_s.SIGUSR1)
        time.sleep(1)
        print(g.logs()[-8000:])
        raise
    server.faults(latency=0)
    drain_and_check_exactly_once(g)
    assert g.store.m.SensorData.select().where(g.store.m.SensorData.synced == -1).count() == 0


def test_broker_restarts_five_times(tmp_path, gateway_factory):
    broker = Broker(tmp_path / "broker").start()
    try:
        g = gateway_factory(broker, interval=0.2)
        obs = broker.observer()
        for i in range(5):
            broker.kill()
            # while it is down: a backend command completes and an alert is raised
            g.devserver.issue(DEVICE, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON" if i % 2 == 0 else "OFF"},
                              id=f"down-{i}")
            g.board.inject(b'{"fruiting":{"temp":24,"humidity":85,"co2":%d},"spawning":{"temp":28,"humidity":70,"co2":900}}\r\n'
                           % (1600 + i))
            wait_for(lambda: g.store.m.Command.get_or_none(g.store.m.Command.command_id == f"down-{i}") is not None and
                     g.store.m.Command.get(g.store.m.Command.command_id == f"down-{i}").status == "completed",
                     timeout=20, what="command done while the broker is down")
            assert [o for o in g.store.owed("mqtt") if o.kind == "ack" and o.ref == f"down-{i}"]
            time.sleep(0.5)
            broker.start()
            restarted = time.time()
            obs.close()
            obs = broker.observer()
            # a command sent before the gateway is back has no subscriber and is gone (MQTT);
            # "after the restart" is once the gateway says it is online again
            wait_for(lambda: [m for m in obs.on(f"{DEVICE}/status") if m.get("status") == "online"
                              and m.get("timestamp", 0) > restarted],
                     timeout=60, what=f"gateway back online after restart {i}")
            obs.publish(f"devices/{DEVICE}/commands", {"id": f"up-{i}", "command": "set_actuator",
                                                        "parameters": {"actuator": "FRUITING_LED",
                                                                       "state": "ON" if i % 2 == 0 else "OFF"}})
            wait_for(lambda: g.board.actuators["FRUITING_LED"] == ("ON" if i % 2 == 0 else "OFF"),
                     timeout=40, what=f"command after restart {i}")
            # the ack owed since the broker went down is confirmed by the new broker (an
            # observer may subscribe after it went out: the reconnect's wait is random)
            wait_for(lambda: not [o for o in g.store.owed("mqtt") if o.kind == "ack"
                                  and o.ref == f"down-{i}"],
                     timeout=40, what="ack queued while down")
            g.board.inject(b'{"fruiting":{"temp":24,"humidity":85,"co2":800},"spawning":{"temp":28,"humidity":70,"co2":900}}\r\n')
        wait_for(lambda: not [o for o in g.store.owed("mqtt") if o.kind == "alert"], timeout=40, what="alerts delivered")
        late = broker.observer(topics=(f"devices/{DEVICE}/status",))
        status = wait_for(lambda: late.messages, what="retained status")[-1]
        assert status[2] is True and status[1]["status"] == "online"
        late.close()
        obs.close()
    finally:
        broker.stop()


def test_serial_unplug_10_times_and_reset_5_times(broker, gateway_factory):
    g = gateway_factory(broker, interval=0.1)
    for actuator in ("MIST_MAKER", "FRUITING_LED"):
        g.devserver.issue(DEVICE, "set_actuator", {"actuator": actuator, "state": "ON"})
    wait_for(lambda: g.board.actuators["MIST_MAKER"] == "ON" and g.board.actuators["FRUITING_LED"] == "ON",
             timeout=20, what="relays on")
    recoveries = []
    for i in range(10):
        g.board.unplug()
        time.sleep(0.5)
        before = g.store.m.SensorData.select().count()
        t0 = time.monotonic()
        g.board.replug()
        wait_for(lambda: g.store.m.SensorData.select().count() > before, timeout=5, interval=0.02,
                 what=f"readings after replug {i}")
        recoveries.append(time.monotonic() - t0)
    restores = []
    for i in range(5):
        t0 = time.monotonic()
        g.board.reset()
        wait_for(lambda: g.board.actuators["MIST_MAKER"] == "OFF", timeout=1, interval=0.001, what="reset")
        wait_for(lambda: g.board.actuators["MIST_MAKER"] == "ON" and g.board.actuators["FRUITING_LED"] == "ON",
                 timeout=5, interval=0.02, what=f"relays restored after reset {i}")
        restores.append(time.monotonic() - t0)
    assert max(recoveries) < 5 and max(restores) < 5
    print(f"replug -> readings: max {max(recoveries):.2f} s; reset -> relays restored: max {max(restores):.2f} s")


def fuzz_lines(n: int, seed: int = 5):
    """Serial lines a broken cable, a bad sensor or a firmware bug could produce."""
    rng = random.Random(seed)
    good = b'{"fruiting":{"temp":24.5,"humidity":85.2,"co2":812},"spawning":{"temp":27.9,"humidity":74.1,"co2":3100}}'
    mutations = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))),
        lambda: good[: rng.randrange(1, len(good))],
        lambda: good.replace(b"24.5", rng.choice([b"NaN", b'"hot"', b"1e309", b"-99", b"true", b"null"])),
        lambda: good.replace(b"812", str(rng.randrange(-10000, 10000)).encode()),
        lambda: good.replace(b"fruiting", rng.choice([b"cellar", b"", b"FRUITING"])),
        lambda: b'{"fruiting":{"error":"invalid_reading"},"spawning":{"error":"%s"}}' % rng.choice([b"invalid_reading", b"x"]),
        lambda: b"{" * rng.randrange(1, 400),
        lambda: b"x" * rng.randrange(500, 3000),
        lambda: rng.choice([b"[CMD] Set MIST_MAKER to ON", b"[ERROR] Unknown actuator: X", b"[INFO] hi", b"[READY] x"]),
        lambda: good,
    ]
    for _ in range(n):
        line = rng.choice(mutations)().replace(b"\n", b" ").replace(b"\r", b" ")
        yield line


def bad_lines(store) -> int:
    return sum(c.value for c in store.m.Counter.select() if c.name.startswith("bad_line."))


def test_100000_fuzzed_serial_lines_are_each_stored_or_counted(broker, gateway_factory):
    g = gateway_factory(broker, interval=0)
    base_rows = g.store.m.SensorData.select().count()
    base_bad = bad_lines(g.store)
    expected_rows, expected_bad = 0, 0
    lines = list(fuzz_lines(100_000))
    for line in lines:
        msg = protocol.parse_line(line)
        if isinstance(msg, protocol.Reading):
            expected_rows += len(msg.rooms)
            expected_bad += len(msg.rejected)
        elif isinstance(msg, (protocol.Bad, protocol.Ack, protocol.CommandError)):
            expected_bad += 1        # a board reply with no command waiting: unexpected_reply
    chunk = []
    for line in lines:
        chunk.append(line + b"\n")
        if len(chunk) == 200:
            g.board.inject(b"".join(chunk))
            chunk = []
    g.board.inject(b"".join(chunk))
    wait_for(lambda: g.store.m.SensorData.select().count() >= base_rows + expected_rows, timeout=240,
             interval=0.5, what="fuzzed good readings stored")
    g.board.inject(b"[INFO] end\n")
    # counters are flushed every 5 s: wait for them, then every line is accounted for exactly
    # (CONTROL_MODE=off and no command: each [CMD]/[ERROR] reply in the fuzz is unexpected)
    wait_for(lambda: bad_lines(g.store) - base_bad >= expected_bad, timeout=30, interval=0.5,
             what="every bad line counted")
    assert g.reader.poll() is None, "the reader died"
    bad = bad_lines(g.store) - base_bad
    assert g.store.m.SensorData.select().count() - base_rows == expected_rows
    assert bad == expected_bad
    print(f"100,000 fuzzed lines: {expected_rows} good readings stored, {bad} rejections counted")


def test_10000_fuzzed_mqtt_commands_are_each_rejected_and_move_no_relay(broker, gateway_factory):
    g = gateway_factory(broker, interval=1.0, BACKEND_URL="")       # MQTT is the channel here
    obs = broker.observer()
    rng = random.Random(9)
    topic = f"devices/{DEVICE}/commands"
    sent = {"usable_id": 0, "no_id": 0}
    past = "2020-01-01T00:00:00Z"
    makers = [
        lambda i: (b"{not json" + str(i).encode(), False),
        lambda i: (json.dumps([i]).encode(), False),
        lambda i: (json.dumps({"command": "set_actuator"}).encode(), False),
        lambda i: (json.dumps({"id": i, "command": "set_actuator"}).encode(), False),
        lambda i: (json.dumps({"id": f"f{i}", "command": "set_actuator",
                               "parameters": {"actuator": rng.choice(["TOASTER", "", "mist"]), "state": "ON"}}).encode(), True),
        lambda i: (json.dumps({"id": f"f{i}", "command": "set_actuator",
                               "parameters": {"actuator": "MIST_MAKER", "state": rng.choice(["HALF", 1, None])}}).encode(), True),
        lambda i: (json.dumps({"id": f"f{i}", "command": "set_actuator", "expiresAt": past,
                               "parameters": {"actuator": "MIST_MAKER", "state": "ON"}}).encode(), True),
        lambda i: (json.dumps({"id": f"f{i}", "command": "set_actuator", "deviceId": "other",
                               "parameters": {"actuator": "MIST_MAKER", "state": "ON"}}).encode(), True),
        lambda i: (json.dumps({"id": f"f{i}", "command": "set_actuator", "pad": "x" * 5000,
                               "parameters": {"actuator": "MIST_MAKER", "state": "ON"}}).encode(), True),
        lambda i: (json.dumps({"id": f"f{i}", "command": rng.choice(["reboot", "", 7])}).encode(), True),
        lambda i: (json.dumps({"id": f"f{max(0, i - 5)}", "command": "self_destruct"}).encode(), None),  # replay
    ]
    for i in range(10_000):
        payload, usable = rng.choice(makers)(i)
        obs.client.publish(topic, payload, qos=1)
        if usable is not None:
            sent["usable_id" if usable else "no_id"] += 1
        if i % 500 == 499:
            time.sleep(0.05)
    assert g.worker.poll() is None
    wait_for(lambda: g.store.counters().get("bad_command.bad_json", 0)
             + g.store.counters().get("bad_command.not_object", 0)
             + g.store.counters().get("bad_command.no_usable_id", 0) >= sent["no_id"], timeout=120,
             interval=0.5, what="malformed payloads counted")
    wait_for(lambda: g.store.m.Command.select().count() >= 1 and
             g.store.m.Command.select().count() + g.store.counters().get("command.duplicate", 0)
             >= sent["usable_id"], timeout=180, interval=0.5, what="every usable id handled")
    assert not g.store.m.Command.select().where(g.store.m.Command.status != "failed").exists()
    assert all(not line.startswith(b'{"actuator"') for line in g.board.received)     # no relay moved
    assert set(g.board.actuators.values()) == {"OFF"}
    assert g.worker.poll() is None and g.reader.poll() is None
    print(f"10,000 fuzzed MQTT payloads: {g.store.m.Command.select().count()} acknowledged failed, "
          f"{g.store.counters().get('command.duplicate', 0)} replays dropped, "
          f"{sent['no_id']} without a usable id counted")
    obs.close()
