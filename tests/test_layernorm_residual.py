"""bias + dropout + residual + LayerNorm on every backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import philox, reference
from tests.utils import DTYPES, assert_close, backend_params, device_backend_params, requires_c, use_backend

SHAPES = [(3, 1), (5, 7), (4, 1000), (2, 768), (2, 1024), (1, 4099), (2, 3, 768), (0, 8), (300, 40)]
GRADS = ("y", "dx", "dresidual", "dweight", "dbias", "dx_bias")


def make_inputs(shape, dtype, device, x_bias=True, param_dtype=None):
    n = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype)
    r = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n, device=device)).to(param_dtype or dtype)
    b = (0.5 * torch.randn(n, device=device)).to(param_dtype or dtype)
    xb = (0.5 * torch.randn(n, device=device)).to(param_dtype or dtype) if x_bias else None
    return x, r, w, b, xb


def _leaves(tensors, dtype=None):
    return [None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_() for t in tensors]


def _grads(y, dy, x, r, w, b, xb):
    y.backward(dy)
    return (y.detach(), x.grad, r.grad, w.grad, b.grad, None if xb is None else xb.grad)


def run(backend, inputs, dy, p, seed_value):
    """The public op on ``backend`` (training, dropout p) with torch's generator at ``seed_value``."""
    x, r, w, b, xb = _leaves(inputs)
    torch.manual_seed(seed_value)
    with use_backend(backend):
        y = fastbert.layernorm_residual(x, r, w, b, xb, eps=1e-12, dropout_p=p, training=p > 0)
    return _grads(y, dy, x, r, w, b, xb)


def drawn_seed(seed_value, device):
    torch.manual_seed(seed_value)
    return philox.draw_seed(device)


def exact(inputs, dy, p, seed):
    x, r, w, b, xb = _leaves(inputs, torch.float64)
    y = reference.layernorm_residual(x, r, w, b, 1e-12, xb, p, seed if p > 0 else None)
    return _grads(y, dy.double(), x, r, w, b, xb)


def eager(inputs, dy, p, seed):
    """Eager PyTorch in the inputs' dtypes, dropping the same elements (to measure its own error)."""
    x, r, w, b, xb = _leaves(inputs)
    h = x + xb if xb is not None else x
    if p > 0:
        keep = philox.keep_mask(int(seed), h.shape, p, h.device)
        h = torch.where(keep, h * philox.scale(p), torch.zeros((), dtype=h.dtype, device=h.device))
    y = F.layer_norm(h + r, h.shape[-1:], w.to(x.dtype), b.to(x.dtype), 1e-12)
    return _grads(y, dy, x, r, w, b, xb)


def check(backend, inputs, p=0.0):
    x = inputs[0]
    dy = torch.randn_like(x)
    seed_value = torch.randint(0, 2**31, ()).item()
    seed = drawn_seed(seed_value, x.device)
    got = run(backend, inputs, dy, p, seed_value)
    want, base = exact(inputs, dy, p, seed), eager(inputs, dy, p, seed)
    for name, g, w_, e in zip(GRADS, got, want, base):
        if w_ is None:
            assert g is None, name
            continue
        assert_close(g, w_, e.to(g.dtype), f"{backend} {name} {tuple(x.shape)} {x.dtype} p={p}")


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("x_bias", [True, False], ids=["xbias", "noxbias"])
def test_matches_reference(device, backend, dtype, shape, x_bias):
    check(backend, make_inputs(shape, dtype, device, x_bias))


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("backend", [b for b in backend_params("cpu") if "cpu" in str(b)])
@pytest.mark.parametrize("shape", [(2731, 769), (2048, 1024)], ids=str)  # rows unaligned / aligned
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_streamed_outputs_match_reference(backend, shape, p):
    """fp32 outputs of 8 MiB or more are written with streaming stores (whole, aligned vectors; the
    rest with plain stores): y, dresidual and dx are still exact."""
    check(backend, make_inputs(shape, torch.float32, "cpu"), p=p)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (4, 1000), (2, 768), (3, 100)], ids=str)
