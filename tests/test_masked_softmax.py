"""Attention softmax (scale + mask + dropout) on every backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import philox, reference
from fastbert.ops.masked_softmax import canonical_mask
from tests.utils import DTYPES, assert_close, backend_params, device_backend_params, requires_c, use_backend

# [batch, heads, queries, keys]: odd key lengths, BERT's 128 and 512, one-key rows, empty tensors
SHAPES = [
    (2, 3, 4, 1),
    (2, 2, 3, 7),
    (2, 3, 5, 77),
    (2, 2, 4, 128),
    (1, 2, 3, 513),
    (3, 1, 1, 64),
    (0, 2, 3, 8),
    (2, 2, 3, 0),
]
LONG = [(1, 1, 2, 4096), (1, 1, 1, 16384)]  # rows longer than one block (streaming on GPU)
MASKS = ["none", "bool_keys", "bool_4d", "add_b11k", "add_b1qk", "add_11qk", "min_b11k", "neginf_b1qk"]


def make_mask(form, shape, dtype, device, fully_masked=True):
    """A mask of the given form for scores of ``shape``; with ``fully_masked`` some rows exclude
    every key (zeros expected). ``min_*`` is Hugging Face's ``finfo(dtype).min`` additive mask."""
    b, h, q, k = shape
    if form == "none":
        return None
    keep_keys = torch.rand(b, k, device=device) > 0.3
    if fully_masked and b > 1:
        keep_keys[1] = False
    if form == "bool_keys":
        return keep_keys
    if form == "bool_4d":
        m = torch.rand(b, 1, q, k, device=device) > 0.4
        if fully_masked and q > 1:
            m[:, :, 0] = False
        return m
    if form in ("add_b11k", "add_b1qk", "add_11qk"):
        dims = {"add_b11k": (b, 1, 1, k), "add_b1qk": (b, 1, q, k), "add_11qk": (1, 1, q, k)}[form]
        return (torch.randn(dims, device=device) * 2).to(dtype)
    if form == "min_b11k":
        return torch.where(keep_keys, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    if form == "neginf_b1qk":
        m = torch.where(torch.rand(b, 1, q, k, device=device) > 0.3, 0.0, float("-inf"))
        if fully_masked and q > 1:
            m[:, :, -1] = float("-inf")
        return m.to(dtype)
    raise AssertionError(form)


def drawn_seed(seed_value, device):
    torch.manual_seed(seed_value)
    return philox.draw_seed(device)


def run(backend, scores, mask, scale, p, seed_value, dy):
    x = scores.detach().requires_grad_()
    torch.manual_seed(seed_value)
    with use_backend(backend):
        y = fastbert.masked_softmax(x, mask, scale=scale, dropout_p=p, training=p > 0)
    y.backward(dy)
    return y.detach(), x.grad


def exact(scores, mask, scale, p, seed, dy):
    x = scores.detach().double().requires_grad_()
    m = canonical_mask(scores, mask)
    m = m.double() if m is not None and m.dtype != torch.bool else m
    y = reference.masked_softmax(x, m, scale, p, seed if p > 0 else None)
    y.backward(dy.double())
    return y.detach(), x.grad


def eager(scores, mask, scale, p, seed, dy):
    """Eager PyTorch in the scores' dtype, dropping the same elements, its fully masked rows' NaN
    set to 0 (to measure its own error where it is defined)."""
    x = scores.detach().requires_grad_()
    h = x * scale
    m = canonical_mask(scores, mask)
    if m is not None:
        h = h.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else h + m.to(h.dtype)
    y = F.softmax(h, -1)
    if p > 0:
        keep = philox.keep_mask(int(seed), y.shape, p, y.device)
        y = torch.where(keep, y * philox.scale(p), torch.zeros((), dtype=y.dtype, device=y.device))
    y.backward(dy)
    return y.detach().nan_to_num(0.0), x.grad.nan_to_num(0.0)


def check(backend, scores, mask=None, scale=0.5, p=0.0):
    dy = torch.randn_like(scores)
    seed_value = torch.randint(0, 2**31, ()).item()
    seed = drawn_seed(seed_value, scores.device)
    got = run(backend, scores, mask, scale, p, seed_value, dy)
    want, base = exact(scores, mask, scale, p, seed, dy), eager(scores, mask, scale, p, seed, dy)
    what = f"{backend} {tuple(scores.shape)} {scores.dtype} scale={scale} p={p}"
    for name, g, w, e in zip(("probs", "dscores"), got, want, base):
        assert_close(g, w, e, f"{what} {name}")
    return got


def scores_like(shape, dtype, device, spread=3.0):
    return (torch.randn(shape, device=device) * spread).to(dtype)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, shape):
    scores = scores_like(shape, dtype, device)
    check(backend, scores, make_mask("bool_keys", shape, dtype, device), scale=0.125)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", MASKS)
