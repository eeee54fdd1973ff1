"""bias + GELU on every backend against the float64 reference (fastbert.reference.bias_gelu)."""

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import reference
from tests.utils import DTYPES, HAS_CUDA, assert_close, backend_params, device_backend_params, requires_c, use_backend

SHAPES = [
    (3, 1),
    (5, 7),
    (4, 127),
    (2, 768),
    (3, 1023),
    (2, 3072),
    (1, 4096),
    (2, 3, 768),
    (0, 5),
    (300, 40),
]  # the last: many row blocks in the dbias reductions
APPROXIMATE = ("none", "tanh")


def make_inputs(shape, dtype, device, bias=True, bias_dtype=None):
    """x spans GELU's curved region and both tails (|z| up to ~10); bias shifts columns."""
    x = torch.randn(shape, device=device) * 2.5
    if x.numel():
        x.view(-1)[: min(4, x.numel())] = torch.tensor([-9.0, 9.0, -5.5, 5.5][: min(4, x.numel())])
    b = torch.randn(shape[-1], device=device) if bias else None
    return x.to(dtype), (b.to(bias_dtype or dtype) if bias else None)


def run(backend, x, b, approximate, dy):
    """Forward and backward through the public op on ``backend``; returns y, dx, dbias."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    with use_backend(backend):
        y = fastbert.bias_gelu(x, b, approximate=approximate)
    y.backward(dy)
    return y.detach(), x.grad, (b.grad if b is not None else None)


def eager(x, b, approximate, dy):
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = F.gelu(x + b if b is not None else x, approximate=approximate)
    y.backward(dy)
    return y.detach(), x.grad, (b.grad if b is not None else None)


def exact(x, b, approximate, dy):
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = reference.bias_gelu(x64, b64, approximate)
    y.backward(dy.double())
    return y.detach(), x64.grad, (b64.grad if b is not None else None)


def check(backend, x, b, approximate):
    dy = torch.randn_like(x)
    got, want, base = run(backend, x, b, approximate, dy), exact(x, b, approximate, dy), eager(x, b, approximate, dy)
    for name, g, w, e in zip(("y", "dx", "dbias"), got, want, base):
        if w is None:
            assert g is None
            continue
        assert_close(g, w, e.to(g.dtype), f"{backend} {name} {tuple(x.shape)} {x.dtype} {approximate}")


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device, backend, dtype, shape, approximate, bias):
    x, b = make_inputs(shape, dtype, device, bias)
    check(backend, x, b, approximate)


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_nonfinite_z_gradient_matches_reference(device, backend, dtype, approximate):
    """NaN z = x + bias gives a NaN gradient and +-inf z the reference's (torch's) NaN, in dx and in
    dbias's column; the kernels' clamps used to turn them into finite values (0, 1/2 or 1). The
    other elements keep their gradients."""
    x, b = make_inputs((4, 9), dtype, device)
    x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), float("-inf")
    b[5] = float("nan")  # a whole column of NaN z
    dy = torch.randn_like(x)
    _, dx, db = run(backend, x, b, approximate, dy)
    _, dx64, db64 = exact(x, b, approximate, dy)
    _, dx_eager, db_eager = eager(x, b, approximate, dy)
    for name, got, want, base in (("dx", dx, dx64, dx_eager), ("dbias", db, db64, db_eager)):
        assert torch.equal(got.isnan(), want.isnan()), (
            f"{backend} {name}: NaN at {got.isnan().nonzero().tolist()}, reference NaN at "
            f"{want.isnan().nonzero().tolist()}"
        )
        finite = want.isfinite()
        assert_close(got[finite], want[finite], base[finite].to(got.dtype), f"{backend} {name} {approximate}")


def ulps(a, b):
    """Distance in units in the last place of a's dtype between same-dtype a and b (0 where equal,
    +-0 included)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    d = (a.view(ints).long() - b.view(ints).long()).abs()
    return torch.where(a == b, 0, d)


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("shape", [(64, 768), (5, 7)], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible)")
def test_cuda_and_triton_agree_to_the_ulp(dtype, approximate, shape):
    """The two GPU backends run the same operations (csrc/cuda/bias_gelu_kernel.cu inlines the PTX
    that Triton emits for fp32 division and exp2): y and dx agree within one ulp of the dtype."""
    x, b = make_inputs(shape, dtype, "cuda")
    dy = torch.randn_like(x)
    got_cuda = run("cuda", x, b, approximate, dy)
    got_triton = run("triton", x, b, approximate, dy)
    for name, c, t in zip(("y", "dx"), got_cuda, got_triton):
        d = ulps(c, t)
        assert d.max() <= 1, (
            f"{name}: {d.max()} ulps apart at {d.argmax()}: cuda {c.view(-1)[d.argmax()]}, "
            f"triton {t.view(-1)[d.argmax()]}"
        )


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 3072), (513, 1024), (3, 8193)], ids=str)
def test_matches_reference_large_cuda(backend, dtype, shape):
    """BERT-sized inputs exercise the GPU kernels' many-block paths (dbias chunking)."""
    x, b = make_inputs(shape, dtype, "cuda")
    check(backend, x, b, "none")


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_bias"])
def test_non_contiguous(device, backend, layout):
    base = torch.randn(48, 40, device=device) * 2
    if layout == "transposed":
        x, b = base.t(), torch.randn(48, device=device)
    elif layout == "strided":
        x, b = base[::3, ::2], torch.randn(40, device=device)[::2]
    else:
        x, b = base, torch.randn(1, device=device).expand(40)
    assert not x.is_contiguous() or not b.is_contiguous()
    check(backend, x, b, "none")


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_bias_with_low_precision_x(device, backend, dtype):
    """Autocast keeps master weights in fp32: the result has x's dtype, dbias the bias's."""
    x, b = make_inputs((6, 200), dtype, device, bias_dtype=torch.float32)
    dy = torch.randn_like(x)
    y, dx, db = run(backend, x, b, "none", dy)
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == torch.float32
    want = exact(x, b, "none", dy)
    base = eager(x.float(), b, "none", dy.float())  # fp32 eager: the best eager can do here
    assert_close(y, want[0], base[0].to(dtype), "y")
    assert_close(db, want[2], base[2], "dbias")