def test_dropout_matches_reference(device, backend, dtype, shape):
    """With dropout the kernels drop exactly the reference's elements (the shared Philox stream)."""
    check(backend, make_inputs(shape, dtype, device), p=0.25)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_params_with_low_precision_x(device, backend, dtype):
    inputs = make_inputs((6, 200), dtype, device, param_dtype=torch.float32)
    got = run(backend, inputs, torch.randn(6, 200, device=device, dtype=dtype), 0.0, 1)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[3].dtype == got[4].dtype == got[5].dtype == torch.float32


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params(kernels_only=True))
def test_non_contiguous_and_large_mean(device, backend):
    """Strided inputs, and a common offset of 1000 that the kernels' statistics must not lose (the
    reference backend, plain fp32 PyTorch, has eager's own error here and is not the subject)."""
    base = torch.randn(40, 64, device=device)
    x = base.t()[:, ::2]  # [64, 20], strided
    r = (1000 + torch.randn(20, 64, device=device)).t()  # large common offset
    w, b, xb = torch.randn(20, device=device), torch.randn(20, device=device), torch.randn(40, device=device)[::2]
    assert not x.is_contiguous() and not r.is_contiguous() and not xb.is_contiguous()
    check(backend, (x, r, w, b, xb))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, backend, p):
    """Kept fraction ~ 1 - p; kept positions scaled by 1/(1-p) in dx; dropped ones exactly zero."""
    shape = (64, 768) if backend != "triton" or device == "cuda" else (8, 768)
    x, r, w, b, _ = make_inputs(shape, torch.float32, device, x_bias=False)
    dy = torch.randn(shape, device=device)
    got = run(backend, (x, r, w, b, None), dy, p, 7)
    dx, dres = got[1], got[2]
    kept = dx != 0
    n = kept.numel()
    frac = kept.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    torch.testing.assert_close(dx[kept], dres[kept] * philox.scale(p), rtol=1e-6, atol=0)
    want = philox.keep_mask(int(drawn_seed(7, device)), shape, p, device)
    assert torch.equal(kept, want & (dres != 0))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_dropout_seeds(device, backend):
    """The same torch seed gives the same output; different seeds differ; eval mode is deterministic."""
    x, r, w, b, xb = make_inputs((4, 256), torch.float32, device)

    def out(seed, training=True):
        torch.manual_seed(seed)
        with use_backend(backend):
            return fastbert.layernorm_residual(x, r, w, b, x_bias=xb, dropout_p=0.2, training=training)

    assert torch.equal(out(1), out(1))
    assert not torch.equal(out(1), out(2))
    assert torch.equal(out(1, training=False), out(2, training=False))
    with use_backend(backend):
        plain = fastbert.layernorm_residual(x, r, w, b, x_bias=xb, training=False)
    torch.testing.assert_close(out(3, training=False), plain, rtol=0, atol=0)


@requires_c
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64_cpu(seed, p):
    x, r, w, b, xb = (t.double().requires_grad_() for t in make_inputs((4, 9), torch.float32, "cpu"))
    s = torch.tensor([123456789]) if p > 0 else None

    def f(x, r, w, b, xb):
        return torch.ops.fastbert.layernorm_residual_fwd(x, r, w, b, 1e-5, xb, p, s)[0]

    assert torch.autograd.gradcheck(f, (x, r, w, b, xb))


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(seed, dtype, p):
    x, r, w, b, xb = (t.requires_grad_() for t in make_inputs((5, 33), dtype, "cpu"))
    s = torch.tensor([42])
    for args in ((x, r, w, b, 1e-12, xb, p, s), (x, r, w, b, 1e-5, None, p, None)):
        torch.library.opcheck(torch.ops.fastbert.layernorm_residual_fwd.default, args)
    _, mean, rstd = torch.ops.fastbert.layernorm_residual_fwd(x, r, w, b, 1e-12, xb, p, s)
    dy = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.fastbert.layernorm_residual_bwd.default,
        (dy, x.detach(), r.detach(), w.detach(), xb.detach(), mean, rstd, p, s),
    )


