"""The cuda and triton backends' Python glue (fastbert/ops/*.py) on fake CUDA tensors: no GPU needed.

``FakeTensorMode`` makes CUDA tensors without a device; custom ops run their fake (shape-only)
kernels, so the glue runs as on a GPU: backend choice, argument preparation, the ``acc.is_cuda``
matmul of the chunked cross-entropy, the autograd formulas. Host syncs: without a shape env,
``.item()``, ``bool()``, ``.tolist()``, ``nonzero`` or a boolean-mask index of a fake tensor raise,
so an op that completes read nothing back and CUDA graphs can capture it. The documented
exceptions: the gather (its forward ops carry ``torch.Tag.cudagraph_unsafe`` and run here with a
shape env: a data-dependent size) and ``packing`` (it reads ``T`` and ``max_seqlen`` of a batch).
Backward: the autograd engine needs a real CUDA device (``hasPrimaryContext``), so each op's
registered formula (``setup_context`` + ``backward``) is called directly on the forward's recorded
inputs and outputs. The triton launchers' bodies are traced by tests/test_triton_trace.py; here
the triton ops are opaque custom ops and only fastbert/ops' glue around them runs. The gather, the
packing, the modules and a BERT forward, the cudagraph tags and the C++ sources' host reads are in
tests/test_cuda_glue_readback.py.
"""

import importlib
import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert import backends, ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
SYNC_ERRORS = (DataDependentOutputException, DynamicOutputShapeException)


def _module(op):
    return importlib.import_module(f"fastbert.ops.{op}")


def _skip_reason(backend):
    from fastbert import _ext

    if _ext.C is None:
        return f"fastbert._C is not available ({_ext.error})"
    if backend == "cuda" and not _ext.C.build_info()["cuda"]:
        return "fastbert._C was built without CUDA kernels (no cuda backend to check)"
    if backend == "triton" and not fastbert.triton.available:
        return f"triton backend unavailable: {fastbert.triton.error}"
    return None


BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(_skip_reason(b) is not None, reason=str(_skip_reason(b))))
    for b in ("cuda", "triton")
]


class Record(TorchDispatchMode):
    """Records every ``fastbert::`` op call below autograd: ``(op, args, output)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastbert":
            self.calls.append((func, args, out))
        return out

    def last(self, name):
        found = [c for c in self.calls if c[0].name() == f"fastbert::{name}"]
        assert found, f"fastbert::{name} was not called; calls: {[c[0].name() for c in self.calls]}"
        return found[-1]


class Ctx:
    """The ``ctx`` torch.library's autograd wrapper hands ``setup_context`` and ``backward``."""

    def __init__(self, inputs):
        self.needs_input_grad = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def bwd_op(op, backend):
    return getattr(torch.ops.fastbert, f"{op}_bwd" + ("_triton" if backend == "triton" else "")).default


def fwd_name(op, backend):
    return f"{op}_fwd" + ("_triton" if backend == "triton" else "")


def run_backward(rec, op, backend, *grads):
    """The op's registered backward on the recorded forward call (inputs, outputs) of ``backend``."""
    mod = _module(op)
    _, args, out = rec.last(fwd_name(op, backend))
    ctx = Ctx(args)
    mod.setup_context(ctx, args, out)
    return args, mod.backward(ctx, bwd_op(op, backend), *grads)


def like(t, ref, what=""):
    """``t`` has ``ref``'s shape, dtype and (CUDA) device."""
    assert isinstance(t, torch.Tensor), what
    assert t.shape == ref.shape and t.dtype == ref.dtype and t.device == ref.device, (
        f"{what}: got {t.dtype} {list(t.shape)} on {t.device}, want {ref.dtype} {list(ref.shape)} on {ref.device}"
    )


def fake_cuda(*shape, dtype=torch.float32, grad=False):
    t = (
        torch.randn(*shape, device="cuda", dtype=dtype)
        if dtype.is_floating_point
        else torch.randint(0, 5, shape, device="cuda", dtype=dtype)
    )
    return t.requires_grad_(grad)


# ---------------------------------------------------------------------------------- backend choice


