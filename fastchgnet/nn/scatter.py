"""Segment sums: the one scatter the models and simulators use."""

from __future__ import annotations

from torch import Tensor

__all__ = ["segment_sum"]


def segment_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    """``out[k] = sum of values[i] where index[i] == k`` for ``k < n``: shape ``(n, *values.shape[1:])``.

    ``index_add_`` into a fresh zero tensor (in place on a tensor nobody else holds: no copy, and
    autograd and torch.compile treat it as the pure sum); ``n`` is a Python int, so no host sync is
    needed to size the result.
    """
    return values.new_zeros((n, *values.shape[1:])).index_add_(0, index, values)