def test_mask_forms(device, backend, dtype, form):
    shape = (3, 2, 4, 77)
    check(backend, scores_like(shape, dtype, device), make_mask(form, shape, dtype, device))


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0, -0.5])
def test_scales(device, backend, scale):
    shape = (2, 2, 3, 33)
    check(
        backend,
        scores_like(shape, torch.float32, device),
        make_mask("add_b1qk", shape, torch.float32, device),
        scale=scale,
    )


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", LONG, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows(device, backend, shape, dtype):
    check(backend, scores_like(shape, dtype, device, spread=6.0), make_mask("min_b11k", shape, dtype, device))


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if "cpu:" in str(p)])
@pytest.mark.parametrize(
    "shape,dtype,p",
    [
        ((1, 1, 1100, 4099), torch.float32, 0.1),
        ((1, 2, 520, 4096), torch.float32, 0.0),
        ((1, 1, 2100, 4096), torch.bfloat16, 0.0),
    ],
    ids=str,
)
def test_large_outputs_cpu(backend, shape, dtype, p):
    """Outputs over 16 MiB take the CPU kernels' streaming stores (whole aligned vectors only; odd
    rows mix aligned and unaligned starts); with dropout both outputs do."""
    scores = scores_like(shape, dtype, "cpu")
    check(backend, scores, make_mask("add_b1qk", shape, dtype, "cpu"), p=p)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("form", ["bool_keys", "bool_4d", "neginf_b1qk"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fully_masked_rows_are_zero(device, backend, form, p):
    shape = (2, 2, 3, 19)
    scores = scores_like(shape, torch.float32, device)
    mask = make_mask(form, shape, torch.float32, device)
    probs, grad = run(backend, scores, mask, 1.0, p, 3, torch.randn(shape, device=device))
    excluded = (reference.masked_softmax(scores.double(), _as_ref(scores, mask)) == 0).all(-1)
    assert excluded.any()
    assert torch.isfinite(probs).all() and torch.isfinite(grad).all()
    assert (probs[excluded] == 0).all() and (grad[excluded] == 0).all()


def _as_ref(scores, mask):
    m = canonical_mask(scores, mask)
    return m.double() if m is not None and m.dtype != torch.bool else m


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_hf_min_mask_low_precision(device, backend, dtype):
    """Hugging Face's ``(1 - attention_mask) * finfo(dtype).min`` mask on scores that are themselves
    large and negative: no overflow to -inf, no NaN, padded keys get exactly zero weight."""
    shape = (2, 3, 4, 40)
    scores = (torch.randn(shape, device=device) * 4 - 60).to(dtype)
    attention = torch.ones(2, 40, device=device)
    attention[0, 25:] = 0
    mask = ((1.0 - attention) * torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    probs, _ = check(backend, scores, mask, scale=1.0)
    assert torch.isfinite(probs).all()
    assert (probs[0, ..., 25:] == 0).all()
    torch.testing.assert_close(
        probs.double().sum(-1), torch.ones(2, 3, 4, dtype=torch.float64, device=device), rtol=0, atol=2e-2
    )


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 3, 7), (2, 2, 4, 128), (1, 1, 2, 513)], ids=str)
def test_dropout_matches_reference(device, backend, dtype, shape):
    """With dropout the kernels drop exactly the reference's elements (the shared Philox stream),
    and the backward regenerates the same mask."""
    check(backend, scores_like(shape, dtype, device), make_mask("add_b11k", shape, dtype, device), p=0.2)