@pytest.mark.skipif(_skip_reason("cuda") is not None, reason=str(_skip_reason("cuda")))
def test_auto_picks_the_cuda_backend_for_fake_cuda_tensors():
    """auto runs the cuda backend for CUDA tensors, float64 masks and x_bias included (the CUDA
    glue converts them; it used to pick the reference)."""
    with FakeTensorMode():
        x, w = fake_cuda(4, 8, dtype=torch.float16), fake_cuda(8)
        scores = fake_cuda(2, 2, 3, 5, dtype=torch.bfloat16)
        assert backends.select("bias_gelu", x, w) == "cuda"
        assert backends.select("layernorm_residual", x, x, w, w, converted=(w.double(),)) == "cuda"
        for mask in (fake_cuda(2, 1, 1, 5, dtype=torch.float64), fake_cuda(2, 1, 3, 5)):
            assert backends.select("masked_softmax", scores, converted=(mask,)) == "cuda"
        assert backends.select("varlen_attention", fake_cuda(4, 2, 8)) == (
            "reference" if _skip_reason("triton") else "triton"
        )
        # the public ops choose so too: the cuda kernels' fakes run
        with Record() as rec:
            ops.masked_softmax(scores, fake_cuda(2, 1, 1, 5, dtype=torch.float64))
            ops.layernorm_residual(x, x, w, w, x_bias=fake_cuda(8, dtype=torch.float64))
        assert [c[0].name() for c in rec.calls] == ["fastbert::masked_softmax_fwd", "fastbert::layernorm_residual_fwd"]


# ------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bias_gelu(backend):
    cases = itertools.product(DTYPES, ("none", "same", "fp32"), ("none", "tanh"), (True, False))
    with FakeTensorMode(), fastbert.backend(backend):
        for dtype, bias_kind, approximate, bias_grad in cases:
            x = fake_cuda(3, 4, 8, dtype=dtype, grad=True).transpose(0, 1)  # non-contiguous
            bias = (
                None
                if bias_kind == "none"
                else fake_cuda(8, dtype=dtype if bias_kind == "same" else torch.float32, grad=bias_grad)
            )
            with Record() as rec:
                y = ops.bias_gelu(x, bias, approximate=approximate)
            like(y, x, "y")
            assert y.is_contiguous()
            args, (dx, dbias, _) = run_backward(rec, "bias_gelu", backend, torch.ones_like(y))
            like(dx, x, "dx")
            if bias is not None and bias_grad:
                like(dbias, bias, "dbias")
            else:
                assert dbias is None


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_layernorm_residual(backend):
    x_biases = ("none", "same", "fp32") + (("fp64",) if backend == "cuda" else ())
    cases = itertools.product(DTYPES, (False, True), x_biases, (0.0, 0.1), (True, False))
    with FakeTensorMode(), fastbert.backend(backend):
        for dtype, fp32_params, xb_kind, p, training in cases:
            x, res = fake_cuda(2, 3, 16, dtype=dtype, grad=True), fake_cuda(2, 3, 16, dtype=dtype, grad=True)
            pdt = torch.float32 if fp32_params else dtype
            w, b = fake_cuda(16, dtype=pdt, grad=True), fake_cuda(16, dtype=pdt, grad=True)
            xdt = {"none": None, "same": dtype, "fp32": torch.float32, "fp64": torch.float64}[xb_kind]
            xb = fake_cuda(16, dtype=xdt, grad=True) if xdt else None
            with Record() as rec:
                y = ops.layernorm_residual(x, res, w, b, xb, eps=1e-5, dropout_p=p, training=training)
            like(y, x, "y")
            _, mean, rstd = rec.last(fwd_name("layernorm_residual", backend))[2]
            assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == x.shape[:-1]
            args, grads = run_backward(rec, "layernorm_residual", backend, torch.ones_like(y))
            dx, dres, dw, db, _, dxb, _, _ = grads
            like(dx, x, "dx")
            like(dres, x, "dresidual")
            like(dw, w, "dweight")
            like(db, b, "dbias")
            if xb is not None:
                like(dxb, xb, "dx_bias")
            else:
                assert dxb is None
            seed = args[7]
            assert (seed is not None) == (training and p > 0)
            if seed is not None:
                assert seed.dtype == torch.int64 and seed.device == x.device


