"""``mash service``: the units it writes pass ``systemd-analyze verify`` (Debian's systemd),
point at this virtual environment and data directory, and the serial user is checked."""
import os
import pwd
import shutil
import subprocess
import sys

import pytest

from mash import service
from mash.config import home

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (Debian's systemd package)")


def verify(*paths):
    return subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True,
                          text=True, timeout=60)


def test_installed_units_verify_and_point_at_this_environment(run_cli, tmp_path):
    unit_dir = tmp_path / "units"
    data = tmp_path / "farm-data"
    result = run_cli("service", "install", "--unit-dir", str(unit_dir), "--no-start",
                     env={"MASH_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stdout + result.stderr
    reader, worker = unit_dir / "mash-reader.service", unit_dir / "mash-worker.service"
    dashboard = unit_dir / "mash-dashboard.service"
    assert f"ExecStart={sys.executable} -m mash.dashboard" in dashboard.read_text()
    text = reader.read_text()
    assert f"ExecStart={sys.executable} -m mash.reader" in text
    assert f"Environment=MASH_DATA_DIR={data}" in text
    assert "Restart=always" in text and "KillSignal=SIGTERM" in text
    assert "RuntimeDirectory=mash" in text and "SupplementaryGroups=dialout" in text
    w = worker.read_text()
    assert "After=network-online.target" in w and "Wants=network-online.target" in w
    for unit in (reader, worker, dashboard):       # supervised: tests/test_crash_only.py
        lines = unit.read_text().splitlines()
        assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=60", "UMask=0077"} <= set(lines)
    checked = verify(reader, worker, dashboard)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr

    # the check can fail: a unit whose program is missing does not verify
    broken = tmp_path / "units" / "broken.service"
    broken.write_text(text.replace(sys.executable, "/nonexistent/python"))
    assert verify(broken).returncode != 0

    assert run_cli("service", "uninstall", "--unit-dir", str(unit_dir), "--no-start").returncode == 0
    assert not reader.exists() and not worker.exists() and not dashboard.exists()


def test_dry_run_prints_the_units_and_changes_nothing(run_cli, tmp_path):
    result = run_cli("service", "install", "--dry-run", "--unit-dir", str(tmp_path / "u"))
    assert result.returncode == 0
    assert "# mash-reader.service" in result.stdout and "# mash-worker.service" in result.stdout
    assert not (tmp_path / "u").exists()


def test_a_user_outside_dialout_is_told_the_fix():
    ok, why = service.serial_access("nobody")
    assert not ok and "sudo usermod -aG dialout nobody" in why
    assert service.serial_access("root")[0]
    assert not service.serial_access("no-such-user-here")[0]


def test_units_made_from_another_directory_point_at_the_gateways_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # not the checkout
    monkeypatch.delenv("MASH_ENV_FILE", raising=False)
    user = pwd.getpwuid(os.getuid()).pw_name
    text = service.units(user)["mash-reader.service"]
    assert f"WorkingDirectory={home()}\n" in text and f"Environment=MASH_HOME={home()}\n" in text
    assert f"Environment=MASH_ENV_FILE={home() / 'config' / '.env'}\n" in text
    assert str(tmp_path) not in text


def test_units_of_a_home_laid_out_as_releases_start_the_current_release(tmp_path):
    """The units run ``<home>/current/bin/python``: an update switches the link, and a
    restart runs the new release."""
    from mash import releases
    from mash.config import Settings
    home_dir = tmp_path / "farm"
    release = home_dir / "releases" / "0.1.0"
    (release / "bin").mkdir(parents=True)
    (release / "bin" / "python").symlink_to(sys.executable)
    releases.switch(home_dir, release)
    user = pwd.getpwuid(os.getuid()).pw_name
    made = service.units(user, workdir=home_dir,
                         settings=Settings.from_mapping({"MASH_DATA_DIR": str(home_dir / "data")}))
    python = home_dir.resolve() / "current" / "bin" / "python"
    for name, text in made.items():
        assert f"ExecStart={python} -m mash." in text and "Restart=always" in text
        assert "Environment=PYTHONSAFEPATH=1" in text
        (tmp_path / name).write_text(text)
    assert "KillMode=process" in made["mash-worker.service"]
    checked = verify(*(tmp_path / n for n in made))
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr


def test_backup_timer_units_verify_and_back_up_into_the_directory(run_cli, tmp_path):
    unit_dir, backups = tmp_path / "units", tmp_path / "usb" / "mash"
    backups.mkdir(parents=True)
    result = run_cli("service", "install", "--unit-dir", str(unit_dir), "--no-start",
                     "--backup-dir", str(backups), "--backup-keep", "5",
                     env={"MASH_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout + result.stderr
    svc, timer = unit_dir / "mash-backup.service", unit_dir / "mash-backup.timer"
    assert f"-m mash backup -o {backups} --keep 5" in svc.read_text()
    assert {"OnCalendar=daily", "Persistent=true"} <= set(timer.read_text().splitlines())
    checked = verify(svc, timer)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
    assert run_cli("service", "uninstall", "--unit-dir", str(unit_dir), "--no-start").returncode == 0
    assert not svc.exists() and not timer.exists()
