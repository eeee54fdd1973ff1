"""The comparison of tests/test_properties.py: ``check`` runs an op fused, exactly (float64 reference)
and eagerly, forward and backward, and ``assert_matches`` judges each output (see that module's
docstring for the rules)."""

import math

import torch
import torch.nn.functional as F

from fastbert import philox, reference
from fastbert.ops.masked_softmax import canonical_mask
from tests.utils import TOLERANCES, assert_close, max_err, use_backend


def _at(mask, *tensors):
    idx = mask.nonzero()[:4]
    return f"at {idx.tolist()}: " + ", ".join(str(t[tuple(idx.t())].tolist()) for t in tensors)


def assert_matches(got, ref64, eager, what, nan_ok=None):
    """``got`` against the float64 ``ref64``: NaN exactly where ``ref64`` is NaN; +-inf exactly where
    ``ref64`` is, or rounds to, that infinity in got's dtype; elsewhere finite and within
    ``assert_close``'s bound (2 x ``eager``'s error + atol, on the positions where both are finite).
    Where the reference is not NaN but eager PyTorch in got's dtype is not finite (an intermediate
    overflowed, e.g. fp16 logits in ``F.cross_entropy``), a NaN or infinity passes: as in eager."""
    assert tuple(got.shape) == tuple(ref64.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    eager = eager.to(got.dtype)
    rounded = ref64.to(got.dtype)
    as_eager = ~ref64.isnan() & ~eager.isfinite() & ~got.isfinite()
    # the same non-finite value as eager PyTorch in got's dtype (e.g. inf where the float64
    # reference's wider range cancels to NaN): literally as in eager
    as_eager |= ~got.isfinite() & ((got == eager) | (got.isnan() & eager.isnan()))
    if nan_ok is not None:  # positions where the op's contract documents NaN (see the caller)
        as_eager |= nan_ok & got.isnan()
    nan = (got.isnan() != ref64.isnan()) & ~as_eager
    assert not nan.any(), f"{what}: NaN differs from the reference {_at(nan, got, ref64, eager)} (got, want, eager)"
    inf = ((got.isinf() & (got != rounded)) | (ref64.isinf() & (got != ref64))) & ~as_eager
    assert not inf.any(), (
        f"{what}: infinity differs from the reference {_at(inf, got, ref64, eager)} (got, want, eager)"
    )
    both = ref64.isfinite() & got.isfinite()
    # eager's error is measured where eager is finite; where it overflowed, that same error is its
    # credit (not none at all: one overflowed element would otherwise leave the whole tensor 1 ulp)
    eager = torch.where(eager.isfinite(), eager, rounded)
    if got.dtype == torch.float64:
        # the float64 reference is itself rounded like the result it checks (no wider reference
        # exists), so the measured error holds the reference's rounding as well as the result's:
        # eager float64's error is taken as at least two roundings of the largest value (one eager
        # sample cannot show it: CI drew a cpu float64 dq 3x a lucky eager's 2.7e-15 at scale 10)
        scale = max(1.0, ref64[both].abs().max().item()) if both.any() else 1.0
        floor = 2 * TOLERANCES[torch.float64].atol * scale
        if max_err(eager[both], ref64[both]) < floor:
            eager = torch.where(both, ref64 + floor, eager)
    assert_close(got[both], ref64[both], eager[both], what)


def _leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append((t.detach().to(dtype) if dtype else t.detach()).requires_grad_())
    return out


def _backward(fn, inputs, dy, dtype=None):
    """``fn(*leaves)`` and the leaves' gradients for the incoming gradient ``dy``."""
    leaves = _leaves(inputs, dtype)
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad if t is not None and t.is_floating_point() else None for t in leaves]


def _farther(a, b, want):
    """Per output, of two eager results the one farther from ``want`` (its error sets the bound)."""
    return [x if y is None or max_err(x, w) >= max_err(y, w) else y for x, y, w in zip(a, b, want)]


