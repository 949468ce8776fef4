"""``python -m mash ...`` is the ``mash`` command (works before the console script is on PATH)."""
import sys

from mash.cli import main

sys.exit(main())
