import atexit
import os
import shutil
import subprocess
import sys
import tempfile

from pathlib import Path

import pytest

# No test reads the developer's own config/.env.
os.environ["MASH_ENV_FILE"] = os.devnull
for key in list(os.environ):
    if key.startswith(("MQTT_", "BACKEND_", "DEVICE_", "FIREBASE_", "SERIAL_", "CONTROL_")):
        del os.environ[key]
# A broker restart in a test is waited for in seconds, not the minute a fleet spreads over
# (MQTT_RECONNECT_MAX; the spread itself is bench/run.py fleet).
os.environ["MQTT_RECONNECT_MAX"] = "10"
# The backend's request budget (BACKEND_MAX_RPM) spreads a drain over the minute; tests that
# are not about pacing (tests/test_pacing.py) drain at once.
os.environ["BACKEND_MAX_RPM"] = "6000"
# The gateway's processes run with a private umask (mash.logs.UMASK); a store a test makes in
# this process is as private, so the processes it starts find nothing to tighten.
os.umask(0o077)
# This machine's kernel is not NTP-disciplined (adjtimex reports STA_UNSYNC), so with the
# default CLOCK_SYNC=auto every reading would wait for the backend's Date. Tests that are not
# about the clock trust it; the honest clock's own tests (test_timekeeper.py) use CLOCK_SYNC=auto
# with a clock source they control, and one runs the real source end to end.
os.environ["CLOCK_SYNC"] = "trust"
# Every dashboard a test starts would otherwise advertise by mDNS on this machine's network and
# serve the grower app's API on 0.0.0.0:5000: off, unless a test asks (those run in network
# namespaces of their own, tests/services.py LanPair).
os.environ["MDNS"] = "0"
os.environ["PHONE_API"] = "off"
# mash.tasks builds its queue from MASH_DATA_DIR at import, so this comes before any import of
# the project: the queue stays out of the checkout.
os.environ["MASH_DATA_DIR"] = _session_dir = tempfile.mkdtemp(prefix="mash-tests-")
atexit.register(shutil.rmtree, _session_dir, True)

from mash import tasks  # noqa: E402
from mash.sinks.backend_api import BackendAPIClient  # noqa: E402
from mash.config import Settings, resolve_queue_dir  # noqa: E402
from mash.models import Store  # noqa: E402
from mash.tasks.context import WorkerContext  # noqa: E402
from tests.services import Broker, DevServer, RTDBStandIn, make_service_account  # noqa: E402


def pytest_sessionfinish(session):
    """Queues of the tests' gateways live in RAM (/dev/shm), one folder per data directory:
    remove those of this run's data directories (and only those: another run on the same
    machine keeps its own)."""
    roots = [Path(_session_dir), session.config._tmp_path_factory.getbasetemp()]
    for root in roots:
        dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
        # a process that stopped on a bad setting made its queue before its data directory
        for directory in dirs + [d / "data" for d in dirs]:
            queue = resolve_queue_dir(directory)
            if queue != directory and queue.is_dir():
                shutil.rmtree(queue, ignore_errors=True)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def make_settings(data_dir):
    def make(**env):
        base = {"MASH_DATA_DIR": str(data_dir), "DEVICE_ID": "rpi_gateway_001",
                "CLOCK_SYNC": "trust", "BACKEND_MAX_RPM": os.environ["BACKEND_MAX_RPM"]}
        base.update({k: str(v) for k, v in env.items()})
        return Settings.from_mapping(base)
    return make


@pytest.fixture
def store(data_dir):
    s = Store(data_dir / "mash.db")
    yield s
    s.close()


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
def mash_backend(devserver_factory):
    """The replica of the deployed MASH backend (CONTRACT §9): 20 requests per 60 s per URL,
    populated with another farm's active device; stopped at teardown."""
    return devserver_factory(profile="mash", rate_limit=20, rate_window=60.0)


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
        return subprocess.run([sys.executable, "-m", "mash", *args], capture_output=True,
                              text=True, env=full, cwd=str(tmp_path), timeout=timeout)
    return run


class ServedContext(WorkerContext):
    """A worker context whose service (MQTT link, scheduler, live feed) a test starts."""
    service = None

    def start(self):
        self.service = tasks.start_service(self)

    def stop(self):
        if self.service is not None:
            self.service.stop()
        elif self.mqtt is not None:
            self.mqtt.disconnect()


@pytest.fixture
def gateway(make_settings, devserver, broker, rtdb):
    """A worker context wired to every real sink, with Huey in immediate mode."""
    settings = make_settings(**devserver.env(), **broker.env(),
                             FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
                             FIREBASE_CREDENTIALS=str(rtdb.credentials))
    tasks.huey.immediate = True
    ctx = ServedContext(settings)
    tasks.set_context(ctx)
    ctx.devserver, ctx.rtdb, ctx.broker = devserver, rtdb, broker
    yield ctx
    ctx.stop()
    tasks.set_context(None)
    tasks.huey.immediate = False


@pytest.fixture
def client_for(make_settings):
    clients = []
    def make(server, **env):
        c = BackendAPIClient(make_settings(**{**server.env(), **env}))
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()
