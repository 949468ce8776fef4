"""The dashboard's picture in docs/: ``python bench/screenshot.py [docs/dashboard.png]``.

Runs the real gateway (``mash run``: the simulated board with its chamber, reader, worker,
dashboard) against the reference backend for a few minutes in a scratch directory, sets a
dashboard password, logs in with Debian's Chromium and saves a full-page screenshot. Nothing
shown is made up: the readings, relays and alerts are what the gateway did meanwhile.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402

from tests.services import DevServer, browser, free_port, stop_process, wait_for, wait_port  # noqa: E402

PASSWORD = "screenshot-only"


def main(out: str = "docs/dashboard.png", minutes: float = 3.0) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="mash-shot-"))
    server = DevServer(scratch / "devserver").start()
    port = free_port()
    env = dict(os.environ, MASH_ENV_FILE=os.devnull, MASH_DATA_DIR=str(scratch / "data"),
               DASHBOARD_PORT=str(port), SYNC_INTERVAL="20", **server.env())
    subprocess.run([sys.executable, "-m", "mash", "dashboard", "set-password"], env=env,
                   input=f"{PASSWORD}\n{PASSWORD}\n", text=True, check=True, cwd=scratch)
    run = subprocess.Popen([sys.executable, "-m", "mash", "run", "--interval", "2"], env=env,
                           cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = None
    try:
        wait_port(port, timeout=30)
        time.sleep(minutes * 60)
        driver = browser(scratch / "profile")
        driver.set_window_size(1280, 2400)
        driver.get(f"http://127.0.0.1:{port}/login")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.XPATH, "//button[normalize-space()='Log in']").click()
        wait_for(lambda: driver.find_element(By.ID, "pending").text not in ("–", ""), timeout=20)
        time.sleep(2)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, height + 40)
        time.sleep(1)
        driver.save_screenshot(str(ROOT / out))
        print(f"saved {out}")
    finally:
        if driver is not None:
            driver.quit()
        stop_process(run, timeout=20)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