@requires_c
@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(seed, training):
    m = fastbert.nn.FusedLayerNormResidual(64, p=0.1).train(training)

    def f(x, r, xb):
        return m(x, r, xb) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, r, xb = torch.randn(6, 64, requires_grad=True), torch.randn(6, 64), torch.randn(64, requires_grad=True)
    torch.manual_seed(5)
    y = compiled(x, r, xb)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and xb.grad.shape == (64,)
    torch.manual_seed(5)
    torch.testing.assert_close(y, f(x, r, xb))


@requires_c
def test_column_sums_deterministic_across_threads(seed):
    x, r, w, b, xb = make_inputs((1000, 300), torch.float32, "cpu")
    y, mean, rstd = torch.ops.fastbert.layernorm_residual_fwd(x, r, w, b, 1e-12, xb, 0.1, torch.tensor([9]))
    dy = torch.randn_like(x)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            outs.append(torch.ops.fastbert.layernorm_residual_bwd(dy, x, r, w, xb, mean, rstd, 0.1, torch.tensor([9])))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))


# ---- bad input -------------------------------------------------------------------------------


def _ok():
    return [torch.randn(4, 8), torch.randn(4, 8), torch.ones(8), torch.zeros(8)]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "change,kwargs,match",
    [
        ({1: torch.randn(4, 7)}, {}, "residual has shape"),
        ({1: torch.randn(4, 8).double()}, {}, "residual dtype"),
        ({2: torch.ones(7)}, {}, "weight must have shape \\[8\\]"),
        ({3: torch.zeros(2, 8)}, {}, "bias must have shape"),
        ({3: torch.zeros(8).double()}, {}, "bias dtype"),
        ({0: torch.randint(0, 3, (4, 8))}, {}, "x must be float32"),
        ({2: torch.ones(8, device="meta")}, {}, "weight is on meta"),
        ({1: torch.randn(4, 8, device="meta")}, {}, "residual is on meta"),
        ({}, {"x_bias": torch.zeros(9)}, "x_bias must have shape"),
        ({}, {"dropout_p": 1.0}, "dropout_p must be in \\[0, 1\\)"),
        ({}, {"dropout_p": -0.1}, "dropout_p must be in"),
        ({}, {"eps": 0.0}, "eps must be a positive number"),
        ({}, {"eps": -1e-5}, "eps must be a positive number"),
    ],
)
def test_bad_input(backend, change, kwargs, match):
    args = _ok()
    for i, t in change.items():
        args[i] = t
    with fastbert.backend(backend), pytest.raises(ValueError, match=match):
        fastbert.layernorm_residual(*args, **kwargs)


@requires_c
def test_bad_input_direct_op():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape \\[8\\]"):
        torch.ops.fastbert.layernorm_residual_fwd(x, x, torch.ones(7), torch.zeros(7), 1e-5, None, 0.0, None)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        torch.ops.fastbert.layernorm_residual_fwd(x, x, torch.ones(8), torch.zeros(8), 0.0, None, 0.0, None)
    with pytest.raises(ValueError, match="seed must be an int64 tensor with one element"):
        torch.ops.fastbert.layernorm_residual_fwd(
            x, x, torch.ones(8), torch.zeros(8), 1e-5, None, 0.1, torch.tensor([1.0])
        )


# ---- module ----------------------------------------------------------------------------------


