"""Forward-mode derivatives through any backbone: the tangent d/dt f(x_t, t) that continuous-time consistency
(sCM, arXiv 2410.11081, Eq. 8) and MeanFlow (arXiv 2505.13447, Eq. 8) need, from one `torch.func.jvp`.

Attention: of PyTorch's SDPA kernels only the math one implements forward-mode AD (flash and memory-efficient
raise "does not support forward AD"; the CPU flash kernel as well). `jvp` therefore runs the function under the
math backend, always, and says so in its docstring rather than falling back on an error: the math kernel
materializes the attention matrix, so a JVP step costs more memory than a plain forward at large sequence lengths.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# the SDPA backends that implement forward-mode AD (torch 2.14): only the math kernel
FORWARD_AD_BACKENDS = (SDPBackend.MATH,)


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """(fn(*primals), the directional derivative of fn at primals along tangents), attention on the math kernel.

    `fn` must be a function of the tensors in `primals` only (close over the rest). Gradients of the returned
    values with respect to parameters flow as usual for the primal output; callers that use the tangent as a
    target detach it (sCM Eq. 8, MeanFlow Eq. 9 stop the gradient through the JVP)."""
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents; give one tangent per primal")
    with sdpa_kernel(list(FORWARD_AD_BACKENDS)):
        return torch.func.jvp(fn, primals, tangents)