@requires_c
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gradcheck_float64_cpu(seed, approximate):
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    with fastbert.backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, b: fastbert.bias_gelu(x, b, approximate=approximate), (x, b))
        assert torch.autograd.gradcheck(lambda x: fastbert.bias_gelu(x, None, approximate=approximate), (x,))


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(seed, dtype):
    x = torch.randn(5, 33, dtype=dtype, requires_grad=True)
    b = torch.randn(33, dtype=dtype, requires_grad=True)
    for args in ((x, b, "none"), (x, None, "tanh")):
        torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, args)
    dy = torch.randn(5, 33, dtype=dtype)
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_bwd.default, (dy, x.detach(), b.detach(), "none", True))


@pytest.mark.skipif(
    not (fastbert.triton.available and fastbert.backends._TRITON_INTERPRET),
    reason="triton on CPU needs TRITON_INTERPRET=1",
)
def test_opcheck_triton(seed):
    x = torch.randn(3, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fastbert.bias_gelu_fwd_triton.default,
        (x, b, "none"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@requires_c
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(seed, dynamic):
    def f(x, b):
        return fastbert.bias_gelu(x, b) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for rows in (4, 9):
        x = torch.randn(rows, 64, requires_grad=True)
        b = torch.randn(64, requires_grad=True)
        y = compiled(x, b)
        y.sum().backward()
        x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
        f(x2, b2).sum().backward()
        torch.testing.assert_close(y, f(x2, b2))
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(b.grad, b2.grad)


@requires_c
def test_torch_compile_inductor(seed):
    f = torch.compile(lambda x, b: fastbert.bias_gelu(x, b, approximate="tanh"), fullgraph=True)
    x, b = torch.randn(8, 96), torch.randn(96)
    torch.testing.assert_close(f(x, b), reference.bias_gelu(x, b, "tanh"), rtol=1e-5, atol=1e-6)


@requires_c
def test_dbias_deterministic_across_runs_and_threads(seed):
    x, b = torch.randn(1000, 700), torch.randn(700)
    dy = torch.randn_like(x)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastbert.bias_gelu_bwd(dy, x, b, "none", True))
    finally:
        torch.set_num_threads(threads)
    for dx, db in outs[1:]:
        assert torch.equal(dx, outs[0][0]) and torch.equal(db, outs[0][1])


@requires_c
def test_cpu_isas_agree(seed):
    """Every ISA variant this CPU runs gives (nearly) the same answer as the others."""
    x, b = torch.randn(7, 1001) * 3, torch.randn(1001)
    results = {}
    for isa in fastbert._ext.C.cpu_isas_supported():
        fastbert._ext.C.set_cpu_isa(isa)
        results[isa] = torch.ops.fastbert.bias_gelu_fwd(x, b, "none")
    fastbert._ext.C.set_cpu_isa("auto")
    first = next(iter(results.values()))
    for isa, y in results.items():
        torch.testing.assert_close(y, first, rtol=1e-6, atol=1e-6, msg=isa)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(7)), "bias must have shape \\[8\\]"),
        ((torch.randn(4, 8), torch.randn(2, 8)), "bias must have shape"),
        ((torch.randint(0, 5, (4, 8)), None), "x must be float32"),
        ((torch.randn(4, 8), torch.randint(0, 5, (8,))), "bias must be float32"),
        ((torch.randn(4, 8), torch.randn(8, device="meta")), "bias is on meta"),
        ((torch.tensor(1.0), None), "x must have at least one dimension"),
        ((torch.randn(4, 8).double(), torch.randn(8)), "float64 x needs a float64 bias"),
    ],
)
def test_bad_input(backend, args, match):
    with fastbert.backend(backend), pytest.raises(ValueError, match=match):
        fastbert.bias_gelu(*args)


def test_bad_approximate_and_types():
    with pytest.raises(ValueError, match="approximate must be one of 'none', 'tanh', got 'fast'"):
        fastbert.bias_gelu(torch.randn(2, 3), None, approximate="fast")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastbert.bias_gelu([1.0, 2.0])
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        fastbert.bias_gelu(torch.randn(2, 3), 1.0)


