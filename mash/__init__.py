"""MASH gateway: Arduino serial -> SQLite -> MASH cloud (backend API, MQTT, Firebase)."""
__version__ = "0.1.0"
