"""The README's first command, exactly as written, on a fresh copy of the checkout with
Debian's own ``/usr/bin/python3`` first on PATH (externally managed, PEP 668, as on Raspberry
Pi OS Bookworm): it installs into a virtual environment and runs the gateway, which stores
readings from the simulated board."""
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

import requests

from tests.services import ROOT, free_port, wait_port

SYSTEM_PYTHON = Path("/usr/bin/python3")


def readme_command(index: int) -> str:
    """The ``index``-th command of the README's Set-up section."""
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, re.S)[index].strip()


def system_python_ok() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    out = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked files, as a clone would have them (with this tree's edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def readings(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM sensor_data").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_readme_command_is_one_line_with_a_virtual_environment():
    command = readme_command(0)
    assert "\n" not in command and "scripts/install.sh" in command and "mash run" in command
    assert '"$PYTHON" -m venv' in (ROOT / "scripts" / "install.sh").read_text()
    assert "--break-system-packages" not in command and "sudo" not in command
    assert "bash scripts/test.sh" == readme_command(1)


@pytest.mark.skipif(not system_python_ok(),
                    reason="no Debian /usr/bin/python3 3.11+ with venv on this machine")
def test_readme_install_runs_with_debians_system_python(tmp_path):
    managed = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "six"],
                             capture_output=True, text=True)
    clone = fresh_copy(tmp_path / "mash-gateway")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MASH_DATA_DIR", "CLOCK_SYNC",
                        "MASH_QUEUE_DIR")}
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    env["MASH_QUEUE_DIR"] = str(tmp_path / "queue")        # not the machine's shared RAM dir
    env["DASHBOARD_PORT"] = str(port := free_port())        # 8080 may be taken on this machine
    log = open(tmp_path / "install.log", "wb")
    proc = subprocess.Popen(["bash", "-c", readme_command(0)], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    db = clone / "data" / "mash.db"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None and readings(db) < 2:
            time.sleep(1)
        assert readings(db) >= 2, (tmp_path / "install.log").read_text()[-3000:]
        # and the dashboard it started shows them
        wait_port(port, timeout=30)
        state = requests.get(f"http://127.0.0.1:{port}/api/state", timeout=10).json()
        assert state["rooms"]["fruiting"]["humidity"] > 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert proc.returncode in (0, 130, -signal.SIGINT), (tmp_path / "install.log").read_text()[-3000:]
    assert (clone / ".venv" / "bin" / "mash").exists()
    # laid out as releases: current -> releases/<version>, what the units and updates use
    version = subprocess.run([str(clone / "current" / "bin" / "mash"), "version"], env=env,
                             capture_output=True, text=True).stdout.split()[0]
    assert (clone / "current").resolve() == (clone / "releases" / version).resolve()
    if "externally-managed-environment" in managed.stderr:
        # the same interpreter refuses a plain pip install: the venv is what made it work
        assert "externally-managed-environment" not in (tmp_path / "install.log").read_text()
