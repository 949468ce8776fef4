"""A phone on the farm's network, for the tests that run it inside a network namespace
(``tests.services.LanPair``):

    python tests/lan_peer.py browse            # JSON lines: each service seen, changed, gone
    python tests/lan_peer.py resolve TYPE NAME # one fresh resolution, as a new search does
    python tests/lan_peer.py post SRC URL JSON # one POST from source address SRC: status, body

``browse`` uses python-zeroconf's ServiceBrowser the way the grower app resolves a service
(PTR -> SRV -> TXT -> A, CONTRACT §10) and prints what it resolved on every change.
"""
import http.client
import json
import sys
import time
from urllib.parse import urlsplit

from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

TYPES = ["_mash-iot._tcp.local.", "_http._tcp.local."]


def emit(**kw):
    print(json.dumps(kw), flush=True)


def browse() -> None:
    zc = Zeroconf(ip_version=IPVersion.V4Only)

    def changed(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            emit(event="removed", type=service_type, name=name)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None:
            emit(event="unresolved", type=service_type, name=name)
            return
        emit(event=state_change.name.lower(), type=service_type, name=name, server=info.server,
             port=info.port, addresses=info.parsed_addresses(),
             properties={k.decode(): (v.decode() if v is not None else None)
                         for k, v in info.properties.items()})

    ServiceBrowser(zc, TYPES, handlers=[changed])
    emit(event="browsing")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        zc.close()


def resolve(service_type: str, name: str) -> None:
    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        info = zc.get_service_info(service_type, name, timeout=5000)
        emit(addresses=info.parsed_addresses() if info else None)
    finally:
        zc.close()


def post(source: str, url: str, body: str) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10,
                                      source_address=(source, 0))
    conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    emit(status=resp.status, body=json.loads(resp.read() or b"null"))


if __name__ == "__main__":
    if sys.argv[1] == "browse":
        browse()
    elif sys.argv[1] == "resolve":
        resolve(*sys.argv[2:4])
    else:
        post(*sys.argv[2:5])
