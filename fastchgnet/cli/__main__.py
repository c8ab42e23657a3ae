"""``python -m fastchgnet.cli ...``: the same as ``python -m fastchgnet ...``."""

import sys

from fastchgnet.cli.launch import console_main

if __name__ == "__main__":
    sys.exit(console_main())
