"""Deprecated: moved to :mod:`fastchgnet.bench.md`; this alias will be removed in 0.2."""

import warnings

from fastchgnet.bench.md import *  # noqa: F401,F403
from fastchgnet.bench.md import _our_calculators, main  # noqa: F401

warnings.warn("fastchgnet.bench_md is deprecated: use fastchgnet.bench.md (the old name goes in 0.2)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    raise SystemExit(main())