def check(backend, what, names, inputs, dy, fused, exact, eager, reorder=True, nan_ok=None):
    """Run ``fused`` on ``backend``, ``exact`` in float64 and ``eager(inputs, dy)`` in the inputs'
    dtypes, each forward and backward (``dy``), and compare every output and gradient (``names``).

    float64 inputs: eager PyTorch in float64 is the reference itself, so its error would be 0 by
    construction; its error is then that of the same maths in another summation order
    (``eager(..., flip=True)``: a reduced dimension reversed; as tests/test_varlen_attention.py's
    ``eager_error_base``), where ``reorder`` (no dropout, whose mask does not reverse)."""
    with use_backend(backend):
        got = _backward(fused, inputs, dy)
    want = _backward(exact, inputs, dy, torch.float64)
    base = eager(inputs, dy)
    if reorder and inputs[0].dtype == torch.float64:
        base = _farther(base, eager(inputs, dy, flip=True), want)
    for name, g, w, e, t in zip(names, got, want, base, [None] + list(inputs)):
        if w is None:
            continue
        if g is None and t is not None and t.numel() == 0:
            g = torch.zeros_like(t)
        assert g is not None, f"{what} {name}: no gradient"
        want_dtype = (t if t is not None else inputs[0]).dtype
        assert g.dtype == want_dtype, f"{what} {name}: dtype {g.dtype}, expected {want_dtype}"
        assert_matches(g, w, e, f"{what} {name}", (nan_ok or {}).get(name))
    return got


