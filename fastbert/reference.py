"""Pure-PyTorch implementations of every fastbert op: the test oracle and the last fallback.

Each function computes in fp32 (fp64 for fp64 inputs) and returns the input dtype, like the fused
kernels. Tests call them on inputs upcast to float64 to get the exact answer.
"""

import torch
import torch.nn.functional as F


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_gelu(x, bias=None, approximate="none"):
    """``gelu(x + bias)``; exact (erf) or ``approximate="tanh"``."""
    z = x.to(_acc(x.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return F.gelu(z, approximate=approximate).to(x.dtype)
