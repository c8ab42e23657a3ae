"""Deprecated: moved to :mod:`fastchgnet.bench.scaling`; this alias will be removed in 0.2."""

import warnings

from fastchgnet.bench.scaling import *  # noqa: F401,F403
from fastchgnet.bench.scaling import main

warnings.warn("fastchgnet.bench_scaling is deprecated: use fastchgnet.bench.scaling (the old name goes in 0.2)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
