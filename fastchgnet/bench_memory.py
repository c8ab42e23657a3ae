"""Deprecated: moved to :mod:`fastchgnet.bench.memory`; this alias will be removed in 0.2."""

import warnings

from fastchgnet.bench.memory import *  # noqa: F401,F403
from fastchgnet.bench.memory import main

warnings.warn("fastchgnet.bench_memory is deprecated: use fastchgnet.bench.memory (the old name goes in 0.2)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
