"""Registering Triton launchers as torch.library ops.

On a GPU the launchers become ``torch.library.triton_op`` ops, which torch.compile can trace into
(and which stay CUDA-graph safe). Under ``TRITON_INTERPRET=1`` (kernels on the CPU, for tests) the
interpreter cannot run on the fake tensors that compile traces with, so the same launchers become
opaque ``torch.library.custom_op`` ops with a registered fake implementation: still one op in the
graph, no graph break.

Usage in a kernel module::

    @kernel_op("fastchgnet::my_op")
    def my_op(x: Tensor) -> Tensor:
        x = x.contiguous()                       # launchers index memory as contiguous
        out = torch.empty_like(x)
        launch(_my_kernel)[grid](x, out, ...)    # launch() wraps for triton_op when needed
        return out

    @my_op.register_fake
    def _(x): return torch.empty_like(x)

    my_op.register_autograd(backward, setup_context=setup)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastchgnet.kernels._env import interpreting

# triton_op needs torch >= 2.6 and real (compiled) Triton
USE_TRITON_OP = hasattr(torch.library, "triton_op") and not interpreting()


def kernel_op(qualname: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Any]:
    """Decorator: register a launcher function as a torch.library op (see module docstring)."""
    if USE_TRITON_OP:
        return torch.library.triton_op(qualname, mutates_args=mutates_args)
    return torch.library.custom_op(qualname, mutates_args=mutates_args)


def launch(kernel: Any) -> Any:
    """The kernel as it must be launched inside a :func:`kernel_op` function."""
    if USE_TRITON_OP:
        return torch.library.wrap_triton(kernel)
    return kernel
