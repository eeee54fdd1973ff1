"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, which must be set before
triton is imported). A missing or broken triton is recorded in ``error``, never raised.

``import fastbert`` does not import this package (nor triton): :mod:`fastbert.backends` imports it
the first time the triton backend would run an op, and so does accessing ``fastbert.triton`` or
importing any ``fastbert.triton`` module. Importing it imports triton, registers the
``fastbert::<op>_*_triton`` kernels and refreshes :mod:`fastbert.backends`.
"""

available = False
error = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from torch.library import triton_op  # noqa: F401  (torch >= 2.6)

    available = True
except Exception as e:  # ImportError, or a triton that does not match torch
    error = f"triton is not usable ({type(e).__name__}: {e}); pip install 'fastbert[triton]'"

if available:
    try:
        from fastbert.triton import (
            bias_gelu,  # noqa: F401  (registers fastbert::bias_gelu_*_triton)
            gather_masked,  # noqa: F401  (fastbert::gather_masked_*_triton)
            layernorm_residual,  # noqa: F401  (fastbert::layernorm_residual_*_triton)
            linear_cross_entropy,  # noqa: F401  (fastbert::linear_cross_entropy_*_triton)
            masked_softmax,  # noqa: F401  (fastbert::masked_softmax_*_triton)
            varlen_attention,  # noqa: F401  (fastbert::varlen_attention_*_triton)
        )
    except Exception as e:  # e.g. a torch/triton pair whose triton_op or jit rejects the kernels
        available = False
        error = f"fastbert's Triton kernels failed to load ({type(e).__name__}: {e})"

from fastbert import backends  # noqa: E402

backends.refresh()  # the triton backend's state: loaded, or why not
