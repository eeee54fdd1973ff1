"""fastbert: fused C++/CUDA/Triton kernels that make BERT training fast.

Ops (autograd-aware, any backend): :func:`fastbert.ops.bias_gelu`,
:func:`fastbert.ops.layernorm_residual`, :func:`fastbert.ops.masked_softmax`,
:func:`fastbert.ops.gather_masked`, :func:`fastbert.ops.linear_cross_entropy`. Modules: :mod:`fastbert.nn`.
Hugging Face models: :func:`fastbert.patch` / :func:`fastbert.unpatch` (and ``patch_transformers``).
Backend choice: :func:`fastbert.backend`, ``FASTBERT_BACKEND``; ``fastbert info`` reports it.

``import fastbert`` needs only torch: triton (``fastbert.triton``) is imported the first time the
triton backend runs an op; tokenizers, tqdm, safetensors, matplotlib and transformers only by the
features that use them (extras ``[triton]``, ``[train]``, ``[hf]``, ``[bench]``: see fastbert/_optional.py).
"""

__version__ = "0.1.0"

from fastbert import ops  # noqa: E402  (defines the op schemas first)
from fastbert import _ext  # noqa: E402  (then registers the compiled kernels)
from fastbert import backends  # noqa: E402  (fastbert.triton, and triton, load at first use: see backends)
from fastbert.backends import BackendUnavailable, ReferenceFallbackWarning, backend, not_supported_reasons  # noqa: E402
from fastbert.ops import (
    bias_gelu,
    gather_masked,
    layernorm_residual,
    linear_cross_entropy,  # noqa: E402
    masked_softmax,
)
from fastbert import nn  # noqa: E402
from fastbert.patch import patch, patch_transformers, unpatch, unpatch_transformers  # noqa: E402  (functions)

backends.refresh()

__all__ = [
    "BackendUnavailable",
    "ReferenceFallbackWarning",
    "backend",
    "bias_gelu",
    "backends",
    "gather_masked",
    "layernorm_residual",
    "linear_cross_entropy",
    "masked_softmax",
    "nn",
    "not_supported_reasons",
    "ops",
    "patch",
    "patch_transformers",
    "unpatch",
    "unpatch_transformers",
    "__version__",
]


def __getattr__(name):
    """``fastbert.triton``: the Triton kernels, imported (with triton) on first access."""
    if name == "triton":
        import importlib

        return importlib.import_module("fastbert.triton")
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")
