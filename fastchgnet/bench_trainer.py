"""Deprecated: moved to :mod:`fastchgnet.bench.trainer_epochs`; this alias will be removed in 0.2."""

import warnings

from fastchgnet.bench.trainer_epochs import *  # noqa: F401,F403
from fastchgnet.bench.trainer_epochs import main

warnings.warn("fastchgnet.bench_trainer is deprecated: use fastchgnet.bench.trainer_epochs (the old name goes in 0.2)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
