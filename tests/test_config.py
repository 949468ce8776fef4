import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mash import config
from mash.alerts import AlertEngine
from mash.config import ConfigError, Settings
from mash.models import Store
from mash.dashboard import actions
from mash.housekeeping import Housekeeping
from mash.tasks.context import WorkerContext
from mash.tasks.intake import intake
from mash.tasks.remote_config import apply_pulled
from tests.services import ROOT


def test_defaults_follow_the_contract():
    s = Settings.from_mapping({})
    assert (s.sync_interval, s.batch_size, s.mqtt_port, s.serial_baud, s.mqtt_qos) == (60, 50, 8883, 9600, 1)
    assert not s.backend_enabled and not s.mqtt_enabled and not s.firebase_enabled
    assert s.thresholds["fruiting"]["temp_min"] == 22.0


@pytest.mark.parametrize("env,key", [
    ({"BATCH_SIZE": "abc"}, "BATCH_SIZE"),
    ({"BATCH_SIZE": "1001"}, "BATCH_SIZE"),          # the backend takes at most 1000 a request
    ({"SYNC_INTERVAL": "0"}, "SYNC_INTERVAL"),
    ({"MQTT_PORT": "99999"}, "MQTT_PORT"),
    ({"MQTT_QOS": "2"}, "MQTT_QOS"),
    ({"ALERT_THRESHOLDS": '{"cellar":{"temp_max":20}}'}, "ALERT_THRESHOLDS"),
    ({"ALERT_THRESHOLDS": '{"fruiting":{"temp_max":"hot"}}'}, "ALERT_THRESHOLDS"),
    ({"BACKEND_URL": "http://api.mashmarket.app"}, "BACKEND_URL"),
    ({"DEVICE_ID": "a/b"}, "DEVICE_ID"),
    ({"SERIAL_BAUD": "1234"}, "SERIAL_BAUD"),
    ({"MQTT_CA_CERTS": "/nonexistent/ca.pem"}, "MQTT_CA_CERTS"),
])
def test_bad_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping(env)
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)


def test_batch_size_is_capped_at_what_the_backend_takes():
    from mash.contract import MAX_READINGS_PER_REQUEST
    assert MAX_READINGS_PER_REQUEST == 1000
    assert Settings.from_mapping({"BATCH_SIZE": "1000"}).batch_size == 1000
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        Settings.from_mapping({"BATCH_SIZE": "5000"})


def test_backend_url_gets_api_prefix_only_without_a_path():
    assert Settings.from_mapping({"BACKEND_URL": "https://api.mashmarket.app"}).api_base == \
        "https://api.mashmarket.app/api/v1"
    assert Settings.from_mapping({"BACKEND_URL": "https://x.example/v2/"}).api_base == "https://x.example/v2"
    assert Settings.from_mapping({"BACKEND_URL": "http://127.0.0.1:3000"}).api_base == "http://127.0.0.1:3000/api/v1"
    assert Settings.from_mapping({"BACKEND_URL": "http://farm.lan", "BACKEND_ALLOW_INSECURE": "1"}).backend_url


def test_password_never_in_the_error_line():
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"MQTT_PASSWORD": "hunter2", "MQTT_PORT": "x"})
    assert "hunter2" not in str(err.value)


# -- CONFIGURE against the configuration in force ------------------------------------------
def configure_cmd(command_id, **params):
    return {"id": command_id, "command": "CONFIGURE", "parameters": params}


def test_a_configure_that_conflicts_with_the_limits_in_force_is_acked_failed_and_not_stored(
        make_settings):
    ctx = WorkerContext(make_settings())                 # no sink: only the ledger and the store
    store = ctx.store
    # fruiting's temp_max in force is 26: a temp_min of 27 cannot run
    assert intake(ctx, configure_cmd("c1", thresholds={"fruiting": {"temp_min": 27}}), "mqtt") == "failed"
    row = store.command("c1")
    assert row.status == "failed"
    assert "temp_min (27) must be below temp_max (26)" in row.reason
    assert store.meta_get("configuration") is None
    acks = [o.message for o in store.owed("mqtt") if o.kind == "ack"]
    assert [(a["id"], a["status"]) for a in acks] == [("c1", "failed")]
    assert "temp_max (26)" in acks[0]["response"]["reason"]
    # a later valid one still works, and is judged with what is stored by then
    assert intake(ctx, configure_cmd("c2", thresholds={"fruiting": {"temp_max": 30}}), "mqtt") == "done"
    assert intake(ctx, configure_cmd("c3", thresholds={"fruiting": {"temp_min": 27}}), "mqtt") == "done"
    assert store.meta_get("configuration") == {"thresholds": {"fruiting": {"temp_max": 30, "temp_min": 27}}}
    # ... and one that conflicts with a stored limit is refused in turn
    assert intake(ctx, configure_cmd("c4", thresholds={"fruiting": {"temp_max": 26.5}}), "mqtt") == "failed"
    assert store.meta_get("configuration")["thresholds"]["fruiting"]["temp_max"] == 30
    # what was stored is what the reader runs with
    engine = AlertEngine(ctx.settings.thresholds)
    Housekeeping(ctx.settings, store, engine)
    assert (engine.thresholds["fruiting"]["temp_min"], engine.thresholds["fruiting"]["temp_max"]) == (27, 30)


