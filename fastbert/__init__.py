"""fastbert: fused C++/CUDA/Triton kernels that make BERT training fast.

Ops (autograd-aware, any backend): :func:`fastbert.ops.bias_gelu`,
:func:`fastbert.ops.layernorm_residual`, :func:`fastbert.ops.masked_softmax`,
:func:`fastbert.ops.gather_masked`, :func:`fastbert.ops.linear_cross_entropy`. Modules: :mod:`fastbert.nn`.
Hugging Face models: :func:`fastbert.patch` / :func:`fastbert.unpatch` (and ``patch_transformers``).
Backend choice: :func:`fastbert.backend`, ``FASTBERT_BACKEND``; ``fastbert info`` reports it.
"""

__version__ = "0.1.0"

from fastbert import ops  # noqa: E402  (defines the op schemas first)
from fastbert import _ext  # noqa: E402  (then registers the compiled kernels)
from fastbert import triton  # noqa: E402  (then the Triton kernels, when triton imports)
from fastbert import backends  # noqa: E402
from fastbert.backends import BackendUnavailable, ReferenceFallbackWarning, backend, not_supported_reasons  # noqa: E402
from fastbert.ops import (bias_gelu, gather_masked, layernorm_residual, linear_cross_entropy,  # noqa: E402
                          masked_softmax)
from fastbert import nn  # noqa: E402
from fastbert.patch import patch, patch_transformers, unpatch, unpatch_transformers  # noqa: E402  (the functions)

backends.refresh()

__all__ = ["BackendUnavailable", "ReferenceFallbackWarning", "backend", "bias_gelu", "backends", "gather_masked", "layernorm_residual",
           "linear_cross_entropy", "masked_softmax", "nn", "not_supported_reasons", "ops", "patch", "patch_transformers",
           "unpatch", "unpatch_transformers", "__version__"]
