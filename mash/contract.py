"""The names and limits the wire contract fixes (docs/CONTRACT.md), defined once.

Every module that speaks to the board, the backend or the broker takes its constants from
here, so a room, an actuator or a size limit has exactly one definition.
"""
from __future__ import annotations

# §1 Serial
ROOMS = ("fruiting", "spawning")
ACTUATORS = ("MIST_MAKER", "HUMIDIFIER_FAN", "FRUITING_EXHAUST_FAN", "FRUITING_INTAKE_FAN",
             "SPAWNING_EXHAUST_FAN", "DEVICE_EXHAUST_FAN", "FRUITING_LED")
STATES = ("ON", "OFF")
# (room, the MASH apps' name) -> the firmware's actuator (CONTRACT §8; the deployed backend's
# START/STOP name an actuator either way, §9)
APPS_ACTUATORS = {
    ("fruiting", "mist_maker"): "MIST_MAKER", ("fruiting", "humidifier_fan"): "HUMIDIFIER_FAN",
    ("fruiting", "exhaust_fan"): "FRUITING_EXHAUST_FAN",
    ("fruiting", "intake_fan"): "FRUITING_INTAKE_FAN", ("fruiting", "led"): "FRUITING_LED",
    ("spawning", "exhaust_fan"): "SPAWNING_EXHAUST_FAN", ("device", "exhaust_fan"): "DEVICE_EXHAUST_FAN",
}
# The firmware's valid ranges; anything outside is a bad reading, never stored as good data.
RANGES = {"temp": (-10.0, 60.0), "humidity": (0.0, 100.0), "co2": (400.0, 5000.0)}
MAX_LINE = 512            # a reading is ~120 bytes; anything past this is noise
MAX_BOARD_COMMAND = 128   # the firmware's command buffer
KEEPALIVE = b'{"keepalive":true}\n'

# §2 Backend
SEVERITIES = ("INFO", "WARNING", "CRITICAL")
DEVICE_STATUSES = ("ONLINE", "OFFLINE", "MAINTENANCE", "ERROR")
# Readings per POST /sensors/data the backend accepts (413 above: the reference backend's
# limit, mash/devserver); BATCH_SIZE and the drain's larger batches stay within it.
MAX_READINGS_PER_REQUEST = 1000

# §9 The deployed MASH backend: each (room, metric) is one of the device's sensors, found by
# its type and the room in its name ("fruiting temperature"); the unit it is created with.
MASH_METRICS = {"temperature": "°C", "humidity": "%", "co2": "ppm"}
MASH_COMMANDS = ("START", "STOP", "RESTART", "RESET", "CONFIGURE", "CALIBRATE",
                 "UPDATE_FIRMWARE", "REQUEST_STATUS")
# a sensor batch: the backend refuses bodies over 100 kB (413); a value and a timestamp are
# ~55 bytes of JSON, so this stays near half of it
MASH_BATCH = 1000

# §3 Commands (both channels)
COMMANDS = ("set_actuator", "REQUEST_STATUS", "force_sync", "CONFIGURE", "update", "RESTART")
# ``update``'s parameters: the release manifest's fields (the wheel's URL and its sha256)
UPDATE_PARAMETERS = ("version", "url", "sha256")
MAX_COMMAND_BYTES = 4096          # larger: acknowledged failed ("oversize")
MAX_COMMAND_ID = 100              # a usable id is a string of at most this many characters
MAX_PARSE_BYTES = 256 * 1024      # larger payloads are not parsed whole (their id is still read)

# §7 Local control
CONTROL_MODES = ("auto", "manual", "off")     # CONTROL_MODE
ROOM_MODES = ("auto", "manual")               # CONFIGURE {"mode": {room: ...}}
