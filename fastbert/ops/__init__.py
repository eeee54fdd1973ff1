"""Public, autograd-aware fused ops. Each op lives in its own file (schema, fake, autograd, dispatch)."""

from fastbert.ops.bias_gelu import bias_gelu

__all__ = ["bias_gelu"]
