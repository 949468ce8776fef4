"""The guide's ``mash.cloud.backend_api``: the client itself is ``mash.sinks.backend_api``."""
from mash.sinks.backend_api import *  # noqa: F401,F403
