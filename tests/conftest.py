import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from mash.config import Settings
from tests.services import Broker, DevServer, RTDBStandIn, make_service_account

# No test reads the developer's own config/.env.
os.environ["MASH_ENV_FILE"] = os.devnull
for key in list(os.environ):
    if key.startswith(("MQTT_", "BACKEND_", "DEVICE_", "FIREBASE_", "SERIAL_")):
        del os.environ[key]
# mash.tasks builds its queue from MASH_DATA_DIR at import: keep that out of the checkout.
os.environ["MASH_DATA_DIR"] = _session_dir = tempfile.mkdtemp(prefix="mash-tests-")
atexit.register(shutil.rmtree, _session_dir, True)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def make_settings(data_dir):
    def make(**env):
        base = {"MASH_DATA_DIR": str(data_dir), "DEVICE_ID": "rpi_gateway_001"}
        base.update({k: str(v) for k, v in env.items()})
        return Settings.from_mapping(base)
    return make


@pytest.fixture
def store(data_dir):
    from mash.models import DatabaseManager
    return DatabaseManager(data_dir / "mash.db")


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path):
    """A broker of the test's own, for tests that kill and restart it."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def observer(broker):
    o = broker.observer()
    yield o
    o.close()


@pytest.fixture
def devserver_factory(tmp_path):
    started = []
    def make(**kw):
        s = DevServer(tmp_path / f"devserver{len(started)}", **kw).start()
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


@pytest.fixture
def devserver(devserver_factory):
    return devserver_factory()


@pytest.fixture
def rtdb(tmp_path, monkeypatch):
    r = RTDBStandIn().start()
    monkeypatch.setenv("FIREBASE_DATABASE_EMULATOR_HOST", r.host)
    r.credentials = make_service_account(tmp_path / "firebase_config.json")
    yield r
    r.stop()


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m mash.cli ...`` as a user would, in a clean working directory."""
    def run(*args, env=None, timeout=60):
        full = {k: v for k, v in os.environ.items()}
        full.update(env or {})
        return subprocess.run([sys.executable, "-m", "mash.cli", *args], capture_output=True,
                              text=True, env=full, cwd=str(tmp_path), timeout=timeout)
    return run


@pytest.fixture
def gateway(make_settings, devserver, broker, rtdb):
    """A worker runtime wired to every real sink, with Huey in immediate mode."""
    from mash import tasks
    from mash.tasks.runtime import Runtime
    settings = make_settings(**devserver.env(), **broker.env(),
                             FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
                             FIREBASE_CREDENTIALS=str(rtdb.credentials))
    tasks.huey.immediate = True
    rt = Runtime(settings)
    tasks.set_runtime(rt)
    rt.devserver, rt.rtdb, rt.broker = devserver, rtdb, broker
    yield rt
    rt.stop()
    if rt.mqtt is not None:
        rt.mqtt.disconnect()
    tasks.set_runtime(None)
    tasks.huey.immediate = False
