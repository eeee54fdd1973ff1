"""The dropout random stream every backend shares: Philox4x32-10 on a fixed element-to-counter map.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), in the form of
Triton's ``tl.randint4x``: key = (seed low 32 bits, seed high 32 bits), counter = (c low, c high, 0, 0),
four 32-bit outputs per counter. csrc/common/philox.h (C++/CUDA) and the Triton kernels implement the
same stream, so every backend drops the same elements for the same seed.

Element ``e`` (the flat index of a [rows, n] tensor) belongs to group ``g = e // 64``; within the group,
``j = e % 64`` takes output ``j // 16`` of counter ``16 g + j % 16``. A vector of 16 (or 8, 4) counters
thus yields four runs of consecutive elements, with no transposes on any SIMD width. The element is
kept when the top 24 bits of its output are ``>= threshold(p)``, and kept values are scaled by
``1 / (1 - p)`` rounded to float32.
"""

import torch

ROUNDS = 10
M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments
MASK32 = 0xFFFFFFFF
SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62)


def threshold(p):
    """24-bit keep threshold: keep iff (r >> 8) >= threshold(p)."""
    return int(p * 16777216.0 + 0.5)


def scale(p):
    """The multiplier of kept values, as float32 (all backends use this exact value)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def draw_seed(device):
    """A seed tensor ([1] int64 on ``device``) from torch's generator for that device, so that
    ``torch.manual_seed`` makes dropout reproducible (and CUDA graphs capture the draw)."""
    return torch.randint(0, SEED_HIGH, (1,), device=device, dtype=torch.int64)


def _mulhilo(a, m):
    """(high, low) 32-bit halves of a * m for int64 tensors ``a`` of uint32 values, without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    mid = a_hi * m_lo + a_lo * m_hi  # < 2^33
    t = a_lo * m_lo + ((mid & 0xFFFF) << 16)  # < 2^33
    return (a_hi * m_hi + (mid >> 16) + (t >> 32)) & MASK32, t & MASK32


def philox4x32(seed, counter):
    """The four outputs (int64 tensors of uint32 values) for int64 ``counter`` values."""
    c0, c1 = counter & MASK32, (counter >> 32) & MASK32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def random_u32(seed, numel, device="cpu"):
    """The uint32 draw (as int64) of every element ``0 .. numel-1`` of the stream."""
    e = torch.arange(numel, device=device, dtype=torch.int64)
    j = e & 63
    outs = philox4x32(int(seed), ((e >> 6) << 4) | (j & 15))
    which = j >> 4
    r = torch.zeros_like(e)
    for i, o in enumerate(outs):
        r = torch.where(which == i, o, r)
    return r


def keep_mask(seed, shape, p, device="cpu"):
    """Boolean keep mask of a tensor of ``shape`` (flattened row-major) for dropout probability p."""
    numel = 1
    for d in shape:
        numel *= d
    return ((random_u32(seed, numel, device) >> 8) >= threshold(p)).reshape(shape)
