"""``python -m bgem3_lib ...``: see :mod:`bgem3_lib.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