def assert_same(got, want, what):
    """Exact equality (a copy), NaN included."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _flip(t, dims):
    return t if t is None or not dims else t.flip(dims)


def _lead(t):
    return tuple(range(t.dim() - 1))


def _mask64(scores, mask):
    m = canonical_mask(scores, mask)
    return m.double() if m is not None and m.dtype != torch.bool else m


class _Gelu64(torch.autograd.Function):
    """GELU in float64 (``reference.bias_gelu``'s values) with an accurate derivative: torch's GELU
    backward forms ``0.5 (1 + erf(z / sqrt 2))`` (or ``1 + tanh``), which cancels to nothing below
    z ~ -8 (a 1% error at z = -10, where the fused kernels are right), and its tanh form overflows
    z^3 for |z| > ~1e102 (a NaN gradient). Here: ``0.5 erfc(-z / sqrt 2) + z phi(z)``, or with
    ``s = sigmoid(2u)`` (= ``0.5 (1 + tanh u)``) ``s + 2 z s (1 - s) u'``; 1 or 0 for |z| >= 1e3;
    torch's (NaN) at +-inf and NaN."""

    @staticmethod
    def forward(ctx, z, approximate):
        ctx.save_for_backward(z)
        ctx.approximate = approximate
        return reference.bias_gelu(z, None, approximate)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        zc = z.clamp(-1e3, 1e3).nan_to_num(0.0)
        if ctx.approximate == "tanh":
            c, k = math.sqrt(2 / math.pi), 0.044715
            sg = torch.sigmoid(2 * c * (zc + k * zc**3))
            d = sg + 2 * zc * sg * (1 - sg) * c * (1 + 3 * k * zc * zc)
        else:
            d = 0.5 * torch.special.erfc(-zc / math.sqrt(2)) + zc * torch.exp(-zc * zc / 2) / math.sqrt(2 * math.pi)
        d = torch.where(z >= 1e3, 1.0, torch.where(z <= -1e3, 0.0, d))
        d = torch.where(z.isfinite(), d, float("nan"))
        return grad * d, None


def _gelu64(x, b, approximate):
    return _Gelu64.apply(x + b if b is not None else x, approximate)


# ------------------------------------------------- the ops' eager and float64 sides (test_properties)


def _drawn_seed(seed_value):
    torch.manual_seed(seed_value)
    return philox.draw_seed("cpu")


def _eager_layernorm_residual(eps, p, seed_t):
    """test_layernorm_residual's ``eager(inputs, dy, flip=False)`` (``flip``: the normalised
    dimension reversed)."""

    def eager(inputs, dy, flip=False):
        def f(x, r, w, b, xb):
            h = x + xb if xb is not None else x
            if p > 0:
                keep = philox.keep_mask(int(seed_t), h.shape, p)
                h = torch.where(keep, h * philox.scale(p), torch.zeros((), dtype=h.dtype))
            s = h + r
            return F.layer_norm(s, s.shape[-1:], w.to(s.dtype), b.to(s.dtype), eps)

        dims = (-1,) if flip else ()  # the normalised dimension reversed
        return [_flip(t, dims) for t in _backward(f, [_flip(t, dims) for t in inputs], _flip(dy, dims))]

    return eager


def _eager_masked_softmax(scores, mask, scale, p, seed_t):
    """test_masked_softmax's ``eager(inputs, dy, flip=False)``."""

    def eager(inputs, dy, flip=False):
        """Eager PyTorch (a float mask promotes as in ``scores * scale + mask``), its fully masked
        rows' NaN set to 0 to measure its own error where it is defined (``flip``: keys reversed)."""
        dims = (-1,) if flip else ()

        def f(x):
            h = x * scale
            m = _flip(canonical_mask(scores, mask), dims)
            if m is not None:
                h = h.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else h + m
            y = F.softmax(h, -1)
            if p > 0:
                keep = philox.keep_mask(int(seed_t), y.shape, p)
                y = torch.where(keep, y * philox.scale(p), torch.zeros((), dtype=y.dtype))
            return y.to(x.dtype)

        outs = _backward(f, [_flip(t, dims) for t in inputs], _flip(dy, dims))
        return [_flip(t, dims).nan_to_num(0.0, posinf=math.inf, neginf=-math.inf) for t in outs]

    return eager


def _masked_softmax_nan_ok(scores, mask, shape, dy, p, seed_t):
    """test_masked_softmax's ``nan_ok``. The documented exception (fastbert/ops/masked_softmax.py):
    the backward does not read the mask, so a bool-masked key's gradient is p (g - sum p g) =
    0 * (non-finite) = NaN where the row's incoming gradient is not finite (eager's masked_fill gives
    0 there)."""
    nan_ok = None
    m = canonical_mask(scores, mask)
    if m is not None and m.dtype == torch.bool:
        g = dy.double()
        if p > 0:
            g = torch.where(philox.keep_mask(int(seed_t), g.shape, p), g, torch.zeros((), dtype=g.dtype))
        nan_ok = {"dscores": ~m.expand(shape) & ~g.isfinite().all(-1, keepdim=True)}
    return nan_ok


def _exact_linear_cross_entropy(targets, reduction):
    """test_linear_cross_entropy's ``exact(rows, weight, bias)``."""

    def exact(r, w, b):
        """The reference, an ignored row's logits masked out: its gradient is 0 by contract (eager's
        log-softmax backward would spread a NaN/inf logit of an ignored row into it)."""
        logits = r @ w.t() + (b if b is not None else 0)
        logits = torch.where((targets != -100)[:, None], logits, torch.zeros((), dtype=logits.dtype))
        if reduction == "mean":  # as reference.linear_cross_entropy: a mean over no valid target is 0
            n = (targets != -100).sum().clamp(min=1)
            return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / n
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)

    return exact


def _eager_linear_cross_entropy(targets, v, reduction):
    """test_linear_cross_entropy's ``eager(inputs, dy, flip=False)`` (``v``: the vocabulary size)."""

    def eager(inputs, dy, flip=False):
        def f(r, w, b):
            return reference.linear_cross_entropy(
                r, w.to(r.dtype), b.to(r.dtype) if b is not None else None, targets, -100, reduction
            )

        def g(r, w, b):  # the hidden dimension and the vocabulary reversed (every sum's order)
            t = torch.where(targets == -100, -100, v - 1 - targets)
            return reference.linear_cross_entropy(
                r.flip(-1),
                w.to(r.dtype).flip(0, 1),
                b.to(r.dtype).flip(0) if b is not None else None,
                t,
                -100,
                reduction,
            )

        return _backward(g if flip else f, inputs, dy)

    return eager
