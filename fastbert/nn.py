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
        return ops.bias_gelu(x, self.bias, approximate=self.approximate)

    def extra_repr(self):
        return f"{self.num_features}, approximate={self.approximate!r}, bias={self.bias is not None}"


class FusedLayerNormResidual(torch.nn.Module):
    """``LayerNorm(dropout(x + x_bias) + residual)``: BERT's sub-layer output in one fused op.

    Holds ``weight``, ``bias`` (the same names and shapes as ``nn.LayerNorm``, so its state_dict
    loads here), ``eps`` and the dropout probability ``p`` (active in training mode only).
    ``forward(x, residual, x_bias=None)``: ``x_bias`` is the preceding Linear's bias when that Linear
    is built with ``bias=False``, so the bias add is fused too.
    """

    def __init__(self, hidden_size, eps=1e-12, p=0.0, device=None, dtype=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"FusedLayerNormResidual: p must be in [0, 1), got {p!r}")
        if not eps > 0:
            raise ValueError(f"FusedLayerNormResidual: eps must be positive, got {eps!r}")
        self.hidden_size, self.eps, self.p = hidden_size, eps, p
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual, x_bias=None):
        return ops.layernorm_residual(
            x, residual, self.weight, self.bias, x_bias, eps=self.eps, dropout_p=self.p, training=self.training
        )

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, p={self.p}"


class FusedMaskedSoftmax(torch.nn.Module):
    """``dropout(softmax(scores * scale + mask))`` over the keys of ``[batch, heads, queries, keys]``
    attention scores (see :func:`fastbert.ops.masked_softmax` for the mask forms). Dropout with
    probability ``p`` runs in training mode only. No parameters.
    """

    def __init__(self, scale=1.0, p=0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"FusedMaskedSoftmax: p must be in [0, 1), got {p!r}")
        self.scale, self.p = float(scale), p

    def forward(self, scores, mask=None):
        return ops.masked_softmax(scores, mask, scale=self.scale, dropout_p=self.p, training=self.training)

    def extra_repr(self):
        return f"scale={self.scale:g}, p={self.p}"


class MaskedTokenGather(torch.nn.Module):
    """The labelled rows of a ``[batch, seq, H]`` hidden state: ``forward(hidden, labels) ->
    (rows, targets, index)`` (see :func:`fastbert.ops.gather_masked`). No parameters."""

    def __init__(self, ignore_index=-100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden, labels):
        return ops.gather_masked(hidden, labels, ignore_index=self.ignore_index)

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}"


class FusedLinearCrossEntropy(torch.nn.Module):
    """``F.cross_entropy(Linear(rows), targets)`` without the ``[M, vocab]`` logits (see
    :func:`fastbert.ops.linear_cross_entropy`). Holds ``weight [num_classes, in_features]`` and
    ``bias`` like ``nn.Linear`` (so a decoder's state_dict loads); tie ``weight`` to an embedding by
    assigning the embedding's parameter. ``forward(rows, targets) -> loss``."""

    def __init__(
        self,
        in_features,
        num_classes,
        bias=True,
        ignore_index=-100,
        reduction="mean",
        chunk_size=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _checks.choice(reduction, "FusedLinearCrossEntropy", "reduction", ("mean", "sum", "none"))
        self.in_features, self.num_classes = in_features, num_classes
        self.ignore_index, self.reduction, self.chunk_size = ignore_index, reduction, chunk_size
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, rows, targets):
        return ops.linear_cross_entropy(
            rows,
            self.weight,
            targets,
            self.bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self):
        return (
            f"{self.in_features}, {self.num_classes}, bias={self.bias is not None}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )
