"""A fleet's MQTT links in one process: ``python bench/fleet.py FIRST COUNT``.

Starts COUNT of the gateway's own ``MQTTClient`` (the same TLS link, last will, retained
status and reconnect jitter as a worker; no serial side, no store), device ids
``fleet-FIRST`` ... , with the broker settings from the environment (``Broker.env()``).
Prints ``up <device> <unix time>`` at every connect and ``down <device> <unix time>`` at
every loss, flushed, for ``bench/run.py fleet`` to read; stops on SIGTERM or end of input.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mash.config import Settings  # noqa: E402
from mash.sinks.mqtt_client import MQTTClient  # noqa: E402

_out = threading.Lock()


def say(word: str, device: str) -> None:
    with _out:
        sys.stdout.write(f"{word} {device} {time.time():.3f}\n")
        sys.stdout.flush()


def main() -> int:
    first, count = int(sys.argv[1]), int(sys.argv[2])
    clients = []
    for n in range(first, first + count):
        device = f"fleet-{n:04d}"
        settings = Settings.from_mapping({**os.environ, "DEVICE_ID": device})
        client = MQTTClient(settings)
        client.on_state_change = (lambda up, d=device: say("up" if up else "down", d))
        client.connect(timeout=0)
        clients.append(client)
        time.sleep(0.002)                       # the fleet was not all booted in one ms
    sys.stdin.read()                            # until the parent closes our input
    for client in clients:
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
