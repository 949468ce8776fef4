"""The sink clients, one module per sink: the backend API (``backend_api``), the MQTT broker
(``mqtt_client``), Firebase (``firebase``), notification URLs (``notify``), and what each
failure of theirs means (``errors``). Plain data in and out: no ORM, no tasks. The guide's
names for them (``mash.cloud.*``) are the facade in ``mash/cloud``."""
