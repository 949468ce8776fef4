"""The guide's sync manager as a library: it raises instead of exiting and leaves the host
application's logging alone. (Its whole integration example runs in test_guide_example.)"""
import logging

import pytest

from mash.cloud.sync import create_sync_manager
from mash.config import ConfigError
from mash.models import Store


def test_a_bad_setting_raises_config_error_not_system_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNC_INTERVAL", "0")
    with pytest.raises(ConfigError, match="SYNC_INTERVAL"):
        create_sync_manager(db_manager=Store(tmp_path / "mash.db"))


def test_start_and_stop_leave_the_hosts_logging_alone(make_settings, data_dir):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    mgr = create_sync_manager(db_manager=Store(data_dir / "mash.db"), settings=make_settings())
    mgr.start()
    try:
        assert root.handlers == handlers and root.level == level
        with pytest.raises(ValueError, match="severity"):
            mgr.queue_alert("high_co2", "x", "LOUD")
        assert mgr.acknowledge_command("no-such-command", True) is False
        assert mgr.get_pending_command(timeout=0) is None
    finally:
        mgr.stop()
    assert root.handlers == handlers and root.level == level
