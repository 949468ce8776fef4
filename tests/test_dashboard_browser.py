"""The dashboard in headless Chromium (Debian's, driven by selenium through Debian's
chromedriver) against the real stack: simulated board on a pty, reader.py, worker.py, the
devserver, mosquitto and the RTDB stand-in, with ``mash dashboard`` in front."""
import os
import time

import pytest
from selenium.webdriver.common.by import By

from mash.alerts import AlertEvent
from mash.models import Store
from tests.services import CHROMEDRIVER, CHROMIUM, Dashboard, browser, wait_for, whole_stack

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(scripts/test.sh installs them)")
PASSWORD = "mushrooms-at-dawn"
DEVICE = "rpi_gateway_001"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("dashboard")
    # no periodic sync: only "Sync now" drains the backlog in these tests
    with whole_stack(base, interval=0.5, SYNC_INTERVAL="3600") as gw:
        dash = Dashboard(base / "dash", gw.env)
        observer = gw.broker.observer()
        driver = None
        try:
            assert dash.mash("dashboard", "set-password",
                             input=f"{PASSWORD}\n{PASSWORD}\n").returncode == 0
            dash.start()
            driver = browser(base / "chromium-profile")
            gw.dash, gw.driver, gw.observer = dash, driver, observer
            gw.store = Store(gw.data / "mash.db")
            yield gw
        finally:
            if driver is not None:
                driver.quit()
            observer.close()
            dash.stop()


def text_of(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def until(predicate, what, timeout=20.0):
    return wait_for(predicate, timeout=timeout, interval=0.1, what=what)


def test_login_refuses_a_wrong_password_then_the_page_updates_live(stack):
    d = stack.driver
    d.get(stack.dash.url + "/")
    assert d.current_url.endswith("/login")
    d.find_element(By.CSS_SELECTOR, "label[for=password]")          # the field labelled Password
    d.find_element(By.ID, "password").send_keys("not-it")
    d.find_element(By.XPATH, "//button[normalize-space()='Log in']").click()
    assert "Wrong password." in text_of(d, ".error")
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    d.find_element(By.XPATH, "//button[normalize-space()='Log in']").click()
    until(lambda: d.current_url.rstrip("/") == stack.dash.url, "the dashboard after login")
    d.execute_script("window.__sameDocument = true")
    S = stack.store.m.SensorData

    def shown_matches_newest():
        row = S.select().where(S.room == "fruiting").order_by(S.id.desc()).first()
        return row and text_of(d, "[data-room=fruiting] [data-field=co2]") == str(row.co2) \
            and row.id
    first = until(shown_matches_newest, "the newest stored reading on the page")
    until(lambda: (shown_matches_newest() or 0) > first, "a later reading, without a reload")
    assert d.execute_script("return window.__sameDocument") is True
    assert "s ago" in text_of(d, "[data-room=fruiting] [data-field=age]")
    assert text_of(d, "[data-sink=backend]") == "online"


def test_charts_are_drawn(stack):
    d = stack.driver
    d.execute_script("for (const i of document.querySelectorAll('img[data-chart]')) "
                     "i.src = i.dataset.chart + '?days=1&t=' + Date.now()")
    until(lambda: d.execute_script(
        "return Array.from(document.querySelectorAll('img[data-chart]'))"
        ".every(i => i.complete && i.naturalWidth > 0)"), "every chart image loaded")
    assert len(d.find_elements(By.CSS_SELECTOR, "img[data-chart]")) == 6
    svg = d.execute_async_script(
        "fetch('/chart/fruiting/co2.svg?days=1').then(r => r.text()).then(arguments[0])")
    assert "<polyline" in svg and 'class="band"' in svg


def test_sync_now_drains_the_backlog_to_the_devserver(stack):
    d = stack.driver
    stack.board.paused = True                   # no readings for a while: the backlog stops growing
    time.sleep(1.0)
    until(lambda: stack.store.pending_count() > 0, "a backlog")
    until(lambda: text_of(d, "#pending") == str(stack.store.pending_count()), "pending shown")
    d.find_element(By.XPATH, "//button[normalize-space()='Sync now']").click()
    until(lambda: text_of(d, "#pending") == "0", "pending 0 on the page", timeout=30)
    stored = {stack.store.reading_id(i) for (i,) in stack.store.m.SensorData.select(
        stack.store.m.SensorData.id).tuples()}
    assert stored <= set(stack.devserver.state(DEVICE)["reading_ids"])
    stack.board.paused = False


def test_mist_maker_switch_reaches_the_board_and_both_sinks(stack):
    d = stack.driver
    switch = d.find_element(By.CSS_SELECTOR, "[data-switch=MIST_MAKER]")
    assert "MIST_MAKER" in switch.get_attribute("aria-label")
    assert switch.get_attribute("role") == "switch"
    switch.click()
    until(lambda: stack.board.actuators["MIST_MAKER"] == "ON", "the board's relay ON")
    until(lambda: "ON: completed" in text_of(d, "[data-actuator=MIST_MAKER] [data-field=command]"),
          "completed on the page")
    until(lambda: switch.get_attribute("aria-checked") == "true", "the switch shown on")
    cmd = stack.store.m.Command.select().where(stack.store.m.Command.source == "local") \
        .order_by(stack.store.m.Command.seq.desc()).first()
    until(lambda: any(a["id"] == cmd.command_id and a["status"] == "completed"
                      for a in stack.devserver.state()["foreign_acks"]), "the ack at the devserver")
    until(lambda: any(a.get("id") == cmd.command_id and a.get("status") == "completed"
                      for a in stack.observer.on("/command_ack")), "the ack over MQTT")
    assert "set by local" in text_of(d, "[data-actuator=MIST_MAKER] [data-field=who]")


def test_an_alert_appears_when_co2_goes_over_the_limit(stack):
    d = stack.driver
    stack.board.set_values("fruiting", co2=1700)
    until(lambda: "CRITICAL" in text_of(d, "#alerts-active"), "the CO2 alert on the page")
    assert "co2" in text_of(d, "#alerts-active").lower()
    stack.board.set_values("fruiting", co2=800)


def test_a_post_without_the_csrf_token_is_refused(stack):
    status = stack.driver.execute_async_script(
        "fetch('/api/actuator', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({actuator: 'FRUITING_LED', state: 'ON'})})"
        ".then(r => arguments[0](r.status))")
    assert status == 403


def test_a_script_in_an_alert_message_renders_as_text(stack, tmp_path):
    d = stack.driver
    evil = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
    stack.store.add_alerts([AlertEvent("test_alert", "WARNING", "spawning", 1.0, 0.0, "raised", evil)])
    until(lambda: evil in text_of(d, "#alerts-active"), "the message shown as text")
    assert d.execute_script("return window.__pwned") is None
    d.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
