"""The guide's ``mash.cloud.mqtt_client``: the client itself is ``mash.sinks.mqtt_client``."""
from mash.sinks.mqtt_client import *  # noqa: F401,F403
