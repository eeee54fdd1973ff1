"""masked_softmax on NaN / inf, float64 masks, mask gradients, double backward (issue 18 fuzz
findings), on every backend; the rest of its tests are in tests/test_masked_softmax.py."""

import pytest
import torch

import fastbert
from fastbert import philox, reference
from fastbert.ops.masked_softmax import canonical_mask
from tests.utils import backend_params, use_backend

KERNEL_BACKENDS = [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "reference"]


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_nan_score_or_scale_propagates_as_eager(backend):
    """A NaN score (or a NaN scale) makes its row NaN, as eager softmax does; the cpu kernel's vector
    max ignored NaN and its exp mapped NaN to 0, giving finite probabilities. A bool mask excludes a
    key whatever its score (masked_fill), so a NaN score at an excluded key stays hidden."""
    shape = (2, 2, 3, 7)
    scores = torch.randn(shape)
    scores[0, 1, 2, 3] = float("nan")
    scores[1, 0, 0, 6] = float("inf")  # +inf: inf - inf in eager's softmax, a NaN row too
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 0] = False
    scores[1, 1, 1, 0] = float("nan")  # at an excluded key: no effect
    for m in (None, mask):
        with use_backend(backend):
            got = fastbert.masked_softmax(scores, m, scale=0.5)
        want = reference.masked_softmax(scores.double(), canonical_mask(scores, m), 0.5)
        eager_x = scores * 0.5 if m is None else (scores * 0.5).masked_fill(~m[:, None, None, :], float("-inf"))
        assert torch.equal(torch.softmax(eager_x, -1).isnan(), want.isnan())
        assert torch.equal(got.isnan(), want.isnan()), f"{backend}: NaN at {got.isnan().nonzero().tolist()}"
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-6, atol=1e-7)
    with use_backend(backend):
        got = fastbert.masked_softmax(scores.nan_to_num(), None, scale=float("nan"))
    assert got.isnan().all(), f"{backend}: a NaN scale gave finite probabilities"
    with use_backend(backend):  # and with a fully excluding bool mask, zeros (masked_fill), not NaN
        got = fastbert.masked_softmax(scores.nan_to_num(), torch.zeros(2, 7, dtype=torch.bool), scale=float("nan"))
    assert (got == 0).all()


@pytest.mark.parametrize(
    "backend",
    ["cpu:" + isa for isa in fastbert._ext.C.cpu_isas_supported()] if fastbert._ext.C is not None else [],
)
def test_nan_score_propagates_float64(backend):
    scores = torch.randn(2, 2, 3, 7, dtype=torch.float64)
    scores[0, 0, 1, 2] = float("nan")
    with use_backend(backend):
        got = fastbert.masked_softmax(scores)
    assert torch.equal(got.isnan(), torch.softmax(scores, -1).isnan())


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if getattr(p, "values", [p])[0] != "triton"])
def test_float64_finfo_min_mask_gives_eager_uniform_row(backend):
    """An fp64 ``finfo(float64).min`` additive mask on fp32 scores: a row whose every key carries it is
    uniform (eager's fp64 sum, and the module docstring), not zeros (the value used to become -inf in
    fp32). The triton backend does not take fp64 masks."""
    scores = torch.randn(2, 2, 3, 7)
    keep = torch.rand(2, 7) > 0.3
    keep[1] = False
    big = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    mask = torch.where(keep, torch.zeros((), dtype=torch.float64), big)[:, None, None, :]
    with use_backend(backend):
        got = fastbert.masked_softmax(scores, mask, scale=0.5)
    want = torch.softmax(scores.double() * 0.5 + mask, -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], torch.full_like(got[1], 1 / 7))
    # -inf stays -inf: a fully -inf row still gives zeros
    with use_backend(backend):
        got = fastbert.masked_softmax(scores, torch.where(keep, 0.0, float("-inf")).double()[:, None, None, :])
    assert (got[1] == 0).all()


@pytest.mark.usefixtures("seed")
@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7), (2, 1, 3, 7), (1, 1, 3, 7)], ids=str)
def test_additive_mask_gradient(backend, mask_shape):
    """A float mask that requires grad gets eager's gradient (it used to get none, silently)."""
    scores = torch.randn(2, 2, 3, 7)
    mask = torch.randn(mask_shape)
    mask[0, ..., 1] = float("-inf")
    dy = torch.randn(2, 2, 3, 7)
    s, m = scores.clone().requires_grad_(), mask.clone().requires_grad_()
    with use_backend(backend):
        fastbert.masked_softmax(s, m, scale=0.7).backward(dy)
    s64, m64 = scores.double().requires_grad_(), mask.double().requires_grad_()
    torch.softmax(s64 * 0.7 + m64, -1).backward(dy.double())
    assert m.grad is not None and m.grad.shape == mask.shape
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    # only the mask requires grad: it still gets its gradient
    m2 = mask.clone().requires_grad_()
    with use_backend(backend):
        fastbert.masked_softmax(scores, m2, scale=0.7).backward(dy)
    torch.testing.assert_close(m2.grad, m.grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    """Differentiating the gradient (create_graph=True) raises instead of giving a silent zero."""
    x = torch.randn(2, 2, 3, 7, requires_grad=True)
    with use_backend(backend):
        y = fastbert.masked_softmax(x, None, scale=0.5)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="masked_softmax: double backward"):
        torch.autograd.grad((g * g).sum(), x)
    with use_backend(backend):  # a first-order gradient with create_graph=True is still fine
        (g1,) = torch.autograd.grad(fastbert.masked_softmax(x, None, scale=0.5).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(g1, g)


@pytest.mark.parametrize("backend", backend_params("cpu") + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_zeroes_dropped_nan(backend, dtype):
    """A dropped element is 0 even where its value is NaN (a select, as torch.where; not a multiply
    by 0): a NaN row's dropped probabilities and a NaN incoming gradient at a dropped key."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels take fp32/fp16/bf16")
    torch.manual_seed(1)
    s = torch.randn(1, 1, 1, 8, dtype=dtype)
    torch.manual_seed(5)
    seed = philox.draw_seed("cpu")
    dropped = ~philox.keep_mask(int(seed), s.shape, 0.5)
    assert dropped.reshape(-1).nonzero().reshape(-1).tolist() == [3, 6]
    dy = torch.ones_like(s).index_fill(-1, torch.tensor([3]), float("nan"))  # NaN at a dropped key
    x = s.clone().requires_grad_()
    with use_backend(backend):
        torch.manual_seed(5)
        (y := fastbert.masked_softmax(x, None, scale=1.0, dropout_p=0.5, training=True)).backward(dy)
    x64 = s.double().requires_grad_()
    reference.masked_softmax(x64, None, 1.0, 0.5, seed).backward(dy.double())
    assert (y[dropped] == 0).all()
    assert torch.isfinite(x.grad).all(), x.grad
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    with use_backend(backend):  # a NaN row: NaN where kept, 0 where dropped
        torch.manual_seed(5)
        y = fastbert.masked_softmax(s.index_fill(-1, torch.tensor([1]), float("nan")), None, dropout_p=0.5)
    assert (y[dropped] == 0).all() and y[~dropped].isnan().all(), y


@pytest.mark.parametrize("backend", backend_params("cpu") + ["reference"])
def test_huge_max_score_is_finite(backend):
    """A row max of 1e30: eager gives [1, 0]; the exp's offset must not overflow (NaN)."""
    with use_backend(backend):
        y = fastbert.masked_softmax(torch.tensor([[[[1e30, 1.0]]]]), None, scale=1.0)
    assert torch.equal(y, torch.tensor([[[[1.0, 0.0]]]])), y
