"""Segment sums: the one scatter the models and simulators use."""

from __future__ import annotations

from torch import Tensor

__all__ = ["segment_sum"]


def segment_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    """``out[k] = sum of values[i] where index[i] == k`` for ``k < n``: shape ``(n, *values.shape[1:])``.

    ``index_add`` on a fresh zero tensor (out of place, so autograd and torch.compile see a pure
    op); ``n`` is a Python int, so no host sync is needed to size the result.
    """
    return values.new_zeros((n, *values.shape[1:])).index_add(0, index, values)
