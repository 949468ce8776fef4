"""The Huey worker with the gateway's consumer settings: ``python worker.py``.

The same as ``mash worker``; ``huey_consumer mash.tasks.huey`` also works (see the README
for the flags ``python worker.py`` applies).
"""
import sys

from mash.worker import main

if __name__ == "__main__":
    sys.exit(main())