def _masks(dtype, backend):
    yield None
    yield torch.ones(2, 5, device="cuda", dtype=torch.bool)  # [B, Sk] key padding
    yield torch.ones(2, 1, 3, 5, device="cuda", dtype=torch.bool)  # 4-D bool
    yield fake_cuda(2, 1, 1, 5, dtype=dtype)  # HF additive
    yield fake_cuda(1, 3, 5)  # 3-D fp32, broadcast
    if backend == "cuda":
        yield fake_cuda(2, 1, 3, 5, dtype=torch.float64)  # converted by the CUDA glue


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_masked_softmax(backend):
    with FakeTensorMode(), fastbert.backend(backend):
        for dtype, p, training in itertools.product(DTYPES, (0.0, 0.1), (True, False)):
            for mask in _masks(dtype, backend):
                scores = fake_cuda(2, 2, 3, 5, dtype=dtype, grad=True)
                with Record() as rec:
                    probs = ops.masked_softmax(scores, mask, scale=0.125, dropout_p=p, training=training)
                like(probs, scores, "probs")
                args, (dscores, *rest) = run_backward(rec, "masked_softmax", backend, torch.ones_like(probs))
                like(dscores, scores, "dscores")
                assert all(r is None for r in rest)
                assert args[1] is None or args[1].dim() == 4  # the canonical (4-D) mask reached the kernel


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_varlen_attention(backend):
    with FakeTensorMode():
        if backend == "cuda":  # no CUDA kernel by design: forcing it says so, auto runs triton
            with fastbert.backend("cuda"), pytest.raises(backends.BackendUnavailable, match="no CUDA kernel"):
                ops.varlen_attention(
                    fake_cuda(6, 2, 8),
                    fake_cuda(6, 2, 8),
                    fake_cuda(6, 2, 8),
                    torch.zeros(3, dtype=torch.int32, device="cuda"),
                    4,
                )
            return
        with fastbert.backend(backend):
            for dtype, p in itertools.product(DTYPES, (0.0, 0.1)):
                qkv = fake_cuda(6, 3, 2, 8, dtype=dtype, grad=True)
                q, k, v = qkv.unbind(1)  # non-contiguous views, as the model passes them
                cu = torch.zeros(3, dtype=torch.int32, device="cuda")
                with Record() as rec:
                    out = ops.varlen_attention(q, k, v, cu, 4, dropout_p=p)
                like(out, q.contiguous(), "out")
                lse = rec.last(fwd_name("varlen_attention", backend))[2][1]
                assert lse.shape == (2, 6) and lse.dtype == torch.float32
                _, (dq, dk, dv, *rest) = run_backward(rec, "varlen_attention", backend, torch.ones_like(out))
                for g, t, name in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
                    like(g, t.contiguous(), name)
                assert all(r is None for r in rest)


LCE = importlib.import_module("fastbert.ops.linear_cross_entropy")


def _fake_addmm_out_dtype_works():
    """Whether this torch's fake tensors run ``addmm(..., out_dtype=, out=)`` (the CUDA kernel of
    ``aten::addmm.dtype_out``). torch 2.11 has the kernel, but under FakeTensorMode the op falls into
    the ``aten.addmm`` decomposition, which takes ``out_dtype`` for ``beta`` (a TypeError)."""
    with FakeTensorMode():
        acc = torch.empty(2, 2, device="cuda")
        a = torch.empty(2, 2, device="cuda", dtype=torch.float16)
        try:
            torch.addmm(acc, a, a, beta=0, out_dtype=torch.float32, out=acc)
            return True
        except TypeError:
            return False


