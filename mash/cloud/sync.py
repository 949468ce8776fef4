"""The guide's ``mash.cloud.sync``: the sync manager, which lives with the tasks it drives
(``mash.tasks.manager``)."""
from mash.tasks.manager import SyncManager, create_sync_manager

__all__ = ["SyncManager", "create_sync_manager"]
