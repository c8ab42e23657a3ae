"""``python -m fastchgnet.cli ...``: the same as ``python -m fastchgnet ...``."""

import sys

from fastchgnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