def test_module_matches_layernorm_and_loads_its_state_dict(seed):
    ln = torch.nn.LayerNorm(48, eps=1e-12)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    m = fastbert.nn.FusedLayerNormResidual(48, eps=1e-12, p=0.1)
    assert set(m.state_dict()) == set(ln.state_dict())
    m.load_state_dict(ln.state_dict())
    x, r = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    m.eval()
    torch.testing.assert_close(m(x, r), ln(x + r), rtol=1e-5, atol=1e-5)
    m.train()
    assert not torch.allclose(m(x, r), ln(x + r))
    assert "p=0.1" in repr(m)
    with pytest.raises(ValueError, match="p must be in"):
        fastbert.nn.FusedLayerNormResidual(8, p=1.5)


@pytest.mark.skipif(not fastbert.triton.available, reason="needs triton")
@pytest.mark.parametrize("sms", [108, 132], ids=["A100", "H100"])
def test_triton_backward_grid_is_one_wave(sms):
    """The Triton backward's row blocks fit one resident wave of programs (64K registers and 2048
    threads per SM: 2 programs of 4 warps, 1 of 8, at up to 255 registers a thread), for BERT's and
    odd shapes, single and multiple column blocks; the old fixed 256 made two waves on an A100."""
    from fastbert.triton import layernorm_residual as ln

    for n in (768, 1024, 1000, 4096, 32768):
        bm, bn, num_warps, _ = ln.bwd_config(n, True)
        wave = ln.wave_programs(sms, 65536, 2048, num_warps)
        assert wave == sms * 8 // num_warps
        col_blocks = -(-n // bn)
        max_blocks = max(1, wave // col_blocks)
        for rows in (1, 217, 4096, 16384, 512 * 128 + 3):
            per = ln.rows_per_program(rows, bm, max_blocks)
            assert per % bm == 0 and per * max_blocks >= rows
            assert -(-rows // per) * col_blocks <= max(wave, col_blocks)
    # without a device (the interpreter here) the launcher keeps the fixed bound
    assert ln.max_row_blocks(torch.device("cpu"), 4, 1) == ln._MAX_ROW_BLOCKS


# ---- eps validation, double backward (issue 18 fuzz findings) -----------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "eps,error,match",
    [
        (True, TypeError, "eps must be a number \\(int or float, not bool\\)"),
        (float("inf"), ValueError, "eps must be a positive number"),
        (float("nan"), ValueError, "eps must be a positive number"),
        (1e39, ValueError, "eps must be a positive number"),
        ("1e-5", TypeError, "eps must be a number"),
    ],
)
def test_bad_eps(backend, eps, error, match):
    """eps=True used to run as 1 and eps=inf returned bias: both are rejected, naming eps."""
    with fastbert.backend(backend), pytest.raises(error, match=match):
        fastbert.layernorm_residual(*_ok(), eps=eps)


@requires_c
def test_bad_eps_direct_op():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        torch.ops.fastbert.layernorm_residual_fwd(x, x, torch.ones(8), torch.zeros(8), float("inf"), None, 0.0, None)


@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "reference"])
def test_double_backward_raises(backend):
    """Second derivatives through the fused backward raise instead of being silently zero."""
    x, r, w, b, xb = _leaves(make_inputs((5, 7), torch.float32, "cpu"))
    with use_backend(backend):
        y = fastbert.layernorm_residual(x, r, w, b, xb, eps=1e-5)
    gx, gw = torch.autograd.grad((y * y).sum(), (x, w), create_graph=True)
    with pytest.raises(RuntimeError, match="layernorm_residual: double backward"):
        torch.autograd.grad((gx * gx).sum() + gw.sum(), w)


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "reference"])
@pytest.mark.parametrize("shape", [(5, 7), (1, 4099)], ids=str)
def test_huge_values_match_float64_reference(backend, shape):
    """Rows holding huge finite values: one -1e30 element (triton gave outputs of 1e32: d^2 overflowed
    fp32), one 3e38 and alternating +-3e38 (inf outputs, NaN gradients). Eager's fp32 layer_norm
    overflows to NaN there; the kernels match the float64 reference (the looped triton path too)."""
    x, r, w, b, xb = make_inputs(shape, torch.float32, "cpu")
    r = torch.zeros_like(r)
    x[0, 3] = -1e30
    if shape[0] > 2:
        x[1, 5] = 3e38
        x[2, :4] = torch.tensor([3e38, -3e38, 3e38, -3e38])
    else:
        x[0, 100:104] = torch.tensor([3e38, -3e38, 3e38, -3e38])
    xb = None
    dy = torch.randn(shape)
    got = run(backend, (x, r, w, b, xb), dy, 0.0, 0)
    want = exact((x, r, w, b, xb), dy, 0.0, None)
    for name, g, e in zip(("y", "dx", "dresidual", "dweight", "dbias"), got, want):
        assert torch.isfinite(g).all(), f"{backend} {name}: non-finite at {(~torch.isfinite(g)).nonzero().tolist()}"
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=f"{backend} {name}")


