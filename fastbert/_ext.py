"""Loads the compiled extension fastbert._C. Import never fails: without it, ops use the reference."""

import warnings

C = None
error = None
try:
    from fastbert import _C as C  # registers the CPU (and CUDA) kernels with the dispatcher
except Exception as e:  # ImportError when not built, OSError/ImportError on a broken build
    error = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"fastbert: compiled kernels are unavailable ({error}); ops fall back to the reference "
        "backend. Build them with `pip install --no-build-isolation .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )
