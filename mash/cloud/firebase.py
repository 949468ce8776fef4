"""The guide's ``mash.cloud.firebase``: the client itself is ``mash.sinks.firebase``."""
from mash.sinks.firebase import *  # noqa: F401,F403
