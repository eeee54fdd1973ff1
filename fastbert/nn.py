"""nn.Module wrappers around the fused ops."""

import torch

from fastbert import ops
from fastbert.ops import _checks
from fastbert.ops.bias_gelu import APPROXIMATE


class FusedBiasGELU(torch.nn.Module):
    """``gelu(x + bias)`` with the bias held here: put it after a ``Linear(..., bias=False)``.

    ``approximate`` is ``"none"`` (exact erf GELU) or ``"tanh"``. The parameter is named ``bias`` so
    a ``Linear``'s bias can be copied in (``module.bias.data.copy_(linear.bias)``).
    """

    def __init__(self, num_features, approximate="none", bias=True, device=None, dtype=None):
        super().__init__()
        _checks.choice(approximate, "FusedBiasGELU", "approximate", APPROXIMATE)
        self.num_features = num_features
        self.approximate = approximate
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return ops.bias_gelu(x, self.bias, self.approximate)

    def extra_repr(self):
        return f"{self.num_features}, approximate={self.approximate!r}, bias={self.bias is not None}"
