"""Tolerances, backend parametrisation and skip markers shared by the tests.

Accuracy rule (CONTRIBUTING.md): compared with the float64 reference, a fused result's max abs error must
be within 2x eager PyTorch's own error (same dtype, same device) plus a small per-dtype atol.
"""

import math
import os
import signal
import time
from dataclasses import dataclass

import pytest
import torch

import fastbert


@dataclass(frozen=True)
class Tol:
    atol: float  # absolute slack added to 2 x eager's error, per unit of output magnitude


# TransformerEngine-style per-dtype table, in units of the largest |reference| value (at least 1), so
# outputs of any magnitude are judged by their own ulps: one ulp (machine epsilon) of the dtype, two
# for float32, where the kernels' fitted rationals are good to about 1.5 ulp and a small tensor's
# eager error can be far below eager's worst case.
TOLERANCES = {
    torch.float64: Tol(2.3e-16),
    torch.float32: Tol(2.4e-7),
    torch.float16: Tol(9.8e-4),
    torch.bfloat16: Tol(7.9e-3),
}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# the tests that need a GPU: `pytest -m gpu` selects them (scripts/gpu_check.sh)
requires_cuda = (pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible)"))
requires_c = pytest.mark.skipif(fastbert._ext.C is None, reason=f"fastbert._C not built: {fastbert._ext.error}")


def cpu_isas():
    return fastbert._ext.C.cpu_isas_supported() if fastbert._ext.C is not None else []


def backend_params(device):
    """pytest params "<backend>[:isa]" for every backend meant to run on ``device``; those that
    cannot run here are kept as skips that say why."""
    params = []
    if device == "cpu":
        isas = cpu_isas() or ["unbuilt"]
        for isa in isas:
            params.append(pytest.param(f"cpu:{isa}", marks=requires_c))
        params.append(
            pytest.param(
                "triton",
                marks=pytest.mark.skipif(
                    not (fastbert.triton.available and TRITON_INTERPRET),
                    reason=f"triton on CPU tensors needs TRITON_INTERPRET=1 and triton: {fastbert.triton.error}",
                ),
            )
        )
    else:
        params.append(pytest.param("cuda", marks=requires_cuda))
        params.append(pytest.param("triton", marks=requires_cuda))
    params.append("reference" if device == "cpu" else pytest.param("reference", marks=requires_cuda))
    return params


def device_backend_params(kernels_only=False):
    """pytest params (device, backend) for both devices, ids like "cpu-cpu:avx2" (without the
    reference backend when ``kernels_only``)."""
    out = []
    for device in ("cpu", "cuda"):
        for p in backend_params(device):
            value, marks = (p.values[0], p.marks) if hasattr(p, "values") else (p, ())
            if kernels_only and value == "reference":
                continue
            out.append(pytest.param(device, value, marks=marks, id=f"{device}-{value}"))
    return out


class use_backend:
    """``with use_backend("cpu:avx2"):`` forces the backend (and CPU ISA) for the block."""

    def __init__(self, param):
        self.name, _, self.isa = param.partition(":")

    def __enter__(self):
        if self.isa:
            fastbert._ext.C.set_cpu_isa(self.isa)
        self.ctx = fastbert.backend(self.name)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        if self.isa:
            fastbert._ext.C.set_cpu_isa("auto")


def max_err(a, ref):
    if ref.numel() == 0:
        return 0.0
    return (a.double() - ref).abs().max().item()


def assert_close(actual, ref64, eager, what=""):
    """``actual`` against the float64 ``ref64``: error <= 2 x eager's error + atol (see module doc)."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{what}: dtype {actual.dtype} != {eager.dtype}"
    assert torch.isfinite(actual).all() or not torch.isfinite(ref64).all(), f"{what}: non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err, eager_err = max_err(actual, ref64), max_err(eager, ref64)
    if not math.isfinite(eager_err):  # eager overflowed (e.g. fp16 with rstd = 1/sqrt(1e-12)): no credit
        eager_err = 0.0
    bound = 2 * eager_err + TOLERANCES[actual.dtype].atol * scale
    assert err <= bound, (
        f"{what}: max error {err:.3g} > 2 x eager error {eager_err:.3g} + "
        f"atol {TOLERANCES[actual.dtype].atol:g} x scale {scale:.3g}"
    )


def assert_grads_match(got, want, same_keys=True):
    """Parameter gradients ``{name: grad}``: finite, and each within 1e-5 of its own largest value
    plus 1e-6 of the largest gradient of all (fp32 models, different op order)."""
    if same_keys:
        assert set(got) == set(want), sorted(set(got) ^ set(want))
    else:
        assert set(want) <= set(got), sorted(set(want) - set(got))
    scale = max(g.abs().max().item() for g in want.values())
    for k, w in want.items():
        assert torch.isfinite(got[k]).all(), f"{k}: non-finite gradient"
        err = (got[k] - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item() + 1e-6 * scale, f"{k}: grad error {err:.3g} (|g| {w.abs().max():.3g})"


class within:
    """Fail (TimeoutError, raised in Python code, the regex engine included) past ``seconds``; a
    generous bound: the inputs below take well under a second now and minutes when quadratic."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def fire(*_):
            raise TimeoutError(f"still running after {self.seconds} s: quadratic time?")

        self.previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
        assert time.perf_counter() - self.t0 < self.seconds, "took too long: quadratic time?"


class VocabMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output shape of every matmul (``mm``, ``addmm``, ``bmm``) whose last dimension is
    ``vocab``: the MLM logits GEMMs. fastbert's fused loss is one custom op, whose inner chunked
    matmuls this mode does not see (it is off while a handler runs), so it records none."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS and out.shape[-1] == self.vocab:
            self.shapes.append(tuple(out.shape))
        return out
