"""Delivery of alerts and command outcomes from the outbox, against the reference backend and
mosquitto, with Huey in immediate mode."""
import threading

from mash.alerts import AlertEvent
from mash.models import Store
from mash.tasks import sync
from tests.services import wait_for

DEVICE = "rpi_gateway_001"


def test_a_burst_of_200_outcomes_and_50_alerts_reaches_each_sink_exactly_once(gateway, observer):
    dev = gateway.devserver
    sync.ensure_registered(gateway)
    ids = [dev.issue(DEVICE, "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"},
                     id=f"burst-{i}")["id"] for i in range(200)]
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    # The reader's side, as another process would write it: its own connection to the file.
    reader_store = Store(gateway.store.path)

    def reader_work():
        for i, cid in enumerate(ids):
            reader_store.add_command(cid, "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"},
                                     "backend")
            reader_store.finish_command(cid, True, response={"board": "[CMD] Set FRUITING_LED to ON"},
                                        desired=("FRUITING_LED", "ON"))
            if i % 4 == 0:
                reader_store.add_alerts([AlertEvent("high_temp", "WARNING", "fruiting", 27.0 + i,
                                                    26.0, "raised", f"burst alert {i // 4}")])
    t = threading.Thread(target=reader_work)
    t.start()
    t.join(60)
    wait_for(lambda: not gateway.store.has_undelivered(), timeout=90, what="everything delivered")
    state = dev.state(DEVICE)
    acks_at_backend = {c["id"]: c["acks"] for c in state["commands"]}
    assert all(acks_at_backend[cid] == 1 for cid in ids), \
        [(cid, acks_at_backend[cid]) for cid in ids if acks_at_backend[cid] != 1][:5]
    messages = [a["message"] for a in state["alerts"]]
    assert len(messages) == 50 and len(set(messages)) == 50
    wait_for(lambda: len(observer.on("/command_ack")) >= 200 and len(observer.on("/alerts")) >= 50,
             timeout=30, what="MQTT copies")
    mqtt_acks = [a["id"] for a in observer.on("/command_ack")]
    mqtt_alerts = [a["id"] for a in observer.on("/alerts")]
    assert sorted(mqtt_acks) == sorted(ids), "an ack published twice or missing"
    assert len(mqtt_alerts) == 50 == len(set(mqtt_alerts)), "an alert published twice"
    reader_store.close()


def test_a_refused_ack_is_recorded_not_retried(gateway):
    gateway.store.add_command("never-known", "REQUEST_STATUS", {}, "mqtt", status="failed",
                              reason="oversize")
    from mash.tasks import delivery
    sync.ensure_registered(gateway)
    delivery.deliver_owed(gateway)
    O = gateway.store.m.Outbox
    row = O.get((O.sink == "backend") & (O.ref == "never-known"))
    assert row.done_at is not None and "404" in row.error
    assert delivery.deliver_owed(gateway) == 0


def owe_an_alert_and_an_ack(store, devserver, cid):
    """An alert and a backend command's outcome, each owed to both sinks (4 outbox rows)."""
    devserver.issue(DEVICE, "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, id=cid)
    store.add_command(cid, "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, "backend")
    store.finish_command(cid, True, response={"board": "[CMD] Set FRUITING_LED to ON"},
                         desired=("FRUITING_LED", "ON"))
    store.add_alerts([AlertEvent("high_temp", "WARNING", "fruiting", 27.5, 26.0, "raised",
                                 f"owed alert {cid}")])


def test_owed_items_wait_for_an_unconfigured_sink_and_go_once_it_is_configured(
        make_settings, devserver, broker, observer, store):
    from mash import tasks
    from mash.tasks import delivery
    from mash.tasks.context import WorkerContext
    owe_an_alert_and_an_ack(store, devserver, "owed-1")
    O = store.m.Outbox
    off = WorkerContext(make_settings(), store=store)           # no sink configured
    assert off.backend is None and off.mqtt is None
    jobs = {job.name: job for job in tasks.periodic_jobs()}
    assert not jobs["deliver"].due(off) and not jobs["deliver_now"].due(off)   # nothing spins
    assert delivery.deliver_owed(off) == 0
    assert O.select().where(O.done_at.is_null()).count() == 4 and \
        not O.select().where(O.error.is_null(False)).exists()
    # the backend configured (MQTT still off): it gets its two, MQTT's two still wait
    on = WorkerContext(make_settings(**devserver.env()), store=store, mqtt=None, firebase=None)
    assert jobs["deliver"].due(on) and jobs["deliver_now"].due(on)
    assert delivery.deliver_owed(on) == 2
    assert not jobs["deliver"].due(on)
    state = devserver.state(DEVICE)
    assert [c["acks"] for c in state["commands"] if c["id"] == "owed-1"] == [1]
    assert [a["message"] for a in state["alerts"]] == ["owed alert owed-1"]
    assert sorted(o.sink for o in O.select().where(O.done_at.is_null())) == ["mqtt", "mqtt"]
    # then MQTT too
    both = WorkerContext(make_settings(**devserver.env(), **broker.env()), store=store,
                         firebase=None)
    try:
        assert both.mqtt.connect(timeout=10)
        assert jobs["deliver"].due(both)
        wait_for(lambda: delivery.deliver_owed(both) >= 0 and not store.has_undelivered(),
                 timeout=15, what="the MQTT copies confirmed")
        wait_for(lambda: observer.on("/alerts") and observer.on("/command_ack"), what="MQTT copies")
        assert [a["id"] for a in observer.on("/command_ack")] == ["owed-1"]
        assert [a["message"] for a in observer.on("/alerts")] == ["owed alert owed-1"]
        assert not O.select().where(O.error.is_null(False)).exists()
        assert len(devserver.state(DEVICE)["alerts"]) == 1            # sent once, not again
    finally:
        both.mqtt.disconnect()


def test_a_401_keeps_every_alert_and_ack_owed_and_mqtt_still_gets_them(gateway, observer):
    from mash.sinks.errors import AuthError
    from mash.tasks import delivery
    dev, store = gateway.devserver, gateway.store
    gateway.backend.login_backoff = (0.5, 2.0)
    sync.ensure_registered(gateway)
    assert gateway.mqtt.connect(timeout=10)
    owe_an_alert_and_an_ack(store, dev, "auth-1")
    dev.faults(unauthorized_for=2)
    try:
        delivery.deliver_owed(gateway)
        raise AssertionError("the 401 was not raised")
    except AuthError as exc:
        assert 0.25 <= exc.retry_after <= 0.5       # 0.5 s, its later half drawn
    owed = [(o.kind, o.message.get("type")) for o in store.owed("backend")]
    assert owed == [("ack", None), ("alert", "high_temp"), ("alert", "backend_auth")]
    wait_for(lambda: delivery.record_confirmed(gateway) >= 0 and not store.owed("mqtt"),
             what="MQTT delivered while the backend refuses us")
    assert sorted(a["type"] for a in observer.on("/alerts")) == ["backend_auth", "high_temp"]

    def backend_took_all():
        try:
            delivery.deliver_owed(gateway)
        except AuthError:
            return False
        return not store.owed("backend")
    wait_for(backend_took_all, timeout=20, interval=0.1, what="delivered once the 401s passed")
    state = dev.state(DEVICE)
    assert [c["acks"] for c in state["commands"] if c["id"] == "auth-1"] == [1]
    assert [a["eventType"] for a in state["alerts"]] == ["high_temp", "backend_auth",
                                                         "backend_auth_cleared"]
    O = store.m.Outbox
    assert not O.select().where(O.error.is_null(False)).exists()      # nothing given up on
