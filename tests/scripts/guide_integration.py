"""The guide's "Integration with Main Application" example, with ``app.`` read as ``mash.``.

Run by tests/test_guide_example.py in a subprocess whose environment points every sink at the
test's real servers; it prints the final stats as JSON on its last line.
"""
import json
import logging
import sys
import time

from mash.cloud.backend_api import create_backend_client
from mash.cloud.mqtt_client import create_mqtt_client
from mash.cloud.firebase import create_firebase_sync
from mash.cloud.sync import create_sync_manager
from mash.models import DatabaseManager

logging.basicConfig(level=logging.INFO)
logger = logging.getLogger("main")

# Initialize components
db = DatabaseManager()
backend = create_backend_client()
firebase = create_firebase_sync()
mqtt = create_mqtt_client()

# Create sync manager
sync_manager = create_sync_manager(
    db_manager=db,
    backend_client=backend,
    firebase_sync=firebase,
    mqtt_client=mqtt
)

# Start sync
sync_manager.start()


# In sensor read loop:
def process_sensor_data(data):
    # Save to SQLite (primary)
    db.save_sensor_data(data)

    # Queue for real-time MQTT
    sync_manager.queue_sensor_data(data)

    # Check thresholds and send alerts
    if data["fruiting"]["co2"] > 1500:
        sync_manager.queue_alert(
            "high_co2",
            f"CO2 level critical: {data['fruiting']['co2']} ppm",
            "CRITICAL"
        )


executed = []


def execute_command(cmd):
    executed.append(cmd["id"])
    return cmd["parameters"]["actuator"] == "MIST_MAKER"


# In command processing:
def process_commands():
    cmd = sync_manager.get_pending_command(timeout=1.0)
    if cmd:
        logger.info(f"Executing command: {cmd}")
        success = execute_command(cmd)
        sync_manager.acknowledge_command(cmd['id'], success)


# On shutdown:
def cleanup():
    sync_manager.stop()
    backend.close()
    mqtt.disconnect()


for i in range(20):
    process_sensor_data({"fruiting": {"temp": 24.5, "humidity": 85, "co2": 800 + 50 * i},
                         "spawning": {"temp": 28.0, "humidity": 70, "co2": 900}})
expected = int(sys.argv[1]) if len(sys.argv) > 1 else 1
deadline = time.monotonic() + 30
while len(executed) < expected and time.monotonic() < deadline:
    process_commands()
sync_manager.force_sync()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    stats = sync_manager.get_stats()
    if stats["pending_records"] == 0 and stats["alerts_pending"] == 0 and stats["commands_unacked"] == 0:
        break
    time.sleep(0.2)
stats = sync_manager.get_stats()
cleanup()
print(json.dumps({"executed": executed, **stats}))