@pytest.mark.usefixtures("seed", "poison")
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous(device, backend):
    base = torch.randn(2, 5, 3, 41, device=device)
    scores = base.transpose(1, 2)  # [2, 3, 5, 41], strided
    mask = torch.randn(2, 41, 5, device=device).transpose(1, 2)[:, None]  # [2, 1, 5, 41], key stride 5
    assert not scores.is_contiguous() and mask.stride(-1) != 1
    check(backend, scores, mask, p=0.1)
    expanded = torch.randn(1, 1, 1, 41, device=device).expand(2, 3, 5, 41)  # all strides 0 but the keys
    check(backend, scores, expanded)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, backend, p):
    """Kept fraction ~ 1 - p; kept values are the softmax times 1/(1-p); dropped ones exactly zero
    and their gradient too; the dropped positions are the shared stream's."""
    shape = (2, 4, 16, 128) if backend != "triton" or device == "cuda" else (1, 2, 8, 128)
    scores = scores_like(shape, torch.float32, device, spread=1.0)
    probs, grad = run(backend, scores, None, 1.0, p, 11, torch.randn(shape, device=device))
    kept = probs != 0
    frac = kept.float().mean().item()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    want = philox.keep_mask(int(drawn_seed(11, device)), shape, p, device)
    assert torch.equal(kept, want)
    torch.testing.assert_close(probs[kept], F.softmax(scores, -1)[kept] * philox.scale(p), rtol=1e-5, atol=0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_dropout_seeds(device, backend):
    """The same torch seed gives the same output; different seeds differ; eval mode is deterministic."""
    scores = torch.randn(2, 2, 4, 64, device=device)

    def out(seed, training=True):
        torch.manual_seed(seed)
        with use_backend(backend):
            return fastbert.masked_softmax(scores, None, scale=0.5, dropout_p=0.2, training=training)

    assert torch.equal(out(1), out(1))
    assert not torch.equal(out(1), out(2))
    assert torch.equal(out(1, training=False), out(2, training=False))
    with use_backend(backend):
        plain = fastbert.masked_softmax(scores, None, scale=0.5)
    torch.testing.assert_close(out(3, training=False), plain, rtol=0, atol=0)


@requires_c
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("form", ["none", "bool_4d", "add_b1qk"])
def test_gradcheck_float64_cpu(seed, p, form):
    shape = (2, 2, 3, 9)
    scores = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = make_mask(form, shape, torch.float64, "cpu", fully_masked=False)
    s = torch.tensor([123456789]) if p > 0 else None

    def f(x):
        return torch.ops.fastbert.masked_softmax_fwd(x, mask, 0.7, p, s)[0]

    assert torch.autograd.gradcheck(f, (scores,))


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(seed, dtype, p):
    shape = (2, 3, 4, 21)
    scores = torch.randn(shape, dtype=dtype, requires_grad=True)
    s = torch.tensor([42])
    masks = (None, make_mask("bool_4d", shape, dtype, "cpu"), make_mask("add_b11k", shape, dtype, "cpu"))
    for mask in masks:
        torch.library.opcheck(torch.ops.fastbert.masked_softmax_fwd.default, (scores, mask, 0.3, p, s))
    probs, soft = torch.ops.fastbert.masked_softmax_fwd(scores, None, 0.3, p, s)
    saved = soft if p > 0 else probs
    torch.library.opcheck(
        torch.ops.fastbert.masked_softmax_bwd.default, (torch.randn_like(probs), saved.detach(), 0.3, p, s)
    )


@requires_c
@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(seed, training):
    m = fastbert.nn.FusedMaskedSoftmax(scale=0.25, p=0.1).train(training)

    def f(x, mask):
        return m(x, mask) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 24, requires_grad=True)
    mask = torch.rand(2, 24) > 0.2
    torch.manual_seed(5)
    y = compiled(x, mask)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.manual_seed(5)
    torch.testing.assert_close(y, f(x, mask))


