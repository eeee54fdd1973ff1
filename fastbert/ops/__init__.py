"""Public, autograd-aware fused ops. Each op lives in its own file (schema, fake, autograd, dispatch).

One calling convention for every op: tensors are positional (optional tensors default to None), options
are keyword-only, and dropout follows ``F.dropout``: ``dropout_p > 0`` drops unless ``training=False``.
"""

from fastbert.ops.bias_gelu import bias_gelu
from fastbert.ops.gather_masked import gather_masked
from fastbert.ops.layernorm_residual import layernorm_residual
from fastbert.ops.linear_cross_entropy import linear_cross_entropy
from fastbert.ops.masked_softmax import masked_softmax
from fastbert.ops.unpad import Packing, packing, pad, unpad
from fastbert.ops.varlen_attention import varlen_attention

__all__ = [
    "bias_gelu",
    "gather_masked",
    "layernorm_residual",
    "linear_cross_entropy",
    "masked_softmax",
    "Packing",
    "pad",
    "packing",
    "unpad",
    "varlen_attention",
]