@requires_c
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(7), "none"), "bias must have shape \\[8\\]"),
        ((torch.randn(4, 8), None, "exact"), "approximate must be 'none' or 'tanh'"),
        ((torch.randint(0, 5, (4, 8)), None, "none"), "x must be float32"),
    ],
)
def test_bad_input_direct_op(args, match):
    """The C++ ops check their inputs too (for callers that skip the Python wrapper)."""
    with pytest.raises(ValueError, match=match):
        torch.ops.fastbert.bias_gelu_fwd(*args)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.fastbert.bias_gelu_bwd(torch.randn(3, 8), torch.randn(4, 8), None, "none", False)


def test_forcing_unavailable_backend_raises_with_reasons():
    x = torch.randn(2, 4)
    with fastbert.backend("cuda"), pytest.raises(fastbert.BackendUnavailable, match="tensors on cpu"):
        fastbert.bias_gelu(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastbert.backend("tpu"):
            pass


# ---- module ----------------------------------------------------------------------------------


def test_module(seed):
    m = fastbert.nn.FusedBiasGELU(24, approximate="tanh")
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(m(x), reference.bias_gelu(x, m.bias, "tanh"), rtol=1e-5, atol=1e-6)
    assert list(m.state_dict()) == ["bias"]
    assert "approximate='tanh'" in repr(m)
    m(x).sum().backward()
    assert m.bias.grad is not None and m.bias.grad.shape == (24,)
    assert fastbert.nn.FusedBiasGELU(4, bias=False).bias is None
    with pytest.raises(ValueError, match="approximate"):
        fastbert.nn.FusedBiasGELU(4, approximate="erf")


@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "reference"])
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_extreme_inputs_saturate(backend, approximate):
    """Huge |z| (z^3 and z^2 overflow fp32) still gives gelu = z or 0 and gelu' = 1 or 0, no NaN."""
    x = torch.tensor([[-1e20, -1e4, -30.0, -10.0, 10.0, 30.0, 1e4, 1e20]]).requires_grad_()
    with use_backend(backend):
        y = fastbert.bias_gelu(x, None, approximate=approximate)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y.detach(), torch.where(x > 0, x, 0.0).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, (x > 0).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_huge_and_infinite_z_forward_matches_eager(backend, dtype, approximate):
    """gelu(-3e38) is -0 as in eager (the clamped tail gave -62 exact, -3.6 tanh); -inf gives eager's
    NaN (-inf * 0), +inf stays inf, NaN stays NaN; finite z matches the float64 reference.

    Eager float32/bf16 ``F.gelu`` on a CPU where torch picks its AVX-512 kernels gives NaN for +inf
    (exact erf form; seen with torch 2.14 on an AMD EPYC with AVX-512): that is torch's defect, found
    by comparing with the float64 reference (it also rounds 3e38 to inf there). The reference backend
    is eager, so it must give eager's values, defects included; every other candidate must match the
    float64 reference."""
    x = torch.tensor([[-3e38, -1e30, -1e20, -20.0, float("-inf"), float("inf"), float("nan"), 3e38]]).to(dtype)
    with use_backend(backend):
        y = fastbert.bias_gelu(x, None, approximate=approximate)
    want = reference.bias_gelu(x.double(), None, approximate)
    base = F.gelu(x, approximate=approximate)
    if backend == "reference":  # eager itself, its defects included
        assert torch.equal(y.isnan(), base.isnan()) and torch.equal(y[~y.isnan()], base[~base.isnan()])
        return
    defect = base.isnan() & ~want.isnan()
    assert torch.equal(defect, defect & (x == float("inf"))), f"eager gelu: NaN at {defect.nonzero().tolist()}"
    assert torch.equal(base.isnan() & want.isnan(), want.isnan())  # eager's NaN (-inf * 0) is kept
    assert torch.equal(y.isnan(), want.isnan()), (
        f"{backend}: NaN at {y.isnan().nonzero().tolist()}, reference {want.isnan().nonzero().tolist()}"
    )
    ok = ~want.isnan()
    assert torch.equal(y[ok].double(), want.to(dtype)[ok].double()), f"{backend}: {y.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "reference"])
def test_double_backward_raises(backend):
    """Second derivatives through the fused backward are not implemented: differentiating the
    gradient raises instead of silently seeing a constant (a zero second derivative)."""
    x = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    with use_backend(backend):
        y = fastbert.bias_gelu(x, b)
    gx, gb = torch.autograd.grad((y * y).sum(), (x, b), create_graph=True)
    with pytest.raises(RuntimeError, match="bias_gelu: double backward"):
        torch.autograd.grad(gx.sum(), x)
    with pytest.raises(RuntimeError, match="bias_gelu: double backward"):
        (gx.sum() + gb.sum()).backward()
    # the reference backend (eager) does differentiate twice
    with use_backend("reference"):
        y = fastbert.bias_gelu(x, b)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.autograd.grad(gx.sum(), x)[0].abs().sum() > 0
