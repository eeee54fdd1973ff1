"""Hypothesis strategies for tests/test_properties.py: shapes, dtypes, memory layouts and tensor values
(random spreads, constant rows, special values) for fastbert's ops.

A tensor is drawn as a seed (torch's generator fills it) plus a few hypothesis-chosen overrides, so
examples stay cheap to generate at any size and shrink towards fewer, simpler special values.
``FASTBERT_HYPOTHESIS_SPECIALS=0`` draws no special values (0, +-inf, NaN, huge, tiny): for
separating the finite properties from the special-value ones while a kernel is being fixed.
"""

import os

import torch
from hypothesis import strategies as st

from fastbert.ops.gather_masked import LABEL_DTYPES

SPECIALS = os.environ.get("FASTBERT_HYPOTHESIS_SPECIALS", "1") not in ("", "0")
INF, NAN = float("inf"), float("nan")
HALF = (torch.float32, torch.float16, torch.bfloat16)


def dtypes(backend):
    """The dtypes ``backend`` ("cpu:avx2", "triton", "reference") runs: fp64 on cpu and reference."""
    name = backend.partition(":")[0]
    return st.sampled_from(HALF + ((torch.float64,) if name in ("cpu", "reference") else ()))


def special_values(dtype):
    """Zeros, infinities, NaN, the dtype's extremes (largest, smallest normal, a subnormal, eps),
    and huge fp32 values (inf in fp16, finite in bf16). float64 takes fp32's largest value, not its
    own: sums and products of values near 1.8e308 overflow in the float64 reference as well, which
    then cannot check them (there is no wider reference)."""
    fi = torch.finfo(dtype)
    big = torch.finfo(torch.float32).max if dtype == torch.float64 else fi.max
    return [
        0.0,
        -0.0,
        INF,
        -INF,
        NAN,
        big,
        -big,
        fi.tiny,
        -fi.tiny,
        fi.tiny * fi.eps,
        fi.eps,
        1e30,
        -1e30,
        3e38,
        -3e38,
        1e4,
        -1e4,
        1 / fi.eps,
    ]


# sizes: small (0 and 1 included) most of the time, now and then one past a vector / block width
def sizes(lo=0, hi=9):
    return st.one_of(st.integers(lo, hi), st.sampled_from([16, 17, 31, 33, 64, 65]))


def leading_shapes(max_dims=2, hi=4):
    return st.lists(st.integers(0, hi), max_size=max_dims).map(tuple)


@st.composite
def tensors(draw, shape, dtype, specials=True, spreads=(1.0, 3.0, 1e-3, 100.0, 1e4)):
    """A tensor of ``shape``: ``randn * spread`` (or one constant, or small integers) in ``dtype``,
    with up to 4 elements set to special values (when ``specials`` and SPECIALS)."""
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["randn", "randn", "randn", "constant", "integers"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        t = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from(spreads))
    elif kind == "constant":
        t = torch.full(shape, draw(st.sampled_from([0.0, 1.0, -2.5, 1e3])), dtype=torch.float64)
    else:
        t = torch.randint(-3, 4, shape, generator=g).double()
    t = t.to(dtype)
    n = t.numel()
    if specials and SPECIALS and n:
        pos = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(special_values(dtype))), max_size=4))
        flat = t.view(-1)
        for i, v in pos:
            flat[i] = v
    return t


LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def layouts():
    return st.sampled_from(LAYOUTS)


def with_layout(t, kind):
    """``t``'s values in another memory layout: its last two dimensions swapped in memory, every
    other element of a twice-as-wide buffer, or a buffer one element in (misaligned)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and t.dim() >= 1:
        base = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        base[..., ::2] = t
        return base[..., ::2]
    if kind == "offset":
        base = torch.zeros(t.numel() + 1, dtype=t.dtype)
        base[1:] = t.reshape(-1)
        return base[1:].view(t.shape)
    return t


@st.composite
def masks(draw, shape, dtype, backend):
    """None; a bool ``[B, Sk]`` key-padding mask; or a 4-D mask broadcastable to ``shape``: bool, or
    additive float (any float dtype the backend takes) with -inf / finfo.min / -1e4 at excluded keys.
    The excluded fraction runs up to 1 (fully masked rows)."""
    bsz, _, _, k = shape
    form = draw(st.sampled_from(["none", "bool_keys", "bool", "float", "float"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    frac = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    if form == "none":
        return None
    if form == "bool_keys":
        return torch.rand(bsz, k, generator=g) >= frac
    mshape = tuple(draw(st.sampled_from([1, s])) for i, s in enumerate(shape))
    keep = torch.rand(mshape, generator=g) >= frac
    if form == "bool":
        return with_layout(keep, draw(layouts()))
    mdtypes = list(HALF) + ([torch.float64] if backend.partition(":")[0] != "triton" else [])
    mdtype = draw(st.sampled_from(sorted({dtype} | set(mdtypes), key=str)))
    fill = draw(st.sampled_from([float("-inf"), torch.finfo(mdtype).min, torch.finfo(torch.float32).min, -1e4]))
    values = draw(tensors(mshape, mdtype, spreads=(1.0, 3.0)))
    m = torch.where(keep, values, torch.tensor(fill, dtype=torch.float64).to(mdtype))
    return with_layout(m, draw(layouts()))


@st.composite
def labels_of(draw, shape):
    ldtype = draw(st.sampled_from(LABEL_DTYPES))
    ignore_index = draw(st.sampled_from([-100, -100, 0, 3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    frac = draw(st.sampled_from([0.0, 0.15, 0.5, 1.0]))
    labels = torch.randint(0, 8, shape, generator=g)
    labels = torch.where(torch.rand(shape, generator=g) < frac, ignore_index, labels).to(ldtype)
    return labels, ignore_index