def test_configure_is_judged_by_the_settings_in_force_not_the_defaults(make_settings):
    ctx = WorkerContext(make_settings(ALERT_THRESHOLDS='{"fruiting":{"temp_max":30}}',
                                      CONTROL_RULES='{"fruiting":{"temp_on":30,"temp_off":29}}'))
    assert intake(ctx, configure_cmd("s1", thresholds={"fruiting": {"temp_min": 27}}), "mqtt") == "done"
    assert intake(ctx, configure_cmd("s2", control={"fruiting": {"temp_off": 28}}), "mqtt") == "done"
    assert intake(ctx, configure_cmd("s3", control={"fruiting": {"temp_off": 31}}), "mqtt") == "failed"
    assert "temp_off (31) must be below temp_on (30)" in ctx.store.command("s3").reason
    assert ctx.store.meta_get("configuration") == {"thresholds": {"fruiting": {"temp_min": 27}},
                                                   "control": {"fruiting": {"temp_off": 28}}}


def test_the_dashboard_and_a_pulled_configuration_are_checked_the_same_way(make_settings):
    ctx = WorkerContext(make_settings())
    conflicting = {"thresholds": {"fruiting": {"temp_min": 27}}}
    with pytest.raises(actions.ActionError, match=r"temp_min \(27\) must be below temp_max \(26\)"):
        actions.configure(ctx.settings, ctx.store, conflicting)
    assert apply_pulled(ctx, "backend", conflicting).startswith("refused: conflicts with the limits")
    assert ctx.store.meta_get("configuration") is None
    assert not ctx.store.m.Command.select().exists()
    assert actions.configure(ctx.settings, ctx.store, {"thresholds": {"fruiting": {"temp_max": 28}}})[1] == \
        {"thresholds": {"fruiting": {"temp_max": 28}}}
    assert apply_pulled(ctx, "backend", conflicting) == "unchanged"    # refused once per version
    assert apply_pulled(ctx, "firebase", conflicting) == "applied"     # fits now: 27 < 28
    assert ctx.store.meta_get("configuration")["thresholds"]["fruiting"] == {"temp_max": 28, "temp_min": 27}


# -- one place for config/.env and the data directory ----------------------------------------
READING = {"fruiting": {"temp": 24.5, "humidity": 85, "co2": 800},
           "spawning": {"temp": 28.0, "humidity": 70, "co2": 900}}


def seeded_store(path: Path, readings: int) -> None:
    store = Store(path)
    for _ in range(readings):
        store.save_sensor_data(READING)
    store.close()


def env_without_paths(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASH_DATA_DIR", "MASH_ENV_FILE", "MASH_HOME", "PYTHONPATH")}
    return {**env, **extra}


def test_paths_resolve_against_mash_home_never_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MASH_HOME", raising=False)
    monkeypatch.delenv("MASH_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.checkout() == ROOT and config.home() == ROOT        # this checkout by default
    assert Settings.from_mapping({}).data_dir == ROOT / "data"
    assert config.env_file_path() == ROOT / "config" / ".env"
    monkeypatch.setenv("MASH_HOME", str(tmp_path / "farm"))
    s = Settings.from_mapping({"MASH_DATA_DIR": "store", "FIREBASE_CREDENTIALS": "key.json"})
    assert (s.data_dir, s.firebase_credentials) == (tmp_path / "farm" / "store",
                                                    str(tmp_path / "farm" / "key.json"))
    assert Settings.from_mapping({"MASH_DATA_DIR": "/srv/mash"}).data_dir == Path("/srv/mash")
    assert config.queue_path_from({}) == Settings.from_mapping({}).queue_path
    monkeypatch.setenv("MASH_ENV_FILE", "/etc/mash.env")
    assert config.env_file_path() == Path("/etc/mash.env")


def test_mash_status_from_another_directory_reads_the_checkouts_store(tmp_path):
    """The real ``mash`` command, run from elsewhere with no MASH_DATA_DIR: it reads the
    store of the checkout it runs from (here a copy of this one, so the developer's own
    data/ is never touched), and of MASH_HOME when that is set."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "mash", copy / "mash", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    seeded_store(copy / "data" / "mash.db", 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "mash", "status", "--json"], cwd=elsewhere,
                         env=env_without_paths(PYTHONPATH=str(copy)), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pending_records"] == 6                # 3 lines, 2 rooms
    assert list(elsewhere.iterdir()) == []                               # no store made here

    # MASH_HOME, with its config/.env naming a relative data directory: relative to it
    farm = tmp_path / "farm"
    (farm / "config").mkdir(parents=True)
    (farm / "config" / ".env").write_text("MASH_DATA_DIR=readings\n")
    seeded_store(farm / "readings" / "mash.db", 2)
    mash = Path(sys.executable).parent / "mash"
    out = subprocess.run([str(mash), "status"], cwd=elsewhere, env=env_without_paths(MASH_HOME=str(farm)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pending:  4 " in out.stdout, out.stdout
    assert list(elsewhere.iterdir()) == [] and not (farm / "data").exists()
