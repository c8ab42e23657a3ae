"""Triton kernels for fastchgnet, installed as ``fastchgnet.kernels``.

This package is a placeholder until the kernels issue lands: the models use the plain-torch
reference implementations in :mod:`fastchgnet.nn` (``fastchgnet.nn.basis`` and
``fastchgnet.nn.layers.gated_epilogue`` are the dispatch points the kernels will plug into).
Never install this directory as a top-level ``kernels`` module (a PyPI package of that name exists).
"""

__all__: list[str] = []