@requires_c
def test_deterministic_across_threads(seed):
    scores = torch.randn(4, 4, 32, 300)
    dy = torch.randn_like(scores)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            probs, soft = torch.ops.fastbert.masked_softmax_fwd(scores, None, 0.5, 0.1, torch.tensor([9]))
            outs.append((probs, torch.ops.fastbert.masked_softmax_bwd(dy, soft, 0.5, 0.1, torch.tensor([9]))))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "scores,mask,kwargs,match",
    [
        (torch.randn(3, 4, 5), None, {}, "scores must be 4-D"),
        (torch.randint(0, 3, (2, 2, 3, 4)), None, {}, "scores must be float32"),
        (torch.randn(2, 2, 3, 4), torch.zeros(2, 1, 1, 5), {}, "does not broadcast"),
        (torch.randn(2, 2, 3, 4), torch.zeros(4, 4), {}, "does not broadcast"),
        (torch.randn(2, 2, 3, 4), torch.ones(2, 5, dtype=torch.bool), {}, "key-padding mask must have shape"),
        (torch.randn(2, 2, 3, 4), torch.ones(2, 1, 1, 1, 4), {}, "does not broadcast"),
        (torch.randn(2, 2, 3, 4), torch.zeros(2, 1, 1, 4, dtype=torch.int64), {}, "mask must be bool"),
        (torch.randn(2, 2, 3, 4), torch.zeros(2, 1, 1, 4, device="meta"), {}, "mask is on meta"),
        (torch.randn(2, 2, 3, 4), None, {"dropout_p": 1.0}, "dropout_p must be in \\[0, 1\\)"),
        (torch.randn(2, 2, 3, 4), None, {"dropout_p": -0.1}, "dropout_p must be in"),
        (torch.randn(2, 2, 3, 4), None, {"scale": "big"}, "scale must be a number"),
    ],
)
def test_bad_input(backend, scores, mask, kwargs, match):
    with fastbert.backend(backend), pytest.raises(ValueError, match=match):
        fastbert.masked_softmax(scores, mask, **kwargs)


@requires_c
def test_bad_input_direct_op():
    x = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.fastbert.masked_softmax_fwd(x, torch.zeros(2, 1, 1, 5), 1.0, 0.0, None)
    with pytest.raises(ValueError, match="mask must be bool or a float dtype"):
        torch.ops.fastbert.masked_softmax_fwd(x, torch.zeros(2, 1, 1, 4, dtype=torch.int32), 1.0, 0.0, None)
    with pytest.raises(ValueError, match="seed must be an int64 tensor with one element"):
        torch.ops.fastbert.masked_softmax_fwd(x, None, 1.0, 0.1, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="must match the saved softmax"):
        torch.ops.fastbert.masked_softmax_bwd(x, torch.randn(2, 2, 3, 5), 1.0, 0.0, None)


# ---- module ----------------------------------------------------------------------------------


def test_module(seed):
    m = fastbert.nn.FusedMaskedSoftmax(scale=0.125, p=0.1)
    x, mask = torch.randn(2, 3, 4, 16), torch.rand(2, 16) > 0.3
    m.eval()
    want = F.softmax((x * 0.125).masked_fill(~mask[:, None, None, :], float("-inf")), -1)
    torch.testing.assert_close(m(x, mask), want, rtol=1e-5, atol=1e-6)
    m.train()
    assert (m(x, mask) == 0).sum() > (want == 0).sum()
    assert list(m.state_dict()) == [] and "p=0.1" in repr(m)
    with pytest.raises(ValueError, match="p must be in"):
        fastbert.nn.FusedMaskedSoftmax(p=1.0)