LN_BACKENDS = backend_params("cpu") + ["reference"]


def _skip_triton_f64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels take fp32/fp16/bf16")


@pytest.mark.parametrize("backend", LN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_zeroes_dropped_nan(backend, dtype):
    """A dropped element is 0 even where x is NaN (a select, as torch.where; not a multiply by 0):
    NaN only at dropped positions leaves y, dx, dresidual and the parameter gradients finite."""
    _skip_triton_f64(backend, dtype)
    inputs = list(make_inputs((2, 8), dtype, "cpu"))
    seed = drawn_seed(5, "cpu")
    dropped = ~philox.keep_mask(int(seed), (2, 8), 0.5)
    assert dropped.any() and not dropped.all()
    inputs[0] = inputs[0].masked_fill(dropped, float("nan"))
    dy = torch.randn(2, 8, dtype=dtype)
    got = run(backend, inputs, dy, 0.5, 5)
    want = exact(inputs, dy, 0.5, seed)
    for name, g, w in zip(GRADS, got, want):
        assert torch.isfinite(g).all(), f"{name}: {g}"
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", LN_BACKENDS)
def test_constant_row_tiny_eps_gives_bias(backend):
    """A constant row (variance exactly 0) with eps=1e-12 in fp32: s - mean is exactly 0, so y = bias
    (a rounded fp32 mean times rstd = 1e6 gave -0.00745)."""
    x = torch.full((1, 7), 0.1)
    with use_backend(backend):
        y = fastbert.layernorm_residual(x, torch.zeros_like(x), torch.ones(7), torch.zeros(7), eps=1e-12)
    assert (y == 0).all(), y


@pytest.mark.parametrize("backend", LN_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_inf_weight_backward_is_nan_as_eager(backend, p):
    """An infinite weight makes g = dy * w infinite: LayerNorm's backward (eager, the reference) gives
    a row of NaN (inf - inf), not -inf at some positions; dx_bias is NaN where kept, 0 where dropped
    (padding rows of a kernel tile add nothing)."""
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    w = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    inputs = (x, torch.zeros_like(x), w, torch.zeros(4), torch.zeros(4))
    dy = torch.tensor([[1.0, 0.5, -1.0, 2.0]])
    seed = drawn_seed(3, "cpu")
    xs, r, ws, b, xb = _leaves(inputs)
    torch.manual_seed(3)
    with use_backend(backend):
        y = fastbert.layernorm_residual(xs, r, ws, b, xb, eps=0.1, dropout_p=p, training=p > 0)
    y.backward(dy)
    x64, r64, w64, b64, xb64 = _leaves(inputs, torch.float64)
    reference.layernorm_residual(x64, r64, w64, b64, 0.1, xb64, p, seed if p > 0 else None).backward(dy.double())
    assert r.grad.isnan().all(), r.grad
    for name, g, want in (("dx", xs.grad, x64.grad), ("dx_bias", xb.grad, xb64.grad)):
        assert torch.equal(g.isnan(), want.isnan()), f"{name}: {g} want {want}"
        assert (g[~want.isnan()] == 0).all(), f"{name}: {g} want {want}"
    assert xs.grad.isnan().all() if p == 0 else not xs.grad.isnan().all()
