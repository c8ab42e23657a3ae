"""``python -m fastchgnet ...``: the ``fastchgnet`` command."""

import sys

from fastchgnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
