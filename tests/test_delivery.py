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
