"""Pairing a phone: the QR decodes (zbar's ``zbarimg``, a real decoder) to MASH-IoT's pairing
JSON; the dashboard serves it as SVG (rendered by Debian's Chromium, then decoded) and a QR of
its own address that carries the ``.local`` name while it is advertised; ``mash pair`` prints
the same. The served parts run inside a network namespace of this test, so the gateway has a
LAN address and advertises on it without touching this machine's network."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mash.dashboard import lan, pairing
from mash.models import Store
from tests.services import CHROMIUM, ROOT, lan_pair_or_skip, stop_process, wait_for

pytestmark = pytest.mark.skipif(shutil.which("zbarimg") is None,
                                reason="zbar's zbarimg is not installed (scripts/test.sh installs "
                                       "zbar-tools)")
PASSWORD = "pairing-at-dawn"


def decode(png) -> str:
    done = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def render(svg_text: str, directory) -> object:
    """The SVG as a browser draws it: Chromium's screenshot of the file."""
    svg, png = directory / "qr.svg", directory / "qr.png"
    svg.write_text(svg_text)
    done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--disable-background-networking",
                           f"--user-data-dir={directory / 'profile'}", f"--screenshot={png}",
                           "--window-size=420,420", svg.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert png.exists(), done.stderr[-2000:]
    return png


def test_pairing_qr_decodes_to_the_apps_json(make_settings, tmp_path):
    settings = make_settings(DEVICE_ID="MASH-B2-CAL26-CE637C", DEVICE_NAME="Shed 2")
    text = pairing.app_payload(settings, "192.168.4.20")
    png = tmp_path / "pair.png"
    pairing.qr(text).save(str(png), scale=6, border=4)
    decoded = decode(png)
    assert decoded == text
    assert list(json.loads(decoded).items()) == [
        ("type", "mash_device"), ("deviceId", "MASH-B2-CAL26-CE637C"), ("deviceName", "Shed 2"),
        ("ipAddress", "192.168.4.20"), ("port", 5000)]
    # the terminal's QR is the same symbol: its rows of half blocks encode the same matrix
    assert len(pairing.terminal(text).splitlines()) == (pairing.qr(text).symbol_size(border=2)[1] + 1) // 2


FETCH = """
import re, sys, requests
base, password, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
s = requests.Session()
page = s.get(base + "/login", timeout=10).text
token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
assert s.post(base + "/login", data={"password": password, "csrf_token": token},
              allow_redirects=False, timeout=10).status_code == 302
for p in paths:
    r = s.get(base + p, timeout=10)
    sys.stdout.write(f"==== {p} {r.status_code}\\n{r.text}\\n")
"""


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_pairing_dashboard_serves_both_qrs_and_mash_pair_prints_them(tmp_path):
    lan = lan_pair_or_skip()
    data = tmp_path / "data"
    env = {**os.environ, "MASH_DATA_DIR": str(data), "MDNS": "1", "PHONE_API": "read",
           "PHONE_API_HOST": "0.0.0.0", "PHONE_API_PORT": "5000", "DASHBOARD_HOST": "0.0.0.0",
           "DASHBOARD_PORT": "8080", "PYTHONPATH": str(ROOT)}
    host = "mash-rpi-gateway-001.local"
    log = open(tmp_path / "dashboard.log", "ab")
    gateway = None
    try:
        pw = subprocess.run([sys.executable, "-m", "mash", "dashboard", "set-password"],
                            input=f"{PASSWORD}\n{PASSWORD}\n", env=env, capture_output=True,
                            text=True, timeout=60)
        assert pw.returncode == 0, pw.stderr
        gateway = lan.popen(lan.gw, ["-m", "mash.dashboard"], env, stdout=log, stderr=log)
        reads = Store(data / "mash.db", readonly=True)
        wait_for(lambda: (reads.meta_get("mdns.advertised") or {}).get("addresses"),
                 timeout=20, what="the advertiser up")
        got = lan.run(lan.gw, ["-c", FETCH, "http://127.0.0.1:8080", PASSWORD, "/pair",
                               "/qr/app.svg", "/qr/dashboard.svg"], env=env)
        assert got.returncode == 0, got.stderr
        parts = dict(p.split("\n", 1) for p in got.stdout.split("==== ")[1:])
        page = parts["/pair 200"]
        assert f"http://{host}:5000/api" in page and f"http://{lan.GW}:5000/api" in page
        assert "<script" not in page
        app_qr = decode(render(parts["/qr/app.svg 200"], tmp_path))
        assert json.loads(app_qr) == {"type": "mash_device", "deviceId": "rpi_gateway_001",
                                      "deviceName": "MASH IoT Gateway", "ipAddress": lan.GW,
                                      "port": 5000}
        (tmp_path / "second").mkdir()
        # the dashboard's own QR: the .local name, since our advertiser answers for it
        assert decode(render(parts["/qr/dashboard.svg 200"], tmp_path / "second")) == \
            f"http://{host}:8080/"

        out = lan.run(lan.gw, ["-m", "mash", "pair"], env=env)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert app_qr in text and "█" in text
        assert f"app API (read) by name: http://{host}:5000/api" in text
        assert f"app API (read) by address: http://{lan.GW}:5000/api" in text
        assert f"dashboard by name: http://{host}:8080/" in text
        assert "mDNS: advertising rpi_gateway_001._mash-iot._tcp.local." in text
    finally:
        stop_process(gateway)
        lan.stop()
        log.close()
    assert "Traceback" not in (tmp_path / "dashboard.log").read_text()
    # stopped: nothing is advertised any more, and `mash pair` says so (by address only)
    out = subprocess.run([sys.executable, "-m", "mash", "pair"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert "not advertised now" in out.stdout and ".local" not in out.stdout.split("mDNS")[1]


def test_pairing_names_and_links_follow_the_rule(make_settings):
    """The host name: ``mash-<sid>``, or the contract's ``<sid>`` for a MASH serial; a link
    carries the .local name only while it is advertised, and none for a loopback server."""
    assert lan.host_name("MASH-B2-CAL26-CE637C") == "mash-b2-cal26-ce637c.local"
    assert lan.host_name("rpi_gateway_001") == "mash-rpi-gateway-001.local"
    assert lan.sid("Shed#2.North") == "shed-2-north"
    s = make_settings(PHONE_API="read", DASHBOARD_HOST="127.0.0.1")
    named = pairing.links(s, True, ["192.168.4.20"])
    assert named["app"]["url"] == "http://mash-rpi-gateway-001.local:5000/api"
    assert named["app"]["by_address"] == "http://192.168.4.20:5000/api"
    assert named["dashboard"]["url"] is None and "127.0.0.1 only" in named["dashboard"]["note"]
    plain = pairing.links(s, False, ["192.168.4.20"])
    assert plain["app"]["url"] == "http://192.168.4.20:5000/api" and plain["app"]["by_name"] is None
    assert pairing.links(s, False, [])["app"]["note"] == "no private IPv4 address on any interface yet"
    assert pairing.links(make_settings(PHONE_API="off"), True, ["10.0.0.2"])["app"]["url"] is None