FAKE_ADDMM_OUT_DTYPE = _fake_addmm_out_dtype_works()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_linear_cross_entropy(backend, monkeypatch):
    """The public op, its autograd formula (every branch reachable with fake tensors) and the
    chunked op's body (several chunks; fp32 accumulation of half operands: ``acc.is_cuda``)."""
    cases = itertools.product(DTYPES, (True, False), ("mean", "sum", "none"), (None, 4), (True, False))
    with FakeTensorMode(), fastbert.backend(backend):
        for dtype, with_bias, reduction, chunk, grad in cases:
            rows = fake_cuda(10, 8, dtype=dtype, grad=grad)
            weight = fake_cuda(11, 8, dtype=torch.float32, grad=grad)  # master weights: cast to rows' dtype
            bias = fake_cuda(11, dtype=torch.float32, grad=grad) if with_bias else None
            targets = torch.randint(0, 11, (10,), device="cuda")
            with Record() as rec:
                loss = ops.linear_cross_entropy(
                    rows, weight, targets, bias, ignore_index=3, reduction=reduction, chunk_size=chunk
                )
            assert loss.dtype == dtype and loss.device == rows.device
            assert loss.shape == ((10,) if reduction == "none" else ())
            _, args, out = rec.last("linear_cross_entropy_chunked")
            assert args[-1] == backend and args[7] == (grad and reduction != "none")
            # the body of the chunked op, as a CUDA run executes it (below autograd); its half-input
            # fp32-output matmul needs a torch whose fake tensors run addmm(out_dtype=)
            if FAKE_ADDMM_OUT_DTYPE or dtype == torch.float32 or not args[7]:
                with torch.no_grad():
                    body = LCE.linear_cross_entropy_chunked._init_fn(*args)
                for got, want, what in zip(body, out, ("loss", "grad_rows", "grad_weight", "grad_bias")):
                    like(got, want, what)
            # the autograd formula: the first backward as an eager run (scales the forward's
            # gradients in place) and as a compiled one (fake tensors count as traced), then a
            # second backward (recomputes); reduction="none" recomputes every time
            for eager in (True, False):
                monkeypatch.setattr(LCE, "_traced", lambda *tensors: not eager)
                ctx = Ctx(args)
                LCE._setup_context(ctx, args, out)
                for _ in range(2):
                    gr, gw, gb, *rest = LCE._backward(ctx, torch.ones_like(loss))
                    like(gr, args[0], "grad rows")
                    like(gw, args[1], "grad weight")
                    if with_bias:
                        like(gb, args[2], "grad bias")
                    else:
                        assert gb is None
                    assert all(r is None for r in rest)
                assert ctx.consumed == (eager and args[7])
                assert LCE._backward(ctx, None) == (None,) * 9
            if reduction == "none" and (FAKE_ADDMM_OUT_DTYPE or dtype == torch.float32):
                with torch.no_grad():
                    bwd = LCE.linear_cross_entropy_chunked_bwd._init_fn(
                        args[0], args[1], args[2], args[3], torch.ones_like(loss), 3, 4, backend
                    )
                like(bwd[0], args[0], "chunked bwd rows")
                like(bwd[1], args[1], "chunked bwd weight")


@pytest.mark.skipif(
    not FAKE_ADDMM_OUT_DTYPE,
    reason=f"torch {torch.__version__}: fake tensors cannot run "
    "addmm(out_dtype=) (its addmm decomposition takes out_dtype for beta)",
)
def test_accumulate_mm_takes_half_operands_into_fp32_on_cuda():
    """The ``acc.is_cuda`` branch (``torch.addmm(..., out_dtype=)``) for every half dtype."""
    with FakeTensorMode():
        for dtype in HALF:
            acc = torch.empty(11, 8, device="cuda", dtype=torch.float32)
            a = fake_cuda(4, 11, dtype=dtype).t()  # a transposed operand, as the dlogits^T of the chunks
            for first in (True, False):
                LCE._accumulate_mm(acc, a, fake_cuda(4, 8, dtype=dtype), first)
                assert acc.dtype == torch.float32 and acc.shape == (11, 8)


def test_target_check_is_asynchronous_on_cuda():
    """Regression: the target range check read ``bool(bad.any())`` back on every forward (a host
    sync: a data-dependent error on fake tensors); on CUDA it is now ``torch._assert_async``."""
    with FakeTensorMode():
        targets = torch.randint(0, 11, (10,), device="cuda")
        LCE._check_targets(targets, 11, -100)  # no host read
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\).*got 11"):  # CPU: the ValueError stays
        LCE._check_targets(torch.tensor([1, 11, -100]), 11, -100)
