"""Public, autograd-aware fused ops. Each op lives in its own file (schema, fake, autograd, dispatch)."""

from fastbert.ops.bias_gelu import bias_gelu
from fastbert.ops.layernorm_residual import layernorm_residual
from fastbert.ops.masked_softmax import masked_softmax

__all__ = ["bias_gelu", "layernorm_residual", "masked_softmax"]
