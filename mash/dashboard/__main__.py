"""``python -m mash.dashboard``: the dashboard alone."""
import sys

from mash.dashboard import main

sys.exit(main())
