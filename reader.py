"""The serial reader service: ``python reader.py`` (the same as ``mash reader``)."""
import sys

from mash.reader import main

if __name__ == "__main__":
    sys.exit(main())
