"""The replica of the deployed MASH backend (CONTRACT §9, ``mash devserver --profile mash``) over
real HTTP: it must refuse, limit and misbehave as the real one does, or a gateway proven
against it proves nothing."""
import jwt
import requests

from tests.services import DevServer

SERIAL = "MASH-A1-CAL25-D5A91F"
KEY = {"X-API-Key": "any-value"}


def bearer(server: DevServer) -> dict:
    return {"Authorization": f"Bearer {server.login()['accessToken']}", **KEY}


def register(server: DevServer, serial: str = SERIAL, **extra) -> requests.Response:
    return requests.post(f"{server.url}/iot/devices", json={
        "name": "Chamber", "type": "MUSHROOM_CHAMBER", "serialNumber": serial, **extra}, timeout=10)


def online_device(server: DevServer, serial: str = SERIAL) -> dict:
    """An operator-created device the gateway has registered (so ONLINE)."""
    server.create_device(serial, "Chamber")
    r = register(server, serial)
    assert r.status_code == 201, r.text
    return r.json()["data"]["data"]


def assert_json_error(r: requests.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["success"] is False and body["statusCode"] == status
    assert body["error"] == {"type": kind, "code": "INTERNAL_SERVER_ERROR",
                             "message": "An unexpected error occurred"}


def assert_html(r: requests.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")


def test_envelope_wraps_login_and_puts_the_iot_device_one_level_deeper(mash_backend):
    r = requests.post(f"{mash_backend.url}/auth/login",
                      json={"email": DevServer.EMAIL, "password": DevServer.PASSWORD}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["success"] is True and body["statusCode"] == 200
    assert body["path"] == "/api/v1/auth/login" and body["correlationId"] and body["timestamp"]
    assert set(body["data"]) >= {"accessToken", "refreshToken", "user"}
    assert body["data"]["user"]["email"] == DevServer.EMAIL
    assert body["data"]["user"]["role"] == "GROWER"
    claims = jwt.decode(body["data"]["accessToken"], options={"verify_signature": False})
    assert set(claims) >= {"sub", "email", "role", "iat", "exp"}
    assert claims["exp"] - claims["iat"] == 86400            # the mash profile's 1 day
    created = mash_backend.create_device(SERIAL, "Chamber")
    assert created["id"].startswith("c") and len(created["id"]) == 25
    r = register(mash_backend, firmware="1.2.0", ipAddress="192.168.1.50")
    inner = r.json()["data"]
    assert r.status_code == 201 and inner["success"] is True and inner["message"]
    assert inner["data"]["id"] == created["id"] and inner["data"]["serialNumber"] == SERIAL
    assert inner["data"]["status"] == "ONLINE" and inner["data"]["firmware"] == "1.2.0"


def test_errors_are_json_naming_the_exception_with_the_message_hidden(mash_backend):
    assert_json_error(requests.get(f"{mash_backend.url}/no/such/route", timeout=10),
                      404, "NotFoundException")
    r = requests.get(f"{mash_backend.url}/devices/cxxx/sensors",
                     headers={"Authorization": "Bearer not-a-token"}, timeout=10)
    assert_json_error(r, 401, "UnauthorizedException")
    r = requests.post(f"{mash_backend.url}/auth/login",
                      json={"email": DevServer.EMAIL, "password": "wrong"}, timeout=10)
    assert_json_error(r, 401, "UnauthorizedException")


def test_csrf_refuses_with_html_unless_an_api_key_of_any_value_is_sent(mash_backend):
    url = f"{mash_backend.url}/sensors/nope/data/batch"
    assert_html(requests.post(url, json={"data": []}, timeout=10), 403)
    assert_html(requests.post(url, json={"data": []}, headers={"X-API-Key": ""}, timeout=10), 403)
    # the key is not checked: the request goes on to the JWT guard
    r = requests.post(url, json={"data": []}, headers={"X-API-Key": "anything"}, timeout=10)
    assert_json_error(r, 401, "UnauthorizedException")
    # login and /iot/devices... are exempt
    assert register(mash_backend, "MASH-OTHER-FARM-0001").status_code == 201


def test_a_csrf_token_from_a_get_also_passes(mash_backend):
    s = requests.Session()
    token = s.get(f"{mash_backend.url}/iot/devices/serial/x", timeout=10).headers["X-CSRF-Token"]
    r = s.post(f"{mash_backend.url}/auth/refresh", json={"refreshToken": "x"},
               headers={"X-CSRF-Token": token}, timeout=10)
    assert_json_error(r, 401, "UnauthorizedException")


def test_refresh_is_not_exempt_from_csrf(mash_backend):
    refresh = mash_backend.login()["refreshToken"]
    url = f"{mash_backend.url}/auth/refresh"
    assert_html(requests.post(url, json={"refreshToken": refresh}, timeout=10), 403)
    r = requests.post(url, json={"refreshToken": refresh}, headers=KEY, timeout=10)
    assert r.status_code == 200, r.text
    assert set(r.json()["data"]) == {"accessToken", "refreshToken", "expiresIn"}


def test_guest_limit_is_20_per_full_url_with_retry_after(mash_backend):
    url = f"{mash_backend.url}/iot/devices/serial/{SERIAL}"
    assert [requests.get(url, timeout=10).status_code for _ in range(20)] == [200] * 20
    r = requests.get(url, timeout=10)
    assert_json_error(r, 429, "ThrottlerException")
    assert r.headers["Retry-After"] == "60"
    # another query string is another URL, another budget
    assert requests.get(url + "?again=1", timeout=10).status_code == 200
    assert requests.get(f"{mash_backend.url}/iot/devices/serial/OTHER", timeout=10).status_code == 200
    # a bearer token does not help: every caller is a guest
    token = bearer(mash_backend)
    assert requests.get(url, headers=token, timeout=10).status_code == 429
    # the tests' calls as the apps count as another client (the apps are elsewhere)
    assert requests.get(url, headers={"X-Replica-Client": "app"}, timeout=10).status_code == 200
    state = mash_backend.state()
    assert state["throttled"] == 2
    assert [h["status"] for h in state["history"]
            if h["url"] == f"/api/v1/iot/devices/serial/{SERIAL}"] == [200] * 20 + [429, 429, 200]
    assert state["per_path"][f"GET /api/v1/iot/devices/serial/{SERIAL}"] == 24


def test_a_body_over_100_kb_is_refused_with_an_html_413(mash_backend):
    online_device(mash_backend)
    r = register(mash_backend, location="x" * 150, name="n" * 100 + "x" * 102400)
    assert_html(r, 413)
    r = requests.post(f"{mash_backend.url}/sensors/s/data/batch", headers=bearer(mash_backend),
                      json={"data": [{"value": 1.0, "timestamp": "2026-01-01T00:00:00Z"}] * 3000},
                      timeout=10)
    assert_html(r, 413)


def test_unknown_body_properties_are_refused_with_400(mash_backend):
    assert_json_error(register(mash_backend, gatewayVersion="1.0"), 400, "BadRequestException")
    r = requests.post(f"{mash_backend.url}/auth/login", json={
        "email": DevServer.EMAIL, "password": DevServer.PASSWORD, "device": "x"}, timeout=10)
    assert_json_error(r, 400, "BadRequestException")
    device = online_device(mash_backend)
    r = requests.post(f"{mash_backend.url}/devices/{device['id']}/command", headers=bearer(mash_backend),
                      json={"command": "START", "parameters": {}, "id": "x"}, timeout=10)
    assert_json_error(r, 400, "BadRequestException")


def test_an_unknown_serial_is_refused_and_looked_up_as_another_farms_device(mash_backend):
    r = register(mash_backend, "MASH-UNKNOWN-0042")
    assert_json_error(r, 400, "BadRequestException")
    r = requests.get(f"{mash_backend.url}/iot/devices/serial/MASH-UNKNOWN-0042", timeout=10)
    assert r.status_code == 200
    assert r.json()["data"]["data"]["serialNumber"] == "MASH-OTHER-FARM-0001"
    assert [d["serialNumber"] for d in mash_backend.state()["devices"]] == ["MASH-OTHER-FARM-0001"]
    # once the operator creates it, the same call registers it
    created = mash_backend.create_device("MASH-UNKNOWN-0042")
    r = register(mash_backend, "MASH-UNKNOWN-0042")
    assert r.status_code == 201 and r.json()["data"]["data"]["id"] == created["id"]


def test_an_unknown_serial_is_created_when_no_other_device_is_active(devserver_factory):
    server = devserver_factory(profile="mash", populated=False)
    assert server.state()["rate_limit"] == 20                 # the profile's default
    assert_json_error(requests.get(f"{server.url}/iot/devices/serial/{SERIAL}", timeout=10),
                      404, "NotFoundException")
    r = register(server)
    assert r.status_code == 201
    device = r.json()["data"]["data"]
    assert device["serialNumber"] == SERIAL and device["userId"] is None
    # nobody owns it, so the farm's account may not read it
    r = requests.get(f"{server.url}/devices/{device['id']}/sensors", headers=bearer(server), timeout=10)
    assert_json_error(r, 403, "ForbiddenException")


def test_patch_takes_device_columns_only_and_sets_last_seen_itself(mash_backend):
    device = online_device(mash_backend)
    url = f"{mash_backend.url}/iot/devices/serial/{SERIAL}"
    r = requests.patch(url, json={"status": "MAINTENANCE", "ipAddress": "10.0.0.2",
                                  "macAddress": "00:11:22:33:44:55", "firmware": "2.0",
                                  "name": "Chamber B", "location": "Room 2",
                                  "lastSeen": "2000-01-01T00:00:00Z"}, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()["data"]["data"]
    assert (got["status"], got["ipAddress"], got["name"], got["location"]) == \
        ("MAINTENANCE", "10.0.0.2", "Chamber B", "Room 2")
    assert got["id"] == device["id"] and got["lastSeen"] > "2020"
    for bad in ({"metadata": {"gateway": "1.0"}}, {"status": "SLEEPING"}, {"name": 5}):
        assert_json_error(requests.patch(url, json=bad, timeout=10), 400, "BadRequestException")
    for status in ("ONLINE", "OFFLINE", "ERROR"):
        assert requests.patch(url, json={"status": status}, timeout=10).status_code == 200
    # an unknown serial: no fall-back here, and the controller makes the 404 a 400
    r = requests.patch(f"{mash_backend.url}/iot/devices/serial/NOPE", json={"status": "ONLINE"},
                       timeout=10)
    assert_json_error(r, 400, "BadRequestException")


def test_sensors_are_listed_created_and_refused_to_an_account_that_may_not(mash_backend):
    device = online_device(mash_backend)
    url = f"{mash_backend.url}/devices/{device['id']}/sensors"
    sensor = mash_backend.create_sensor(device["id"], "temperature", "fruiting temperature", "°C")
    assert sensor["deviceId"] == device["id"] and sensor["type"] == "temperature"
    r = requests.get(url, headers=bearer(mash_backend), timeout=10)
    assert r.status_code == 200
    assert [(s["id"], s["type"], s["name"], s["unit"]) for s in r.json()["data"]["sensors"]] == \
        [(sensor["id"], "temperature", "fruiting temperature", "°C")]
    mash_backend.set_role("USER")
    r = requests.post(url, json={"type": "co2", "name": "fruiting co2", "unit": "ppm"},
                      headers=bearer(mash_backend), timeout=10)
    assert_json_error(r, 403, "ForbiddenException")
    mash_backend.set_role("GROWER")
    # another farm's device is not the account's
    other = mash_backend.state("MASH-OTHER-FARM-0001")["devices"][0]["id"]
    r = requests.get(f"{mash_backend.url}/devices/{other}/sensors", headers=bearer(mash_backend),
                     timeout=10)
    assert_json_error(r, 403, "ForbiddenException")


def test_a_batch_sent_twice_is_stored_twice(mash_backend):
    device = online_device(mash_backend)
    sensor = mash_backend.create_sensor(device["id"], "humidity", "fruiting humidity", "%")
    url = f"{mash_backend.url}/sensors/{sensor['id']}/data/batch"
    batch = {"data": [{"value": 88.5, "timestamp": "2026-01-01T00:00:00.000Z"},
                      {"value": 89, "timestamp": "2026-01-01T00:00:05.000Z"}]}
    h = {**bearer(mash_backend), "Idempotency-Key": "same-key"}
    for _ in range(2):
        r = requests.post(url, json=batch, headers=h, timeout=10)
        assert r.status_code == 201 and r.json()["data"] == {"success": True, "count": 2}
    state = mash_backend.state(SERIAL)
    assert state["sensors"][0]["readings"] == 4
    assert state["readings"][sensor["id"]] == [[88.5, "2026-01-01T00:00:00.000Z"],
                                               [89.0, "2026-01-01T00:00:05.000Z"]] * 2
    r = requests.post(f"{mash_backend.url}/sensors/cnope/data/batch", json=batch, headers=h,
                      timeout=10)
    assert_json_error(r, 404, "NotFoundException")
    # items are not validated by the DTO: a bad one fails in the database, the whole batch
    r = requests.post(url, json={"data": [{"value": 1.0}, {"value": "wet"}]}, headers=h, timeout=10)
    assert_json_error(r, 500, "PrismaClientValidationError")
    r = requests.post(url, json={"data": "not a list"}, headers=h, timeout=10)
    assert_json_error(r, 400, "BadRequestException")
    assert mash_backend.state(SERIAL)["sensors"][0]["readings"] == 4


def test_commands_are_listed_newest_first_and_at_most_50(mash_backend):
    mash_backend.faults(rate_limit=0)          # 55 commands through one URL
    device = online_device(mash_backend)
    issued = [mash_backend.issue(device["id"], "START", {"actuator": "MIST_MAKER", "n": i})
              for i in range(55)]
    assert {c["status"] for c in issued} == {"pending"}
    r = requests.get(f"{mash_backend.url}/devices/{device['id']}/commands",
                     headers=bearer(mash_backend), timeout=10)
    commands = r.json()["data"]["commands"]
    assert len(commands) == 50
    assert [c["id"] for c in commands] == [c["commandId"] for c in reversed(issued)][:50]
    assert set(commands[0]) == {"id", "deviceId", "command", "parameters", "status", "response",
                                "sentAt", "acknowledgedAt"}
    assert commands[0]["parameters"] == {"actuator": "MIST_MAKER", "n": 54}
    assert_json_error(requests.post(f"{mash_backend.url}/devices/{device['id']}/command",
                                    json={"command": "DANCE"}, headers=bearer(mash_backend),
                                    timeout=10), 400, "BadRequestException")
    # as deployed (no broker) the publish fails: the row is failed and the app gets a 400
    mash_backend.faults(broker="down")
    r = requests.post(f"{mash_backend.url}/devices/{device['id']}/command", json={"command": "STOP"},
                      headers=bearer(mash_backend), timeout=10)
    assert_json_error(r, 400, "BadRequestException")
    assert mash_backend.state(SERIAL)["commands"][-1]["status"] == "failed"


def test_an_offline_device_takes_no_command(mash_backend):
    device = mash_backend.create_device(SERIAL)          # OFFLINE until it registers
    r = requests.post(f"{mash_backend.url}/devices/{device['id']}/command", json={"command": "START"},
                      headers=bearer(mash_backend), timeout=10)
    assert_json_error(r, 400, "BadRequestException")


def test_there_is_no_acknowledgement_route(mash_backend):
    device = online_device(mash_backend)
    command = mash_backend.issue(device["id"], "REQUEST_STATUS")
    base = f"{mash_backend.url}/devices/{device['id']}/commands/{command['commandId']}"
    h = bearer(mash_backend)
    for method, url in (("put", base), ("patch", base), ("post", base + "/ack"),
                        ("post", base + "/acknowledge")):
        r = getattr(requests, method)(url, json={"status": "completed"}, headers=h, timeout=10)
        assert_json_error(r, 404, "NotFoundException")
    r = requests.get(f"{mash_backend.url}/devices/{device['id']}/configuration", headers=h, timeout=10)
    assert r.json()["data"]["configuration"]["readingInterval"] == 60


def test_a_lost_answer_is_stored_but_never_answered(mash_backend):
    device = online_device(mash_backend)
    sensor = mash_backend.create_sensor(device["id"], "co2", "fruiting co2", "ppm")
    mash_backend.faults(lose_answer_next=1, lose_path="/data/batch")
    url = f"{mash_backend.url}/sensors/{sensor['id']}/data/batch"
    h = bearer(mash_backend)
    try:
        requests.post(url, json={"data": [{"value": 812, "timestamp": "2026-01-01T00:00:00Z"}]},
                      headers=h, timeout=10)
        raise AssertionError("the answer arrived")
    except requests.ConnectionError:
        pass
    state = mash_backend.state(SERIAL)
    assert state["sensors"][0]["readings"] == 1 and state["lost"] == 1
    r = requests.post(url, json={"data": [{"value": 812, "timestamp": "2026-01-01T00:00:00Z"}]},
                      headers=h, timeout=10)
    assert r.status_code == 201                          # the resend is a duplicate
    assert mash_backend.state(SERIAL)["sensors"][0]["readings"] == 2


def test_fault_switches_fail_and_drop_then_recover(mash_backend):
    mash_backend.faults(fail_next=2, fail_status=503, fail_path="/iot/devices")
    url = f"{mash_backend.url}/iot/devices/serial/{SERIAL}"
    assert_json_error(requests.get(url, timeout=10), 503, "ServiceUnavailableException")
    assert_json_error(requests.get(url, timeout=10), 503, "ServiceUnavailableException")
    assert requests.get(url, timeout=10).status_code == 200
    mash_backend.faults(drop_for=30)
    try:
        requests.get(url, timeout=10)
        raise AssertionError("answered while dropping")
    except requests.ConnectionError:
        pass
    mash_backend.faults(drop_for=0)
    assert requests.get(url, timeout=10).status_code == 200
