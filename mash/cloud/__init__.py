"""The guide's names (CONTRACT §6): ``mash.cloud.backend_api``, ``mqtt_client``,
``firebase`` and ``sync``, the public face of the gateway's Python API. A facade at the top
of the house: the clients themselves are ``mash.sinks.*``, and the sync manager is
``mash.tasks.manager``."""
