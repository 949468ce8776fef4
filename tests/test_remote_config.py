"""Configuration pulled from the backend and Firebase, and the rule that a newer CONFIGURE
wins: a pulled configuration applies only when it changed at its source."""
from mash.tasks.intake import intake
from mash.tasks.remote_config import pull_configuration

DEVICE = "rpi_gateway_001"


def set_backend_config(devserver, config):
    devserver.faults(configuration=config, device=DEVICE)


def test_backend_configuration_applies_and_a_later_configure_wins_until_it_changes(gateway):
    set_backend_config(gateway.devserver, {"sync_interval": 120,
                                           "thresholds": {"fruiting": {"temp_max": 26}}})
    assert pull_configuration(gateway)["backend"] == "applied"
    assert gateway.intervals["sync"] == 120
    assert gateway.store.meta_get("configuration")["thresholds"]["fruiting"]["temp_max"] == 26
    assert pull_configuration(gateway)["backend"] == "unchanged"

    # a CONFIGURE after that: newer, so it stays in force through later pulls
    assert intake(gateway, {"id": "cfg-1", "command": "CONFIGURE",
                            "parameters": {"sync_interval": 30}}, "mqtt") == "done"
    assert pull_configuration(gateway)["backend"] == "unchanged"
    assert gateway.intervals["sync"] == 30

    # the backend's configuration changes again: now it is the newer one
    set_backend_config(gateway.devserver, {"sync_interval": 90})
    assert pull_configuration(gateway)["backend"] == "applied"
    assert gateway.intervals["sync"] == 90
    assert gateway.store.meta_get("configuration")["thresholds"]["fruiting"]["temp_max"] == 26


def test_firebase_config_is_pulled_too(gateway):
    gateway.rtdb.tree.setdefault("devices", {}).setdefault(DEVICE, {})["config"] = {
        "mode": {"spawning": "manual"}}
    assert pull_configuration(gateway)["firebase"] == "applied"
    assert gateway.store.meta_get("configuration")["mode"] == {"spawning": "manual"}


def test_bad_or_foreign_settings_are_refused_or_ignored_with_a_reason(gateway, caplog):
    set_backend_config(gateway.devserver, {"sync_interval": 0})
    result = pull_configuration(gateway)["backend"]
    assert result.startswith("refused: malformed: sync_interval")
    assert "sync_interval" not in (gateway.store.meta_get("configuration") or {})
    assert pull_configuration(gateway)["backend"] == "unchanged"      # refused once, not per pull
    assert gateway.store.counters()["config_pull.refused"] == 1

    set_backend_config(gateway.devserver, {"heartbeat_interval": 45, "displayName": "Room A"})
    with caplog.at_level("INFO", logger="mash.worker"):
        assert pull_configuration(gateway)["backend"] == "applied"
    assert gateway.intervals["heartbeat"] == 45
    assert "ignoring settings the gateway does not have: displayName" in caplog.text
