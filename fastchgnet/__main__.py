"""``python -m fastchgnet ...``: the ``fastchgnet`` command (its start-up: :mod:`fastchgnet.cli.launch`)."""

import sys

from fastchgnet.cli.launch import console_main

if __name__ == "__main__":
    sys.exit(console_main())
