"""Deprecated: moved to :mod:`fastchgnet.bench.train_step`; this alias will be removed in 0.2."""

import warnings

from fastchgnet.bench.train_step import *  # noqa: F401,F403
from fastchgnet.bench.train_step import main

warnings.warn("fastchgnet.bench_train is deprecated: use fastchgnet.bench.train_step (the old name goes in 0.2)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
